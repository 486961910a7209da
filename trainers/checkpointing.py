"""Checkpoints that `mergekit-rl extract` and transformers read directly and that resume a run
exactly, sharded optimizer state included.

Layout of `output_dir/checkpoint-N/` (and of `output_dir/` itself for the final model, without
`training_state/`):

    model.safetensors | model-0000k-of-0000n.safetensors + index   gathered, save_pretrained
      (LoRA: adapter_model.safetensors + adapter_config.json, a PEFT adapter folder)
    config.json, generation_config.json, tokenizer files, chat template, README.md
    trainer_config.yaml       the resolved config the run used
    trainer_state.json        step, data position, last metrics, best checkpoint
    training_state/           accelerate's `save_state`: optimizer (sharded under FSDP /
                              DeepSpeed), scheduler, gradient scaler, every process's RNG
    merged/                   final model of a LoRA run with lora.merge: the merged weights

The weights are gathered once into safetensors; accelerate's own copy of them is skipped by a
save-state pre-hook (under FSDP and DeepSpeed accelerate also keeps its sharded model, which
`load_state` reads). A checkpoint is written to `checkpoint-N.tmp` and renamed into place, so a
run killed while saving keeps the previous checkpoint as the latest. The final model is written
to `final.tmp/` and its files moved into `output_dir` with the weights before `config.json`
and `trainer_state.json` last: a reader that finds `config.json` finds whole weights, and
`trainer_state.json` marks a complete save. Resuming loads the weights from the checkpoint and
the rest with `load_state`; the data order is a function of (seed, epoch), so the step alone
fixes the data position.
"""

from __future__ import annotations

import json
import logging
import os
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
FINAL_TMP = "final.tmp"
MERGED = "merged"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
# Moved last, in this order: what readers open first, then the mark of a complete save.
LAST = ("model.safetensors.index.json", "model.safetensors", "adapter_model.safetensors",
        "adapter_config.json", "config.json", STATE_FILE)


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


def remove_leftovers(output_dir: Path) -> None:
    """What a killed run leaves: half-written checkpoints and a half-written final model."""
    for d in Path(output_dir).glob("checkpoint-*.tmp"):
        shutil.rmtree(d, ignore_errors=True)
    for name in (FINAL_TMP, MERGED + ".tmp"):
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


def remove_final_model(output_dir: Path) -> None:
    """The final model of an earlier run in this folder (marker first, so a half-removed one
    never looks complete)."""
    out = Path(output_dir)
    (out / STATE_FILE).unlink(missing_ok=True)
    for pattern in ("*.safetensors", "*.safetensors.index.json", "config.json",
                    "generation_config.json", "adapter_config.json", "trainer_config.yaml"):
        for f in out.glob(pattern):
            f.unlink()
    shutil.rmtree(out / MERGED, ignore_errors=True)


def register_hooks(accelerator) -> None:
    """accelerate's save_state/load_state leave the weights to us (gathered safetensors)."""
    def skip_weights(models, weights, output_dir):
        weights.clear()

    def skip_models(models, input_dir):
        models.clear()  # loaded from the checkpoint's safetensors before `prepare`

    accelerator.register_save_state_pre_hook(skip_weights)
    accelerator.register_load_state_pre_hook(skip_models)


def write_model(directory: Path, accelerator, model, tokenizer, config, state: dict,
                max_shard_size: str) -> dict:
    """Weights (gathered, sharded safetensors; a PEFT adapter folder under LoRA), tokenizer,
    resolved config, state and card into `directory` (main process; a collective)."""
    state_dict = accelerator.get_state_dict(model)  # a collective under DeepSpeed/FSDP
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        state_dict = _without_tied_aliases(unwrapped, state_dict)
        unwrapped.save_pretrained(directory, state_dict=state_dict,
                                  max_shard_size=max_shard_size)
        _write_side_files(directory, tokenizer, config, state, adapter=_is_adapter(unwrapped))
    accelerator.wait_for_everyone()
    return state_dict


def _without_tied_aliases(model, state_dict: dict) -> dict:
    """A gathered state dict holds a tied matrix under both names as separate copies, which
    save_pretrained cannot recognise as shared: keep the parameter's own name only (the file
    then has the input's layout: Qwen2.5's lm_head tied to the embedding is saved once)."""
    own = {n for n, _ in model.named_parameters(remove_duplicate=True)} | \
        {n for n, _ in model.named_buffers()}
    aliases = set(model.state_dict()) - own
    return {k: v for k, v in state_dict.items() if k not in aliases}


def _is_adapter(model) -> bool:
    from .models import is_peft

    return is_peft(model)


def _write_side_files(directory: Path, tokenizer, config, state: dict, adapter: bool) -> None:
    from .card import write_training_card
    from .config import to_dict

    tokenizer.save_pretrained(directory)
    save_config(config, directory / "trainer_config.yaml")
    write_training_card(directory, config, to_dict(config), state, adapter=adapter)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def save_checkpoint(output_dir: Path, accelerator, model, tokenizer, config, state: dict,
                    max_shard_size: str, keep: int | None = None,
                    protect: str | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically; drop the oldest beyond `keep` (never
    the one named `protect`, the best so far)."""
    final = Path(output_dir) / f"checkpoint-{state['step']}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / TRAINING_STATE))  # every process: its RNG, its shards
    write_model(tmp, accelerator, model, tokenizer, config, state, max_shard_size)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep is not None:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                if str(old) != protect:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written to %s", final)
    accelerator.wait_for_everyone()
    return final


def save_final(output_dir: Path, accelerator, model, tokenizer, config, state: dict,
               max_shard_size: str, merge: bool = False) -> None:
    """The final model into `output_dir`, atomically as far as readers can tell (module
    docstring); with `merge` (LoRA) also the merged full weights in `output_dir/merged`."""
    out = Path(output_dir)
    tmp = out / FINAL_TMP
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    state_dict = write_model(tmp, accelerator, model, tokenizer, config, state, max_shard_size)
    if accelerator.is_main_process:
        remove_final_model(out)
        if merge:
            _write_merged(out, accelerator.unwrap_model(model), state_dict, tokenizer, config,
                          state, max_shard_size)
        files = sorted(p.name for p in tmp.iterdir())
        order = [n for n in files if n not in LAST] + [n for n in LAST if n in files]
        for name in order:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    accelerator.wait_for_everyone()


def _write_merged(out: Path, unwrapped, state_dict, tokenizer, config, state: dict,
                  max_shard_size: str) -> None:
    from .models import merge_adapter_state

    tmp, final = out / (MERGED + ".tmp"), out / MERGED
    shutil.rmtree(tmp, ignore_errors=True)
    merged = merge_adapter_state(state_dict, unwrapped.peft_config["default"])
    base = unwrapped.get_base_model()
    base.save_pretrained(tmp, state_dict=merged, max_shard_size=max_shard_size)
    _write_side_files(tmp, tokenizer, config, state, adapter=False)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_training_state(directory: Path, accelerator) -> dict:
    """Restore optimizer, scheduler, scaler and every process's RNG (`load_state`) from a
    checkpoint; return its trainer state."""
    accelerator.load_state(str(Path(directory) / TRAINING_STATE))
    return json.loads((Path(directory) / STATE_FILE).read_text())


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
