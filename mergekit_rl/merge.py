"""`mergekit-rl merge MANIFEST`: one streaming pass over every input of a manifest.

The target's tensors are the output's. For each one the planner gathers the same tensor from
every term's inputs (a vector, a `plus − minus` pair computed on the fly, or a model whose delta
to the target is taken), the manifest's settings are evaluated for that tensor (per-layer
gradients, regex/substring conditions), and the method combines the deltas:
`θ = θ_target + λ·merge(τ_1..τ_n)` — or Σ w_i θ_i for `linear`.
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
from .checkpoint import TOKENIZER_FILES, Checkpoint, copy_side_files, parse_size
from .errors import ConfigError
from .job import Options, ProgressFactory, Result, execute, opened
from .manifest import Cond, Manifest, Term, to_dict
from .maths import merge_methods
from .output import check_output
from .plan import Plan, Selection, embed_name, layer_index, plan_combine

log = logging.getLogger(__name__)

ELEMENTWISE = ("task_arithmetic", "linear")


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


def resolve_params(m: Manifest, name: str, t: float) -> TensorParams:
    normalize = m.global_param("normalize", name, t, merge_methods.DEFAULT_NORMALIZE[m.method])
    return TensorParams(
        weights=tuple(float(m.term_param(term, "weight", name, t, 1.0)) for term in m.terms),
        densities=tuple(float(m.term_param(term, "density", name, t, 1.0)) for term in m.terms),
        lam=float(m.global_param("lambda", name, t, 1.0)),
        normalize=bool(normalize),
        gammas=tuple(float(m.term_param(term, "gamma", name, t, 0.01)) for term in m.terms),
        rescale=m.global_param("rescale", name, t, None),
        seed=int(m.params.get("seed", 0)),
    )


def compute_fn(m: Manifest, params: dict[str, TensorParams]) -> engine.ComputeFn:
    """The per-tensor maths: gather each term's delta and combine with the method."""

    def fn(item, x: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        p = params[item.name]
        x = {role: t.to(torch.float32) for role, t in x.items()}  # methods work in fp32
        base = x["target"]
        present, weights, dens, gammas, seeds = [], [], [], [], []
        for i, term in enumerate(m.terms):
            roles = term_roles(i, term)
            if not all(r in x for r in roles):
                continue  # masked out of this term's vector
            # In place on this block's own fp32 copies (a role belongs to one term only);
            # the same rounding as `a - b`.
            if term.kind == "pair":
                present.append(x[roles[0]].sub_(x[roles[1]]))
            elif term.kind == "model" and m.method != "linear":
                present.append(x[roles[0]].sub_(base))
            else:
                present.append(x[roles[0]])
            weights.append(p.weights[i])
            dens.append(p.densities[i])
            gammas.append(p.gammas[i])
            seeds.append(merge_methods.tensor_seed(p.seed, item.name, i))
        if m.method == "linear":
            return merge_methods.linear(present, weights, normalize=p.normalize)
        merged = merge_methods.merge_deltas(present, weights, method=m.method, densities=dens,
                                      normalize=p.normalize, gamma=gammas, rescale=p.rescale,
                                      seeds=seeds)
        return merge_methods.apply_merged(base, merged, p.lam, inplace=True)  # merged is ours

    return fn


def _sources(m: Manifest) -> dict[str, hub.Source]:
    sources = {"target": hub.resolve(m.target)}
    for i, term in enumerate(m.terms):
        for role, spec in zip(term_roles(i, term), term.inputs):
            sources[role] = hub.resolve(spec)
    return sources


def _plan(m: Manifest, ckpts: dict[str, Checkpoint], options: Options
          ) -> tuple[Plan, dict[str, TensorParams]]:
    excluded = {}
    for i, term in enumerate(m.terms):
        if term.kind == "vector":
            role = term_roles(i, term)[0]
            excluded[role] = frozenset(provenance.read_record(ckpts[role].path).get("excluded", ()))
    inputs = {r: c for r, c in ckpts.items() if r != "target"}
    plan = plan_combine(ckpts["target"], inputs, Selection(m.include, m.exclude),
                        options.out_dtype, options.allow_vocab_mismatch, excluded,
                        what=f"cannot merge {m.source or 'manifest'}")
    target = ckpts["target"]
    layers = target.config().get("num_hidden_layers") or 1 + max(
        (i for n in target.tensors if (i := layer_index(n)) is not None), default=0)
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
        params[item.name] = p
    return plan, params


def options_for(m: Manifest, base: Options) -> Options:
    """The manifest's output settings, unless the command line gave its own."""
    dtype = base.dtype if base.dtype != "auto" else m.out_dtype
    shard = base.max_shard_size
    if m.max_shard_size and base.max_shard_size == Options().max_shard_size:
        shard = parse_size(m.max_shard_size)
    return dataclasses.replace(base, dtype=dtype, max_shard_size=shard)


def run_merge(m: Manifest, out: Path | None, options: Options = Options(),
              progress: ProgressFactory | None = None) -> Result:
    out = out or m.out_path
    if out is None:
        raise ConfigError(f"{m.source}: no output folder; set output.path or pass -o")
    options = options_for(m, options)
    local = [Path(s) for s in (m.target, *(x for t in m.terms for x in t.inputs))
             if Path(s).exists()]
    out = check_output(Path(out), local, options.overwrite)
    sources = _sources(m)
    with opened(sources) as ckpts:
        plan, params = _plan(m, ckpts, options)
        tok_from = hub.resolve(m.tokenizer_source).path if m.tokenizer_source else None

        def finalize(tmp: Path) -> None:
            (tmp / "merge.yaml").write_text(yaml.safe_dump(to_dict(m), sort_keys=False))
            if tok_from:  # the tokenizer (not the config) from tokenizer_source
                copy_side_files(tok_from, tmp, TOKENIZER_FILES)

        result = execute(
            "model", formula(m), sources, ckpts, plan, compute_fn(m, params), out, options,
            progress, side_from=sources["target"].path, side_names=None,
            tags=["merge", m.method.replace("_", "-"), "reasoning-vector"],
            extra={"method": m.method, "manifest": to_dict(m)},
            whole_tensors=m.method not in ELEMENTWISE,
            finalize=finalize)
    return result


def formula(m: Manifest) -> str:
    if m.method == "linear":
        return "Σ_i w_i·θ_i" + (" / Σ_i w_i" if m.params.get("normalize", True) else "")
    parts = []
    for i, t in enumerate(m.terms):
        parts.append(f"w{i}·(plus{i} − minus{i})" if t.kind == "pair" else
                     f"w{i}·v{i}" if t.kind == "vector" else f"w{i}·(model{i} − target)")
    return f"target + λ·{m.method}({', '.join(parts)})"


def dry_run(m: Manifest, options: Options = Options()) -> Iterator[str]:
    """Describe the plan: inputs, tensors, bytes, peak memory, what each override touches."""
    options = options_for(m, options)
    sources = _sources(m)
    with opened(sources) as ckpts:
        plan, params = _plan(m, ckpts, options)
        yield f"method: {m.method}   formula: {formula(m)}"
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
        for note in plan.notes:
            yield f"note: {note}"
        yield "dry run: nothing was written"


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
