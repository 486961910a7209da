"""Setting up a run: accelerator, tokenizer, model, optimizer, schedule, collective helpers.

Multi-device comes from accelerate with no code change: `torchrun --nproc_per_node N -m
trainers.sft CONFIG` (or `accelerate launch -m ...` on GPUs, DeepSpeed/FSDP through accelerate's
config) runs data-parallel. The global batch is fixed by the config, so the maths does not
depend on the number of processes: each process takes its slice, and losses are normalised by
global counts.
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


def check_finite(value: float, step: int, what: str, last_checkpoint: str | None) -> None:
    from .errors import NonFiniteLossError

    if not math.isfinite(value):
        where = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} is {value} at step {step}; training stopped before the update ({where}). "
            "Lower optim.lr, set optim.max_grad_norm, or check the data and rewards")


def prepare_output_dir(accelerator, train: TrainConfig, resume_dir: Path | None) -> None:
    """Refuse to start a fresh run on top of an earlier one unless told to overwrite it."""
    import shutil

    from .checkpointing import checkpoint_dirs
    from .metrics import METRICS_FILE

    out = Path(train.output_dir)
    earlier = checkpoint_dirs(out) or (out / METRICS_FILE).is_file()
    if resume_dir is None and earlier:
        if not train.overwrite_output_dir:
            raise TrainerConfigError(
                f"train.output_dir: {out} already holds a run; pass --resume to continue it, "
                "set train.overwrite_output_dir: true to start afresh, or choose another folder")
        if accelerator.is_main_process:
            for d in out.glob("checkpoint-*"):
                shutil.rmtree(d, ignore_errors=True)
            (out / METRICS_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def warn_config_changes(saved: Path, config) -> None:
    """On resume, name the fields that differ from the run's saved config."""
    import yaml

    from .config import to_dict

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    if not saved.is_file():
        return
    before = dict(flat(yaml.safe_load(saved.read_text()) or {}))
    now = dict(flat(to_dict(config)))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's in: %s",
                    ", ".join(changed))


def clip_gradients(accelerator, model, max_norm: float | None) -> float:
    """Clip gradients (if configured) and return their global norm."""
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float | None,
                   step: int, last_checkpoint: str | None) -> tuple[float, float]:
    """Clip, refuse a non-finite gradient, update, advance the schedule.

    `step` is the number of the update being taken (1-based). -> (grad_norm, lr used)
    """
    grad_norm = clip_gradients(accelerator, model, max_grad_norm)
    check_finite(grad_norm, step, "gradient norm", last_checkpoint)
    optimizer.step()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def save_or_stop(train: TrainConfig, step: int, metrics: dict, checkpoint, stop, accelerator,
                 logger, last_checkpoint: str | None) -> str | None:
    """After an update: checkpoint every `train.save_steps`; on SIGINT/SIGTERM make sure a
    checkpoint of this step exists, then raise TrainingInterrupted. -> the last checkpoint."""
    from .errors import TrainingInterrupted

    saved = train.save_steps is not None and step % train.save_steps == 0
    if saved:
        last_checkpoint = checkpoint(metrics)
    signum = stop.requested(accelerator)
    if signum:
        if not saved:
            last_checkpoint = checkpoint(metrics)
        logger.close()
        raise TrainingInterrupted(f"stopped at step {step}: checkpoint {last_checkpoint}; "
                                  "continue with --resume", signum, last_checkpoint)
    return last_checkpoint


def stop_token_ids(tokenizer, model) -> set[int]:
    """Token ids that end a completion: the tokenizer's eos and the model's generation_config
    eos (an int or a list, e.g. Qwen's `<|im_end|>` and `<|endoftext|>`)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(extra if isinstance(extra, list) else [extra])}
    return {i for i in ids if i is not None}
