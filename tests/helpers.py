"""Test helpers: an independent reference reader and a directory fingerprint.

`load_state` deliberately uses `safetensors.torch.load_file` rather than the project's own
reader, so tests compare the tool against something it does not share code with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Fingerprint every file under `path`: relative path -> (sha256 hex, mtime_ns).

    Compare two snapshots taken before and after an operation to prove it left inputs alone.
    """
    root = Path(path)
    result = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        result[file.relative_to(root).as_posix()] = (digest, file.stat().st_mtime_ns)
    return result


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index if it has one."""
    root = Path(path)
    if (root / INDEX_NAME).is_file():
        weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    raise FileNotFoundError(f"no {INDEX_NAME} or {SINGLE_NAME} in {root}")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded with an index)."""
    state: dict[str, torch.Tensor] = {}
    root = Path(path)
    weight_map = None
    if (root / INDEX_NAME).is_file():
        weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
    for file in shard_files(root):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            if name in state:
                raise ValueError(f"tensor {name} appears in more than one shard of {root}")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise ValueError(f"tensor {name} is in {file.name} but the index says otherwise")
            state[name] = tensor
    if weight_map is not None and set(weight_map) != set(state):
        raise ValueError(f"index of {root} and its shards list different tensors")
    return state


def assert_failed(result, out: Path, inputs: dict[Path, dict], *needles: str) -> None:
    """A user mistake: exit 1, one line `Error: ...` holding every needle, no traceback, no
    output and no temporary or leftover folder beside it, every input byte-identical.

    `inputs` maps each input folder to its `snapshot` taken before the command."""
    assert one_line_error(result, *needles).startswith("Error: "), result.output
    out = Path(out)
    assert not out.exists(), f"{out} was written"
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.glob(f".{out.name}.*"))
    for folder, before in inputs.items():
        assert snapshot(folder) == before, f"{folder} changed"


def cli(*args, ok: bool = True):
    """Run `mergekit-rl ARGS...` in-process; with `ok`, assert it exited 0."""
    from click.testing import CliRunner

    from mergekit_rl.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, *words: str) -> str:
    """Assert a user mistake's outcome: exit 1, one line, no traceback, naming every word."""
    assert result.exit_code == 1, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def worker_dies(ctx) -> None:
    """A demo job whose worker process is killed (as the system's OOM killer would)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def worker_sleeps(ctx) -> None:
    """A demo job that would run for a long time."""
    import time

    time.sleep(120)


def worker_keeps_running_on_sigterm(ctx) -> None:
    """A demo job that, as a trainer does, takes SIGTERM as "checkpoint, then stop" and goes on
    meanwhile (here: for two minutes); it says it is ready in OUT/handler_set."""
    import signal
    import time

    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    (ctx.out / "handler_set").write_text("1")
    time.sleep(120)


def worker_fails_once_the_other_runs(ctx) -> None:
    """A demo job with a user error, raised once `worker_keeps_running_on_sigterm` is ready."""
    import time

    from mergekit_rl.errors import ConfigError

    for _ in range(600):
        if (ctx.out / "handler_set").exists():
            break
        time.sleep(0.05)
    raise ConfigError("bad stage: fix its config")


def worker_locks(ctx) -> str:
    """A demo job that makes a multiprocessing lock in its worker, as tqdm does for its bars (the
    resource tracker warns at exit about any a terminated worker left)."""
    import multiprocessing

    worker_locks.lock = multiprocessing.RLock()
    return "locked"
