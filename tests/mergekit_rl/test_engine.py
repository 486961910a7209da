"""The streaming engine: results against an in-memory recomputation whatever the block size,
thread count or staging, and every failure path (writer, reader, compute) stopping all stages
under a timeout, so a hang fails its test instead of the suite."""

import errno
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_rl import engine
from mergekit_rl.checkpoint import Checkpoint, CheckpointWriter
from mergekit_rl.errors import CheckpointError, ConfigError, NonFiniteError
from mergekit_rl.plan import Item

TIMEOUT = 20  # seconds; the engine finishes these plans in well under one
ALPHA = 0.37  # not a power of two: a different rounding shows


def _inputs(tmp_path, seed=0, inf_at=None):
    g = torch.Generator().manual_seed(seed)
    target = {
        "big.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "embed.weight": torch.randn(40, 16, generator=g).to(torch.bfloat16),  # 40 rows vs 33
        "norm.weight": torch.randn(48, generator=g).to(torch.bfloat16),
        "scale": torch.randn((), generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(12, dtype=torch.int64),
        "frozen.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
    }
    vector = {k: torch.randn(v.shape, generator=g) for k, v in target.items()
              if v.is_floating_point() and k not in ("embed.weight", "frozen.weight")}
    vector["embed.weight"] = torch.randn(33, 16, generator=g)
    if inf_at:
        vector[inf_at][5] = float("inf")
    for name, state in (("target", target), ("vector", vector)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    return target, vector


def _plan(target) -> list[Item]:
    items = []
    for name, t in target.items():
        shape, dtype = tuple(t.shape), t.dtype
        if name in ("position_ids", "frozen.weight"):  # copies (an integer tensor, a masked one)
            items.append(Item(name, shape, dtype, copy_from=("target", name)))
        else:
            items.append(Item(name, shape, dtype, (("target", name), ("vector", name)),
                              ("target", name), 33 if name == "embed.weight" else None))
    return items


def _apply(item, x, out):
    return out.copy_(x["target"].to(torch.float32).add_(x["vector"].float(), alpha=ALPHA))


def _reference(target, vector):
    """The expected output, computed whole in memory (no blocks, no engine)."""
    want = {}
    for name, t in target.items():
        if name not in vector:
            want[name] = t
            continue
        v = vector[name]
        rows = v.shape[0] if v.dim() else None
        r = t.clone()
        part = (t[:rows] if rows else t).float() + ALPHA * v.float()
        if rows:
            r[:rows] = part.to(t.dtype)
        else:
            r = part.to(t.dtype)
        want[name] = r
    return want


def _run(tmp_path, items, fn=_apply, writer_cls=CheckpointWriter, **kw):
    inputs = {r: Checkpoint.open(tmp_path / r) for r in ("target", "vector")}
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    writer = writer_cls(out, [(i.name, i.dtype, i.shape) for i in items])
    try:
        stats = engine.run(items, inputs, fn, writer, torch.device("cpu"), **kw)
        writer.finish()
    finally:
        writer.close()
        for c in inputs.values():
            c.close()
    return stats, load_file(out / "model.safetensors")


MODES = {"1 thread": {"threads": 1}, "2 threads": {"threads": 2},
         "staged": {"staged": True}, "whole": {"whole_tensors": True, "threads": 1}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_bytes", [192, 1000, engine.DEFAULT_BLOCK_BYTES])  # 192: one row
def test_matches_in_memory_reference(tmp_path, mode, block_bytes):
    if MODES[mode].get("threads", 1) > engine.available_cores():
        pytest.skip("needs 2 cores")
    target, vector = _inputs(tmp_path)
    items = _plan(target)
    stats, got = _run(tmp_path, items, block_bytes=block_bytes, **MODES[mode])
    want = _reference(target, vector)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           want[name].reshape(-1).view(torch.uint8)), name  # bit for bit
    written = sum(t.numel() * t.element_size() for t in want.values())
    assert stats.bytes_written == written
    read = sum(t.numel() * t.element_size() for t in target.values()) + \
        sum(t.numel() * t.element_size() for t in vector.values())
    assert stats.bytes_read == read  # every input byte exactly once, none twice


def test_blocks_cover_every_row_once():
    item = Item("w", (10, 3), torch.bfloat16, (("a", "w"),), ("a", "w"), common_rows=7)
    got = [(b.rows, b.compute) for b in engine.blocks([item], block_bytes=3 * 4 * 3)]
    assert got == [((0, 3), True), ((3, 6), True), ((6, 7), True), ((7, 10), False)]


def test_thread_and_block_size_limits():
    cores = engine.available_cores()
    for bad in (0, -1, cores + 1):
        with pytest.raises(ConfigError, match=rf"^--threads {bad}: expected 1 to {cores}"):
            engine.check_threads(bad)
    engine.check_threads(cores)
    item = Item("w", (10, 300), torch.bfloat16, (("a", "w"),))
    with pytest.raises(ConfigError, match=r"^--block-size 1000: too small to hold one row of "
                                          r"tensor w \(1200 bytes in fp32\)"):
        engine.check_block_size([item], 1000)
    engine.check_block_size([item], 1200)
    engine.check_block_size([item], 1000, whole_tensors=True)  # not split: no limit


# ---- failures -------------------------------------------------------------------------------

def _engine_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mkrl-")]


def _run_bounded(tmp_path, items, **kw):
    """Run in a thread with a timeout: returns the raised error; a hang fails the test."""
    box = {}

    def body():
        try:
            _run(tmp_path, items, **kw)
        except BaseException as e:  # the error under test
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive(), "the engine hung"
    deadline = time.monotonic() + 5
    while _engine_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _engine_threads(), "engine threads left running"
    return box.get("error")


FAIL_MODES = {"1 thread": {"threads": 1}, "2 threads": {"threads": 2}, "staged": {"staged": True}}


def _fail_mode(mode):
    if FAIL_MODES[mode].get("threads", 1) > engine.available_cores():
        pytest.skip("needs 2 cores")
    return {"block_bytes": 256, **FAIL_MODES[mode]}  # ~50 blocks


@pytest.mark.parametrize("mode", FAIL_MODES)
@pytest.mark.parametrize("when", ["mid-stream", "at the end"])
def test_writer_failure_with_full_queue_stops_every_stage(tmp_path, mode, when):
    """The writer dies while the write queue is full: mid-stream, with a worker waiting to put
    the next block, or after the last block, with the end-of-stream marker waiting (the
    `put(None)` that used to block forever)."""
    target, _ = _inputs(tmp_path)
    items = [i for i in _plan(target) if not i.is_copy and i.common_rows is None]
    kw = _fail_mode(mode)
    n_blocks = len(engine.blocks(items, kw["block_bytes"]))  # all computed: one fn call each
    workers = kw.get("threads", 1)
    # Blocks computed by the time the writer's first (or last-but-queue) write is blocked:
    # the one being written, a full queue and, mid-stream, one more per waiting worker.
    fail_at, full = ((1, 1 + engine.QUEUE_DEPTH + workers) if when == "mid-stream" else
                     (n_blocks - engine.QUEUE_DEPTH, n_blocks))
    computed = []
    reached = threading.Event()

    def fn(item, x, out):
        computed.append(1)
        return _apply(item, x, out)

    class DiskFull(CheckpointWriter):
        calls = 0

        def write(self, name, tensor, row_start=0):
            DiskFull.calls += 1
            if DiskFull.calls < fail_at:
                return super().write(name, tensor, row_start)
            deadline = time.monotonic() + 5
            while len(computed) < full:
                assert time.monotonic() < deadline, "the queue never filled"
                time.sleep(0.005)
            reached.set()
            time.sleep(0.1)  # the others are now waiting on the full queue
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder))

    error = _run_bounded(tmp_path, items, fn=fn, writer_cls=DiskFull, **kw)
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, error
    assert reached.is_set()
    if when == "mid-stream":
        assert len(computed) < n_blocks  # it stopped rather than ran to the end


@pytest.mark.parametrize("mode", FAIL_MODES)
def test_reader_failure_stops_every_stage(tmp_path, mode):
    """The vector is truncated after its header was checked: a short read mid-run."""
    target, _ = _inputs(tmp_path)
    items = _plan(target)
    kw = _fail_mode(mode)
    shard = tmp_path / "vector" / "model.safetensors"
    real_open = Checkpoint.open

    def open_then_truncate(path):
        ckpt = real_open(path)
        if path == tmp_path / "vector":
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size // 2)
        return ckpt

    Checkpoint.open = staticmethod(open_then_truncate)
    try:
        error = _run_bounded(tmp_path, items, **kw)
    finally:
        Checkpoint.open = real_open
    assert isinstance(error, CheckpointError)
    assert str(error).startswith(f"{shard}: file ended early at byte ")
    assert "truncated" in str(error)


@pytest.mark.parametrize("mode", FAIL_MODES)
def test_compute_failure_stops_every_stage(tmp_path, mode):
    target, _ = _inputs(tmp_path)
    items = _plan(target)
    calls = []

    def fn(item, x, out):
        calls.append(1)
        if len(calls) == 7:
            raise ValueError("boom in block 7")
        return _apply(item, x, out)

    error = _run_bounded(tmp_path, items, fn=fn, **_fail_mode(mode))
    assert isinstance(error, ValueError) and str(error) == "boom in block 7"


@pytest.mark.parametrize("mode", FAIL_MODES)
def test_non_finite_result_names_tensor(tmp_path, mode):
    target, _ = _inputs(tmp_path, inf_at="big.weight")
    error = _run_bounded(tmp_path, _plan(target), **_fail_mode(mode))
    assert isinstance(error, NonFiniteError)
    assert str(error).startswith("tensor big.weight: the result contains NaN or Inf")


def test_staged_path_orders_its_copies_with_events(tmp_path, monkeypatch):
    """The CUDA bookkeeping with recording stand-ins for events and streams: every wait is on a
    recorded event, each device buffer set is refilled only after the block that used it, and
    every host buffer is refilled or written only after its copy's event."""
    from mergekit_rl import staging

    log = []

    class Event:
        def __init__(self):
            self.recorded = False

        def record(self, stream=None):
            self.recorded = True
            log.append(("record", stream.name))

        def synchronize(self):
            assert self.recorded, "waited on an event never recorded"

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            assert isinstance(event, Event) and event.recorded
            log.append(("wait", self.name))

    default = Stream("default")
    real_init = staging.Staging.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.copy_stream = Stream("copy")

    monkeypatch.setattr(staging.Staging, "__init__", init)
    monkeypatch.setattr(staging.Staging, "_event", lambda self: Event())
    monkeypatch.setattr(staging.Staging, "_current", lambda self: default)
    target, vector = _inputs(tmp_path)
    items = _plan(target)
    _, got = _run(tmp_path, items, block_bytes=256, staged=True)
    want = _reference(target, vector)
    assert all(torch.equal(got[k], want[k]) for k in want)
    n = len(engine.blocks(items, 256))
    assert log.count(("record", "copy")) == n  # one host-to-device copy per block
    assert log.count(("record", "default")) == n  # one result copied back per block
    assert log.count(("wait", "default")) == n  # compute waits for its block's copy
    assert log.count(("wait", "copy")) == n - 2  # set i is refilled after block i-2 computed
