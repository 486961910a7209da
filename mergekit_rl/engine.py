"""Stream a plan through read → compute → write, a block of rows at a time.

Three stages overlap. Each block's inputs are `pread` straight into reused buffers (pinned on
CUDA), on the CPU by the compute worker that then computes the block (the bytes are still in
cache), on CUDA and for whole-tensor methods by a reader thread. Compute workers combine them
in fp32 and round once into reused output buffers, checking finiteness while the block is still
in cache; a writer thread puts each result at its final offset, so blocks may finish in any
order. On the CPU there are `threads` compute workers, each on its own blocks; on CUDA one
worker copies inputs to the device on a side stream while the previous block computes
(`staging.py`). Bounded queues and buffer pools keep memory at a few blocks whatever the model
size. A failure in any stage stops every stage: every wait
polls a shared stop flag, so nothing blocks on a stage that died.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .checkpoint import Checkpoint
from .errors import ConfigError
from .plan import Item
from .staging import Block, ComputeFn, Staging, check_done

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2
# fp32 bytes of one input's block. Small enough that every buffer stays under glibc's 32 MiB
# mmap ceiling and that a block's few passes (widen, add, round, finiteness) run out of the
# CPU's caches: 4 MiB ran the `add` of a 0.5 GB model 1.5x faster than 16 MiB on a 2-core EPYC
# (2 MiB L2 per core, 32 MiB L3); 1-2 MiB were no better, 512 KiB and below lost it to
# per-block overhead.
DEFAULT_BLOCK_BYTES = 4 * 2**20
_POLL = 0.05  # seconds between looks at the stop flag while waiting on a queue
# CPU block runs: each compute worker reads its own block's inputs (no reader thread), so the
# block is computed while its bytes are still in cache; CUDA and whole-tensor runs keep a reader
WORKER_READS = True

ProgressFn = Callable[[int, int], None]  # (bytes written, tensors finished)


class Sink(Protocol):
    """Where results go: a `CheckpointWriter`, or a model in memory (`inmemory.ModelSink`)."""

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None: ...


def resolve_device(text: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' as given."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N")
    return device


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """CPU compute workers: the cores less two (the writer thread's and one for the system and
    the main thread), at least one."""
    return max(1, available_cores() - 2)


def check_threads(threads: int | None) -> None:
    cores = available_cores()
    if threads is not None and not 1 <= threads <= cores:
        raise ConfigError(f"--threads {threads}: expected 1 to {cores} (the cores this process "
                          "may use)")


def _row_elems(item: Item) -> int:
    n = 1
    for d in item.shape[1:]:
        n *= d
    return n


def _splits(item: Item, block_bytes: int, whole_tensors: bool) -> bool:
    numel = _row_elems(item) * (item.shape[0] if item.shape else 1)
    return bool(item.shape) and not whole_tensors and numel * 4 > block_bytes


def check_block_size(items: Iterable[Item], block_bytes: int, whole_tensors: bool = False) -> None:
    """A streamed block holds whole rows: refuse a block size below one fp32 row of a tensor
    that has to be split (naming the widest), before any output exists."""
    rows = [(_row_elems(i) * 4, i.name) for i in items if _splits(i, block_bytes, whole_tensors)]
    need, name = max(rows, default=(0, ""))
    if need > block_bytes:
        raise ConfigError(f"--block-size {block_bytes}: too small to hold one row of tensor "
                          f"{name} ({need} bytes in fp32); use at least {need}B")


def blocks(items: list[Item], block_bytes: int, whole_tensors: bool = False) -> list[Block]:
    """The plan cut into blocks of whole rows of at most `block_bytes` in fp32 (or one block per
    tensor); with a vocabulary mismatch the computed rows and the copied rows are separate."""
    out = []
    for item in items:
        n_rows = item.shape[0] if item.shape else 0
        split = item.common_rows if item.common_rows is not None else n_rows
        if not _splits(item, block_bytes, whole_tensors) and split == n_rows:
            rows = None if item.common_rows is None else (0, split)
            out.append(Block(item, rows, not item.is_copy, True))
            continue
        step = max(block_bytes // (4 * max(_row_elems(item), 1)), 1)
        spans = []
        for lo, hi, compute in ((0, split, not item.is_copy), (split, n_rows, False)):
            chunk = max(hi - lo, 1) if whole_tensors else step
            spans += [(r, min(r + chunk, hi), compute) for r in range(lo, hi, chunk)]
        out += [Block(item, (r0, r1), c, k == len(spans) - 1)
                for k, (r0, r1, c) in enumerate(spans)]
    return out


@dataclass
class Stats:
    """What one run moved and where its stages spent their time (busy seconds per stage,
    summed over threads), so a summary can show whether compute hides behind I/O. Staged runs
    add "device": the writer's wait for results (compute issues work; the device does it)."""

    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    threads: int = 1
    busy: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "compute": 0.0,
                                                            "write": 0.0})

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / self.seconds if self.seconds else 0.0


class _Stopped(Exception):
    """Internal: another stage failed; leave quietly (its error is the one raised)."""


class _Pipeline:
    """The stop flag, the errors and the bounded waits shared by the stages of one run."""

    def __init__(self):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def fail(self, error: BaseException) -> None:
        if not isinstance(error, _Stopped):
            self.errors.append(error)
        self.stop.set()

    def put(self, q: queue.Queue, obj) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.put(obj, timeout=_POLL)
            except queue.Full:
                continue

    def take(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue

    def thread(self, target, name: str) -> threading.Thread:
        def body():
            try:
                target()
            except BaseException as e:  # handed to the calling thread, which re-raises it
                self.fail(e)
        return threading.Thread(target=body, name=name, daemon=True)


def run(items: list[Item], inputs: dict[str, Checkpoint], fn: ComputeFn,
        writer: Sink, device: torch.device, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
        whole_tensors: bool = False, check_finite: bool = True, threads: int | None = None,
        progress: ProgressFn | None = None, staged: bool | None = None) -> Stats:
    """Compute every item of a plan and write it. An error in any stage stops all stages and
    is raised here.

    On the CPU, `threads` workers (default: `default_threads()`) each compute whole blocks with
    one intra-op thread: workers on separate blocks scale better than OpenMP inside small ops,
    which made the run 1.5x slower when it competed with the reader and writer for 2 cores.
    Whole-tensor methods (TIES, DARE) compute one tensor at a time with `threads` intra-op
    threads (default: torch's setting). `staged` (default: on CUDA) copies inputs and results
    through device buffers as on a GPU; tests set it on the CPU to run that code path."""
    check_threads(threads)
    check_block_size(items, block_bytes, whole_tensors)
    staged = device.type == "cuda" if staged is None else staged
    plan = blocks(items, block_bytes, whole_tensors)
    workers = 1 if staged or whole_tensors else threads or default_threads()
    intra = (threads or torch.get_num_threads()) if whole_tensors else 1
    worker_reads = WORKER_READS and not staged and not whole_tensors
    stage = Staging(device, plan, inputs, pooled=not whole_tensors, staged=staged)
    pipe = _Pipeline()
    read_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
    write_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
    free_in: queue.Queue = queue.Queue()
    free_out: queue.Queue = queue.Queue()
    for _ in range(workers + QUEUE_DEPTH + 1):  # one per stage and queue place
        free_in.put(stage.new_in_slot(free_in))
        free_out.put(stage.new_out_slot(free_out))
    stats = Stats(threads=workers)
    if staged:
        stats.busy["device"] = 0.0
    lock = threading.Lock()
    running = [workers]

    def busy(name: str, since: float) -> None:
        with lock:
            stats.busy[name] += time.perf_counter() - since

    def read(block: Block, slot) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        slot.ready()  # a staged copy from this slot may still be in flight
        data, nbytes = {}, 0
        for j, (role, name) in enumerate(block.pairs):
            n, src = stage.in_bytes(role, name, block), inputs[role]
            data[role] = src.read(name, block.rows, out=slot.buffer(j, n)) \
                if isinstance(src, Checkpoint) else src.read(name, block.rows)
            nbytes += n
        with lock:
            stats.bytes_read += nbytes
        busy("read", t0)
        return data

    def reader() -> None:
        for block in plan:
            slot = pipe.take(free_in)
            pipe.put(read_q, (block, slot, read(block, slot)))
        for _ in range(workers):
            pipe.put(read_q, None)

    pending = iter(plan)

    def read_next():
        """A worker's own read of the next block (no reader thread): still hot when computed."""
        if pipe.stop.is_set():
            raise _Stopped
        with lock:
            block = next(pending, None)
        if block is None:
            return None
        slot = pipe.take(free_in)
        return block, slot, read(block, slot)

    def compute_loop() -> None:
        torch.set_num_threads(intra)  # per thread: each worker runs its blocks' ops alone
        take_out = functools.partial(pipe.take, free_out)
        source = read_next if worker_reads else functools.partial(pipe.take, read_q)
        for block, slot, data in iter(source, None):
            t0 = time.perf_counter()
            ready = stage.compute(block, slot, data, fn, check_finite, take_out)
            busy("compute", t0)
            for done in ready:
                pipe.put(write_q, done)
        for done in stage.drain(fn, check_finite, take_out):
            pipe.put(write_q, done)
        with lock:
            running[0] -= 1
            last = running[0] == 0
        if last:
            pipe.put(write_q, None)

    def write_loop() -> None:
        for block, tensor, release, copied, flag in iter(functools.partial(pipe.take, write_q),
                                                         None):
            t0 = time.perf_counter()
            copied.synchronize()  # staged: the device-to-host copy has landed
            if staged:
                busy("device", t0)  # waiting for the device: it, not the writer, is behind
                t0 = time.perf_counter()
            check_done(block, flag)
            writer.write(block.item.name, tensor, block.rows[0] if block.rows else 0)
            nbytes = tensor.numel() * tensor.element_size()
            stats.bytes_written += nbytes
            busy("write", t0)
            for slot in release:
                slot.release()
            if progress:
                progress(nbytes, int(block.last))

    previous = torch.get_num_threads()
    start = time.perf_counter()
    others = [pipe.thread(write_loop, "mkrl-write")]
    if not worker_reads:
        others.append(pipe.thread(reader, "mkrl-read"))
    others += [pipe.thread(compute_loop, f"mkrl-compute-{i}") for i in range(1, workers)]
    for t in others:
        t.start()
    try:
        compute_loop()  # worker 0 is the calling thread, so Ctrl-C lands in a worker
    except _Stopped:
        pass
    except BaseException as e:
        pipe.fail(e)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: raised as they are
            _join(others)
            raise
    finally:
        torch.set_num_threads(previous)
    _join(others)
    if pipe.errors:
        raise pipe.errors[0]
    stats.seconds = time.perf_counter() - start
    return stats


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:  # every wait polls the stop flag, so each thread ends soon after it is set
        t.join()
