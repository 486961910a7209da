"""Where a block lives while the engine computes it: reused host buffers, and the device copies.

Direct (the CPU): compute reads the buffers the reader filled and rounds its result into an
output buffer the writer drains; both kinds are pooled, so no block allocates or faults in
memory. Staged (CUDA; also on the CPU, for tests): the host buffers are pinned; each block's
inputs are copied into one of two device buffer sets on a side stream while the block before
it computes on the default stream, its result is copied back into a pinned output buffer, and
the writer waits on that copy's event. The finiteness check then runs on the device too and
only its flag travels back.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, dtype_size
from .errors import NonFiniteError
from .plan import Item

# fn(item, {role: block in its stored dtype, on device}, out) -> result: the maths for one block.
# `out` is an empty block in the output dtype; fn computes in fp32 and writes its result there
# (torch rounds once on store, so fp32 maths + the cast is one pass over memory) or returns a
# tensor the engine casts. Inputs are scratch buffers owned by the engine: fn may overwrite them.
ComputeFn = Callable[[Item, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Block:
    """Rows [r0, r1) of one planned tensor (or all of it): the unit the stages pass on."""

    item: Item
    rows: tuple[int, int] | None  # None: the whole tensor
    compute: bool                 # False: copy rows from item.copy_from
    last: bool                    # last block of its item

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return self.item.sources if self.compute else (self.item.copy_from,)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.item.shape
        return shape if self.rows is None else (self.rows[1] - self.rows[0], *shape[1:])

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n




def all_finite(t: torch.Tensor) -> bool:
    """NaN or Inf anywhere makes the sum non-finite: one pass over a block still in cache (torch
    accumulates in fp32 and rounds the total to t's dtype). Only a non-finite sum, or a finite
    fp16 block whose sum overflows, takes the exact test: min and max, which NaN propagates to
    (one pass as well, 20x faster than `isfinite(t).all()`)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype != torch.float16 and bool(torch.isfinite(t.sum())):
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def non_finite_error(item: Item) -> NonFiniteError:
    return NonFiniteError(f"tensor {item.name}: the result contains NaN or Inf (in {item.dtype});"
                          " check the inputs and --alpha, or use a wider --dtype")


class _NoEvent:
    """The CPU stand-in for a CUDA event or stream: work is done when it is issued."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_event(self, event) -> None:
        pass


NO_EVENT = _NoEvent()


class Slot:
    """Host buffers for one block in flight (one per input, or the output), back to `pool`
    when released. Pooled slots keep fixed buffers; unpooled ones (whole-tensor methods,
    whose tensors vary in size) allocate per block and let go at release."""

    def __init__(self, pool: queue.Queue, capacities: list[int], pin: bool, pooled: bool,
                 flag: bool = False):
        self.pool, self.pin, self.pooled = pool, pin, pooled
        self.buffers = [torch.empty(c, dtype=torch.uint8, pin_memory=pin) if pooled else None
                        for c in capacities]
        self.flag = torch.zeros(1, dtype=torch.bool, pin_memory=pin) if flag else None
        self.event = NO_EVENT  # the last asynchronous copy that reads or fills these buffers

    def buffer(self, j: int, nbytes: int) -> torch.Tensor:
        if self.pooled:
            return self.buffers[j][:nbytes]
        self.buffers[j] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return self.buffers[j]

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = dtype_size(dtype)
        for d in shape:
            n *= d
        return self.buffer(0, n).view(dtype).reshape(shape)

    def ready(self) -> None:
        """Wait until no copy still reads these buffers (before the reader refills them)."""
        self.event.synchronize()
        self.event = NO_EVENT

    def release(self) -> None:
        if not self.pooled:
            self.buffers = [None] * len(self.buffers)
        self.pool.put(self)


# What the compute stage hands the writer: (block, host tensor, slots to release once written,
# the event to wait for before reading the tensor, a device-computed "maybe not finite" flag).
Done = tuple


class Staging:
    """Buffers and the compute step for one run (see the module docstring)."""

    def __init__(self, device: torch.device, plan: list[Block], inputs: dict[str, Checkpoint],
                 pooled: bool, staged: bool):
        self.device, self.inputs, self.pooled, self.staged = device, inputs, pooled, staged
        self.pin = device.type == "cuda"
        n = max((len(b.pairs) for b in plan), default=1)
        self.in_caps, self.out_cap = [0] * n, 0
        if pooled:
            for b in plan:
                for j, (role, name) in enumerate(b.pairs):
                    self.in_caps[j] = max(self.in_caps[j], self.in_bytes(role, name, b))
                self.out_cap = max(self.out_cap, b.numel() * dtype_size(b.item.dtype))
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else NO_EVENT
        self.device_buffers: list[list[torch.Tensor | None]] = [[None] * n, [None] * n]
        self.freed = [NO_EVENT, NO_EVENT]  # compute on device buffer set i is finished
        self.pending: tuple | None = None
        self.count = 0

    def in_bytes(self, role: str, name: str, block: Block) -> int:
        """Bytes of a block's input read into a slot; 0 for inputs that are computed, not read
        (adapters and low-rank vectors as dense deltas: they make their own tensors)."""
        src = self.inputs[role]
        if not isinstance(src, Checkpoint):
            return 0
        return block.numel() * dtype_size(src.tensors[name].dtype)

    def new_in_slot(self, pool: queue.Queue) -> Slot:
        return Slot(pool, self.in_caps, self.pin, self.pooled)

    def new_out_slot(self, pool: queue.Queue) -> Slot:
        return Slot(pool, [self.out_cap], self.pin, self.pooled, flag=self.staged)

    def _event(self):
        return torch.cuda.Event() if self.cuda else NO_EVENT

    def _stream(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _on_device(self):
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def _current(self):
        return torch.cuda.current_stream(self.device) if self.cuda else NO_EVENT

    # ---- the compute step --------------------------------------------------------------------
    def compute(self, block: Block, slot: Slot, data: dict[str, torch.Tensor], fn: ComputeFn,
                check_finite: bool, take_out) -> list[Done]:
        """Compute one block; returns what is ready for the writer (staged: the block before)."""
        if self.staged:
            with self._on_device():
                return self._stage(block, slot, data, fn, check_finite, take_out)
        item = block.item
        if not block.compute:
            (t,) = data.values()
            if t.dtype == item.dtype:  # a plain copy: the writer writes the input buffer itself
                if check_finite and not all_finite(t):
                    raise non_finite_error(item)
                return [(block, t, [slot], NO_EVENT, None)]
        out_slot = take_out()
        out = out_slot.view(item.dtype, block.shape)
        result = fn(item, data, out) if block.compute else out.copy_(next(iter(data.values())))
        if result is not out:
            out.copy_(result)  # fp32 results round once into the output dtype
        if check_finite and not all_finite(out):
            raise non_finite_error(item)
        slot.release()
        return [(block, out, [out_slot], NO_EVENT, None)]

    def drain(self, fn: ComputeFn, check_finite: bool, take_out) -> list[Done]:
        """The staged block still waiting for its compute, after the last one was staged."""
        pending, self.pending = self.pending, None
        if not pending:
            return []
        with self._on_device():
            return [self._finish(*pending, fn, check_finite, take_out)]

    def _stage(self, block, slot, data, fn, check_finite, take_out) -> list[Done]:
        """Copy this block to device buffer set `i` on the side stream, then compute the block
        staged before it (its copy overlapped that block's wait in the queue)."""
        i = self.count % 2
        self.count += 1
        if self.freed[i] is not NO_EVENT:  # set i's previous block is computed
            self.copy_stream.wait_event(self.freed[i])
        x = {}
        for j, (role, t) in enumerate(data.items()):
            nbytes = t.numel() * t.element_size()
            buf = self.device_buffers[i][j]
            if buf is None or buf.numel() < nbytes:
                buf = self.device_buffers[i][j] = torch.empty(
                    max(nbytes, self.in_caps[j]), dtype=torch.uint8, device=self.device)
            x[role] = buf[:nbytes].view(t.dtype).reshape(t.shape)
        with self._stream(self.copy_stream):
            for role, t in data.items():
                x[role].copy_(t, non_blocking=True)
            copied = self._event()
            copied.record(self.copy_stream)
        slot.event = copied  # the reader waits for this before it refills the slot
        slot.release()
        pending, self.pending = self.pending, (block, x, copied, i)
        return [self._finish(*pending, fn, check_finite, take_out)] if pending else []

    def _finish(self, block, x, copied, i, fn, check_finite, take_out) -> Done:
        item = block.item
        current = self._current()
        current.wait_event(copied)
        out = torch.empty(block.shape, dtype=item.dtype, device=self.device)
        result = fn(item, x, out) if block.compute else out.copy_(next(iter(x.values())))
        if result is not out:
            out.copy_(result)
        out_slot = take_out()
        out_slot.ready()
        host = out_slot.view(item.dtype, block.shape)
        host.copy_(out, non_blocking=True)
        flag = None
        if check_finite and out.is_floating_point() and out.numel():
            low, high = torch.aminmax(out)  # on the device: no false alarm, no sync
            out_slot.flag.copy_(~(torch.isfinite(low) & torch.isfinite(high)).reshape(1),
                                non_blocking=True)
            flag = out_slot.flag
        done = self._event()
        done.record(current)
        self.freed[i] = done
        out_slot.event = done
        return (block, host, [out_slot], done, flag)


def check_done(block: Block, flag: torch.Tensor | None) -> None:
    """The writer's half of the staged finiteness check (the copy has landed)."""
    if flag is not None and bool(flag):
        raise non_finite_error(block.item)
