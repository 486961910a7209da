"""The parts a run is built from: accelerator, tokenizer, model, optimizer, schedule, collective
helpers (`scaffold.Run` puts them together).

Multi-device comes from accelerate with no code change: `torchrun --nproc_per_node N -m
trainers train sft CONFIG` (or `accelerate launch -m trainers ...` on GPUs, DeepSpeed/FSDP
through accelerate's config) runs data-parallel. The global batch is fixed by the config, so
the maths does not depend on the number of processes: each process takes its slice, and losses
are normalised by global counts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import torch

from .config import ModelConfig, OptimConfig, TrainConfig
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                   "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "aim": ("aim",),
                   "clearml": ("clearml",), "dvclive": ("dvclive",), "trackio": ("trackio",)}


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


def make_accelerator(train: TrainConfig):
    """An Accelerator with our own gradient accumulation (the loop normalises by global counts,
    so accelerate must not rescale the loss) and the configured trackers."""
    from accelerate import Accelerator

    trackers = resolve_trackers(train.report_to)
    # accelerate forms a gloo group under torchrun only when told `cpu=True`; without it a
    # CPU-only machine runs N unrelated single processes.
    accelerators = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not accelerators
    return Accelerator(mixed_precision=train.mixed_precision, log_with=trackers or None,
                       project_dir=train.output_dir, cpu=cpu_group)


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer or model.path,
                                              revision=model.revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: ModelConfig, path: str | Path | None = None, trainable: bool = True):
    """The causal LM at `path` (default: the config's), dropout off, frozen if not trainable."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, model.dtype)}
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    revision = model.revision if path is None else None
    lm = AutoModelForCausalLM.from_pretrained(str(path or model.path), revision=revision, **kwargs)
    disable_dropout(lm)
    if trainable:
        if model.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
            lm.config.use_cache = False
        lm.train()
    else:
        lm.eval()
        lm.requires_grad_(False)
    return lm


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout would make log-probs of the same tokens differ between two forwards (TRL does
    the same); the RL ratios and the reference KL assume they do not."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)
    name = "constant_with_warmup" if optim.scheduler == "constant" else optim.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    return train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))


def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (a no-op with one process)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum")
