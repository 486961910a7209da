"""`mergekit-rl merge MANIFEST`: one streaming pass over every input of a manifest.

The target's tensors are the output's. For each one the planner gathers the same tensor from
every term's inputs (a vector, a `plus − minus` pair computed on the fly, or a model whose delta
to the target is taken), the manifest's settings are evaluated for that tensor (per-layer
gradients, regex/substring conditions), and the method combines the deltas:
`θ = θ_target + λ·merge(τ_1..τ_n)` — or, on the models themselves, Σ w_i θ_i for `linear`,
`slerp(t; θ_target, θ_1)` and `model_stock(θ_target; θ_1..θ_n)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import engine, hub, provenance
from .adapter import Adapter, covered_only, prepare_adapter
from .checkpoint import TOKENIZER_FILES, Checkpoint, copy_side_files, parse_size
from .errors import ConfigError, MismatchError
from .job import Options, ProgressFactory, Result, execute, opened
from .manifest import MODEL_METHODS, Cond, Manifest, Term, to_dict
from .maths import geometric, merge_methods
from .output import check_output
from .plan import Plan, Selection, embed_name, layer_index, plan_combine
from .tokenizer_id import check_vector_donors

log = logging.getLogger(__name__)

ELEMENTWISE = ("task_arithmetic", "linear")
ELECTING = ("ties", "dare_ties", "breadcrumbs_ties")  # sign election: per-entry divisors


def term_roles(i: int, term: Term) -> tuple[str, ...]:
    return (f"t{i}+", f"t{i}-") if term.kind == "pair" else (f"t{i}",)


def layer_position(name: str, num_layers: int, embed: str | None) -> float:
    """mergekit's t: layer i of L at i/(L−1); embeddings at 0; final norm and head at 1."""
    layer = layer_index(name)
    if layer is not None:
        return layer / (num_layers - 1) if num_layers > 1 else 1.0
    return 0.0 if name == embed or "embed" in name else 1.0


@dataclass(frozen=True)
class TensorParams:
    """The manifest's settings evaluated for one tensor."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lam: float
    normalize: bool
    gammas: tuple[float, ...]
    rescale: bool | str | None  # None: the method's mergekit default
    seed: int
    epsilons: tuple[float, ...] = ()
    t: float | None = None       # slerp
    filter_wise: bool = False    # model_stock


def resolve_params(m: Manifest, name: str, t: float) -> TensorParams:
    normalize = m.global_param("normalize", name, t,
                               merge_methods.DEFAULT_NORMALIZE.get(m.method, False))
    slerp_t = m.global_param("t", name, t, None)
    return TensorParams(
        weights=tuple(float(m.term_param(term, "weight", name, t, 1.0)) for term in m.terms),
        densities=tuple(float(m.term_param(term, "density", name, t, 1.0)) for term in m.terms),
        lam=float(m.global_param("lambda", name, t, 1.0)),
        normalize=bool(normalize),
        gammas=tuple(float(m.term_param(term, "gamma", name, t, 0.01)) for term in m.terms),
        rescale=m.global_param("rescale", name, t, None),
        seed=int(m.params.get("seed", 0)),
        epsilons=tuple(float(m.term_param(term, "epsilon", name, t, 0.15)) for term in m.terms),
        t=None if slerp_t is None else float(slerp_t),
        filter_wise=bool(m.global_param("filter_wise", name, t, False)),
    )


def compute_fn(m: Manifest, params: dict[str, TensorParams]) -> engine.ComputeFn:
    """The per-tensor maths: gather each term's delta and combine with the method."""

    def fn(item, x: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        p = params[item.name]
        x = {role: t.to(torch.float32) for role, t in x.items()}  # methods work in fp32
        base = x["target"]
        present, weights, dens, gammas, seeds, epsilons = [], [], [], [], [], []
        for i, term in enumerate(m.terms):
            roles = term_roles(i, term)
            if not all(r in x for r in roles):
                continue  # masked out of this term's vector
            # In place on this block's own fp32 copies (a role belongs to one term only);
            # the same rounding as `a - b`.
            if term.kind == "pair":
                present.append(x[roles[0]].sub_(x[roles[1]]))
            elif term.kind == "model" and m.method not in MODEL_METHODS:
                present.append(x[roles[0]].sub_(base))
            else:
                present.append(x[roles[0]])
            weights.append(p.weights[i])
            dens.append(p.densities[i])
            gammas.append(p.gammas[i])
            epsilons.append(p.epsilons[i])
            seeds.append(merge_methods.tensor_seed(p.seed, item.name, i))
        if m.method == "linear":
            return merge_methods.linear(present, weights, normalize=p.normalize)
        if m.method == "slerp":
            return geometric.slerp(p.t, base, present[0])
        if m.method == "model_stock":
            return geometric.model_stock(base, present, filter_wise=p.filter_wise)
        merged = merge_methods.merge_deltas(present, weights, method=m.method, densities=dens,
                                      normalize=p.normalize, gamma=gammas, rescale=p.rescale,
                                      seeds=seeds, epsilon=epsilons)
        return merge_methods.apply_merged(base, merged, p.lam, inplace=True)  # merged is ours

    return fn


def _sources(m: Manifest, header_only: bool = False) -> dict[str, hub.Source]:
    resolve = hub.resolve_headers if header_only else hub.resolve
    sources = {"target": resolve(m.target)}
    for i, term in enumerate(m.terms):
        for role, spec in zip(term_roles(i, term), term.inputs):
            sources[role] = resolve(spec)
    return sources


def selection(m: Manifest, options: Options) -> Selection:
    """The manifest's mask and the command line's together: a tensor is merged only when both
    select it (as on `add`, the rest is the target's, unchanged)."""
    return Selection(m.include, m.exclude, str(m.source or "manifest")).narrowed(
        options.selection)


def kinds(m: Manifest) -> dict[str, str]:
    """What each input must be: a vector term's input a task vector, the rest models."""
    out = {}
    for i, term in enumerate(m.terms):
        for role in term_roles(i, term):
            out[role] = "vector" if term.kind == "vector" else "model"
    return out


def _plan(m: Manifest, ckpts: dict[str, Checkpoint], options: Options
          ) -> tuple[Plan, dict[str, TensorParams]]:
    excluded, no_alias, notes = {}, set(), []
    target = ckpts["target"]
    for i, term in enumerate(m.terms):
        if term.kind == "vector":
            role = term_roles(i, term)[0]
            vector = ckpts[role]
            if isinstance(vector, Adapter) and not vector.lowrank:
                if vector.full:
                    raise MismatchError(f"{vector.path}: carries full weights "
                                        f"({sorted(vector.full)[0]}, ...), not only deltas; "
                                        "extract it against its base and merge that vector")
                notes += prepare_adapter(vector, target, "target")
                no_alias.add(role)
            excluded[role] = covered_only(vector, target)
            notes += check_vector_donors(provenance.read_record(vector.path), target.path,
                                         options.allow_vocab_mismatch)
    inputs = {r: c for r, c in ckpts.items() if r != "target"}
    plan = plan_combine(target, inputs, selection(m, options),
                        options.out_dtype, options.allow_vocab_mismatch, excluded,
                        what=f"cannot merge {m.source or 'manifest'}", no_alias=frozenset(no_alias))
    plan.notes[:0] = notes
    layers = target.config().get("num_hidden_layers") or 1 + max(
        (i for n in target.tensors if (i := layer_index(n)) is not None), default=0)
    if m.layer_range is not None and tuple(m.layer_range) != (0, layers):
        raise ConfigError(f"{m.source}: slices layer_range {list(m.layer_range)} does not span "
                          f"the models' {layers} layers [0, {layers}]; only a slice over every "
                          "layer is supported")
    embed = embed_name(target)
    params = {}
    for item in plan.items:
        if item.is_copy:
            continue
        p = resolve_params(m, item.name, layer_position(item.name, layers, embed))
        for d in p.densities:
            if not 0 < d <= 1:
                raise ConfigError(f"{m.source}: density {d} for tensor {item.name}: expected a "
                                  "value in (0, 1]")
        if not all(math.isfinite(w) for w in p.weights + (p.lam,)):
            raise ConfigError(f"{m.source}: weights and lambda must be finite ({item.name})")
        _check_divisor(m, item, p)
        params[item.name] = p
    return plan, params


def _check_divisor(m: Manifest, item, p: TensorParams) -> None:
    """Normalising divides by the sum of the weights of the terms present for this tensor
    (without sign election; with it, an entry no term agrees on is 0 as in mergekit). A sum
    of 0 is a mistake in the manifest: mergekit divides anyway (linear: inf/NaN) or silently
    skips the division (task arithmetic, DARE linear, breadcrumbs)."""
    if not p.normalize or m.method in ELECTING:
        return
    roles = {role for role, _ in item.sources}
    weights = [p.weights[i] for i, term in enumerate(m.terms)
               if all(r in roles for r in term_roles(i, term))]
    total = float(torch.tensor(weights, dtype=torch.float32).sum())  # as the maths sums them
    if weights and abs(total) < 1e-8:
        shown = ", ".join(f"{w:g}" for w in weights)
        raise ConfigError(f"{m.source or 'manifest'}: {m.method} with normalize: true divides "
                          f"by the sum of the weights, which is {total:g} for {item.name} "
                          f"(weights {shown}); set parameters.normalize: false or change the "
                          "weights")


def options_for(m: Manifest, base: Options) -> Options:
    """The manifest's output settings, unless the command line gave its own."""
    dtype = base.dtype if base.dtype != "auto" else m.out_dtype
    shard = base.max_shard_size
    if m.max_shard_size and base.max_shard_size == Options().max_shard_size:
        shard = parse_size(m.max_shard_size)
    return dataclasses.replace(base, dtype=dtype, max_shard_size=shard)


def output_path(m: Manifest, out: Path | None) -> Path:
    """The folder a merge writes: `-o` (relative to the working directory), else the manifest's
    output.path (relative to the manifest)."""
    out = out or m.out_path
    if out is None:
        raise ConfigError(f"{m.source}: no output folder; set output.path or pass -o")
    return Path(out).expanduser().resolve()


def run_merge(m: Manifest, out: Path | None, options: Options = Options(),
              progress: ProgressFactory | None = None) -> Result:
    out = output_path(m, out)
    options = options_for(m, options)
    local = [Path(s) for s in (m.target, *(x for t in m.terms for x in t.inputs))
             if Path(s).exists()]
    out = check_output(out, local, options.overwrite)
    sources = _sources(m)
    resolved = dataclasses.replace(m, out_path=out)  # merge.yaml says where it was written
    with opened(sources, kinds(m)) as ckpts:
        plan, params = _plan(m, ckpts, options)
        tok_from = hub.resolve(m.tokenizer_source).path if m.tokenizer_source else None

        def finalize(tmp: Path) -> None:
            (tmp / "merge.yaml").write_text(yaml.safe_dump(to_dict(resolved), sort_keys=False))
            if tok_from:  # the tokenizer (not the config) from tokenizer_source
                copy_side_files(tok_from, tmp, TOKENIZER_FILES)

        result = execute(
            "model", formula(m), sources, ckpts, plan, compute_fn(m, params), out, options,
            progress, side_from=sources["target"].path, side_names=None,
            tags=["merge", m.method.replace("_", "-"), "reasoning-vector"],
            extra={"method": m.method, "manifest": to_dict(resolved),
                   **({"ignored": list(m.notes)} if m.notes else {})},
            whole_tensors=m.method not in ELEMENTWISE,
            finalize=finalize, selection=selection(m, options))
    return result


def formula(m: Manifest) -> str:
    if m.method == "linear":
        return "Σ_i w_i·θ_i" + (" / Σ_i w_i" if m.params.get("normalize", True) else "")
    if m.method == "slerp":
        return "slerp(t; target, model0)"
    if m.method == "model_stock":
        return f"model_stock(target; {', '.join(f'model{i}' for i in range(len(m.terms)))})"
    parts = []
    for i, t in enumerate(m.terms):
        parts.append(f"w{i}·(plus{i} − minus{i})" if t.kind == "pair" else
                     f"w{i}·v{i}" if t.kind == "vector" else f"w{i}·(model{i} − target)")
    return f"target + λ·{m.method}({', '.join(parts)})"


def dry_run(m: Manifest, options: Options = Options(), out: Path | None = None
            ) -> Iterator[str]:
    """The pre-flight report of `check` (Hub inputs read header-only), then the plan: inputs,
    output, tensors, bytes, peak memory, what each override touches. Raises after the report
    when the inputs cannot be combined."""
    from .preflight import check_sources

    options = options_for(m, options)
    target = out or m.out_path
    sources = _sources(m, header_only=True)
    report = check_sources(sources, kinds(m), options.allow_vocab_mismatch)
    yield from report.render()
    if not report.ok:
        raise MismatchError(f"dry run: {m.source or 'the manifest'}: the inputs cannot be "
                            "combined (problems above); nothing was written")
    with opened(sources, kinds(m)) as ckpts:
        plan, params = _plan(m, ckpts, options)
        yield f"method: {m.method}   formula: {formula(m)}"
        yield (f"output: {Path(target).expanduser().resolve()}" + (" (-o)" if out else
               " (output.path)") if target else "output: none given (set output.path or -o)")
        for role, src in sources.items():
            yield f"  {role:<7} {src.spec}  ({len(ckpts[role].tensors)} tensors, " \
                  f"{ckpts[role].total_bytes / 1e9:.3g} GB)"
        read = sum(ckpts[r].tensors[n].nbytes for i in plan.items
                   for r, n in (i.sources or (i.copy_from,)))
        write = sum(i.nbytes for i in plan.items)
        yield (f"tensors: {len(plan.items)} ({plan.computed} computed, "
               f"{len(plan.items) - plan.computed} copied from the target)")
        yield f"bytes: read {read / 1e9:.3g} GB, write {write / 1e9:.3g} GB " \
              f"(dtype {options.dtype})"
        yield f"expected peak memory: ≈{peak_memory(m, plan, options) / 2**20:.0f} MiB " \
              "(+ ~300 MiB for Python and torch)"
        for label, setting in _conditions(m):
            names = [i.name for i in plan.items if not i.is_copy
                     and any(c.applies(i.name) for c in setting)]
            yield f"override {label}: {len(names)} tensors" + (
                f" (e.g. {', '.join(names[:3])})" if names else "")
        mask = selection(m, options)
        if not mask.empty:
            yield (f"mask: {len(plan.excluded)} floating-point tensors left as the target's "
                   f"({'; '.join(_mask_text(s) for s in mask.masks())})")
        for note in plan.notes:
            yield f"note: {note}"
        yield "dry run: nothing was written"


def _mask_text(s: Selection) -> str:
    return ", ".join(f"{s.flag(k)} {p!r}" for k in ("include", "exclude") for p in getattr(s, k))


def _conditions(m: Manifest) -> Iterator[tuple[str, list[Cond]]]:
    for key, setting in m.params.items():
        if isinstance(setting, list) and setting and isinstance(setting[0], Cond):
            yield f"parameters.{key}", setting
    for i, t in enumerate(m.terms):
        for key, setting in t.params.items():
            if isinstance(setting, list) and setting and isinstance(setting[0], Cond):
                yield f"terms[{i}].{key}", setting


def peak_memory(m: Manifest, plan: Plan, options: Options) -> int:
    """Rough working set: the blocks in flight (queues + compute) times the inputs they carry."""
    n_in = max((len(i.sources) for i in plan.items), default=1)
    if m.method in ELEMENTWISE:
        biggest = min(max((i.nbytes * 4 // i.dtype.itemsize for i in plan.items), default=0),
                      options.block_bytes)
    else:
        biggest = max((math.prod(i.shape) * 4 for i in plan.items), default=0)
    in_flight = engine.QUEUE_DEPTH * 2 + 1
    return biggest * (n_in + 2) * in_flight // 2
