"""The demo's report: which rows are evaluated, the goals checked (and never enforced), the
`report.json` record, the printed table and `report.png`."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

from .recipe import Recipe

# (row name, task) pairs evaluated; the instruction task only where the question is asked
ROWS = (("base", "arithmetic"), ("sft", "arithmetic"), ("grpo", "arithmetic"),
        ("instruct", "arithmetic"), ("instruct+v", "arithmetic"), ("instruct-v", "arithmetic"),
        ("merge", "arithmetic"), ("wpo", "arithmetic"), ("dpo", "arithmetic"),
        ("pairwise", "arithmetic"), ("instruct+v_pairwise", "arithmetic"),
        ("instruct", "instruction"), ("instruct+v", "instruction"),
        ("instruct+v_pairwise", "instruction"))

# what the recipe aims for (points of accuracy); reported, never enforced
GOALS = (("grpo beats sft by >= 5 points", "grpo", "sft", 5.0),
         ("instruct+v beats instruct by >= 5 points", "instruct+v", "instruct", 5.0),
         ("instruct-v is below instruct", "instruct", "instruct-v", 1e-9),
         ("wpo >= dpo", "wpo", "dpo", 0.0))

MODEL_DIRS = {"base": "models/base", "sft": "models/sft", "grpo": "models/grpo",
              "instruct": "models/instruct", "instruct+v": "models/instruct_plus_v",
              "instruct-v": "models/instruct_minus_v", "merge": "models/merge",
              "wpo": "models/wpo", "dpo": "models/dpo", "pairwise": "models/pairwise",
              "instruct+v_pairwise": "models/instruct_plus_v_pairwise"}


def build_report(out: Path, r: Recipe, quick: bool, results: dict, seconds: dict) -> dict:
    from mergekit_rl.inspection import inspect_checkpoint

    def acc(name: str, task: str = "arithmetic") -> float:
        return 100 * results[name][task]["accuracy"]

    vector = inspect_checkpoint(str(out / "vector"))

    def complete(name: str, task: str) -> float | None:
        share = results[name][task].get("complete")  # word problems only
        return None if share is None else 100 * share

    rows = [{"model": name, "task": task, "accuracy": acc(name, task),
             "complete": complete(name, task), "n": results[name][task]["n"],
             "path": MODEL_DIRS[name]} for name, task in ROWS]
    goals = [{"goal": text, "difference": acc(a) - acc(b), "met": acc(a) - acc(b) >= need}
             for text, a, b, need in GOALS]
    return {"recipe": dataclasses.asdict(r), "fingerprint": r.fingerprint(), "quick": quick,
            "rows": rows, "goals": goals,
            "instruction_change": acc("instruct+v", "instruction") - acc("instruct",
                                                                         "instruction"),
            "vector": {"l2": vector.total.l2, "sparsity": vector.total.sparsity,
                       "groups": [g.as_dict() for g in vector.groups]},
            "sweep": sweep_report(out), "judged": judged(out),
            "seconds": seconds, "total_seconds": sum(seconds.values())}


def judged(out: Path) -> dict | None:
    """The judge's held-out accuracy and its win rates of the donors' answers (stage judged)."""
    import json

    path = out / "eval" / "judged.json"
    return json.loads(path.read_text()) if path.is_file() else None


QUICK_NOTE = ("--quick is a smoke test of the pipeline (a few steps on a few examples): its "
              "accuracies and goals mean nothing; run without --quick for the experiment")


def sweep_report(out: Path) -> dict | None:
    """The α sweep's points (accuracies in %, with their standard errors), or None without it."""
    file = out / "eval" / "sweep.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())

    def point(p: dict) -> dict:
        row = {k: p[k] for k in ("alpha", "rank") if k in p}
        for task, result in p.items():
            if isinstance(result, dict):
                acc, n = result["accuracy"], result["n"]
                row[task] = {"accuracy": 100 * acc, "stderr": 100 * math.sqrt(acc * (1 - acc) / n),
                             "n": n, "complete": None if result.get("complete") is None
                             else 100 * result["complete"]}
        return row

    return {"items": data["items"], "points": [point(p) for p in data["points"]],
            "low_rank": [point(p) for p in data["low_rank"]]}


def format_report(report: dict) -> Iterator[str]:
    n = report["rows"][0]["n"]
    yield ""
    if report.get("quick"):
        yield f"note: {QUICK_NOTE}"
    yield (f"{'model':<20}{'word problems':>15}{'(complete)':>12}{'instructions':>15}   "
           f"(greedy exact match, %, n={n})")
    by_model: dict[str, dict[str, dict]] = {}
    for row in report["rows"]:
        by_model.setdefault(row["model"], {})[row["task"]] = row

    def cell(value: float | None, width: int, fmt: str = "{:.1f}") -> str:
        return f"{'' if value is None else fmt.format(value):>{width}}"

    for model, rows in by_model.items():
        arith, instr = rows["arithmetic"], rows.get("instruction", {})
        yield (f"{model:<20}{cell(arith['accuracy'], 15)}"
               f"{cell(arith.get('complete'), 12, '({:.1f})')}{cell(instr.get('accuracy'), 15)}")
    yield ""
    for goal in report["goals"]:
        yield (f"{'met    ' if goal['met'] else 'NOT met'}  {goal['goal']}: "
               f"{goal['difference']:+.1f} points")
    yield (f"instruct+v vs instruct on instructions: {report['instruction_change']:+.1f} points; "
           f"vector L2 {report['vector']['l2']:.3g}; stages {report['total_seconds']:.0f}s"
           + (f", this run {report['wall_seconds']:.0f}s on {report['workers']} worker(s)"
              if "wall_seconds" in report else ""))
    verdict = report.get("judged")
    if verdict:
        yield (f"judge (held-out pairwise accuracy {100 * verdict['judge']['eval/accuracy']:.1f}%"
               f") win rate against the worked solutions, correct ({verdict['n_correct']}) / "
               f"flawed ({verdict['n_flawed']}):")
        for name in ("sft", "grpo", "pairwise"):
            row = verdict[name]
            yield (f"  {name:<9}{100 * row['correct']['win_rate']:6.1f}% / "
                   f"{100 * row['flawed']['win_rate']:5.1f}%")
    yield from format_sweep(report)
    if report.get("quick"):
        yield f"note: {QUICK_NOTE}"


def format_sweep(report: dict) -> Iterator[str]:
    """The α sweep as a small table (nothing when the report has no sweep)."""
    sweep = report.get("sweep")
    if not sweep:
        return
    items = sweep["items"]
    yield ""
    yield (f"{'instruct + alpha·v':<20}{'word problems':>15}{'(complete)':>12}"
           f"{'instructions':>15}   (in memory, n={items['arithmetic']} / "
           f"{items['instruction']})")
    for p in sweep["points"] + sweep["low_rank"]:
        name = f"alpha {p['alpha']:g}" + (f", rank {p['rank']}" if "rank" in p else "")
        arith, instr = p["arithmetic"], p["instruction"]
        complete = f"({arith['complete']:.1f})"
        yield f"{name:<20}{arith['accuracy']:>15.1f}{complete:>12}{instr['accuracy']:>15.1f}"


def plot_report(report: dict, path: Path) -> Path | None:
    """Bar chart of accuracies and the vector's per-layer L2 norms; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, swept) = plt.subplots(1, 3, figsize=(18, 4.5),
                                             gridspec_kw={"width_ratios": [3, 2, 2]})
    rows = report["rows"]
    labels = [row["model"] + ("\n(instr.)" if row["task"] == "instruction" else "")
              for row in rows]
    colors = ["tab:blue" if row["task"] == "arithmetic" else "tab:orange" for row in rows]
    bars = left.bar(range(len(rows)), [row["accuracy"] for row in rows], color=colors)
    left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    left.set_ylabel("exact match (%)")
    left.set_title("held-out accuracy (blue: word problems, orange: instructions)")
    groups = report["vector"]["groups"]
    right.bar(range(len(groups)), [g["l2_norm"] for g in groups], color="tab:green")
    right.set_xticks(range(len(groups)), [g["group"] for g in groups], rotation=45, ha="right",
                     fontsize=8)
    right.set_ylabel("L2 norm")
    right.set_title("reasoning vector (grpo - sft) per layer")
    plot_sweep(swept, report)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(ax, report: dict) -> None:
    """Accuracy of instruct + α·v against α, both tasks, with standard-error bars."""
    sweep = report.get("sweep")
    if not sweep:
        ax.set_axis_off()
        return
    points = sorted(sweep["points"], key=lambda p: p["alpha"])
    alphas = [p["alpha"] for p in points]
    for task, color, name in (("arithmetic", "tab:blue", "word problems"),
                              ("instruction", "tab:orange", "instructions")):
        ax.errorbar(alphas, [p[task]["accuracy"] for p in points],
                    yerr=[p[task]["stderr"] for p in points], marker="o", capsize=3,
                    color=color, label=name)
    for p in sweep["low_rank"]:
        ax.plot([p["alpha"]], [p["arithmetic"]["accuracy"]], marker="x", color="tab:blue")
        ax.annotate(f"r{p['rank']}", (p["alpha"], p["arithmetic"]["accuracy"]), fontsize=7)
    ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("alpha (instruct + alpha·v, in memory)")
    ax.set_ylabel("exact match (%)")
    n = sweep["items"]["arithmetic"]
    ax.set_title(f"the alpha sweep ({n} items per task and point)")
    ax.legend(fontsize=8)
