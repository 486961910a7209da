"""`compare A B [--base BASE]`: how two vectors relate, tensor by tensor and layer by layer.

For vectors a and b (or the deltas A − BASE and B − BASE of two models), per tensor, per layer
and in total: cosine similarity ⟨a, b⟩ / (‖a‖·‖b‖), norm ratio ‖a‖ / ‖b‖, and sign agreement —
the share of entries where both are non-zero whose signs agree (TIES' notion of interference,
https://arxiv.org/abs/2306.01708). Streamed: a few threads each read blocks of rows of every
input and reduce them, in one compiled pass (`kernels.pair_sums`) or, without a C compiler, in
torch; sums kept in float64 and added in block order.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hub, kernels
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


def _fill(row: torch.Tensor, c, name: str, span) -> int:
    """Input c's block of tensor `name` flattened into `row` (float32), converted on the way."""
    if isinstance(c, Checkpoint):
        return c.read_into(name, span, row)
    t = c.read(name, span).reshape(-1)  # a computed input (an adapter's B·A)
    row[:t.numel()].copy_(t)
    return t.numel()


def _block_stats_all(names: list[str], inputs: dict, workers: int, native: bool
                     ) -> tuple[list[tuple[str, object]], list[tuple]]:
    """Every block of rows of every tensor, each read and reduced by one of `workers` threads:
    -> (blocks as (name, rows), their `block_stats` plus the entry count, in order).

    Each thread takes the next block and reads every input's rows of it into buffers of its
    own. With `native` (the compiled `kernels.pair_sums`), bfloat16 files are reduced from
    their bytes as read and everything else from float32 rows, the deltas to a base taken in
    the same pass; otherwise the rows are widened into a [k, n] float32 matrix (the deltas
    taken in place) for `block_stats`. The kernel and torch's kernels let go of the GIL, so the
    threads run side by side. A reader thread feeding one reducing thread had left a core idle
    part of the time. Nothing is allocated per block (a widening into a fresh 4 MiB buffer took
    4x a copy into a reused one). The results are summed in block order, so they do not depend
    on which thread took which block."""
    first = next(iter(inputs.values()))
    jobs: list[tuple[str, object]] = []
    largest = 1
    for name in names:
        shape = first.tensors[name].shape
        rows, row, step = _span_of(shape, BLOCK_ELEMENTS)
        largest = max(largest, row * step)
        jobs += [(name, (r0, min(r0 + step, rows))) for r0 in range(0, rows, step)] \
            if shape else [(name, None)]
    # tensors every input stores in bfloat16 in a file: reduced from the bytes as read
    raw = {name for name in names if native and all(
        isinstance(c, Checkpoint) and c.tensors[name].dtype == torch.bfloat16
        for c in inputs.values())}
    results: list = [None] * len(jobs)
    lock, cursor, stop, errors = threading.Lock(), [0], threading.Event(), []
    has_base = "base" in inputs

    def work() -> None:
        x = torch.empty(len(inputs), largest)
        as_read = torch.empty(len(inputs), 2 * largest, dtype=torch.uint8) if raw else None
        scratch = None if native else torch.empty(largest)
        try:
            while not stop.is_set():
                with lock:
                    i = cursor[0]
                    cursor[0] += 1
                if i >= len(jobs):
                    return
                name, span = jobs[i]
                if name in raw:
                    rows = [c.read(name, span, out=as_read[k]).reshape(-1)
                            for k, c in enumerate(inputs.values())]
                    n = rows[0].numel()
                else:
                    n = [_fill(x[k], c, name, span) for k, c in enumerate(inputs.values())][0]
                    rows = x[:, :n]
                if native:
                    sums = kernels.pair_sums(rows[0], rows[1], rows[2] if has_base else None)
                else:
                    if has_base:  # our own buffer (rows a, b, base): the deltas in place
                        rows[:2] -= rows[2:3]
                    sums = block_stats(rows[:2], scratch)
                results[i] = (*sums, n)
        except BaseException as e:  # re-raised by the caller
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, name=f"mkrl-compare-{k}", daemon=True)
               for k in range(max(1, min(workers, len(jobs))))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)  # wakes for Ctrl-C
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return jobs, results


# threads that each read, widen and reduce whole blocks (each holds a [k, 1 Mi] float32 matrix)
WORKERS = max(1, min(4, os.cpu_count() or 1))
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
    """One intra-op thread per reducing thread (`WORKERS` of them share the cores); OpenMP
    workers spinning against them cost more than they gave."""
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
        per = {name: Stats(name, tensors=1) for name in names}
        jobs, results = _block_stats_all(names, ckpts, WORKERS, kernels.available())
        for (name, _), (dot, sq_a, sq_b, agree, disagree, n) in zip(jobs, results):
            s = per[name]
            s.params += n
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
