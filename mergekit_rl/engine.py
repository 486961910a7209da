"""Stream a plan through read → compute → write, a block of rows at a time.

Three stages overlap: a reader thread fetches the next block's inputs (pinned memory on CUDA),
the calling thread computes in fp32 on the device and casts once, and a writer thread puts the
result at its final offset. The queues between them hold at most `QUEUE_DEPTH` blocks, so memory
is bounded by a few blocks whatever the model size. The same code runs on CPU and CUDA.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .checkpoint import Checkpoint
from .errors import NonFiniteError
from .plan import Item

log = logging.getLogger(__name__)

QUEUE_DEPTH = 2
# fp32 bytes of one input's block. Small enough that every buffer stays under glibc's 32 MiB
# mmap ceiling (freed blocks are reused from the heap instead of page-faulted in anew) and that a
# block's few passes (widen, add, round, finiteness) run out of the CPU's caches: 4 MiB ran the
# in-process `add` of a 0.5 GB model 1.5x faster than 16 MiB on a 2-core EPYC (2 MiB L2 per
# core, 32 MiB L3); 1-2 MiB were no better, 512 KiB and below lost it to per-block overhead.
DEFAULT_BLOCK_BYTES = 4 * 2**20

# fn(item, {role: block in its stored dtype, on device}, out) -> result: the maths for one block.
# `out` is an empty block in the output dtype; fn computes in fp32 and writes its result there
# (torch rounds once on store, so fp32 maths + the cast is one pass over memory) or returns a
# tensor the engine casts. Inputs are scratch copies owned by the engine: fn may overwrite them.
ComputeFn = Callable[[Item, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
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


@dataclass(frozen=True)
class _Block:
    item: Item
    rows: tuple[int, int] | None  # None: the whole tensor
    compute: bool                 # False: copy rows from item.copy_from
    last: bool                    # last block of its item


def _blocks(items: list[Item], block_bytes: int, whole_tensors: bool) -> Iterator[_Block]:
    for item in items:
        numel = 1
        for d in item.shape:
            numel *= d
        n_rows = item.shape[0] if item.shape else 0
        split = item.common_rows if item.common_rows is not None else n_rows
        small = not item.shape or whole_tensors or numel * 4 <= block_bytes
        if small and split == n_rows:
            rows = None if item.common_rows is None else (0, split)
            yield _Block(item, rows, not item.is_copy, True)
            continue
        row_elems = max(numel // n_rows, 1)
        step = max(block_bytes // (4 * row_elems), 1)
        spans = []
        for lo, hi, compute in ((0, split, not item.is_copy), (split, n_rows, False)):
            chunk = max(hi - lo, 1) if whole_tensors else step
            spans += [(r, min(r + chunk, hi), compute) for r in range(lo, hi, chunk)]
        for k, (r0, r1, compute) in enumerate(spans):
            yield _Block(item, (r0, r1), compute, k == len(spans) - 1)


def run(items: list[Item], inputs: dict[str, Checkpoint], fn: ComputeFn,
        writer: Sink, device: torch.device, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
        whole_tensors: bool = False, check_finite: bool = True,
        progress: ProgressFn | None = None) -> None:
    """Compute every item of a plan and write it. Errors in any stage stop all stages.

    On the CPU, streaming blocks are computed with one intra-op thread: the reader and writer
    threads keep the other cores busy, and OpenMP workers competing with them for 2 cores made
    the whole run 1.5x slower (whole-tensor methods such as TIES keep torch's thread count)."""
    if device.type == "cpu" and not whole_tensors and torch.get_num_threads() > 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run(items, inputs, fn, writer, device, block_bytes=block_bytes,
                       whole_tensors=whole_tensors, check_finite=check_finite,
                       progress=progress)
        finally:
            torch.set_num_threads(previous)
    pin = device.type == "cuda"
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
    write_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
    errors: list[BaseException] = []

    def put(q: queue.Queue, obj) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for block in _blocks(items, block_bytes, whole_tensors):
                if block.compute:
                    pairs = block.item.sources
                else:
                    pairs = (block.item.copy_from,)
                data = {role: inputs[role].read(name, block.rows, pin=pin) for role, name in pairs}
                if not put(read_q, (block, data)):
                    return
            put(read_q, None)
        except BaseException as e:  # handed to the main thread, which re-raises it
            errors.append(e)
            stop.set()

    def write_loop() -> None:
        try:
            while not stop.is_set():
                try:
                    got = write_q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if got is None:
                    return
                block, tensor = got
                writer.write(block.item.name, tensor, block.rows[0] if block.rows else 0)
                if progress:
                    progress(tensor.numel() * tensor.element_size(), int(block.last))
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, name="mkrl-read", daemon=True),
               threading.Thread(target=write_loop, name="mkrl-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while not stop.is_set():
            try:
                got = read_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if got is None:
                break
            block, data = got
            out = _compute_block(block, data, fn, device)
            if check_finite and not _all_finite(out):
                raise NonFiniteError(f"tensor {block.item.name}: the result contains NaN or Inf "
                                     f"(in {block.item.dtype}); check the inputs and --alpha, "
                                     "or use a wider --dtype")
            if not put(write_q, (block, out.to("cpu"))):
                break
    except BaseException:
        stop.set()
        raise
    finally:
        if not stop.is_set():
            write_q.put(None)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf anywhere makes the sum non-finite (it is accumulated in fp32); only then look
    element by element, since a finite fp16 tensor whose sum overflows is a false alarm."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _compute_block(block: _Block, data: dict[str, torch.Tensor], fn: ComputeFn,
                   device: torch.device) -> torch.Tensor:
    item = block.item
    if not block.compute:
        (t,) = data.values()
        return t.to(device, dtype=item.dtype, non_blocking=True)
    # fp32 arithmetic whatever the stored dtypes; cast once at the end.
    x = {role: t.to(device, non_blocking=True) for role, t in data.items()}
    out = torch.empty(next(iter(x.values())).shape, dtype=item.dtype, device=device)
    result = fn(item, x, out)
    return result if result.dtype == item.dtype else result.to(item.dtype)
