"""TARGET + α·VECTOR applied in place to a model held in memory, bit for bit as `add` writes it.

`add` streams `vectors.plan_vector`'s plan through the engine into a `CheckpointWriter`. Here the
same plan, the same per-block maths (`vectors.apply_fn`: fp32, one cast) and the same engine run
(same blocks, same kernels, same device) go into a `ModelSink`, which copies each result block
into the loaded model's tensor instead of a file. So the model at α equals `add --alpha α`'s
output bit for bit, and no checkpoint is written. The target's own tensors are re-read from
TARGET for every α (from the page cache after the first), so no second copy of the model is
held; `restore` copies them back, which gives the model loaded from TARGET exactly again.

The vector is read only through what a `Checkpoint` offers the planner and the engine: `path`,
`tensors` (names with dense shapes and dtypes; `name in vector`), `read(name, rows, pin)` — "the
dense delta of tensor NAME", rows r0:r1 of it in any float dtype — and `close()`. A low-rank
vector plugs in as a reader with those members that returns `B[r0:r1] @ A · scale` for adapter
tensors and the dense side file for the rest. The one place to return it is `job.opened`,
which opens every input (today with `Checkpoint.open`): then `add`, `VectorInMemory` and so
`sweep` and the demo's α sweep apply it, through `vectors.plan_vector`, `vectors.apply_fn` and
the engine unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from . import engine, hub
from .errors import ConfigError, MismatchError
from .job import Options, opened
from .plan import Item
from .vectors import apply_fn, check_alpha, plan_vector

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelSink:
    """An engine sink that copies each result block into a tensor of a loaded model."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    @torch.no_grad()  # no_grad is per thread: this runs on the engine's writer thread
    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        dst = self.tensors[name]
        if tensor.dim() and (row_start or tensor.shape[0] != dst.shape[0]):
            dst = dst[row_start:row_start + tensor.shape[0]]
        dst.copy_(tensor)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by their checkpoint names (a tied matrix under both of its names)."""
    return model.state_dict(keep_vars=True)


def _never(item: Item, x: dict, out: torch.Tensor) -> torch.Tensor:
    raise AssertionError(f"internal: restoring {item.name} computed instead of copying")


class VectorInMemory:
    """`add`'s plan of TARGET + α·VECTOR, applied to a model loaded from TARGET, α after α.

        with VectorInMemory(target, vector, options) as applied:   # plans from headers
            model = load(applied.target_path, dtype=applied.load_dtype)
            applied.attach(model)
            applied.set_alpha(0.5)                                  # = add --alpha 0.5
        # leaving the block restores the target's tensors exactly

    Every mismatch between TARGET and VECTOR is found from the headers when the object is made,
    before any model is loaded.
    """

    def __init__(self, target: str, vector: str, options: Options = Options()):
        self.options = options
        self.device = engine.resolve_device(options.device)
        self.sources = {"target": hub.resolve(target), "vector": hub.resolve(vector)}
        self._stack = contextlib.ExitStack()
        self.ckpts = self._stack.enter_context(opened(self.sources, {"vector": "vector"}))
        try:
            self.plan = plan_vector(self.ckpts, options)
        except BaseException:
            self._stack.close()
            raise
        for note in self.plan.notes:
            log.warning(note)
        self.items = [i for i in self.plan.items if not i.is_copy]  # copies never change
        self.sink: ModelSink | None = None
        self.alpha: float | None = None  # None: the model holds the target's own tensors

    @property
    def target_path(self):
        return self.sources["target"].path

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype to load the model in so that its tensors are the plan's output tensors."""
        kinds = {i.dtype for i in self.plan.items if i.dtype.is_floating_point}
        if len(kinds) > 1:
            names = ", ".join(sorted(str(k).removeprefix("torch.") for k in kinds))
            raise ConfigError(f"{self.target_path}: floating tensors mix dtypes ({names}); pass "
                              "--dtype float32 (or bfloat16/float16) to sweep in one dtype")
        return kinds.pop() if kinds else torch.float32

    def attach(self, model: torch.nn.Module) -> None:
        """Use `model` (loaded from TARGET in `load_dtype`): every tensor the plan computes must
        be one of its tensors under the same name, with the same shape and dtype."""
        tensors = model_tensors(model)
        problems = []
        for item in self.items:
            t = tensors.get(item.name)
            if t is None:
                problems.append(f"{item.name} is not a tensor of the loaded model")
            elif tuple(t.shape) != item.shape or t.dtype != item.dtype:
                problems.append(f"{item.name} is {str(t.dtype).removeprefix('torch.')}"
                                f"{list(t.shape)} in the loaded model but "
                                f"{str(item.dtype).removeprefix('torch.')}{list(item.shape)} "
                                "in the checkpoint")
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise MismatchError(f"{self.target_path}: {'; '.join(problems[:3])}{more}. The sweep "
                                "needs a model whose tensors are named and stored as in its "
                                "checkpoint; use `add` then `eval` for this one")
        self.sink = ModelSink(tensors)

    def _run(self, items: list[Item], fn: engine.ComputeFn) -> None:
        if self.sink is None:
            raise RuntimeError("internal: attach a model first")
        engine.run(items, self.ckpts, fn, self.sink, self.device,
                   block_bytes=self.options.block_bytes)

    def set_alpha(self, alpha: float) -> None:
        """The model's weights become TARGET + alpha·VECTOR, exactly as `add --alpha` writes."""
        check_alpha(alpha, "α")
        self.alpha = float("nan")  # until the run finishes the model is neither
        self._run(self.items, apply_fn(alpha))
        self.alpha = alpha

    def restore(self) -> None:
        """Copy the target's own tensors back (a no-op when they are there already)."""
        if self.alpha is None or self.sink is None:
            return
        copies = [dataclasses.replace(i, sources=(), common_rows=None) for i in self.items]
        self._run(copies, _never)
        self.alpha = None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> VectorInMemory:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.restore()
        finally:
            self.close()


def sweep(applied: VectorInMemory, alphas: Sequence[float], evaluate: Callable[[float], T],
          on_point: Callable[[float, T], None] | None = None) -> list[tuple[float, T]]:
    """Evaluate the model at each α in turn (`evaluate(α)` sees the model at α); the target's
    tensors are restored at the end, also after an error or an interrupt."""
    points: list[tuple[float, T]] = []
    try:
        for alpha in alphas:
            applied.set_alpha(alpha)
            result = evaluate(alpha)
            points.append((alpha, result))
            if on_point:
                on_point(alpha, result)
    finally:
        applied.restore()
    return points
