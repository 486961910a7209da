"""The vector workflow: extract a task vector, add it to or subtract it from a model.

Each operation resolves its inputs, plans from headers (all mismatches reported before anything
is written) and hands the plan to `job.execute`, which streams it into an atomic output folder
with the side files, a provenance record and a model card.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import engine, hub, provenance
from .checkpoint import Checkpoint
from .errors import ConfigError
from .job import Options, ProgressFactory, Result, execute, opened
from .maths import task_vectors
from .output import check_output
from .plan import Plan, plan_apply, plan_extract


def extract(finetuned: str, base: str, out: str | Path, options: Options = Options(),
            progress: ProgressFactory | None = None) -> Result:
    """Write the task vector `finetuned − base` (the reasoning vector: GRPO − SFT)."""
    out = check_output(Path(out), hub.local_inputs(finetuned, base), options.overwrite)
    sources = {"finetuned": hub.resolve(finetuned), "base": hub.resolve(base)}
    with opened(sources, {"finetuned": "model", "base": "model"}) as ckpts:
        plan = plan_extract(ckpts["finetuned"], ckpts["base"], options.selection,
                            options.out_dtype, options.allow_vocab_mismatch)
        return execute(
            "vector", "finetuned − base", sources, ckpts, plan,
            lambda item, x, out: task_vectors.task_vector(x["finetuned"], x["base"], out=out),
            out, options, progress, side_from=sources["finetuned"].path,
            side_names=("config.json",), tags=["task-vector"], extra={})


def check_alpha(alpha: float, flag: str = "--alpha") -> float:
    """`alpha` when it is a finite number; a ConfigError naming `flag` otherwise."""
    if not math.isfinite(alpha):
        raise ConfigError(f"{flag} {alpha}: must be a finite number")
    return alpha


def plan_vector(ckpts: dict[str, Checkpoint], options: Options) -> Plan:
    """`add`'s plan for `ckpts["target"] + α·ckpts["vector"]` (also the in-memory sweep's): the
    mask, tied embeddings, vocabulary rows and integer tensors, all from headers."""
    record = provenance.read_record(ckpts["vector"].path)
    return plan_apply(ckpts["target"], ckpts["vector"], options.selection, options.out_dtype,
                      options.allow_vocab_mismatch, frozenset(record.get("excluded", ())))


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
        plan = plan_vector(ckpts, options)
        sign = "−" if subtract else "+"
        return execute(
            "model", f"target {sign} {alpha:g}·vector", sources, ckpts, plan,
            apply_fn(coef), out, options, progress, side_from=sources["target"].path,
            side_names=None, tags=["task-arithmetic", "reasoning-vector"], extra={"alpha": coef})
