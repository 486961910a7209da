"""`mergekit-rl demo`: the reasoning-vector experiment in miniature, end to end on a CPU.

Every stage runs through the project's own tools (`stages.PIPELINE`), with configs written to
`OUT/configs/` so any stage can be rerun by hand (`mergekit-rl train sft OUT/configs/sft.yaml`):

  data       generated word problems (`#### N`) and word-list instructions, train / test splits;
             `flawed_share` of the worked solutions stop one step short (mixed-quality data)
  base       a byte-level BPE tokenizer and a tiny Qwen2 pretrained from scratch on both families
  sft        `train sft` from the base on word problems                    (the SFT donor)
  grpo       `train grpo` from SFT with the exact-answer reward            (the GRPO donor)
  instruct   `train sft` from the base on instructions                      (the sibling)
  vector     `extract grpo sft`, `add instruct v`, `subtract instruct v`, and `merge` of the
             manifest `instruct + 1.0·(grpo − sft)` (one pass, no vector on disk)
  sweep      instruct + α·v for α in -1..2, applied in memory as `mergekit-rl sweep` does
  pairs      `sample pairs` from SFT (chosen = correct, rejected = wrong)
  wpo / dpo  `train wpo` from SFT on those pairs, weighting on / off
  judge      `train judge` from SFT on the same pairs: a generative pairwise judge
  pairwise   `train pairwise` from SFT, reward P̄(sample ≻ the worked solution) (Pairwise-RL)
  vector_pairwise  `extract pairwise sft`, `add instruct v_pairwise`
  judged     the judge's win rate of sft / grpo / pairwise answers against the worked
             solutions, separately for correct and flawed ones
  eval       greedy exact match on held-out items; report.json, report.png, the table

Stages are recorded in `OUT/stages.json` with the recipe's fingerprint: a rerun reuses finished
stages of the same recipe, redoes a stage (and everything after it) whose recipe changed, and
`fresh` starts again. The numbers are whatever the run measures; the goals in `report.GOALS`
are checked and reported, never enforced.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from mergekit_rl.errors import ConfigError

from . import report as report_mod
from .recipe import make_recipe
from .runner import Job, run_jobs, setup_process, stage_job
from .stages import DEPENDS, PIPELINE, Context, Stages, eval_file, evaluate_row

EVAL_FROM = {"base": "base", "sft": "sft", "grpo": "grpo", "instruct": "instruct",
             "instruct+v": "vector", "instruct-v": "vector", "merge": "vector", "wpo": "wpo",
             "dpo": "dpo", "pairwise": "pairwise", "instruct+v_pairwise": "vector_pairwise"}


def open_output(out: Path, fresh: bool) -> Path:
    """The demo folder, made or reused; a non-empty folder that is not a demo's is refused."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / "stages.json").exists():
        raise ConfigError(f"{out}: exists and is not a demo folder (no stages.json); nothing "
                          "was touched. Choose a new or empty folder with -o")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_demo(out: Path, quick: bool = False, fresh: bool = False, overrides: tuple[str, ...] = (),
             quiet: bool = False, workers: int = 1) -> Iterator[str]:
    """Run (or resume) the experiment in `out` on `workers` processes (`runner`), yielding one
    line per finished stage and the report table at the end."""
    recipe = make_recipe(quick, overrides)
    out = open_output(out, fresh)
    setup_process(recipe.threads)
    ctx = Context(out, recipe, quiet)
    stages = Stages(out, recipe)
    yield (f"mergekit-rl demo: recipe {recipe.fingerprint()}{' (quick)' if quick else ''} in "
           f"{out}; torch threads {recipe.threads}, {workers} worker process"
           + ("es" if workers > 1 else ""))
    t0 = time.perf_counter()
    yield from run_jobs(stages, jobs(), ctx, workers)
    results = {name: {} for name, _ in report_mod.ROWS}
    for name, task in report_mod.ROWS:
        results[name][task] = json.loads((out / eval_file(name, task)).read_text())
    report = report_mod.build_report(out, recipe, quick, results, stages.seconds)
    report["wall_seconds"] = time.perf_counter() - t0
    report["workers"] = workers
    (out / "report.json").write_text(json.dumps(report, indent=1))
    png = report_mod.plot_report(report, out / "report.png")
    yield from report_mod.format_report(report)
    yield f"report: {out / 'report.json'}" + (f", {png}" if png else
                                               " (report.png needs matplotlib: pip install "
                                               "'mergekit-rl[plot]')")


def jobs() -> list[Job]:
    """The pipeline's stages, then the greedy evaluation of every report row's model on its
    held-out task (one job each, ready as soon as that model is)."""
    out = [stage_job(name, outputs, DEPENDS[name]) for name, outputs, _ in PIPELINE]
    out += [Job(f"eval {name} {task}", (eval_file(name, task),),
                ((EVAL_FROM[name],), ("n_test", "max_new_tokens")),
                partial(evaluate_row, row=name, task=task))
            for name, task in report_mod.ROWS]
    return out
