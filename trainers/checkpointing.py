"""Checkpoints that `mergekit-rl extract` reads directly and that resume a run exactly.

Layout of `output_dir/checkpoint-N/` (and of `output_dir/` itself for the final model, without
`training_state/`):

    model.safetensors | model-0000k-of-0000n.safetensors + index    save_pretrained, sharded
    config.json, generation_config.json, tokenizer files, chat template
    trainer_config.yaml       the resolved config the run used
    trainer_state.json        step, data position, last metrics
    training_state/           optimizer.pt, scheduler.pt, rng-<rank>.pt (torch, python, CUDA)

Nothing but the model is written as .safetensors, so readers that glob shards see only weights.
A checkpoint is written to `checkpoint-N.tmp` and renamed into place: a run killed while saving
leaves the previous checkpoint as the latest. Resuming restores the model (loaded from the
checkpoint), optimizer, scheduler, every process's RNG and the step; the data order is a function
of (seed, epoch), so the step alone fixes the data position.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
import threading
from pathlib import Path

import torch

from .config import save_config
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    for d in Path(output_dir).glob("checkpoint-*"):
        m = CHECKPOINT_RE.fullmatch(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """`--resume` with no value (or "latest"): the newest checkpoint in output_dir; else DIR."""
    if resume is None:
        return None
    if resume in ("", "latest", "auto"):
        dirs = checkpoint_dirs(output_dir)
        if not dirs:
            raise TrainerConfigError(f"--resume: no checkpoint-N in {output_dir} to resume from")
        return dirs[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not (path / TRAINING_STATE).is_dir():
        raise TrainerConfigError(f"--resume: {path} is not a checkpoint folder (no {STATE_FILE} "
                                f"and {TRAINING_STATE}/)")
    return path


def save_model(directory: Path, accelerator, model, tokenizer, config, state: dict,
               max_shard_size: str) -> None:
    """Weights (sharded safetensors), tokenizer, resolved config and state into `directory`."""
    state_dict = accelerator.get_state_dict(model)  # a collective under DeepSpeed/FSDP
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(
            directory, state_dict=state_dict, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(directory)
        save_config(config, directory / "trainer_config.yaml")
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        from .card import write_training_card
        from .config import to_dict

        write_training_card(directory, config, to_dict(config), state)
    accelerator.wait_for_everyone()


def save_checkpoint(output_dir: Path, accelerator, model, tokenizer, optimizer, scheduler,
                    config, state: dict, max_shard_size: str,
                    keep: int | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically; drop the oldest beyond `keep`."""
    final = Path(output_dir) / f"checkpoint-{state['step']}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / TRAINING_STATE).mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / TRAINING_STATE / f"rng-{accelerator.process_index}.pt")
    optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        torch.save(optimizer_state, tmp / TRAINING_STATE / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / TRAINING_STATE / "scheduler.pt")
    save_model(tmp, accelerator, model, tokenizer, config, state, max_shard_size)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep is not None:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written to %s", final)
    accelerator.wait_for_everyone()
    return final


def load_training_state(directory: Path, accelerator, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and this process's RNG from a checkpoint; return its state."""
    ts = Path(directory) / TRAINING_STATE
    optimizer.load_state_dict(torch.load(ts / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(ts / "scheduler.pt"))
    rng_file = ts / f"rng-{accelerator.process_index}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s missing (different number of processes?): sampling will not repeat the "
                    "uninterrupted run", rng_file)
    return json.loads((Path(directory) / STATE_FILE).read_text())


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """While active, SIGINT/SIGTERM set a flag instead of killing the process; the loop checks
    it between steps, writes a checkpoint and stops. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step with a checkpoint",
                    signal.Signals(signum).name)

    def requested(self, accelerator) -> int:
        """The signal number if any process got one (agreed across processes), else 0."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)
