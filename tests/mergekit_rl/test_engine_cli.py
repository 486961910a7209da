"""The engine's options and faults through the CLI: --threads and --block-size limits, an input
that becomes unreadable mid-run (truncated, EIO, permission), the summary's throughput. Each bad
case: exit 1, one line naming the file or option, no output or temporary folder, inputs intact."""

import errno
import os
import shutil

import pytest
from click.testing import CliRunner
from helpers import load_state, snapshot

from mergekit_rl import checkpoint, engine
from mergekit_rl.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def pair(tmp_path, tiny_models):
    """A target and a vector of the sharded bf16 model, copied so a test may damage them."""
    m = tiny_models["qwen2_untied_bf16_sharded"]
    r = cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vector", "-q", "--max-shard-size", "40KB")
    assert r.exit_code == 0, r.output
    shutil.copytree(m["instruct"], tmp_path / "target")
    return tmp_path / "target", tmp_path / "vector"


def _check_failed(result, tmp_path, inputs, before, *needles):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
    for p, snap in zip(inputs, before):
        assert snapshot(p) == snap


@pytest.mark.parametrize("threads", ["0", "-2", str(engine.available_cores() + 1)])
def test_thread_count_out_of_range(tmp_path, pair, threads):
    before = [snapshot(p) for p in pair]
    r = cli("add", *pair, "-o", tmp_path / "out", "--threads", threads)
    _check_failed(r, tmp_path, pair, before, f"--threads {threads}: expected 1 to "
                  f"{engine.available_cores()}")


def test_block_size_below_one_row(tmp_path, pair):
    before = [snapshot(p) for p in pair]
    r = cli("add", *pair, "-o", tmp_path / "out", "--block-size", "100")
    _check_failed(r, tmp_path, pair, before, "--block-size 100: too small to hold one row of "
                  "tensor ", "bytes in fp32); use at least")
    r = cli("add", *pair, "-o", tmp_path / "out", "--block-size", "lots")
    assert r.exit_code == 2 and "--block-size" in r.output and not (tmp_path / "out").exists()


def test_threads_and_block_size_give_the_same_result(tmp_path, pair):
    r = cli("add", *pair, "-o", tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    r = cli("add", *pair, "-o", tmp_path / "b", "-q", "--threads", "1", "--block-size", "1KiB")
    assert r.exit_code == 0, r.output
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)


def test_summary_reports_throughput(tmp_path, pair):
    r = cli("add", *pair, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("add: wrote ") and " GB through the engine at " in line, line
    assert "GB/s (busy: read " in line and "compute " in line and "write " in line, line


def _vector_shard(vector):
    return sorted(vector.glob("*.safetensors"))[1]


def test_input_truncated_mid_run(tmp_path, pair, monkeypatch):
    """The header was checked when the input was opened; the file shrinks before its data is
    read (another process rewriting it, a sync client)."""
    target, vector = pair
    shard = _vector_shard(vector)
    real_open = checkpoint.Checkpoint.open

    def open_then_truncate(path):
        ckpt = real_open(path)
        if os.fspath(path) == os.fspath(vector):
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size - 100)
        return ckpt

    monkeypatch.setattr(checkpoint.Checkpoint, "open", staticmethod(open_then_truncate))
    before = [snapshot(target)]
    r = cli("add", target, vector, "-o", tmp_path / "out")
    _check_failed(r, tmp_path, [target], before, f"{shard}: file ended early at byte ",
                  "truncated")


def test_input_read_error_mid_run(tmp_path, pair, monkeypatch):
    """EIO from a failing disk, injected on the third read of one shard."""
    target, vector = pair
    shard = _vector_shard(vector)
    real = os.preadv
    calls = []

    def failing(fd, buffers, offset):
        if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(shard):
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing)
    before = [snapshot(p) for p in pair]
    r = cli("add", target, vector, "-o", tmp_path / "out", "--block-size", "1KiB")
    _check_failed(r, tmp_path, pair, before, f"{shard}: read failed at byte ",
                  "(Input/output error); check the disk")


def test_input_not_readable(tmp_path, pair, monkeypatch):
    """Permission taken away after the headers were read (root ignores modes, so injected)."""
    target, vector = pair
    shard = _vector_shard(vector)
    real = os.open

    def refusing(path, flags, *args, **kw):
        if os.fspath(path) == os.fspath(shard) and flags == os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refusing)
    before = [snapshot(p) for p in pair]
    r = cli("add", target, vector, "-o", tmp_path / "out")
    _check_failed(r, tmp_path, pair, before, f"{shard}: cannot open it for reading "
                  "(Permission denied)")
