"""The parts a run is built from: precision, the launch checks, the accelerator, optimizer,
schedule, the collective helpers and full parameters for generation (`scaffold.Run` puts them
together; `models` loads the weights).

Multi-device comes from accelerate: `torchrun --nproc_per_node N -m trainers train sft CONFIG`
on CPUs or GPUs, or `accelerate launch --config_file manifests/accelerate/fsdp.yaml -m trainers
train sft CONFIG` for DDP, FSDP or DeepSpeed. The global batch is fixed by the config, so the
maths does not depend on the number of processes: each process takes its slice, gradient
accumulation goes through accelerate (one optimizer / DeepSpeed step per optimizer step), and
losses are normalised by global counts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator

import torch

from .config import ModelConfig, OptimConfig, TrainConfig
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                   "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "aim": ("aim",),
                   "clearml": ("clearml",), "dvclive": ("dvclive",), "trackio": ("trackio",)}
# Test-only: run accelerate's FSDP2 path over gloo on a CPU machine (accelerate itself only
# offers FSDP on accelerators; torch's fully_shard works on CPU).
CPU_FSDP2_ENV = "MERGEKIT_RL_TEST_CPU_FSDP2"


def _installed(modules: tuple[str, ...]) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in modules)


def resolve_trackers(names: tuple[str, ...]) -> list[str]:
    """accelerate tracker names; "auto" is tensorboard when installed, "none" is nothing."""
    out: list[str] = []
    for name in names:
        if name == "auto":
            if _installed(TRACKER_MODULES["tensorboard"]):
                out.append("tensorboard")
        elif name != "none":
            if not _installed(TRACKER_MODULES[name]):
                raise TrainerConfigError(f"train.report_to: {name} is not installed "
                                         f"(pip install {name}) ; or remove it")
            out.append(name)
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------
# Precision

def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
CPU_MALLOC = {
    # glibc's defaults, kept fixed: blocks over 256 KiB are mapped and given back on free
    "bounded": {M_MMAP_THRESHOLD: 256 * 1024, M_TRIM_THRESHOLD: 128 * 1024,
                M_TOP_PAD: 128 * 1024},
    # glibc's ceiling (32 MiB on 64-bit), and a heap whose top is neither trimmed nor regrown
    # page by page: a freed block is reused without new page faults
    "cached": {M_MMAP_THRESHOLD: 32 * 1024 * 1024, M_TRIM_THRESHOLD: 1024 ** 3,
               M_TOP_PAD: 64 * 1024 * 1024},
}


def set_cpu_malloc(mode: str, device: torch.device | None = None) -> bool:
    """Work on the CPU: tune glibc's allocator for the run (`train.cpu_malloc`).

    `bounded` fixes the mmap threshold at glibc's 256 KiB default. glibc otherwise raises it to
    the size of each large block freed (up to 32 MiB), after which the per-step gradients and
    activations of 1-32 MiB come from the heap, whose freed holes are not given back: the
    resident size creeps up by hundreds of MB over the first steps (150 MB of peak at a
    151,936-token vocabulary; `benchmarks/trainer_bench.py`). The price is a page fault per
    page of every large block allocated, and a heap top given back and refaulted as it moves.
    `cached` keeps blocks up to 32 MiB in a heap that is not trimmed: for small models, whose
    steps allocate thousands of such blocks, that is half the step time spent in the kernel
    saved (the demo's GRPO steps: 1.8x as fast), at the price of the high-water mark staying
    resident. Left alone when the user tunes malloc (`MALLOC_ENV`, or glibc.malloc tunables),
    off glibc, or on an accelerator. True if set."""
    import ctypes
    import ctypes.util
    import platform

    if (device is not None and device.type != "cpu") or platform.libc_ver()[0] != "glibc" or \
            any(k in os.environ for k in MALLOC_ENV) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return all([bool(libc.mallopt(param, value)) for param, value in CPU_MALLOC[mode].items()])


def resolve_precision(train: TrainConfig, model: ModelConfig) -> str:
    """accelerate's mixed_precision for this run. `auto`: bf16 autocast over fp32 weights on a
    GPU that has bf16, nothing on the CPU (so CPU runs compute exactly in fp32); an `accelerate
    launch` config that asks for bf16/fp16 is followed."""
    choice = train.mixed_precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if choice == "auto":
        if launched in ("bf16", "fp16"):
            choice = launched
        elif model.dtype == "float32" and torch.cuda.is_available() and \
                torch.cuda.is_bf16_supported():
            choice = "bf16"
        else:
            choice = "no"
    elif launched in ("bf16", "fp16") and launched != choice:
        raise TrainerConfigError(
            f"train.mixed_precision: {choice}, but the accelerate config asks for {launched}; "
            "make them agree (or set train.mixed_precision: auto to follow accelerate)")
    if choice == "fp16":
        if not has_accelerator():
            raise TrainerConfigError("train.mixed_precision: fp16 needs a GPU (there is no CPU "
                                     "fp16 autocast); use auto or bf16")
        if model.dtype != "float32":
            raise TrainerConfigError(
                f"train.mixed_precision: fp16 scales gradients of fp32 master weights, but "
                f"model.dtype is {model.dtype}; set model.dtype: float32")
    return choice


def warn_low_precision(model: ModelConfig, precision: str) -> None:
    """bf16/fp16 master weights lose updates below their resolution (bf16 keeps 8 bits: a step
    smaller than ~1/256 of a weight rounds to nothing at lr 1e-6); say so unless opted in."""
    if model.dtype == "float32" or model.allow_low_precision_weights or model.lora is not None:
        return  # LoRA's adapters are created in fp32 by peft whatever the base dtype
    bits = {"bfloat16": 8, "float16": 11}[model.dtype]
    log.warning("model.dtype %s: the optimizer updates %s master weights, whose %d-bit "
                "mantissa rounds away any update below ~2^-%d of a weight (most updates at "
                "lr 1e-6). Use model.dtype: float32 with train.mixed_precision: %s, or set "
                "model.allow_low_precision_weights: true if this is intended", model.dtype,
                model.dtype, bits, bits, "bf16" if precision == "no" else precision)


# ---------------------------------------------------------------------------------------------
# The launch

def _deepspeed_config() -> dict:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        return {}
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise TrainerConfigError(f"accelerate config deepspeed_config_file: cannot read {path} "
                                 f"({e})") from None


def check_launch(train: TrainConfig, model: ModelConfig, optim: OptimConfig, world: int
                 ) -> int:
    """What the launcher asks for must be something the trainer honours; every mismatch is one
    error naming the field and the remedy, before any weights load. -> accumulation steps."""
    accumulation = train.accumulation_steps(world)
    env = os.environ
    asked = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if asked not in (None, "", "1", str(accumulation)):
        raise TrainerConfigError(
            f"accelerate config gradient_accumulation_steps: {asked}, but the trainer "
            f"accumulates train.batch_size / (processes x train.micro_batch_size) = "
            f"{train.batch_size} / ({world} x {train.micro_batch_size}) = {accumulation} "
            "micro-batches; remove it from the accelerate config and size the batch in the "
            "trainer config")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if not _installed(("deepspeed",)):
            raise TrainerConfigError("accelerate config use DeepSpeed: deepspeed is not "
                                     "installed (pip install deepspeed)")
        ds = _deepspeed_config()
        for section in ("optimizer", "scheduler"):
            if section in ds:
                raise TrainerConfigError(
                    f"deepspeed config {section}: the trainer builds its own (optim.*); remove "
                    f"the {section!r} section from {env['ACCELERATE_DEEPSPEED_CONFIG_FILE']}")
        for key, ours in (("gradient_accumulation_steps", accumulation),
                          ("train_micro_batch_size_per_gpu", train.micro_batch_size),
                          ("gradient_clipping", optim.max_grad_norm)):
            value = ds.get(key, "auto")
            if value != "auto" and value != ours:
                raise TrainerConfigError(
                    f"deepspeed config {key}: {value}, but the trainer config gives {ours}; "
                    f"set it to \"auto\" in {env['ACCELERATE_DEEPSPEED_CONFIG_FILE']}")
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" and \
                env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false") != "true" and \
                not ds.get("zero_optimization", {}).get(
                    "stage3_gather_16bit_weights_on_model_save"):
            raise TrainerConfigError(
                "accelerate config zero3_save_16bit_model: false, but ZeRO-3 can hand the "
                "trainer whole weights to save only with it; set zero3_save_16bit_model: true")
        clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "none")
        if clip not in ("none", "") and optim.max_grad_norm is not None and \
                float(clip) != optim.max_grad_norm:
            raise TrainerConfigError(
                f"accelerate config gradient_clipping: {clip}, but optim.max_grad_norm is "
                f"{optim.max_grad_norm}; remove it from the accelerate config")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = env.get("FSDP_VERSION", "1")
        if version == "1" and model.lora is not None and \
                env.get("FSDP_USE_ORIG_PARAMS", "true").lower() != "true":
            raise TrainerConfigError("accelerate config fsdp_use_orig_params: false cannot train "
                                     "LoRA (frozen and trainable weights in one flat "
                                     "parameter); set it to true, or use fsdp_version: 2")
        if not has_accelerator():
            raise TrainerConfigError("accelerate config distributed_type FSDP: accelerate runs "
                                     "FSDP on GPUs only; launch with torchrun (DDP) on a CPU")
    return accumulation


def make_accelerator(train: TrainConfig, precision: str, accumulation: int):
    """An Accelerator that accumulates `accumulation` micro-batches per optimizer step, in the
    resolved precision, with the configured trackers."""
    from accelerate import Accelerator

    trackers = resolve_trackers(train.report_to)
    # accelerate forms a gloo group under torchrun only when told `cpu=True`; without it a
    # CPU-only machine runs N unrelated single processes.
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator()
    accelerator = Accelerator(mixed_precision=precision, log_with=trackers or None,
                              project_dir=train.output_dir, cpu=cpu_group,
                              gradient_accumulation_steps=accumulation)
    # The environment (accelerate launch) would override the argument: the config decides.
    accelerator.gradient_accumulation_steps = accumulation
    if os.environ.get(CPU_FSDP2_ENV) == "1" and accelerator.num_processes > 1:
        _force_cpu_fsdp2(accelerator)
    return accelerator


def _force_cpu_fsdp2(accelerator) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            state_dict_type="SHARDED_STATE_DICT")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def sharding(accelerator) -> str | None:
    """"fsdp", "zero3", "zero" (stage 1/2: parameters whole) or None."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return "zero3" if stage == 3 else "zero"
    return None


def load_model(*args, **kwargs):
    """Moved to `trainers.models.load_model` (kept for callers of the old name)."""
    from .models import load_model as load

    return load(*args, **kwargs)


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer or model.path,
                                              revision=model.revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs


def check_deferred_head(world: int, shard: str | None, precision: str) -> None:
    """`model.lm_head_grad: deferred` forms the head's gradient in one process from whole
    weights (`headgrad`), and fp16's loss scaler never sees it."""
    where = {"fsdp": "FSDP", "zero": "DeepSpeed ZeRO", "zero3": "DeepSpeed ZeRO-3"}.get(shard) \
        or (f"{world} processes" if world > 1 else None)
    if where:
        raise TrainerConfigError(f"model.lm_head_grad: deferred runs in one process with whole "
                                 f"weights, not under {where}; set lm_head_grad: dense")
    if precision == "fp16":
        raise TrainerConfigError("model.lm_head_grad: deferred with train.mixed_precision fp16: "
                                 "the loss scaler cannot check the head's gradient; use bf16 "
                                 "or set lm_head_grad: dense")


def make_optimizer(model: torch.nn.Module, optim: OptimConfig,
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; no weight decay on biases and norm weights (1-D).

    Fused (`optim.fused`, default where torch has the kernel): the update is one pass per
    tensor, so the step makes no full-size temporaries (the per-tensor loop holds a copy of
    the largest tensor's √v, 150 MB for a 151,936 x 256 embedding); same maths to rounding.
    `device`: where the weights will train (accelerate moves them after this), default theirs."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    supported = bool(params) and all(
        (device or p.device).type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if optim.fused and not supported:
        raise TrainerConfigError("optim.fused: torch's fused AdamW needs floating-point weights "
                                 f"on {' or '.join(FUSED_DEVICES)}; set optim.fused: null")
    fused = supported if optim.fused is None else optim.fused
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)
    name = "constant_with_warmup" if optim.scheduler == "constant" else optim.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    return train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# Collectives and generation

def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (a no-op with one process)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum")


@contextlib.contextmanager
def full_parameters(accelerator, model) -> Iterator[torch.nn.Module]:
    """The module to call `generate` on, with whole parameters for the duration: ZeRO-3's are
    gathered once (not per layer and token); FSDP2 keeps each layer unsharded after its first
    forward, then reshards; FSDP1 summons the root's; otherwise the unwrapped module."""
    unwrapped = accelerator.unwrap_model(model)
    kind = sharding(accelerator)
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield unwrapped
    elif kind == "fsdp" and hasattr(unwrapped, "set_reshard_after_forward"):
        unwrapped.set_reshard_after_forward(False, recurse=True)
        try:
            yield unwrapped
        finally:
            unwrapped.set_reshard_after_forward(True, recurse=True)
            for module in unwrapped.modules():
                if hasattr(module, "reshard"):
                    module.reshard()
    elif kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield unwrapped
    else:
        yield unwrapped
