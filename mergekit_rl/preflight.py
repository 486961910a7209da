"""`check INPUT...`: can these inputs be combined? Answered from headers and configs alone.

For every input: its kind, architecture, tensors, dtypes, quantisation, tied embeddings,
vocabulary and tokenizer. Against the first input (the target): the tensor names and shapes
as the planner of `add` / `merge` matches them (the same code, so the answer is the one the
command would give), the architecture, the tokenizer (same vocabulary and added tokens, or
which differ; for a vector, its donors' tokenizer as its provenance records it) and the chat
template. With `init`, a sample of tensors is read to tell whether two models share an
initialisation: per tensor ‖θ_A − θ_B‖ / ‖θ_A‖, which is small for fine-tunes of one base
(≲ 0.1) and ≈ √2 for independent initialisations of the same scale. Hub inputs are read
header-only (HTTP range requests). Nothing is written.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from . import hub
from .adapter import Adapter, covered_only, prepare_adapter
from .checkpoint import Checkpoint
from .checkpoint import quantization as checkpoint_quantization
from .errors import MergekitRLError
from .job import opened
from .plan import (
    Selection,
    embed_name,
    is_tied,
    plan_apply,
    plan_combine,
)
from .provenance import read_record
from .tokenizer_id import differences, donor_fingerprint, fingerprint

INIT_TENSORS = 8       # tensors sampled by --init
INIT_ROWS = 256        # rows read from each
INIT_THRESHOLD = 1.0   # median ratio below this: a shared initialisation
@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> list[str]:
        out = list(self.lines)
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"problem: {p}" for p in self.problems]
        out.append("check: the inputs can be combined" if self.ok else
                   f"check: {len(self.problems)} problem(s); the inputs cannot be combined as "
                   "asked")
        return out


def quantization(ckpt) -> str | None:
    """The quantisation a checkpoint declares (`checkpoint.quantization`); None for adapters."""
    return checkpoint_quantization(ckpt) if isinstance(ckpt, Checkpoint) else None


def describe(role: str, src: hub.Source, ckpt) -> list[str]:
    """One input's facts, as report lines."""
    cfg = ckpt.config()
    kind = ("low-rank vector" if ckpt.lowrank else "adapter") if isinstance(ckpt, Adapter) \
        else read_record(src.path).get("kind", "model")
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        label = str(t.dtype).removeprefix("torch.")
        dtypes[label] = dtypes.get(label, 0) + 1
    params = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    arch = (cfg.get("architectures") or [None])[0] or (
        ckpt.architecture() if isinstance(ckpt, Adapter) else None)
    lines = [f"{role}: {src.spec} ({kind}{', header-only' if src.header_only else ''})",
             f"  architecture {arch or '?'}, {len(ckpt.tensors)} tensors, {params:,} "
             f"parameters, dtypes {', '.join(f'{k}×{v}' for k, v in sorted(dtypes.items()))}"]
    emb = embed_name(ckpt)
    if kind == "model":
        rows = ckpt.tensors[emb].shape[0] if emb else None
        lines.append(f"  vocab_size {cfg.get('vocab_size', '?')} (embedding rows {rows}), tied "
                     f"embeddings {'yes' if is_tied(ckpt) else 'no'}, quantisation "
                     f"{quantization(ckpt) or 'none'}")
    tok = fingerprint(src.path)
    if tok:
        lines.append(f"  tokenizer {tok['vocab_sha256'][:12]} ({tok['vocab_size']} tokens, "
                     f"{len(tok['added_tokens'])} added), chat template "
                     f"{(tok['chat_template_sha256'] or 'none')[:12]}")
    return lines


def compare_to_target(role: str, kind: str, ckpt, src: hub.Source, target, tsrc: hub.Source,
                      allow_vocab: bool, report: Report) -> None:
    """What would stop `add` (a vector) or `merge` (a model) from combining ckpt with target."""
    tcfg = target.config()
    if kind == "vector":
        raw = isinstance(ckpt, Adapter) and not ckpt.lowrank
        try:
            if raw:
                prepare_adapter(ckpt, target, "target")
            plan_apply(target, ckpt, Selection(), None, allow_vocab, covered_only(ckpt, target),
                       alias_tied=not raw)
        except MergekitRLError as e:
            report.problems.append(f"{role}: {e}")
        mine = (ckpt.config().get("architectures") or [None])[0]
        donor = donor_fingerprint(read_record(src.path))
        problems, warnings = differences(donor, fingerprint(tsrc.path))
        if donor is None:
            report.warnings.append(f"{role}: records no donor tokenizer; cannot tell whether "
                                   "its rows mean the target's tokens")
    else:
        quantized = quantization(ckpt) or (quantization(target) and
                                           f"the target's: {quantization(target)}")
        if quantized:
            report.problems.append(f"{role}: quantised weights ({quantized}) cannot be "
                                   "combined; use the unquantised checkpoints")
        try:
            plan_combine(target, {role: ckpt}, Selection(), None, allow_vocab)
        except MergekitRLError as e:
            report.problems.append(f"{role}: {e}")
        mine = (ckpt.config().get("architectures") or [None])[0]
        if is_tied(ckpt) != is_tied(target):
            yes = {True: "tied", False: "untied"}
            report.warnings.append(f"{role}: {yes[is_tied(ckpt)]} embeddings but the target's "
                                   f"are {yes[is_tied(target)]}; add/merge change the shared "
                                   "matrix once")
        va, vb = ckpt.config().get("vocab_size"), tcfg.get("vocab_size")
        if va and vb and va != vb and not allow_vocab:
            report.problems.append(f"{role}: vocab_size {va} but the target's is {vb} (pass "
                                   "--allow-vocab-mismatch to combine the common rows)")
        problems, warnings = differences(fingerprint(src.path), fingerprint(tsrc.path))
    theirs = (tcfg.get("architectures") or [None])[0]
    if mine and theirs and mine != theirs:
        report.problems.append(f"{role}: architecture {mine} but the target is {theirs}")
    report.problems += [f"{role}: tokenizer: {p}" for p in problems if not allow_vocab]
    report.warnings += [f"{role}: tokenizer: {p}" for p in problems if allow_vocab]
    report.warnings += [f"{role}: {w}" for w in warnings]


def shared_init(a, b, names: list[str] | None = None) -> tuple[float, list[str]]:
    """Median ‖θ_A − θ_B‖/‖θ_A‖ over a sample of 2-D tensors (first INIT_ROWS rows of each),
    and the report lines. Reads tensor data."""
    both = [n for n, t in a.tensors.items() if t.is_float and len(t.shape) == 2
            and n in b.tensors and b.tensors[n].shape == t.shape]
    if names is None:
        step = max(len(both) / INIT_TENSORS, 1)
        names = [both[int(i * step)] for i in range(min(INIT_TENSORS, len(both)))]
    ratios, lines, read = [], [], 0
    for n in names:
        rows = (0, min(INIT_ROWS, a.tensors[n].shape[0]))
        x, y = a.read(n, rows).to(torch.float64), b.read(n, rows).to(torch.float64)
        read += x.numel() * (a.tensors[n].dtype.itemsize + b.tensors[n].dtype.itemsize)
        norm = float(x.norm())
        ratio = float((x - y).norm()) / norm if norm > 0 else float("inf")
        ratios.append(ratio)
        lines.append(f"    {n}: {ratio:.4f}")
    median = statistics.median(ratios) if ratios else float("nan")
    lines.insert(0, f"  init: ‖θ_A − θ_B‖/‖θ_A‖ on {len(names)} tensors (first {INIT_ROWS} rows; "
                    f"read {read / 1e6:.2f} MB of tensor data): median {median:.4f}")
    return median, lines


def check(specs: list[str], allow_vocab: bool = False, init: bool = False) -> Report:
    """The report for `check INPUT...`: the first input is the target."""
    sources = {f"input {i}" if i else "target": hub.resolve_headers(s)
               for i, s in enumerate(specs)}
    return check_sources(sources, None, allow_vocab, init)


def check_sources(sources: dict[str, hub.Source], kinds: dict[str, str] | None,
                  allow_vocab: bool = False, init: bool = False) -> Report:
    """The report for inputs already resolved; `kinds` says which roles are vectors (default:
    what each folder is)."""
    report = Report()
    with opened(sources, refuse_quantized=False) as ckpts:
        target = ckpts["target"]
        for role, src in sources.items():
            report.lines += describe(role, src, ckpts[role])
        for role, src in list(sources.items())[1:]:
            ckpt = ckpts[role]
            kind = (kinds or {}).get(role) or ("vector" if isinstance(ckpt, Adapter) or
                                               read_record(src.path).get("kind") == "vector"
                                               else "model")
            compare_to_target(role, kind, ckpt, src, target, sources["target"], allow_vocab,
                              report)
            if init and kind == "model":
                median, lines = shared_init(target, ckpt)
                report.lines += [f"{role} vs target:"] + lines
                if not median < INIT_THRESHOLD:
                    report.problems.append(
                        f"{role}: does not share the target's initialisation (median relative "
                        f"distance {median:.3g} ≥ {INIT_THRESHOLD}; fine-tunes of one base are "
                        "typically < 0.1, independent inits ≈ 1.41); task arithmetic needs a "
                        "common base")
                else:
                    report.lines.append(f"  {role} shares the target's initialisation")
    return report
