"""The one scaffold every trainer's loop runs in: configuration and launch checks, the
accelerator and precision, the output folder, resume, signals, gradient accumulation, the
optimizer step, evaluation and the best checkpoint, checkpoints, the final save and its card.

A trainer file keeps only its algorithm (SFT's batches, GRPO's rollouts, WPO's pairs and their
losses) and calls this module around it:

    run = Run(config, "sft", resume)          # checks, accelerator, output folder, tokenizer
    examples = ...                            # everything that can fail on user input
    run.start(max_steps, progress)            # model, optimizer, schedule; restored on resume
    ref = run.load_reference()                # optional, after start: frozen starting policy
    with run.signals():                       # SIGINT/SIGTERM: checkpoint, then stop
        while run.step < run.max_steps:
            with models.resident(ref) as r:   # an offloaded reference: for this pass only
                ...                           # reference log-probs of the round
            for k, piece in enumerate(pieces):     # run.accumulation pieces per process
                with run.accumulate(last=k == len(pieces) - 1):
                    run.backward(loss_of(piece))
            run.update(loss_value)            # clip, refuse non-finite, step, schedule
            metrics |= run.evaluate(evaluate_fn)   # every train.eval_steps, else {}
            run.log(metrics)
            run.checkpoint_or_stop(metrics)
    return run.finish(metrics)                # weights, tokenizer, config, card

Under `dry_run()` (the commands' `--dry-run`), `start` raises `DryRunComplete` with the batch
arithmetic and a memory estimate instead of loading weights.

Data-parallel and sharded runs (`torchrun`, `accelerate launch` with DDP, FSDP, DeepSpeed)
need no change in a trainer: the global batch is fixed by the config, each process takes its
slice, accelerate accumulates `run.accumulation` micro-batches per optimizer step, and the
losses are normalised by global counts (`backward` undoes accelerate's division by the
accumulation steps and DDP's average over processes).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import headgrad, models, runtime
from .checkpointing import (
    StopSignal,
    checkpoint_dirs,
    load_training_state,
    register_hooks,
    remove_final_model,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    save_final,
)
from .config import to_dict
from .errors import NonFiniteLossError, OutOfMemory, TrainerConfigError, TrainingInterrupted
from .metrics import METRICS_FILE, MetricsLogger

log = logging.getLogger(__name__)

_DRY_RUN = contextvars.ContextVar("dry_run", default=False)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class DryRunComplete(Exception):  # noqa: N818 — not an error: the plan a dry run prints
    """Raised by `Run.start` under `dry_run()`; `report` is the text to print."""

    def __init__(self, report: str):
        super().__init__(report)
        self.report = report


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Runs started inside stop at `start` with a report instead of loading weights."""
    token = _DRY_RUN.set(True)
    try:
        yield
    finally:
        _DRY_RUN.reset(token)


class Run:
    """One training run. Attributes the loop uses: `accelerator`, `device`, `world`, `rank`,
    `accumulation` (micro-batches per process per step), `tokenizer`, `model` (prepared),
    `policy` (unwrapped), `step`, `max_steps`."""

    def __init__(self, config, kind: str, resume: str | None = None):
        self.config, self.kind, self.train = config, kind, config.train
        self.dry_run = _DRY_RUN.get()
        self.out = Path(self.train.output_dir)
        self.resume_dir = resolve_resume(self.out, resume)
        models.check_model_path(config.model.path, "model.path")
        if self.train.eval_steps and not config.data.has_eval:
            raise TrainerConfigError("train.eval_steps: there are no held-out rows; set "
                                     "data.eval_size, data.eval_split or data.eval_path")
        if config.model.lora is not None:
            models.require_peft()
            models.check_lora_targets(config.model)
        if self.train.num_threads is not None:  # before any model exists: same maths by hand
            torch.set_num_threads(self.train.num_threads)
        self.precision = runtime.resolve_precision(self.train, config.model)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accumulation = runtime.check_launch(self.train, config.model, config.optim, world)
        self.accelerator = runtime.make_accelerator(self.train, self.precision,
                                                    self.accumulation)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        self.shard = runtime.sharding(self.accelerator)
        runtime.set_cpu_malloc(self.train.cpu_malloc, self.device)
        if config.model.lm_head_grad == "deferred":
            runtime.check_deferred_head(self.world, self.shard, self.precision)
        if config.model.reference_offload and self.shard in ("fsdp", "zero3"):
            raise TrainerConfigError(f"model.reference_offload: under {self.shard} the reference "
                                     "is sharded like the policy already; remove it")
        if not self.dry_run:
            self._prepare_output_dir()
        self.tokenizer = runtime.load_tokenizer(config.model)
        self.step = 0
        self.max_steps = 0
        self.best: dict | None = None  # {"metric", "value", "step", "checkpoint"}
        self.skipped_steps = 0  # fp16 overflows
        self.head_grad: headgrad.HeadGradient | None = None  # model.lm_head_grad: deferred
        self.last_checkpoint: str | None = str(self.resume_dir) if self.resume_dir else None
        self._progress: Callable[[int], dict] = lambda step: {}
        self._stop: StopSignal | None = None
        self._plan: dict = {}
        self._best_pending = False

    # ---- before the loop -------------------------------------------------------------------
    def _prepare_output_dir(self) -> None:
        """Refuse to start a fresh run on top of an earlier one unless told to overwrite it;
        clear what a killed run left half-written."""
        earlier = checkpoint_dirs(self.out) or (self.out / METRICS_FILE).is_file()
        if self.resume_dir is None and earlier and not self.train.overwrite_output_dir:
            raise TrainerConfigError(
                f"train.output_dir: {self.out} already holds a run; pass --resume to continue "
                "it, set train.overwrite_output_dir: true to start afresh, or choose another "
                "folder")
        if self.accelerator.is_main_process:
            remove_leftovers(self.out)
            if self.resume_dir is None and earlier:
                remove_final_model(self.out)
                for d in self.out.glob("checkpoint-*"):
                    shutil.rmtree(d, ignore_errors=True)
                (self.out / METRICS_FILE).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def start(self, max_steps: int, progress: Callable[[int], dict] | None = None, *,
              micro_batches: int | None = None, plan: dict | None = None) -> None:
        """Load the model (from the checkpoint when resuming), the optimizer and the schedule,
        hand them to accelerate, restore the training state, open the metrics log.

        `progress(step)` gives the data position recorded with each checkpoint (epoch, rows or
        prompts seen); the step alone fixes where a resumed run continues. `micro_batches`:
        micro-batches per process per step when a trainer's differ from train.batch_size /
        (processes x train.micro_batch_size). `plan` describes the batch for `--dry-run` and
        the out-of-memory message: `lines` (text), `sequence_length`, `sequences_per_micro`,
        `reference` (a frozen copy is kept), `hint` (what else to lower).
        """
        from accelerate.utils import set_seed

        self.max_steps = max_steps
        self._progress = progress or self._progress
        self._plan = plan or {}
        if micro_batches is not None and micro_batches != self.accumulation:
            self.accumulation = micro_batches
            self.accelerator.gradient_accumulation_steps = micro_batches
        if self.dry_run:
            from .dryrun import report

            raise DryRunComplete(report(self))
        runtime.warn_low_precision(self.config.model, self.precision)
        model = models.load_model(self.config.model, path=self.resume_dir)
        optimizer = runtime.make_optimizer(model, self.config.optim, self.device)
        self.scheduler = runtime.make_scheduler(optimizer, self.config.optim, max_steps)
        # The scheduler stays outside `prepare` (accelerate would step it once per process);
        # it is checkpointed as a registered object.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        register_hooks(self.accelerator)
        self.policy = self.accelerator.unwrap_model(self.model)
        if self.shard is None and self.config.model.lora is None:  # after DDP has wrapped it
            models.sparse_tied_embedding_grad(self.policy)
        self.head_grad = headgrad.attach(self.policy) \
            if self.config.model.lm_head_grad == "deferred" else None
        if self.resume_dir is not None:
            warn_config_changes(self.resume_dir / "trainer_config.yaml", self.config)
            state = load_training_state(self.resume_dir, self.accelerator)
            self.step = state["step"]
            self.best = state.get("best")
            self.skipped_steps = state.get("skipped_steps", 0)
            log.info("resumed from %s at step %d", self.resume_dir, self.step)
        else:
            set_seed(self.train.seed, device_specific=True)  # each process samples differently
        self.logger = MetricsLogger(self.accelerator, self.out, self.kind, to_dict(self.config),
                                    max_steps, self.step, self.train.progress_bar)

    def load_reference(self):
        """The frozen starting policy, called like a model: with LoRA the policy with its
        adapters off (call after `start`); under FSDP / ZeRO-3 a copy sharded like the
        policy; with `model.reference_offload` one kept off the device between passes; else a
        copy on this process's device. Use it through `models.resident(ref)`. None in a dry
        run."""
        if self.dry_run:
            return None
        if self.config.model.lora is not None and not hasattr(self, "model"):
            raise RuntimeError("Run.load_reference() of a LoRA run needs the policy: call it "
                               "after Run.start()")
        return models.make_reference(self.config.model, self.accelerator,
                                     getattr(self, "model", None), getattr(self, "policy", None),
                                     self.shard)

    # ---- inside the loop -------------------------------------------------------------------
    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM become a checkpoint and a stop; running out of accelerator memory
        becomes one line that says what to lower."""
        with StopSignal() as stop:
            self._stop = stop
            try:
                yield
            except OUT_OF_MEMORY:
                raise OutOfMemory(self._oom_message()) from None
            finally:
                self._stop = None

    def _oom_message(self) -> str:
        hint = self._plan.get("hint")
        return (f"out of accelerator memory at step {self.step + 1} with "
                f"train.micro_batch_size {self.train.micro_batch_size} "
                f"({self.accumulation} micro-batches per process per step): lower "
                "train.micro_batch_size (the global batch and the maths stay the same)"
                + (f", {hint}" if hint else "") + ", or set model.gradient_checkpointing: true "
                "or model.lora; `--dry-run` estimates the memory")

    @contextlib.contextmanager
    def accumulate(self, last: bool):
        """One micro-batch's forward and backward; gradients are all-reduced (and the optimizer
        may step) only after the last of the step's `accumulation` micro-batches."""
        with self.accelerator.accumulate(self.model):
            if self.accelerator.sync_gradients != last:
                raise RuntimeError(
                    f"{self.kind}: a step must have exactly {self.accumulation} micro-batches "
                    "per process (the last with last=True); pass micro_batches= to Run.start")
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a piece whose loss is normalised by the global batch's counts."""
        self.accelerator.backward(loss * (self.world * self.accumulation))

    def my_share(self, n: int) -> tuple[list[int], int]:
        """This process's contiguous share of n items for evaluation-style loops, padded by
        repeating its first item so every process runs as many forwards (sharded models
        all-gather in each). -> (indices, how many are real)"""
        per = -(-n // self.world)
        mine = list(range(self.rank * per, min((self.rank + 1) * per, n)))
        real = len(mine)
        return mine + [mine[0] if mine else 0] * (per - real), real

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (a no-op with one process)."""
        return runtime.reduce_sum(self.accelerator, values)

    def generation(self):
        """`with run.generation() as model:` the policy with whole parameters for `generate`
        (pass `synced_gpus=run.synced` under sharding, so every process runs as many steps)."""
        return runtime.full_parameters(self.accelerator, self.model)

    @property
    def synced(self) -> bool:
        return self.shard in ("fsdp", "zero3") and self.world > 1

    def autocast(self):
        return self.accelerator.autocast()

    def update(self, loss_value: float | torch.Tensor) -> tuple[float, float]:
        """Refuse a non-finite loss or gradient (fp16: skip the overflowing update instead),
        clip, take the optimizer step and advance the schedule; `step` counts the update.
        -> (gradient norm, learning rate used)"""
        self._check_finite(float(loss_value), "loss")
        max_norm = self.config.optim.max_grad_norm
        coef = None
        if self.head_grad is not None:  # the head's gradient is formed (and applied) below
            norm, coef = self.head_grad.clip(self.model.parameters(), max_norm)
        else:  # an infinite bound measures the norm (sharded ones included) without clipping
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                    max_norm if max_norm is not None else math.inf)
        scaler = self.accelerator.scaler
        grad_norm = float(norm) if norm is not None else math.nan
        if scaler is None and norm is not None:
            self._check_finite(grad_norm, "gradient norm")
        scale = scaler.get_scale() if scaler is not None else None
        self.optimizer.step()
        if self.head_grad is not None:
            grad_norm = float(self.head_grad.step(self.optimizer, coef))
        lr = self.scheduler.get_last_lr()[0]
        # a fused optimizer takes the scaler's found-inf itself (accelerate then sees a step):
        # an overflow is also told by the lowered scale
        if self.accelerator.optimizer_step_was_skipped or \
                (scale is not None and scaler.get_scale() < scale):
            self.skipped_steps += 1
            log.warning("step %d: fp16 gradients overflowed; the update was skipped and the "
                        "loss scale lowered to %g (%d skipped so far)", self.step + 1,
                        scaler.get_scale() if scaler is not None else math.nan,
                        self.skipped_steps)
        else:
            self.scheduler.step()
        if norm is None and hasattr(self.model, "get_global_grad_norm"):  # DeepSpeed clips
            grad_norm = float(self.model.get_global_grad_norm() or 0.0)
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

    def evaluate(self, fn: Callable[[], dict]) -> dict:
        """Every `train.eval_steps` (and at the last step): `fn()`'s metrics as `eval/<key>`,
        and whether they are the best so far (`train.metric_for_best`, default the first key;
        lower is better for a name ending in "loss", as in transformers). Else {}."""
        every = self.train.eval_steps
        if not every or (self.step % every and self.step != self.max_steps):
            return {}
        metrics = {f"eval/{k}": float(v) for k, v in fn().items()}
        key = self.train.metric_for_best or next(iter(metrics))
        if key not in metrics:
            raise TrainerConfigError(f"train.metric_for_best: {key} is not measured; the "
                                     f"evaluation gives {', '.join(metrics)}")
        value, lower = metrics[key], key.endswith("loss")
        if self.best is None or (value < self.best["value"] if lower else
                                 value > self.best["value"]):
            self.best = {"metric": key, "value": value, "step": self.step, "checkpoint": None}
            self._best_pending = True
        return metrics

    def log(self, metrics: dict) -> None:
        """Record this step's metrics (every `train.log_steps`, at evaluations and at the last
        step)."""
        if self.step % self.train.log_steps == 0 or self.step == self.max_steps or \
                any(k.startswith("eval/") for k in metrics):
            self.logger.log(self.step, metrics)
        self.logger.advance(self.step, metrics)

    def _state(self, metrics: dict) -> dict:
        state = {"step": self.step, **self._progress(self.step), "metrics": metrics}
        if self.best is not None:
            state["best"] = self.best
        if self.skipped_steps:
            state["skipped_steps"] = self.skipped_steps
        return state

    def checkpoint(self, metrics: dict) -> str:
        if self._best_pending:
            self.best["checkpoint"] = f"checkpoint-{self.step}"
            self._best_pending = False
        protect = str(self.out / self.best["checkpoint"]) if self.best and \
            self.best["checkpoint"] else None
        self.last_checkpoint = str(save_checkpoint(
            self.out, self.accelerator, self.model, self.tokenizer, self.config,
            self._state(metrics), self.train.max_shard_size, self.train.save_total_limit,
            protect))
        return self.last_checkpoint

    def checkpoint_or_stop(self, metrics: dict) -> None:
        """Between updates: a checkpoint every `train.save_steps` and at a new best evaluation;
        on SIGINT/SIGTERM make sure one of this step exists, then stop with
        TrainingInterrupted."""
        saved = self.train.save_steps is not None and self.step % self.train.save_steps == 0
        if saved or self._best_pending:
            self.checkpoint(metrics)
            saved = True
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
        """Write the final model (atomically), tokenizer, resolved config and card; return the
        folder. LoRA: a PEFT adapter folder, plus `merged/` with `model.lora.merge`."""
        lora = self.config.model.lora
        save_final(self.out, self.accelerator, self.model, self.tokenizer, self.config,
                   self._state(metrics), self.train.max_shard_size,
                   merge=lora is not None and lora.merge)
        self.logger.close()
        if self.best is not None:
            log.info("best %s %.6g at step %d (%s)", self.best["metric"], self.best["value"],
                     self.best["step"], self.best["checkpoint"] or "not checkpointed")
        log.info("%s finished after %d steps; model written to %s", self.kind.upper(),
                 self.step, self.out)
        return self.out


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
