"""The vector workflow: extract a task vector, add it to or subtract it from a model.

Each operation resolves its inputs, plans from headers (all mismatches reported before anything
is written) and hands the plan to `job.execute`, which streams it into an atomic output folder
with the side files, a provenance record and a model card.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from . import engine, hub
from .adapter import Adapter, Merged, Zeros, covered_only, prepare_adapter
from .errors import ConfigError, MismatchError
from .job import Options, ProgressFactory, Result, execute, opened
from .maths import task_vectors
from .output import check_output
from .plan import Plan, plan_adapter_extract, plan_apply, plan_extract
from .provenance import read_record
from .tokenizer_id import check_vector_donors


def extract(finetuned: str, base: str, out: str | Path, options: Options = Options(),
            progress: ProgressFactory | None = None, lowrank=None) -> Result:
    """Write the task vector `finetuned − base` (the reasoning vector: GRPO − SFT). FINETUNED
    may be a PEFT adapter: the vector is then its s·B·A per adapted tensor, zero elsewhere.
    `lowrank` (a `lowrank.LowRank`) writes the vector as truncated SVDs in PEFT's format."""
    out = check_output(Path(out), hub.local_inputs(finetuned, base), options.overwrite)
    sources = {"finetuned": hub.resolve(finetuned), "base": hub.resolve(base)}
    with opened(sources, {"finetuned": ("model", "adapter"), "base": "model"}) as ckpts:
        if isinstance(ckpts["finetuned"], Adapter):
            return _extract_adapter(sources, ckpts, out, options, progress, lowrank)
        plan = plan_extract(ckpts["finetuned"], ckpts["base"], options.selection,
                            options.out_dtype, options.allow_vocab_mismatch)
        fn = _task_vector
        if lowrank is not None:
            from .lowrank import write_lowrank

            return write_lowrank(sources, ckpts, plan, fn, out, options, lowrank,
                                 "finetuned − base", sources["finetuned"].path)
        return execute(
            "vector", "finetuned − base", sources, ckpts, plan, fn,
            out, options, progress, side_from=sources["finetuned"].path,
            side_names=("config.json",), tags=["task-vector"], extra={})


def check_alpha(alpha: float, flag: str = "--alpha") -> float:
    """`alpha` when it is a finite number; a ConfigError naming `flag` otherwise."""
    if not math.isfinite(alpha):
        raise ConfigError(f"{flag} {alpha}: must be a finite number")
    return alpha


def plan_vector(ckpts: dict, options: Options, coef: float | None = None) -> Plan:
    """`add`'s plan for `ckpts["target"] + coef·ckpts["vector"]` (also the in-memory sweep's):
    the mask, tied embeddings, vocabulary rows, integer tensors, the tensors the vector leaves
    out, the donors' tokenizer, and a PEFT adapter's scaling and full weights, from headers.
    `coef` None (the sweep) refuses an adapter's full weights, which no α can scale."""
    target, vector = ckpts["target"], ckpts["vector"]
    raw_adapter = isinstance(vector, Adapter) and not vector.lowrank
    notes = prepare_adapter(vector, target, "target") if raw_adapter else []
    notes += check_vector_donors(read_record(vector.path), target.path,
                                 options.allow_vocab_mismatch)
    plan = plan_apply(target, vector, options.selection, options.out_dtype,
                      options.allow_vocab_mismatch, covered_only(vector, target),
                      alias_tied=not raw_adapter)
    if raw_adapter and vector.full:
        plan = _replace_full_weights(plan, vector, coef)
    plan.notes[:0] = notes
    return plan


def apply_fn(coef: float) -> engine.ComputeFn:
    """`add`'s per-block maths, θ_target + coef·τ in fp32 rounded once (also the sweep's)."""
    return lambda item, x, out: task_vectors.apply_vector(x["target"], x["vector"], coef, out=out)


def apply(target: str, vector: str, out: str | Path, alpha: float = 1.0,
          options: Options = Options(), progress: ProgressFactory | None = None,
          subtract: bool = False) -> Result:
    """Write `target + alpha·vector` (or `target − alpha·vector` with subtract=True)."""
    check_alpha(alpha)
    out = check_output(Path(out), hub.local_inputs(target, vector), options.overwrite)
    sources = {"target": hub.resolve(target), "vector": hub.resolve(vector)}
    coef = -alpha if subtract else alpha
    with opened(sources, {"vector": "vector"}) as ckpts:
        plan = plan_vector(ckpts, options, coef)
        sign = "−" if subtract else "+"
        return execute(
            "model", f"target {sign} {alpha:g}·vector", sources, ckpts, plan,
            apply_fn(coef), out, options, progress, side_from=sources["target"].path,
            side_names=None, tags=["task-arithmetic", "reasoning-vector"], extra={"alpha": coef})


def _replace_full_weights(plan, adapter: Adapter, coef: float):
    """Full weights in an adapter replace the target's tensor (peft's merge_and_unload) — at
    α = 1 only: they are not deltas, so they cannot be scaled or subtracted."""
    full = sorted(n for n in adapter.full if any(i.name == n for i in plan.items))
    if full and coef != 1:  # None: the sweep, whose α varies
        raise MismatchError(
            f"{adapter.path}: {full[0]} is a full weight (modules_to_save or a saved embedding "
            "layer), not a delta, so --alpha/subtract cannot scale it; run `mergekit-rl "
            "extract ADAPTER BASE` to get a vector and apply that with --alpha")
    items = [replace(i, sources=(), copy_from=("vector", i.name), common_rows=None)
             if i.name in adapter.full else i for i in plan.items]
    notes = [f"{n}: replaced by the adapter's full weight (as peft's merge_and_unload)"
             for n in full]
    return replace(plan, items=items, notes=plan.notes + notes)


def _extract_adapter(sources, ckpts, out: Path, options: Options, progress, lowrank) -> Result:
    """The dense (or low-rank) vector an adapter applies to its base."""
    adapter, base = ckpts["finetuned"], ckpts["base"]
    notes = prepare_adapter(adapter, base, "base")
    plan = plan_adapter_extract(adapter, base, options.selection, options.out_dtype)
    plan.notes[:0] = notes
    inputs = {**ckpts, "adapter": adapter, "zero": Zeros(base.tensors),
              "merged": Merged(adapter)}

    def fn(item, x, out):
        if "zero" in x:
            return out.zero_()
        delta = (x["merged"] if "merged" in x else x["adapter"]).to(torch.float32)
        return out.copy_(delta.sub_(x["base"].to(torch.float32)) if "base" in x else delta)

    if lowrank is not None:
        from .lowrank import write_lowrank

        return write_lowrank(sources, inputs, plan, fn, out, options, lowrank,
                             "s·B·A per adapted tensor", sources["base"].path)
    return execute(
        "vector", "s·B·A per adapted tensor (full weights − base), 0 elsewhere", sources, inputs,
        plan, fn, out, options, progress, side_from=sources["base"].path,
        side_names=("config.json",), tags=["task-vector", "lora"],
        extra={"excluded": plan.excluded, "adapter": adapter.adapter_config})


def _task_vector(item, x, out):
    return task_vectors.task_vector(x["finetuned"], x["base"], out=out)


def compress(vector: str, out: str | Path, lowrank, options: Options = Options()) -> Result:
    """Rewrite an existing vector (dense, low-rank or an adapter applied to nothing) as a
    low-rank vector with `lowrank`'s rank or energy."""
    from .lowrank import write_lowrank
    from .plan import Item, Plan

    out = check_output(Path(out), hub.local_inputs(vector), options.overwrite)
    sources = {"vector": hub.resolve(vector)}
    with opened(sources) as ckpts:
        v = ckpts["vector"]
        if isinstance(v, Adapter) and v.full:
            raise MismatchError(f"{v.path}: carries full weights ({sorted(v.full)[0]}, ...), "
                                "not only deltas; extract it against its base first")
        dtype = options.out_dtype or torch.float32
        items, excluded = [], []
        for name, info in v.tensors.items():
            if not info.is_float:
                continue
            if not options.selection.selects(name):
                excluded.append(name)
                continue
            items.append(Item(name, info.shape, dtype, (("vector", name),)))
        plan = Plan(items, [], excluded)
        return write_lowrank(sources, ckpts, plan, _copy_vector, out, options, lowrank,
                             "truncated SVD of vector", sources["vector"].path)


def _copy_vector(item, x, out):
    return out.copy_(x["vector"])
