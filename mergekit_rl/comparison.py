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


def _blocks(names: list[str], inputs: dict, depth: int = 2) -> Iterator[tuple[str, dict]]:
    """(name, {role: float32 block}) for every block of rows, read and widened ahead by a
    thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    first = next(iter(inputs.values()))

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        # (this thread keeps torch's default intra-op threads: its widening then uses the core
        # the main thread's single-threaded reductions leave; one thread here was 13% slower)
        try:
            for name in names:
                shape = first.tensors[name].shape
                rows = shape[0] if shape else 1
                row = max(math.prod(shape[1:]), 1) if shape else 1
                step = max(DEFAULT_BLOCK_BYTES // (4 * row), 1)
                for r0 in range(0, rows, step):
                    span = (r0, min(r0 + step, rows)) if shape else None
                    # widened here, so the reader's core does the conversion and the main
                    # thread only the reductions (the two took as long as each other)
                    if not put((name, {r: c.read(name, span).to(torch.float32)
                                       for r, c in inputs.items()})):
                        return
            put(None)
        except BaseException as e:  # re-raised by the consumer
            put(e)

    thread = threading.Thread(target=reader, name="mkrl-compare", daemon=True)
    thread.start()
    try:
        while (got := q.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join()


def block_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, int, int]:
    """(⟨a,b⟩, ‖a‖², ‖b‖², #same sign, #opposite sign) of two fp32 blocks (zeros in neither).

    Five cheap passes: three BLAS dots, the product's signs in place, their sum (same − opposite)
    and their dot with themselves (same + opposite); comparisons and count_nonzero were 3x
    slower. The counts are exact: integers below 2^24 in float32 (blocks are ≤ 4 MiB)."""
    a, b = a.reshape(-1), b.reshape(-1)
    signs = torch.mul(a, b).sign_()
    net = int(signs.sum())
    both = int(torch.dot(signs, signs)) if signs.numel() < 2**24 else int(signs.count_nonzero())
    return float(torch.dot(a, b)), float(torch.dot(a, a)), float(torch.dot(b, b)), \
        (both + net) // 2, (both - net) // 2


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
        for name, x in _blocks(names, ckpts):
            # Every block is a fresh float32 buffer of ours (widened by the reader): subtract
            # in place.
            a, b = x["a"], x["b"]
            if "base" in x:
                a, b = a.sub_(x["base"]), b.sub_(x["base"])
            s = per.get(name)
            if s is None:
                s = per[name] = Stats(name, tensors=1)
            dot, sq_a, sq_b, agree, disagree = block_stats(a, b)
            s.params += a.numel()
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
