"""Faults around the output folder: a full disk, a read-only or unwritable place, SIGKILL and
SIGTERM at chosen moments, `--overwrite` killed while it swaps or removes. Each case checks the
exit code, the one-line message, that no output or temporary folder remains (or, after a kill,
that the next run cleans it), and that inputs are byte-identical."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_failed, load_state, snapshot

from mergekit_rl import output
from mergekit_rl.cli import main

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_bytes, name) -> a fresh tmpfs folder (skipped where mounting is not allowed)."""
    mounted = []

    def mount(size: int, name: str = "fs", read_only: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture
def pair(tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    return m["grpo"], m["sft"], {m["grpo"]: snapshot(m["grpo"]), m["sft"]: snapshot(m["sft"])}


# ---- full disk, read-only, unwritable ----------------------------------------------------------

def test_full_disk_is_refused_before_reading(tmpfs, pair, monkeypatch):
    ft, base, before = pair
    fs = tmpfs(64 * 1024)  # the vector needs 0.15 MB
    from mergekit_rl.checkpoint import Checkpoint

    real, read = Checkpoint.read, []

    def spy(self, name, *a, **k):
        read.append(self.tensors[name].shape)
        return real(self, name, *a, **k)

    monkeypatch.setattr(Checkpoint, "read", spy)
    out = fs / "vec"
    r = cli("extract", ft, base, "-o", out, ok=False)
    assert_failed(r, out, before, f"cannot write output {out}", "free; free some space")
    assert all(len(shape) == 1 for shape in read)  # at most the few norm weights `folder_kind` reads


def test_disk_filling_up_midway_names_the_output(tmpfs, pair, monkeypatch):
    # The kernel's own ENOSPC, from a tmpfs that fills while the shards are written (the
    # up-front check is switched off to get there).
    ft, base, before = pair
    fs = tmpfs(64 * 1024)
    monkeypatch.setattr(output, "check_space", lambda out, nbytes: None)
    out = fs / "vec"
    r = cli("extract", ft, base, "-o", out, ok=False)
    assert_failed(r, out, before, f"cannot write output {out}", "No space left on device")
    assert not list(fs.iterdir())  # the temporary folder is gone: the disk is free again


def test_injected_enospc_mid_write(tmp_path, pair, monkeypatch):
    ft, base, before = pair
    real = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "vec"
    r = cli("extract", ft, base, "-o", out, ok=False)
    assert_failed(r, out, before, f"cannot write output {out} (model.safetensors): No space left "
                  "on device; nothing was written")


def test_read_only_output_place(tmpfs, pair):
    ft, base, before = pair
    fs = tmpfs(1 << 20, read_only=True)
    out = fs / "vec"
    r = cli("extract", ft, base, "-o", out, ok=False)
    assert_failed(r, out, before, f"cannot write output {out}: {fs} is not writable "
                  "(read-only file system)")


def test_unwritable_output_place(tmp_path, pair, monkeypatch):
    # As root every folder is writable, so the refusal is injected where the OS would say no.
    ft, base, before = pair
    (tmp_path / "locked").mkdir()
    out = tmp_path / "locked" / "vec"
    real = os.access
    monkeypatch.setattr(output.os, "access", lambda p, mode: False if Path(p) == out.parent
                        else real(p, mode))
    r = cli("extract", ft, base, "-o", out, ok=False)
    assert_failed(r, out, before, f"cannot write output {out}: {out.parent} is not writable "
                  "(permission denied)")


def test_permission_error_inside_the_output_names_the_file(tmp_path, pair, monkeypatch):
    ft, base, before = pair
    import shutil

    real = shutil.copyfile

    def copyfile(src, dst, **kw):
        if Path(dst).name == "config.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    out = tmp_path / "vec"
    r = cli("extract", ft, base, "-o", out, ok=False)
    assert_failed(r, out, before, f"cannot write output {out} (config.json): Permission denied")


def test_failed_overwrite_keeps_the_old_output_whole(tmp_path, pair, monkeypatch):
    ft, base, before = pair
    out = tmp_path / "vec"
    cli("extract", ft, base, "-o", out, "-q", "--exclude", "mlp")
    old = snapshot(out)
    real = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    r = cli("extract", ft, base, "-o", out, "--overwrite", ok=False)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "No space left" in r.output
    assert snapshot(out) == old and not leftovers(out)
    monkeypatch.setattr(os, "pwrite", real)
    cli("extract", ft, base, "-o", out, "--overwrite", "-q")
    assert "model.layers.0.mlp.up_proj.weight" in load_state(out) and not leftovers(out)
    assert all(snapshot(p) == s for p, s in before.items())


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not output._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (fallback path is tested)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ---- killed runs -------------------------------------------------------------------------------

# Runs the CLI in a child that stops at a chosen moment (writes MARKER, then sleeps) so the test
# can kill it exactly there.
HARNESS = r"""
import os, sys, time
from pathlib import Path

phase, marker = sys.argv[1], Path(sys.argv[2])

def reached():
    marker.write_text(phase)
    time.sleep(120)

from mergekit_rl import job, output
from mergekit_rl.maths import task_vectors

if phase == "writing":  # in the compute thread, after a few tensors went to the writer
    original, calls = task_vectors.task_vector, []
    def task_vector(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            reached()
        return original(*a, **k)
    task_vectors.task_vector = task_vector
elif phase == "side-files":
    copy = job.copy_side_files
    def copy_side_files(*a, **k):
        copy(*a, **k)
        reached()
    job.copy_side_files = copy_side_files
elif phase == "removing-old":
    def remove_tree(path):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        files[0].unlink()
        reached()
    output._remove_tree = remove_tree
elif phase == "between-renames":
    output._exchange = lambda a, b: False
    rename = os.rename
    def renamed(a, b):
        rename(a, b)
        if ".old-" in str(b):
            reached()
    output.os.rename = renamed

sys.argv = ["mergekit-rl", *sys.argv[3:]]
from mergekit_rl.cli import main
main()
"""


def run_until(tmp_path: Path, phase: str, *args, sig=signal.SIGKILL) -> subprocess.CompletedProcess:
    """Start the CLI, wait for `phase`, send `sig`; return the finished process."""
    marker = tmp_path / f"marker-{phase}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", HARNESS, phase, str(marker),
                              *map(str, args)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"child never reached {phase}: rc {child.returncode}\n{out}\n{err}")
        time.sleep(0.02)
    child.send_signal(sig)
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("phase", ["writing", "side-files"])
def test_sigkill_leaves_no_output_and_the_next_run_cleans(tmp_path, pair, phase):
    ft, base, before = pair
    out = tmp_path / "vec"
    done = run_until(tmp_path, phase, "extract", ft, base, "-o", out, "-q")
    assert done.returncode == -signal.SIGKILL
    assert not out.exists() and [p.name.split("-")[0] for p in leftovers(out)] == [".vec.tmp"]
    r = cli("extract", ft, base, "-o", out)
    assert "left by a run that was killed" in r.output
    assert out.is_dir() and not leftovers(out)
    assert all(snapshot(p) == s for p, s in before.items())


def test_sigkill_during_overwrite_keeps_the_old_output(tmp_path, pair):
    ft, base, before = pair
    out = tmp_path / "vec"
    cli("extract", ft, base, "-o", out, "-q", "--exclude", "mlp")
    old = snapshot(out)
    done = run_until(tmp_path, "writing", "extract", ft, base, "-o", out, "--overwrite", "-q")
    assert done.returncode == -signal.SIGKILL
    assert snapshot(out) == old  # whole, under its name
    cli("extract", ft, base, "-o", out, "--overwrite", "-q")
    assert not leftovers(out) and "model.layers.0.mlp.up_proj.weight" in load_state(out)


def test_sigkill_while_removing_the_old_output(tmp_path, pair):
    ft, base, before = pair
    out = tmp_path / "vec"
    cli("extract", ft, base, "-o", out, "-q", "--exclude", "mlp")
    done = run_until(tmp_path, "removing-old", "extract", ft, base, "-o", out, "--overwrite",
                     "-q")
    assert done.returncode == -signal.SIGKILL
    # the new output is complete under the name; the half-removed old one is beside it
    new = load_state(out)
    grpo, sft = load_state(ft), load_state(base)
    assert new.keys() == grpo.keys()
    assert all(torch.equal(new[k], grpo[k] - sft[k]) for k in new)
    assert len(leftovers(out)) == 1
    # the next run for that output (here one that fails on a bad pattern) cleans it
    r = cli("extract", ft, base, "-o", out, "--overwrite", "--include", "nothing", ok=False)
    assert r.exit_code == 1 and not leftovers(out) and load_state(out).keys() == new.keys()


def test_killed_between_the_two_renames_puts_the_old_output_back(tmp_path, pair):
    # Where the filesystem cannot swap, OUT is renamed aside first: a kill right then leaves
    # no OUT; the next run restores it before it decides anything.
    ft, base, before = pair
    out = tmp_path / "vec"
    cli("extract", ft, base, "-o", out, "-q", "--exclude", "mlp")
    old = snapshot(out)
    done = run_until(tmp_path, "between-renames", "extract", ft, base, "-o", out, "--overwrite",
                     "-q")
    assert done.returncode == -signal.SIGKILL
    assert not out.exists() and len(leftovers(out)) == 2  # .vec.old-* and .vec.tmp-*
    r = cli("extract", ft, base, "-o", out, ok=False)  # no --overwrite: the old one is kept
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    assert "restored" in r.output
    assert snapshot(out) == old and not leftovers(out)


def test_sigterm_removes_the_temporary_folder(tmp_path, pair):
    ft, base, before = pair
    out = tmp_path / "vec"
    done = run_until(tmp_path, "writing", "extract", ft, base, "-o", out, "-q",
                     sig=signal.SIGTERM)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip() == "interrupted: terminated (SIGTERM): no output was written"
    assert not out.exists() and not leftovers(out)
    assert all(snapshot(p) == s for p, s in before.items())


def test_a_live_runs_temporary_folder_is_not_taken_for_a_leftover(tmp_path, pair):
    ft, base, _ = pair
    out = tmp_path / "vec"
    with output.atomic_folder(out) as tmp:
        (tmp / "f").write_text("mine")
        output.clean_leftovers(out)  # what a second run for OUT does first
        assert (tmp / "f").read_text() == "mine"
    assert (out / "f").read_text() == "mine" and not leftovers(out)
