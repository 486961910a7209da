"""Plan an operation from checkpoint headers alone, before any tensor data is read.

A plan is the list of output tensors, each saying which input tensors it is computed from (or
copied from), its output shape and dtype. Every mismatch between inputs (missing or extra tensors,
shape or dtype-kind differences, vocabulary rows) is found here and reported in one error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import ConfigError, MismatchError

log = logging.getLogger(__name__)

LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight",
                  "word_embeddings.weight", "tok_embeddings.weight")
MAX_LISTED = 8
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Item:
    """One output tensor.

    `sources` are (role, tensor name) pairs read for the computation. Rows [0, common_rows) are
    computed; with a vocabulary mismatch the remaining rows are copied from `copy_from`. An item
    with no sources is a plain copy of `copy_from` (integer tensors, tensors outside the mask).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[tuple[str, str], ...] = ()
    copy_from: tuple[str, str] | None = None
    common_rows: int | None = None

    @property
    def is_copy(self) -> bool:
        return not self.sources

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Plan:
    items: list[Item]
    notes: list[str] = field(default_factory=list)  # things the user should be told
    excluded: list[str] = field(default_factory=list)  # float tensors left out by the mask

    @property
    def computed(self) -> int:
        return sum(not i.is_copy for i in self.items)


@dataclass(frozen=True)
class Selection:
    """The paper's mask m as name regexes: a tensor takes part when it matches an `include`
    (or there is none) and no `exclude` (re.search), and passes every mask in `within`.

    `source` says where the patterns were written, for errors and provenance: None for the
    command line (`--include`), else the manifest file (`m.yaml: include`)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    source: str | None = None
    within: tuple[Selection, ...] = ()

    def __post_init__(self):
        for key, patterns in (("include", self.include), ("exclude", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"{self.flag(key)} {p!r}: invalid regular expression "
                                      f"({e})") from None

    def flag(self, key: str) -> str:
        return f"--{key}" if self.source is None else f"{self.source}: {key}"

    @property
    def empty(self) -> bool:
        return not (self.include or self.exclude or self.within)

    def masks(self) -> list[Selection]:
        own = [self] if self.include or self.exclude else []
        return own + [m for s in self.within for m in s.masks()]

    def _own(self, name: str) -> bool:
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    def selects(self, name: str) -> bool:
        return self._own(name) and all(s.selects(name) for s in self.within)

    def narrowed(self, other: Selection) -> Selection:
        """Both masks at once: a tensor takes part only when each of them selects it."""
        if other.empty:
            return self
        if self.empty:
            return other
        return Selection(self.include, self.exclude, self.source, (*self.within, other))

    def record(self) -> dict:
        """What provenance.json says about the mask."""
        return {"masks": [{"from": "command line" if m.source is None else f"manifest {m.source}",
                           "include": list(m.include), "exclude": list(m.exclude)}
                          for m in self.masks()],
                "rule": "a tensor is changed when every mask selects it (it matches one of the "
                        "mask's include patterns, or it has none, and none of its excludes)"}

    def check(self, names: list[str], what: str) -> list[str]:
        """The selected `names`; a MismatchError naming the pattern when an include matches no
        tensor at all or the mask leaves nothing to change."""
        for m in self.masks():
            for p in m.include:
                if not any(re.search(p, n) for n in names):
                    raise MismatchError(f"{m.flag('include')} {p!r} matches no tensor of {what} "
                                        f"(names look like {', '.join(names[:2])}); check the "
                                        "pattern (a regular expression, searched in the name)")
        chosen = [n for n in names if self.selects(n)]
        if names and not chosen:
            flags = ", ".join(f"{m.flag(k)} {p!r}" for m in self.masks()
                              for k in ("include", "exclude") for p in getattr(m, k))
            raise MismatchError(f"{flags}: no tensor of {what} is left to change; the output "
                                "would be a copy. Check the patterns")
        return chosen


def parse_dtype(text: str) -> torch.dtype | None:
    """'auto' → None; 'float32' / 'bfloat16' / 'float16' (and fp32/bf16/fp16) → dtype."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if text == "auto":
        return None
    if text not in names:
        raise ConfigError(f"dtype {text!r}: expected auto, float32, bfloat16 or float16")
    return names[text]


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.3.mlp...` → 3); None outside layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def lm_head_name(ckpt: Checkpoint) -> str | None:
    return next((n for n in LM_HEAD_NAMES if n in ckpt), None)


def embed_name(ckpt: Checkpoint) -> str | None:
    return next((n for n in ckpt.tensors if n.endswith(EMBED_SUFFIXES)), None)


def is_tied(ckpt: Checkpoint) -> bool:
    """Tied when the file has no lm_head or the config says so (the embedding is the shared
    matrix)."""
    if embed_name(ckpt) is None:
        return False
    return lm_head_name(ckpt) is None or bool(ckpt.config().get("tie_word_embeddings", False))


def _is_vocab_tensor(name: str) -> bool:
    return name in LM_HEAD_NAMES or name.endswith(EMBED_SUFFIXES)


class _Problems:
    """Collects mismatches so the user gets all of them in one message."""

    def __init__(self, what: str):
        self.what = what
        self.missing: list[str] = []
        self.extra: list[str] = []
        self.other: list[str] = []

    def raise_if_any(self) -> None:
        parts = []
        for label, names in (("missing", self.missing), ("unexpected", self.extra)):
            if names:
                shown = ", ".join(names[:MAX_LISTED])
                more = f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
                parts.append(f"{len(names)} {label}: {shown}{more}")
        parts += self.other[:MAX_LISTED]
        if parts:
            raise MismatchError(f"{self.what}: " + "; ".join(parts))


def _common_rows(a: TensorInfo, b: TensorInfo, allow_vocab: bool, problems: _Problems,
                 a_label: str, b_label: str) -> int | None:
    """Rows to combine: None when shapes match, else the common block for vocabulary tensors."""
    if a.shape == b.shape:
        return None
    if (_is_vocab_tensor(a.name) and len(a.shape) == 2 and len(b.shape) == 2
            and a.shape[1:] == b.shape[1:]):
        if allow_vocab:
            return min(a.shape[0], b.shape[0])
        problems.other.append(
            f"{a.name} has {a.shape[0]} vocabulary rows in {a_label} but {b.shape[0]} in "
            f"{b_label} (pass --allow-vocab-mismatch to combine the common rows)")
        return None
    problems.other.append(f"{a.name} has shape {list(a.shape)} in {a_label} but "
                          f"{list(b.shape)} in {b_label}")
    return None


def _kind_mismatch(a: TensorInfo, b: TensorInfo, problems: _Problems, a_label: str,
                   b_label: str) -> bool:
    if a.is_float != b.is_float:
        problems.other.append(f"{a.name} is {a.dtype} in {a_label} but {b.dtype} in {b_label}")
        return True
    return False


def plan_extract(finetuned: Checkpoint, base: Checkpoint, selection: Selection,
                 out_dtype: torch.dtype | None, allow_vocab: bool = False) -> Plan:
    """Vector = finetuned − base over the selected floating-point tensors."""
    dtype = out_dtype or torch.float32
    problems = _Problems(f"cannot extract {finetuned.path} − {base.path}")
    notes: list[str] = []
    items: list[Item] = []
    ft_head, base_head = lm_head_name(finetuned), lm_head_name(base)
    ft_emb, base_emb = embed_name(finetuned), embed_name(base)
    alias = {}  # finetuned name → base name when one side ties lm_head to the embedding
    if ft_head and not base_head and base_emb:
        alias[ft_head] = base_emb
        notes.append(f"{base.path} ties {ft_head} to {base_emb}: vector {ft_head} = "
                     f"finetuned {ft_head} − base {base_emb}")
    for name in sorted(set(base.tensors) - set(finetuned.tensors)):
        if name == base_head and not ft_head and ft_emb:
            notes.append(f"{finetuned.path} ties {base_head}: the vector has no {base_head}; "
                         f"its {ft_emb} delta applies to both")
        elif base.tensors[name].is_float:
            problems.missing.append(name)
    excluded = []
    for name, info in finetuned.tensors.items():
        src = alias.get(name, name)
        if src not in base:
            if info.is_float:
                problems.extra.append(name)
            continue
        b = base.tensors[src]
        if _kind_mismatch(info, b, problems, "finetuned", "base") or not info.is_float:
            continue  # integer tensors are not task-vector material
        if not selection.selects(name):
            excluded.append(name)
            continue
        rows = _common_rows(info, b, allow_vocab, problems, "finetuned", "base")
        shape = info.shape if rows is None else (rows,) + info.shape[1:]
        if rows is not None:
            notes.append(f"{name}: vocabularies differ ({info.shape[0]} vs {b.shape[0]} rows); "
                         f"the vector covers the common {rows} rows")
        items.append(Item(name, shape, dtype, (("finetuned", name), ("base", src)),
                          common_rows=rows))
    problems.raise_if_any()
    selection.check([n for n, i in finetuned.tensors.items() if i.is_float], str(finetuned.path))
    if not items:
        raise MismatchError(f"{finetuned.path}: no floating-point tensor to extract")
    return Plan(items, notes, excluded)


def plan_adapter_extract(adapter, base: Checkpoint, selection: Selection,
                         out_dtype: torch.dtype | None) -> Plan:
    """The dense vector of an adapter: s·B·A where it adapts a tensor, (full weight − base)
    where it carries a full weight (modules_to_save), zero elsewhere; every float tensor of
    the base. Roles: "adapter", "base", "zero" (an `adapter.Zeros` of the base), "merged" (an
    `adapter.Merged`: peft's saved copy of the layer plus its delta)."""
    dtype = out_dtype or torch.float32
    problems = _Problems(f"cannot extract adapter {adapter.path} against base {base.path}")
    problems.extra += sorted(n for n in {*adapter.tensors, *adapter.copies} if n not in base)
    items, excluded = [], []
    for name, info in base.tensors.items():
        if not info.is_float:
            continue
        if not selection.selects(name):
            excluded.append(name)
            continue
        mine = adapter.tensors.get(name)
        if name in adapter.copies:  # peft loads its copy: merged − base = copy + Δ − base
            items.append(Item(name, info.shape, dtype, (("merged", name), ("base", name))))
            continue
        if mine is None:
            items.append(Item(name, info.shape, dtype, (("zero", name),)))
            continue
        if mine.shape != info.shape:
            problems.other.append(f"{name} has shape {list(mine.shape)} in the adapter but "
                                  f"{list(info.shape)} in the base (is it the adapter's base?)")
        full = name in adapter.full
        items.append(Item(name, info.shape, dtype,
                          (("adapter", name),) + ((("base", name),) if full else ())))
    if problems.extra:
        problems.other.append("the base lacks tensors the adapter changes: is it the "
                              "adapter's base model?")
    problems.raise_if_any()
    return Plan(items, [], excluded)


def plan_apply(target: Checkpoint, vector: Checkpoint, selection: Selection,
               out_dtype: torch.dtype | None, allow_vocab: bool = False,
               vector_excluded: frozenset[str] = frozenset(), alias_tied: bool = True) -> Plan:
    """Output = target + α·vector; the output has exactly the target's tensors, in its order."""
    return plan_combine(target, {"vector": vector}, selection, out_dtype, allow_vocab,
                        {"vector": vector_excluded},
                        what=f"cannot apply vector {vector.path} to {target.path}",
                        no_alias=frozenset() if alias_tied else frozenset({"vector"}))


def plan_combine(target: Checkpoint, inputs: dict[str, Checkpoint], selection: Selection,
                 out_dtype: torch.dtype | None, allow_vocab: bool = False,
                 excluded: dict[str, frozenset[str]] | None = None, what: str = "",
                 no_alias: frozenset[str] = frozenset()) -> Plan:
    """Output tensors = the target's, each computed from the target and the same tensor of every
    input (vectors or models). Tensors outside the mask and integer tensors are copied; a vector
    that lacks a tensor because it was masked out at extraction does not take part in it.
    Roles in `no_alias` (PEFT adapters): an input without lm_head leaves lm_head alone instead
    of lending it its embedding delta (it did not come from a tied pair, it did not adapt it)."""
    problems = _Problems(what or f"cannot combine {', '.join(str(c.path) for c in inputs.values())}"
                         f" with {target.path}")
    excluded = excluded or {}
    many = len(inputs) > 1
    notes: list[str] = []
    items: list[Item] = []
    used: dict[str, set[str]] = {role: set() for role in inputs}
    t_head, target_tied = lm_head_name(target), is_tied(target)
    heads = {role: (lm_head_name(c), embed_name(c)) for role, c in inputs.items()}

    def source_name(role: str, name: str) -> str:
        ckpt, (_, emb) = inputs[role], heads[role]
        if name == t_head and emb and (target_tied or (role not in no_alias and
                                                       name not in ckpt)):
            if not target_tied:
                notes.append(f"{ckpt.path} has no {name} (tied): applying its {emb} to {name} "
                             "too" if many else f"the vector has no {name} (it came from a tied "
                             f"pair): applying its {emb} delta to {name} too")
            return emb  # the shared matrix changes once: by the embedding
        return name

    for name, info in target.tensors.items():
        dtype = info.dtype if (out_dtype is None or not info.is_float) else out_dtype
        copy = Item(name, info.shape, dtype, copy_from=("target", name))
        srcs = {role: source_name(role, name) for role in inputs}
        if not info.is_float or not selection.selects(name):
            for role, src in srcs.items():
                if src in inputs[role]:
                    used[role].add(src)
                    if not info.is_float:
                        _kind_mismatch(info, inputs[role].tensors[src], problems, "target", role)
            items.append(copy)
            continue
        present, rows = [], None
        for role, src in srcs.items():
            if src not in inputs[role]:
                if name not in excluded.get(role, ()):
                    problems.missing.append(f"{name} (in {role})" if many else name)
                continue
            used[role].add(src)
            other = inputs[role].tensors[src]
            if _kind_mismatch(info, other, problems, "target", role):
                continue
            r = _common_rows(info, other, allow_vocab, problems, "target", role)
            if r is not None:
                rows = r if rows is None else min(rows, r)
            present.append((role, src))
        if not present:
            items.append(copy)
            continue
        if rows is not None and rows < info.shape[0]:
            notes.append(f"{name}: target has {info.shape[0]} rows, the inputs {rows}; rows "
                         f"{rows}..{info.shape[0] - 1} are kept from the target")
        items.append(Item(name, info.shape, dtype, (("target", name), *present),
                          copy_from=("target", name), common_rows=rows))
    for role, (head, _) in heads.items():
        if target_tied and head and head not in target:
            used[role].add(head)
            notes.append(f"{target.path} ties {head} to the embeddings: using the "
                         f"{role}'s embedding delta once and ignoring its {head}"
                         if many else f"{target.path} ties {head} to the embeddings: using the "
                         f"vector's embedding delta once and ignoring its {head}")
        extra = sorted(set(inputs[role].tensors) - used[role])
        problems.extra += [f"{n} (in {role})" if many else n for n in extra]
    problems.raise_if_any()
    float_names = [n for n, i in target.tensors.items() if i.is_float]
    selection.check(float_names, str(target.path))
    excluded = [n for n in float_names if not selection.selects(n)]
    return Plan(items, list(dict.fromkeys(notes)), excluded)
