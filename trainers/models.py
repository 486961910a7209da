"""The weights of a run: loading the policy (with LoRA adapters through peft), checks and
estimates made on a weightless (meta-device) copy, the frozen reference, and adapter merging.

peft is imported only when `model.lora` is set. With LoRA the reference policy is the same
module with its adapters switched off, so no second copy of the model is ever made.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------
# Before any weights load

def check_model_path(spec: str, field: str) -> None:
    """A model must be there before anything loads: a missing local folder (even one shaped
    like org/name, such as runs/sft) or an unreachable Hub repo is one line naming both, instead
    of a late message about repo ids or minutes of retries."""
    from mergekit_rl.errors import HubError
    from mergekit_rl.hub import check_input

    try:
        check_input(spec)
    except HubError as e:
        raise TrainerConfigError(f"{field}: {e}") from None


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise TrainerConfigError("model.lora: LoRA needs peft, which is not installed; pip "
                                 "install 'mergekit-rl[peft]' (or peft), or remove model.lora") \
            from None


def meta_model(model: ModelConfig):
    """The architecture of `model.path` with no weights (meta device): names, shapes, counts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model.path, revision=model.revision)
    kwargs = {"attn_implementation": model.attn_implementation} \
        if model.attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model.dtype),
                                                **kwargs)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module name or its trailing components."""
    return name == target or name.endswith("." + target)


def check_lora_targets(model: ModelConfig, skeleton=None) -> None:
    """Every name in `model.lora.target_modules` must name some module of the model."""
    targets = model.lora.target_modules
    if list(targets) == ["all-linear"]:
        return
    skeleton = skeleton if skeleton is not None else meta_model(model)
    names = [n for n, _ in skeleton.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                     if isinstance(m, torch.nn.Linear)})
    for target in targets:
        if not any(_matches(n, target) for n in names):
            raise TrainerConfigError(
                f"model.lora.target_modules: {target!r} matches no module of {model.path}; "
                f"its linear layers are {', '.join(linear)} (or use [all-linear])")


def parameter_counts(skeleton, model: ModelConfig) -> tuple[int, int]:
    """(all parameters, trainable parameters) counting a tied matrix once; LoRA's trainable
    count is r·(in + out) per adapted linear layer."""
    total = sum(p.numel() for p in skeleton.parameters())  # parameters() dedups tied weights
    if model.lora is None:
        return total, total
    targets = model.lora.target_modules
    head = skeleton.get_output_embeddings()
    trainable = 0
    for name, module in skeleton.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if list(targets) == ["all-linear"] or any(_matches(name, t) for t in targets):
            trainable += model.lora.r * (module.in_features + module.out_features)
    return total, trainable


# ---------------------------------------------------------------------------------------------
# Loading

def _from_pretrained(model: ModelConfig, path, revision):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, model.dtype)}
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path), revision=revision, **kwargs)


def load_model(model: ModelConfig, path: str | Path | None = None, trainable: bool = True):
    """The causal LM at `path` (default: the config's), dropout off, frozen if not trainable.

    With `model.lora` and `trainable`, the base comes from `model.path` and the adapters from
    `path` when it is a checkpoint holding them (resume), else fresh ones (B = 0: the policy
    starts exactly at the base).
    """
    lora = model.lora if trainable else None
    adapter = Path(path) if lora is not None and path is not None else None
    base_path = model.path if lora is not None or path is None else path
    revision = model.revision if base_path == model.path else None
    lm = _from_pretrained(model, base_path, revision)
    disable_dropout(lm)
    if trainable and model.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.config.use_cache = False
        if lora is not None:
            lm.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    if lora is not None:
        lm = _with_adapters(lm, model, adapter)
    if trainable:
        lm.train()
    else:
        lm.eval()
        lm.requires_grad_(False)
    return lm


def _with_adapters(lm, model: ModelConfig, checkpoint: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None and (checkpoint / ADAPTER_CONFIG).is_file():
        return PeftModel.from_pretrained(lm, str(checkpoint), is_trainable=True)
    cfg = model.lora
    targets = cfg.target_modules
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules="all-linear" if list(targets) == ["all-linear"]
                        else list(targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(lm, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %.2f M of %.2f M parameters trainable", cfg.r,
             ", ".join(targets), trainable / 1e6, total / 1e6)
    return peft_model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make log-probs of the same tokens differ between two forwards (TRL does
    the same); the RL ratios and the reference KL assume they do not."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def sparse_tied_embedding_grad(model: torch.nn.Module) -> bool:
    """Tied input and output embeddings (Qwen2.5 ≤ 3B, the Llama 3.2s, Gemma): two full-
    vocabulary gradients fewer per micro-batch (each 150 MB at 151,936 x 256 in fp32, 0.9 GB at
    Qwen2.5-1.5B's). The input lookup gives a sparse gradient (the rows of the batch's tokens)
    instead of a dense [V, H] one, which autograd adds into the head's dense gradient, so
    `.grad` stays dense; and the chunked head (`logprobs.ChunkedLogprob`) adds its gradient into
    the accumulated `.grad` in place instead of a [V, H] buffer autograd would hold until the
    lookup's arrives. Same sums in another order: equal to rounding (tested). Call after DDP
    wraps the model (DDP reads `sparse` once, at wrapping, and would then expect a sparse
    gradient); not for sharded weights, nor for untied embeddings, whose own gradient would
    then be sparse. True if set."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, torch.nn.Embedding) or \
            head is None or getattr(head, "weight", None) is not emb.weight or \
            not emb.weight.requires_grad:
        return False
    emb.sparse = True
    emb.weight.grad_in_place = True  # read by logprobs.ChunkedLogprob
    return True


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# ---------------------------------------------------------------------------------------------
# The reference policy

class AdaptersOff:
    """The reference of a LoRA run: the policy itself with its adapters disabled, called like a
    model (`ref(input_ids=..., ...)`); no second copy of the weights."""

    def __init__(self, model, unwrapped):
        self.model, self.unwrapped = model, unwrapped

    def __call__(self, *args, **kwargs):
        with self.unwrapped.disable_adapter():
            return self.model(*args, **kwargs)

    def head_owner(self):
        return self.unwrapped


class OffloadedReference:
    """The frozen reference kept off the device between its passes (`model.reference_offload`):
    `with resident(ref) as model:` gives a model on the device for one pass.

    On an accelerator the weights wait in host memory (pinned where CUDA is there) and are
    copied in for the pass, so between passes the device holds none of them; on the CPU, where
    host memory is the device's, they are re-read from `config.path` for each pass and dropped
    after it (the page cache keeps the re-read cheap). The log-probs are the same either way.
    """

    def __init__(self, config: ModelConfig, device: torch.device):
        self.config, self.device = config, torch.device(device)
        self.model = None  # on the CPU: only inside `resident()`
        # each host weight and every (module, name) that holds it (tied weights: one entry)
        self._host: list[tuple[torch.nn.Parameter, list[tuple[torch.nn.Module, str]]]] = []
        if self.device.type != "cpu":
            model = load_model(config, trainable=False)
            pin = torch.cuda.is_available()
            seen: dict[int, int] = {}
            for module in model.modules():
                for key, param in module._parameters.items():
                    if param is None:
                        continue
                    if id(param) not in seen:
                        seen[id(param)] = len(self._host)
                        host = param.data.pin_memory() if pin else param.data
                        self._host.append((torch.nn.Parameter(host, requires_grad=False), []))
                    self._host[seen[id(param)]][1].append((module, key))
                for key, buf in module._buffers.items():  # buffers (rotary tables) are small:
                    if buf is not None:                   # they stay on the device
                        module._buffers[key] = buf.to(self.device)
            self.model = model
            self._place(lambda host: host)

    def _place(self, tensor_of) -> None:
        for host, places in self._host:
            param = tensor_of(host)
            for module, key in places:
                module._parameters[key] = param

    @contextlib.contextmanager
    def resident(self, generate: bool = False) -> Iterator[torch.nn.Module]:
        """`generate`: the pass generates (a streamed vocabulary serves log-prob passes only)."""
        if self.device.type == "cpu":
            streamed = None if generate else StreamedVocabulary.load(self.config)
            self.model = streamed.model if streamed else load_model(self.config, trainable=False)
            try:
                yield self.model
            finally:  # weights freed now, even where the caller's name still holds the model
                if streamed:
                    streamed.close()
                self.model.to("meta")
                self.model = None
                gc.collect()
            return
        self._place(lambda host: torch.nn.Parameter(host.to(self.device, non_blocking=True),
                                                    requires_grad=False))
        try:
            yield self.model
        finally:
            self._place(lambda host: host)  # the device copies are freed


class StreamedVocabulary:
    """A frozen model for CPU passes whose vocabulary matrices stay in its safetensors files:
    the input embedding reads the rows of the batch's tokens, and the LM head (run chunked,
    `logprobs.ChunkedLogprob`) reads each tile's block of rows into one reused buffer; every
    other weight is read in. At a real vocabulary these matrices are most of a small model
    (151,936 x 256 is 39 M of 43 M parameters), so an offloaded reference's pass holds a few MB
    of them instead of a copy. The log-probs are the same to the bit: the same values in the
    same tiles. `load` gives None where this does not apply (a Hub id, `.bin` weights, a scaled
    or biased embedding or head, names the file does not hold); the caller loads the whole
    model then."""

    def __init__(self, model, checkpoint):
        self.model, self.checkpoint = model, checkpoint

    @classmethod
    def load(cls, config: ModelConfig) -> StreamedVocabulary | None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from mergekit_rl.checkpoint import Checkpoint
        from mergekit_rl.errors import CheckpointError

        from .logprobs import output_head

        path = Path(config.path)
        if not path.is_dir():
            return None
        try:
            ckpt = Checkpoint.open(path)
        except CheckpointError:
            return None
        if any(f.suffix != ".safetensors" for f in ckpt.files):
            ckpt.close()
            return None
        kwargs = {"attn_implementation": config.attn_implementation} \
            if config.attn_implementation else {}
        with init_empty_weights(include_buffers=False):  # rotary tables are computed, real
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path),
                                                  dtype=getattr(torch, config.dtype), **kwargs)
        lm.tie_weights()  # inside init_empty_weights the tie made a second meta matrix
        emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        names = {id(p): n for n, p in lm.named_parameters()}  # a tied matrix: its first name
        vocab = {id(emb.weight), id(head.weight)} if type(emb) is torch.nn.Embedding else set()
        if not vocab or output_head(lm) is not head or head.bias is not None or any(
                names[id(p)] not in ckpt or ckpt.tensors[names[id(p)]].shape != tuple(p.shape)
                for p in lm.parameters()):
            ckpt.close()
            return None
        loaded: dict[int, torch.nn.Parameter] = {}
        for module in lm.modules():
            for key, p in module._parameters.items():
                if p is None or id(p) in vocab:
                    continue
                if id(p) not in loaded:
                    t = ckpt.read(names[id(p)]).to(p.dtype)
                    loaded[id(p)] = torch.nn.Parameter(t, requires_grad=False)
                module._parameters[key] = loaded[id(p)]
        emb.forward = _row_lookup(ckpt, names[id(emb.weight)], emb.weight.dtype)
        head.streamed_rows = _row_blocks(ckpt, names[id(head.weight)], head.weight.dtype)
        disable_dropout(lm)
        lm.eval()
        lm.requires_grad_(False)
        return cls(lm, ckpt)

    def close(self) -> None:
        self.checkpoint.close()


def _row_lookup(ckpt, name: str, dtype: torch.dtype):
    """`embedding(ids)` reading only the rows of the ids present from the file."""
    width = ckpt.tensors[name].shape[1]

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.empty(len(unique), width, dtype=dtype)
        for k, i in enumerate(unique.tolist()):
            ckpt.read_into(name, (i, i + 1), rows[k])
        return rows[inverse]

    return lookup


def _row_blocks(ckpt, name: str, dtype: torch.dtype):
    """`rows(lo, hi)` -> the matrix's rows lo .. hi, read into one buffer reused by every call
    (each tile's logits are made before the next block is read)."""
    width = ckpt.tensors[name].shape[1]
    buffer = [torch.empty(0, dtype=dtype)]

    def rows(lo: int, hi: int) -> torch.Tensor:
        n = (hi - lo) * width
        if buffer[0].numel() < n:
            buffer[0] = torch.empty(n, dtype=dtype)
        ckpt.read_into(name, (lo, hi), buffer[0])
        return buffer[0][:n].view(hi - lo, width)

    return rows


@contextlib.contextmanager
def resident(ref, generate: bool = False) -> Iterator:
    """The reference on its device for one pass (`generate`: one that generates): an offloaded
    one is moved or read in for the block; any other (a resident copy, adapters off, a sharded
    copy, None) is itself."""
    if isinstance(ref, OffloadedReference):
        with ref.resident(generate) as model:
            yield model
    else:
        yield ref


def make_reference(config: ModelConfig, accelerator, policy, unwrapped, shard: str | None):
    """The frozen starting model for log-probs: adapters off under LoRA; under FSDP/ZeRO-3 a
    copy sharded like the policy (each process holds its share); with `reference_offload` one
    kept off the device between passes; else a copy on the device. Use it through
    `resident(ref)`."""
    if config.lora is not None:
        return AdaptersOff(policy, unwrapped)
    if config.reference_offload:  # Run refuses it with fsdp / zero3 before anything loads
        return OffloadedReference(config, accelerator.device)
    ref = load_model(config, trainable=False)
    if shard == "fsdp":
        return _fully_shard(ref, accelerator)
    if shard == "zero3":
        return _zero3_inference(ref, accelerator)
    return ref.to(accelerator.device)


def _fully_shard(ref, accelerator):
    """FSDP2 over each decoder layer and the root (the root holds the LM head, so it is whole
    while the head runs)."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(ref, "_no_split_modules", None) or [])
    ref.to(accelerator.device)
    for module in ref.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(ref)
    return ref


def _zero3_inference(ref, accelerator):
    """A ZeRO-3 inference engine from the run's DeepSpeed config without its optimizer (as TRL's
    prepare_deepspeed does)."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------------
# Adapters out

@torch.no_grad()
def policy_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every weight the engine needs: each parameter, a tied matrix
    under each of its names; for a peft LoRA model, each adapted layer's merged weight
    W + ΔW (ΔW = peft's `get_delta_weight`: (alpha/r)·B·A), computed in float32 beside the
    policy, whose own weights stay untouched (merging in place and unmerging would round the
    frozen base weights at each sync, badly so in bfloat16)."""
    if not is_peft(policy):
        yield from policy.named_parameters(remove_duplicate=False)
        return
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters(remove_duplicate=False):
        if "modules_to_save" in name or "original_module" in name:
            raise TrainerConfigError("model.lora: layers trained in full (modules_to_save) are "
                                     "not synced into vLLM; leave them out or set backend: hf")
        if ".lora_" in name:  # lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            owner = owner[:-len(".base_layer")]
            if leaf == "weight" and owner in layers:
                param = _merged(layers[owner], param, owner)
            name = f"{owner}.{leaf}"
        yield name, param


def _merged(layer, weight: torch.Tensor, name: str) -> torch.Tensor:
    if layer.merged or layer.disable_adapters:  # already in the weight, or switched off
        return weight
    merged = weight.float()
    for adapter in layer.active_adapters:
        if adapter not in layer.scaling:
            continue
        if layer.use_dora.get(adapter, False):
            raise TrainerConfigError(f"model.lora: {name} uses DoRA, whose merged weight is not "
                                     "synced into vLLM; use plain LoRA or set backend: hf")
        merged = merged + layer.get_delta_weight(adapter).float()
    return merged



def merge_adapter_state(state: dict[str, torch.Tensor], peft_config) -> dict[str, torch.Tensor]:
    """Full weights from a PeftModel's state dict: W + (alpha/r)·B·A for each adapted linear
    layer (https://arxiv.org/abs/2106.09685 eq. 3), base names restored, adapters dropped."""
    scaling = peft_config.lora_alpha / peft_config.r
    if getattr(peft_config, "use_rslora", False):
        scaling = peft_config.lora_alpha / peft_config.r ** 0.5
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in name:
            module = key.rsplit(".base_layer.", 1)[0]
            a = state.get(f"{module}.lora_A.default.weight")
            b = state.get(f"{module}.lora_B.default.weight")
            name = name.replace(".base_layer.", ".")
            if a is not None and b is not None and name.endswith(".weight"):
                delta = scaling * (b.float() @ a.float())
                value = (value.float() + delta).to(value.dtype)
        merged[name] = value
    return merged
