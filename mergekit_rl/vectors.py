"""The vector workflow: extract a task vector, add it to or subtract it from a model.

Each operation resolves its inputs, plans from headers (all mismatches reported before anything
is written) and hands the plan to `job.execute`, which streams it into an atomic output folder
with the side files, a provenance record and a model card.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import hub, provenance
from .errors import ConfigError
from .job import Options, ProgressFactory, Result, execute, opened
from .maths import task_vectors
from .output import check_output
from .plan import plan_apply, plan_extract


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


def apply(target: str, vector: str, out: str | Path, alpha: float = 1.0,
          options: Options = Options(), progress: ProgressFactory | None = None,
          subtract: bool = False) -> Result:
    """Write `target + alpha·vector` (or `target − alpha·vector` with subtract=True)."""
    if not math.isfinite(alpha):
        raise ConfigError(f"--alpha {alpha}: must be a finite number")
    out = check_output(Path(out), hub.local_inputs(target, vector), options.overwrite)
    sources = {"target": hub.resolve(target), "vector": hub.resolve(vector)}
    coef = -alpha if subtract else alpha
    with opened(sources, {"vector": "vector"}) as ckpts:
        record = provenance.read_record(sources["vector"].path)
        plan = plan_apply(ckpts["target"], ckpts["vector"], options.selection, options.out_dtype,
                          options.allow_vocab_mismatch, frozenset(record.get("excluded", ())))
        sign = "−" if subtract else "+"
        return execute(
            "model", f"target {sign} {alpha:g}·vector", sources, ckpts, plan,
            lambda item, x, out: task_vectors.apply_vector(x["target"], x["vector"], coef, out=out),
            out, options, progress, side_from=sources["target"].path, side_names=None,
            tags=["task-arithmetic", "reasoning-vector"], extra={"alpha": coef})
