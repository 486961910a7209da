"""`mergekit-rl sweep TARGET VECTOR --alphas ... --tasks ...`: lm-eval at every α, no checkpoint
written.

TARGET is loaded once (on the GPU when there is one). For each α its weights are set in place to
TARGET + α·VECTOR by `inmemory` (`add`'s own plan and maths, so equal to `add --alpha α` bit for
bit), lm-eval evaluates, and the next α follows. At the end the target's tensors are restored,
`OUT/sweep.json` and `OUT/sweep.png` (each metric against α, with stderr bars) are written
atomically, and `--save-best DIR` writes the best α's model through `add` itself.

Every check that can be made before a model loads is made first: the α list, the outputs,
lm-eval, the tasks and their datasets, then the plan from the headers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import evaluation, hub, inmemory, vectors
from .errors import ConfigError, DependencyError
from .job import Options
from .output import atomic_folder, check_output
from .provenance import tool_version, update_card_file

log = logging.getLogger(__name__)

SWEEP_NAME, PLOT_NAME = "sweep.json", "sweep.png"


def parse_alphas(text: str, flag: str = "--alphas", example: str = "--alphas -1,-0.5,0,0.5,1"
                 ) -> tuple[float, ...]:
    """'-1,-0.5,0,0.5,1' → (-1.0, -0.5, 0.0, 0.5, 1.0); errors name `flag` and the item."""
    alphas: list[float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: {part!r} is not a number; expected numbers "
                              f"separated by commas, e.g. {example}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {text!r}: {part} is not finite")
        if value in alphas:
            raise ConfigError(f"{flag} {text!r}: {part} appears twice")
        alphas.append(value)
    return tuple(alphas)


def _key(row: dict) -> tuple[str, str, str | None]:
    return row["task"], row["metric"], row.get("filter")


def label(key: tuple[str, str, str | None]) -> str:
    task, metric, filt = key
    return f"{task} {metric}" + (f" ({filt})" if filt else "")


def best_point(points: list[dict]) -> tuple[dict, dict]:
    """(the best point, the row that decides): the first task's first metric as lm-eval reports
    it, highest wins (lowest where lm-eval says lower is better); ties go to the earlier α."""
    first = points[0]["results"][0]
    key, higher = _key(first), first.get("higher_is_better") is not False

    def value(point: dict) -> float:
        row = next(r for r in point["results"] if _key(r) == key)
        return row["value"] if higher else -row["value"]

    best = max(points, key=value)
    return best, next(r for r in best["results"] if _key(r) == key)


@dataclass
class SweepResult:
    out: Path
    record: dict
    saved: Path | None = None


def _require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # found, not imported (0.5 s) yet
        raise DependencyError(f"sweep draws OUT/sweep.png with matplotlib: {evaluation.INSTALL}")


def run_sweep(target: str, vector: str, out: str | Path, alphas: tuple[float, ...],
              eval_options: evaluation.EvalOptions, options: Options = Options(),
              save_best: str | Path | None = None,
              on_point: Callable[[float, list[dict], float], None] | None = None) -> SweepResult:
    """Evaluate TARGET + α·VECTOR at each α in memory; write OUT/sweep.json and sweep.png."""
    if not alphas:
        raise ConfigError("--alphas: give at least one value, e.g. --alphas -1,0,1")
    for a in alphas:
        vectors.check_alpha(a, "--alphas")
    inputs = hub.local_inputs(target, vector)
    out = check_output(Path(out), inputs, options.overwrite)
    best_dir = None
    if save_best is not None:
        best_dir = check_output(Path(save_best), inputs, options.overwrite)
        if best_dir == out or out in best_dir.parents or best_dir in out.parents:
            raise ConfigError(f"--save-best {best_dir} overlaps -o {out}; give two separate "
                              "folders")
    _require_matplotlib()
    lm_eval_version = evaluation.require_lm_eval()
    tasks = evaluation.load_tasks(eval_options)
    start = time.perf_counter()
    with inmemory.VectorInMemory(target, vector, options) as applied:  # the plan, from headers
        model, tokenizer = evaluation.load_model(applied.target_path, applied.device,
                                                 applied.load_dtype)
        applied.attach(model)
        lm = evaluation.harness_model(model, tokenizer, eval_options)

        def evaluate(alpha: float) -> dict:
            t0 = time.perf_counter()
            rows = evaluation.rows(evaluation.run(lm, tasks, eval_options))
            return {"results": rows, "seconds": round(time.perf_counter() - t0, 3)}

        def report(alpha: float, point: dict) -> None:
            if on_point:
                on_point(alpha, point["results"], point["seconds"])

        points = [{"alpha": alpha, **point}
                  for alpha, point in inmemory.sweep(applied, alphas, evaluate, report)]
        sources = {role: s.record() for role, s in applied.sources.items()}
        device = str(applied.device)
    best, row = best_point(points)
    record = {"target": target, "vector": vector, "sources": sources, "alphas": list(alphas),
              "tasks": list(eval_options.tasks), "limit": eval_options.limit,
              "num_fewshot": eval_options.num_fewshot,
              "selection": {"include": list(options.include), "exclude": list(options.exclude)},
              "lm_eval_version": lm_eval_version, "device": device,
              "selected_by": {"task": row["task"], "metric": row["metric"],
                              "filter": row.get("filter"),
                              "higher_is_better": row.get("higher_is_better")},
              "best": {"alpha": best["alpha"], "value": row["value"], "stderr": row["stderr"]},
              "points": points, "seconds": round(time.perf_counter() - start, 3),
              "tool": {"name": "mergekit-rl", "version": tool_version()},
              "command": options.command}
    with atomic_folder(out) as tmp:
        (tmp / SWEEP_NAME).write_text(json.dumps(record, indent=2) + "\n")
        plot(record, tmp / PLOT_NAME)
    saved = None
    if best_dir is not None:
        saved = vectors.apply(target, vector, best_dir, best["alpha"],
                              dataclasses.replace(options, overwrite=True)).out
        update_card_file(saved, {"results": best["results"]})
    return SweepResult(out, record, saved)


def summary(record: dict) -> list[str]:
    """The sweep as a small table: one line per α, one column per metric."""
    keys = list(dict.fromkeys(_key(r) for p in record["points"] for r in p["results"]))
    lines = [f"{'alpha':>7}  " + "  ".join(f"{label(k):>28}" for k in keys)]
    for p in record["points"]:
        by = {_key(r): r for r in p["results"]}
        cells = []
        for k in keys:
            r = by.get(k)
            text = "" if r is None else f"{r['value']:.4f}"
            if r is not None and r.get("stderr") is not None:
                text += f" ± {r['stderr']:.4f}"
            cells.append(f"{text:>28}")
        lines.append(f"{p['alpha']:>7g}  " + "  ".join(cells))
    sel, best = record["selected_by"], record["best"]
    lines.append(f"best alpha {best['alpha']:g}: {label(_key(sel))} = {best['value']:.4f}")
    return lines


def plot(record: dict, path: Path) -> Path:
    """Each (task, metric, filter) against α with its stderr bars; α = 0 is the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(_key(r) for p in record["points"] for r in p["results"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs, ys, errs = [], [], []
        for p in sorted(record["points"], key=lambda p: p["alpha"]):
            r = next((r for r in p["results"] if _key(r) == key), None)
            if r is not None:
                xs.append(p["alpha"])
                ys.append(r["value"])
                errs.append(r["stderr"] or 0.0)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3)
        if key == _key(record["selected_by"]):
            best = record["best"]
            ax.plot([best["alpha"]], [best["value"]], marker="*", markersize=14,
                    color="tab:red", linestyle="none", label=f"best α = {best['alpha']:g}")
            ax.legend(fontsize=8)
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("α (0 = the target)")
        ax.set_title(label(key), fontsize=9)
    fig.suptitle(f"{Path(record['target']).name} + α · {Path(record['vector']).name}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
