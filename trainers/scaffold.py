"""The one scaffold every trainer's loop runs in: configuration checks, the accelerator, resume,
signals, checkpoints, the final save and its model card.

A trainer file keeps only its algorithm (SFT's batches, GRPO's rollouts, WPO's pairs and their
losses) and calls this module around it:

    run = Run(config, "sft", resume)          # accelerator, output folder, tokenizer; no model
    examples = ...                            # everything that can fail on user input
    run.start(max_steps, progress)            # model, optimizer, schedule; restored on resume
    with run.signals():                       # SIGINT/SIGTERM: checkpoint, then stop
        while run.step < run.max_steps:
            for k, piece in enumerate(pieces):
                with run.accumulate(last=k == len(pieces) - 1):
                    run.backward(loss_of(piece))
            run.update(loss_value)            # clip, refuse non-finite, step, schedule
            run.log(metrics)
            run.checkpoint_or_stop(metrics)
    return run.finish(metrics)                # weights, tokenizer, config, card

Pushing to the Hub happens in the CLI once the run has returned (`trainers.cli`), for every
trainer alike. Data-parallel runs (`torchrun`, `accelerate launch`) need no change: the global
batch is fixed by the config, each process takes its slice, and the losses are normalised by
global counts (the `world` factor of `backward` undoes DDP's gradient average).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from . import runtime
from .checkpointing import (
    StopSignal,
    checkpoint_dirs,
    load_training_state,
    resolve_resume,
    save_checkpoint,
    save_model,
)
from .config import to_dict
from .errors import NonFiniteLossError, TrainerConfigError, TrainingInterrupted
from .metrics import METRICS_FILE, MetricsLogger

log = logging.getLogger(__name__)


class Run:
    """One training run. Attributes the loop uses: `accelerator`, `device`, `world`, `rank`,
    `tokenizer`, `model` (prepared), `policy` (unwrapped), `step`, `max_steps`."""

    def __init__(self, config, kind: str, resume: str | None = None):
        self.config, self.kind, self.train = config, kind, config.train
        self.out = Path(self.train.output_dir)
        self.resume_dir = resolve_resume(self.out, resume)
        check_model_path(config.model.path, "model.path")
        if self.train.num_threads is not None:  # before any model exists: same maths by hand
            torch.set_num_threads(self.train.num_threads)
        self.accelerator = runtime.make_accelerator(self.train)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        self._prepare_output_dir()
        self.tokenizer = runtime.load_tokenizer(config.model)
        self.step = 0
        self.max_steps = 0
        self.last_checkpoint: str | None = str(self.resume_dir) if self.resume_dir else None
        self._progress: Callable[[int], dict] = lambda step: {}
        self._stop: StopSignal | None = None

    # ---- before the loop -------------------------------------------------------------------
    def _prepare_output_dir(self) -> None:
        """Refuse to start a fresh run on top of an earlier one unless told to overwrite it."""
        earlier = checkpoint_dirs(self.out) or (self.out / METRICS_FILE).is_file()
        if self.resume_dir is None and earlier:
            if not self.train.overwrite_output_dir:
                raise TrainerConfigError(
                    f"train.output_dir: {self.out} already holds a run; pass --resume to continue "
                    "it, set train.overwrite_output_dir: true to start afresh, or choose another "
                    "folder")
            if self.accelerator.is_main_process:
                for d in self.out.glob("checkpoint-*"):
                    shutil.rmtree(d, ignore_errors=True)
                (self.out / METRICS_FILE).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def start(self, max_steps: int, progress: Callable[[int], dict] | None = None) -> None:
        """Load the model (from the checkpoint when resuming), the optimizer and the schedule,
        hand them to accelerate, restore the training state, open the metrics log.

        `progress(step)` gives the data position recorded with each checkpoint (epoch, rows or
        prompts seen); the step alone fixes where a resumed run continues.
        """
        from accelerate.utils import set_seed

        self.max_steps = max_steps
        self._progress = progress or self._progress
        model = runtime.load_model(self.config.model, path=self.resume_dir)
        optimizer = runtime.make_optimizer(model, self.config.optim)
        self.scheduler = runtime.make_scheduler(optimizer, self.config.optim, max_steps)
        # The scheduler stays outside `prepare`: accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.policy = self.accelerator.unwrap_model(self.model)
        if self.resume_dir is not None:
            warn_config_changes(self.resume_dir / "trainer_config.yaml", self.config)
            state = load_training_state(self.resume_dir, self.accelerator, self.optimizer,
                                        self.scheduler)
            self.step = state["step"]
            log.info("resumed from %s at step %d", self.resume_dir, self.step)
        else:
            set_seed(self.train.seed, device_specific=True)  # each process samples differently
        self.logger = MetricsLogger(self.accelerator, self.out, self.kind, to_dict(self.config),
                                    max_steps, self.step, self.train.progress_bar)

    def load_reference(self):
        """The frozen starting model on this process's device (for a KL term or log-probs)."""
        return runtime.load_model(self.config.model, trainable=False).to(self.device)

    # ---- inside the loop -------------------------------------------------------------------
    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        with StopSignal() as stop:
            self._stop = stop
            try:
                yield
            finally:
                self._stop = None

    def accumulate(self, last: bool):
        """Gradients of a micro-batch: all-reduced only after the last piece of the step."""
        return nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a piece whose loss is normalised by the global batch's counts."""
        self.accelerator.backward(loss * self.world)

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (a no-op with one process)."""
        return runtime.reduce_sum(self.accelerator, values)

    def update(self, loss_value: float) -> tuple[float, float]:
        """Refuse a non-finite loss or gradient, clip, take the optimizer step and advance the
        schedule; `step` counts the update. -> (gradient norm, learning rate used)"""
        self._check_finite(loss_value, "loss")
        max_norm = self.config.optim.max_grad_norm
        if max_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        else:
            norms = [p.grad.detach().norm() for p in self.model.parameters()
                     if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self._check_finite(grad_norm, "gradient norm")
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm, lr

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            where = (f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"{what} is {value} at step {self.step + 1}; training stopped before the update "
                f"({where}). Lower optim.lr, set optim.max_grad_norm, or check the data and "
                "rewards")

    def log(self, metrics: dict) -> None:
        """Record this step's metrics (every `train.log_steps` and at the last step)."""
        if self.step % self.train.log_steps == 0 or self.step == self.max_steps:
            self.logger.log(self.step, metrics)
        self.logger.advance(self.step, metrics)

    def _state(self, metrics: dict) -> dict:
        return {"step": self.step, **self._progress(self.step), "metrics": metrics}

    def checkpoint(self, metrics: dict) -> str:
        self.last_checkpoint = str(save_checkpoint(
            self.out, self.accelerator, self.model, self.tokenizer, self.optimizer,
            self.scheduler, self.config, self._state(metrics), self.train.max_shard_size,
            self.train.save_total_limit))
        return self.last_checkpoint

    def checkpoint_or_stop(self, metrics: dict) -> None:
        """Between updates: a checkpoint every `train.save_steps`; on SIGINT/SIGTERM make sure
        one of this step exists, then stop with TrainingInterrupted."""
        saved = self.train.save_steps is not None and self.step % self.train.save_steps == 0
        if saved:
            self.checkpoint(metrics)
        signum = self._stop.requested(self.accelerator) if self._stop else 0
        if signum:
            if not saved:
                self.checkpoint(metrics)
            self.logger.close()
            raise TrainingInterrupted(f"stopped at step {self.step}: checkpoint "
                                      f"{self.last_checkpoint}; continue with --resume", signum,
                                      self.last_checkpoint)

    # ---- after the loop --------------------------------------------------------------------
    def finish(self, metrics: dict) -> Path:
        """Write the final model, tokenizer, resolved config and card; return the folder."""
        save_model(self.out, self.accelerator, self.model, self.tokenizer, self.config,
                   self._state(metrics), self.train.max_shard_size)
        self.logger.close()
        log.info("%s finished after %d steps; model written to %s", self.kind.upper(),
                 self.step, self.out)
        return self.out


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


def warn_config_changes(saved: Path, config) -> None:
    """On resume, name the fields that differ from the run's saved config."""
    import yaml

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
