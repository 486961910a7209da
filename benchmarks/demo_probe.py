"""Recipe search for the miniature reasoning-vector experiment: the demo itself, over seeds.

Each run is `mergekit-rl demo` (the shipped stages: the project's own trainers, vector commands
and evaluation) with a recipe and a seed, in its own folder under `--root`, so a recipe found
here is exactly what `make demo` runs. Folders are kept: a rerun with another value reuses every
stage that does not depend on it (the demo's stage fingerprints), which makes sweeping one knob
cheap. At the end: each row's accuracy and each goal's difference as mean ± sample std over the
seeds, with the per-seed values.

    .venv/bin/python benchmarks/demo_probe.py --seeds 0 1 2
    .venv/bin/python benchmarks/demo_probe.py --quick --seeds 0
    .venv/bin/python benchmarks/demo_probe.py --set grpo_steps=200 --set flawed_share=0.6 \
        --json out.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reasoning_demo.demo import run_demo  # noqa: E402
from reasoning_demo.recipe import make_recipe  # noqa: E402


def run(root: Path, overrides: list[str], seed: int, quick: bool, verbose: bool) -> dict:
    """One demo run; -> its report.json."""
    items = [*overrides, f"seed={seed}"]
    recipe = make_recipe(quick, tuple(items))  # validates before any work
    key = hashlib.sha256(json.dumps(sorted(overrides) + [quick]).encode()).hexdigest()[:10]
    out = root / f"{key}-seed{seed}"
    for line in run_demo(out, quick=quick, overrides=tuple(items), quiet=True):
        if verbose or line.startswith(("[", "mergekit-rl demo")):
            print(line, flush=True)
    report = json.loads((out / "report.json").read_text())
    assert report["fingerprint"] == recipe.fingerprint()
    return {"seed": seed, "overrides": overrides, "folder": str(out), **report}


def spread(values: list[float], sign: str = "") -> str:
    """mean ± sample std [each value], in points."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    each = ", ".join(f"{v:{sign}.1f}" for v in values)
    return f"{statistics.mean(values):{sign}6.1f} ± {sd:4.1f}   [{each}]"


def summarise(results: list[dict]) -> list[str]:
    lines = [f"{len(results)} seed(s): {[r['seed'] for r in results]}"]
    for i, row in enumerate(results[0]["rows"]):
        values = [r["rows"][i]["accuracy"] for r in results]
        lines.append(f"  {row['model']:<14} {row['task']:<12} {spread(values)}")
    for i, goal in enumerate(results[0]["goals"]):
        values = [r["goals"][i]["difference"] for r in results]
        met = sum(r["goals"][i]["met"] for r in results)
        lines.append(f"  {goal['goal']:<42} {spread(values, '+')}  met {met}/{len(results)}")
    totals = [r["total_seconds"] for r in results]
    lines.append(f"  stage time per run: {statistics.mean(totals):.0f}s (max {max(totals):.0f}s)")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="the demo's one-minute recipe")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a recipe value, as `mergekit-rl demo --set` takes it")
    parser.add_argument("--root", type=Path, default=Path("benchmarks/_cache/probe"),
                        help="where the runs' folders are kept (reused across invocations)")
    parser.add_argument("--json", type=Path, help="append one JSON line per run")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the report tables")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        results.append(run(args.root, args.set, seed, args.quick, args.verbose))
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    print("\n".join(summarise(results)))


if __name__ == "__main__":
    main()
