"""`compare A B [--base BASE]`: how two vectors relate, tensor by tensor and layer by layer.

For vectors a and b (or the deltas A − BASE and B − BASE of two models), per tensor, per layer
and in total: cosine similarity ⟨a, b⟩ / (‖a‖·‖b‖), norm ratio ‖a‖ / ‖b‖, and sign agreement —
the share of entries where both are non-zero whose signs agree (TIES' notion of interference,
https://arxiv.org/abs/2306.01708). Streamed: a reader thread fetches blocks of rows of every
input while the main thread reduces the previous ones, sums kept in float64.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hub
from .checkpoint import Checkpoint
from .engine import DEFAULT_BLOCK_BYTES
from .errors import MismatchError
from .inspection import _order, group_of, pyplot
from .job import opened
from .plan import MAX_LISTED, Selection


@dataclass
class Stats:
    """Sums over some entries of a and b; the measures are ratios of these sums."""

    name: str
    tensors: int = 0
    params: int = 0
    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    agree: int = 0
    disagree: int = 0

    def add(self, other: Stats) -> None:
        self.tensors += other.tensors
        self.params += other.params
        self.dot += other.dot
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.agree += other.agree
        self.disagree += other.disagree

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.sq_a * self.sq_b)
        return self.dot / denom if denom > 0 else float("nan")

    @property
    def norm_ratio(self) -> float:
        return math.sqrt(self.sq_a / self.sq_b) if self.sq_b > 0 else float("nan")

    @property
    def sign_agreement(self) -> float:
        both = self.agree + self.disagree
        return self.agree / both if both else float("nan")

    def as_dict(self) -> dict:
        return {"name": self.name, "tensors": self.tensors, "params": self.params,
                "cosine": self.cosine, "norm_ratio": self.norm_ratio,
                "sign_agreement": self.sign_agreement, "norm_a": math.sqrt(self.sq_a),
                "norm_b": math.sqrt(self.sq_b)}


@dataclass
class Comparison:
    a: str
    b: str
    base: str | None
    tensors: list[Stats] = field(default_factory=list)
    groups: list[Stats] = field(default_factory=list)
    total: Stats = field(default_factory=lambda: Stats("total"))

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "base": self.base, "total": self.total.as_dict(),
                "groups": [g.as_dict() for g in self.groups],
                "tensors": [t.as_dict() for t in self.tensors]}


def _names(a, b, base, selection: Selection, labels: tuple[str, str]) -> list[str]:
    """The tensors compared: the float tensors both hold (and the base, with one); different
    sets or shapes are one error naming them."""
    def floats(c):
        return {n for n, t in c.tensors.items() if t.is_float and selection.selects(n)}

    fa, fb = floats(a), floats(b)
    problems = []
    for label, only in ((labels[0], sorted(fa - fb)), (labels[1], sorted(fb - fa))):
        if only:
            more = f" (+{len(only) - MAX_LISTED} more)" if len(only) > MAX_LISTED else ""
            problems.append(f"{len(only)} only in {label}: {', '.join(only[:MAX_LISTED])}{more}")
    names = sorted(fa & fb, key=list(a.tensors).index)
    checked = [("B", b)] + ([("BASE", base)] if base is not None else [])
    for n in names:
        for label, other in checked:
            if n not in other:
                problems.append(f"{n} is missing from {label}")
            elif other.tensors[n].shape != a.tensors[n].shape:
                problems.append(f"{n} has shape {list(a.tensors[n].shape)} in A but "
                                f"{list(other.tensors[n].shape)} in {label}")
    if problems:
        raise MismatchError(f"cannot compare {labels[0]} with {labels[1]}: "
                            + "; ".join(problems[:MAX_LISTED])
                            + "; compare vectors extracted with the same --include/--exclude, "
                              "or select the common tensors with --include/--exclude")
    return names


# float32 entries per block and input: 1 Mi (4 MiB); a quarter of that took 1.7x as long
# (per-block costs), 4x as much 1.15x (the blocks leave the caches)
BLOCK_ELEMENTS = DEFAULT_BLOCK_BYTES // 4


def _span_of(shape, row_elems: int) -> tuple[int, int, int]:
    """(rows, elements per row, rows per block) of a tensor read in blocks of about
    DEFAULT_BLOCK_BYTES of float32."""
    rows = shape[0] if shape else 1
    row = max(math.prod(shape[1:]), 1) if shape else 1
    return rows, row, max(row_elems // row, 1)


def _blocks(names: list[str], inputs: dict, depth: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, X) for every block of rows: X is a [k, n] float32 matrix whose row i is input i's
    block (in the order of `inputs`), flattened, valid until the next block is asked for.

    A reader thread reads each block and widens it into one of a few pooled matrices (float32
    inputs are read straight into it), so the main thread only reduces: on two cores the reads
    plus the widening take about as long as the reductions. Nothing is allocated per block
    (fresh 4 MiB buffers cost page faults: a widening into one took 4x a copy into a reused
    one)."""
    roles = list(inputs)
    first = inputs[roles[0]]
    per_block = BLOCK_ELEMENTS
    largest = 1
    for n in names:
        _, row, step = _span_of(first.tensors[n].shape, per_block)
        largest = max(largest, row * step)
    slots = [torch.empty(len(roles), largest) for _ in range(depth + 2)]
    free: queue.Queue = queue.Queue()
    for k in range(len(slots)):
        free.put(k)
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def wait(box: queue.Queue, item=None, put: bool = False):
        while not stop.is_set():
            try:
                return box.put(item, timeout=0.1) if put else box.get(timeout=0.1)
            except (queue.Full, queue.Empty):
                continue
        raise _Stopped

    def fill(row: torch.Tensor, c, name: str, span) -> int:
        if isinstance(c, Checkpoint):
            return c.read_into(name, span, row)
        t = c.read(name, span).reshape(-1)  # a computed input (an adapter's B·A)
        row[:t.numel()].copy_(t)
        return t.numel()

    def reader() -> None:
        try:
            for name in names:
                rows, _, step = _span_of(first.tensors[name].shape, per_block)
                shaped = bool(first.tensors[name].shape)
                for r0 in range(0, rows, step):
                    span = (r0, min(r0 + step, rows)) if shaped else None
                    k = wait(free)
                    n = [fill(slots[k][i], c, name, span) for i, c in enumerate(inputs.values())]
                    wait(q, (name, k, n[0]), put=True)
            wait(q, None, put=True)
        except _Stopped:
            return
        except BaseException as e:  # re-raised by the consumer
            with contextlib.suppress(_Stopped):
                wait(q, e, put=True)

    thread = threading.Thread(target=reader, name="mkrl-compare", daemon=True)
    thread.start()
    try:
        while (got := q.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            name, k, n = got
            yield name, slots[k][:, :n]
            free.put(k)
    finally:
        stop.set()
        thread.join()


class _Stopped(Exception):
    """The consumer went away: the reader ends."""


GRAM_INNER = 1024  # elements per partial dot of the Gram product


def block_stats(x: torch.Tensor, scratch: torch.Tensor | None = None
                ) -> tuple[float, float, float, int, int]:
    """(⟨a,b⟩, ‖a‖², ‖b‖², #same sign, #opposite sign) of a [2, n] float32 block (rows a and b;
    zeros count for neither).

    The three dots are one batched Gram product over runs of GRAM_INNER entries, the partial
    sums added in float64: one pass over both rows (three BLAS dots took 1.7x as long, and
    one [2, n] x [n, 2] product lost 4e-5 of relative accuracy in its long float32 sums; these
    are within 1e-9). The signs are the product's, taken in place in `scratch` (a float32 buffer
    of at least n, reused), summed (same − opposite) and dotted with themselves (same +
    opposite); comparisons and count_nonzero were 3x slower. The counts are exact: integers
    below 2^24 in float32 (blocks are ≤ 4 MiB)."""
    a, b = x[0], x[1]
    n = a.numel()
    whole = n // GRAM_INNER * GRAM_INNER
    gram = torch.zeros(2, 2, dtype=torch.float64)
    if whole:
        runs = x[:, :whole].reshape(2, -1, GRAM_INNER).transpose(0, 1)  # [m, 2, inner]
        gram += torch.bmm(runs, runs.transpose(1, 2)).sum(0, dtype=torch.float64)
    if whole < n:
        tail = x[:, whole:].double()
        gram += tail @ tail.t()
    (sq_a, dot), (_, sq_b) = gram.tolist()
    signs = torch.mul(a, b, out=scratch[:n] if scratch is not None else None).sign_()
    net = int(signs.sum())
    both = int(torch.dot(signs, signs)) if n < 2**24 else int(signs.count_nonzero())
    return dot, sq_a, sq_b, (both + net) // 2, (both - net) // 2


@contextlib.contextmanager
def _one_thread():
    """Reduce with one intra-op thread while the reader thread keeps the other core busy (as the
    engine streams); OpenMP workers spinning against it cost more than they gave."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compare(a_spec: str, b_spec: str, base_spec: str | None = None,
            selection: Selection = Selection()) -> Comparison:
    """Stream both inputs (and the base) once and reduce them to a `Comparison`."""
    sources = {"a": hub.resolve(a_spec), "b": hub.resolve(b_spec)}
    if base_spec is not None:
        sources["base"] = hub.resolve(base_spec)
    with opened(sources) as ckpts, _one_thread():
        names = _names(ckpts["a"], ckpts["b"], ckpts.get("base"), selection, (a_spec, b_spec))
        per: dict[str, Stats] = {}
        scratch = torch.empty(BLOCK_ELEMENTS)
        for name, x in _blocks(names, ckpts):
            # X is a buffer of ours (rows a, b[, base]): the deltas are taken in place
            if "base" in ckpts:
                x[:2] -= x[2:3]
            s = per.get(name)
            if s is None:
                s = per[name] = Stats(name, tensors=1)
            if scratch.numel() < x.shape[1]:
                scratch = torch.empty(x.shape[1])
            dot, sq_a, sq_b, agree, disagree = block_stats(x[:2], scratch)
            s.params += x.shape[1]
            s.dot += dot
            s.sq_a += sq_a
            s.sq_b += sq_b
            s.agree += agree
            s.disagree += disagree
    result = Comparison(a_spec, b_spec, base_spec, [per[n] for n in names])
    groups: dict[str, Stats] = {}
    for s in result.tensors:
        groups.setdefault(group_of(s.name), Stats(group_of(s.name))).add(s)
        result.total.add(s)
    result.groups = sorted(groups.values(), key=lambda g: _order(g.name))
    return result


def plot_comparison(c: Comparison, out: Path) -> None:
    """Per-layer cosine, sign agreement and norm ratio: the figure papers show."""
    plt = pyplot()
    names = [g.name.replace("layer ", "L") for g in c.groups]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.35 * len(names)), 7), sharex=True)
    for ax, key, label in zip(axes, ("cosine", "sign_agreement", "norm_ratio"),
                              ("cosine similarity", "sign agreement", "‖A‖ / ‖B‖")):
        ax.bar(names, [getattr(g, key) for g in c.groups], color="#4C72B0")
        ax.set_ylabel(label)
        ax.axhline({"cosine": 0, "sign_agreement": 0.5, "norm_ratio": 1}[key], color="grey",
                   lw=0.8, ls="--")
    axes[0].set_title(f"{Path(c.a).name} vs {Path(c.b).name}"
                      + (f" (deltas to {Path(c.base).name})" if c.base else "")
                      + f": total cosine {c.total.cosine:.3f}")
    axes[-1].tick_params(axis="x", rotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
