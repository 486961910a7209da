"""`mergekit-rl sweep` against the naive way (add to disk + load, per α) on the demo's models.

    mergekit-rl demo --quick -o /tmp/evalsweep-demo          # or a full `make demo` folder
    flock /tmp/bench.lock .venv/bin/python benchmarks/sweep_bench.py --demo /tmp/evalsweep-demo

TARGET is the demo's instruct sibling, VECTOR its reasoning vector; the lm-eval task is the
demo's held-out word problems (chat template, regex filter on `#### N`, `--limit` items) from a
task YAML written next to the outputs. One run of each arm, each a fresh process (wall time;
peak RSS is the child's ru_maxrss from wait4, so this driver never imports torch):

  sweep         `mergekit-rl sweep TARGET VECTOR --alphas A1,..,A5 ...`: one load, in memory
  naive shell   per α `mergekit-rl add TARGET VECTOR -o DIR --alpha A` then
                `mergekit-rl eval DIR ...` (10 commands; peak RSS: the largest)
  naive script  one Python process: per α `vectors.apply` to disk (= `add`), `from_pretrained`,
                lm-eval (imported, tasks loaded, once)
  weights only  per α, no evaluation: `set_alpha` in memory vs `add` to disk + `from_pretrained`
                (with `--large` also on a 0.47 GB bf16 model: SPEC §5's small trio's shapes)

The arms must give the same numbers (the weights are bit-identical); the script checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ALPHAS = (-1.0, 0.0, 0.5, 1.0, 2.0)
TASK = "demo_word_problems"
TASK_YAML = """\
task: demo_word_problems
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
  max_gen_toks: 40
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


THREADS = "1"  # set by --threads: torch's intra-op threads in every arm


def child_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=THREADS,
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process; its output goes to a log on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(), cwd=REPO)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def eval_args(tasks: Path, limit: int) -> list[str]:
    return ["--tasks", TASK, "--include-path", str(tasks), "--limit", str(limit),
            "--apply-chat-template", "--batch-size", "16", "--device", "cpu", "-q"]


# ---- arms that run in a child process of this file ------------------------------------------

def naive_script(target: str, vector: str, work: Path, tasks: Path, limit: int) -> None:
    from mergekit_rl import evaluation
    from mergekit_rl.job import Options
    from mergekit_rl.vectors import apply

    options = evaluation.EvalOptions(tasks=(TASK,), limit=limit, batch_size=16,
                                     apply_chat_template=True, include_path=(str(tasks),))
    loaded = evaluation.load_tasks(options)
    values = {}
    for alpha in ALPHAS:
        out = work / f"script_{alpha:g}"
        apply(target, vector, out, alpha, Options(overwrite=True, device="cpu"))
        import torch

        model, tokenizer = evaluation.load_model(out, torch.device("cpu"))
        rows = evaluation.rows(evaluation.run(evaluation.harness_model(model, tokenizer, options),
                                              loaded, options))
        values[alpha] = rows[0]["value"]
    (work / "script.json").write_text(json.dumps(values))


def build_large(work: Path) -> tuple[str, str]:
    """A 234 M-parameter bf16 Qwen2 (hidden 2048, intermediate 5632, 2 layers, vocab 32000,
    untied) and a vector that fits it: the shapes of merge_bench's 0.5 GB trio."""
    import torch

    from mergekit_rl.job import Options
    from mergekit_rl.vectors import extract
    from reasoning_demo.tiny import build_model, finetune_copy

    base = build_model(work / "large" / "base", hidden_size=2048, intermediate_size=5632,
                       num_layers=2, num_heads=16, num_kv_heads=16, vocab_size=32000,
                       dtype=torch.bfloat16)
    tuned = finetune_copy(base, work / "large" / "tuned", seed=1)
    extract(str(tuned), str(base), work / "large" / "vector", Options(overwrite=True))
    shutil.rmtree(tuned)
    return str(base), str(work / "large" / "vector")


def weights_only(target: str, vector: str, work: Path, repeats: int = 3,
                 name: str = "weights.json") -> None:
    import statistics

    import torch

    from mergekit_rl.evaluation import load_model
    from mergekit_rl.inmemory import VectorInMemory
    from mergekit_rl.job import Options
    from mergekit_rl.vectors import apply

    memory, disk = [], []
    with VectorInMemory(target, vector, Options(device="cpu")) as applied:
        model, _ = load_model(applied.target_path, torch.device("cpu"), applied.load_dtype)
        applied.attach(model)
        for _ in range(repeats):
            for alpha in ALPHAS:
                t0 = time.perf_counter()
                applied.set_alpha(alpha)
                memory.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                apply(target, vector, work / "w", alpha, Options(overwrite=True, device="cpu"))
                load_model(work / "w", torch.device("cpu"))
                disk.append(time.perf_counter() - t0)
    (work / name).write_text(json.dumps(
        {"set_alpha_s": statistics.median(memory), "add_and_load_s": statistics.median(disk)}))


# ---- the driver -------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", type=Path, default=Path("/tmp/evalsweep-demo"),
                   help="a finished demo folder (models/instruct, vector, data)")
    p.add_argument("--limit", type=int, default=100, help="word problems per α")
    p.add_argument("--work", type=Path, default=Path("/tmp/sweep_bench"))
    p.add_argument("--threads", default="1",
                   help="OMP_NUM_THREADS of every arm (1: two threads sharing a busy core ran "
                        "tiny models many times slower, see benchmarks/README.md)")
    p.add_argument("--large", action="store_true",
                   help="also time the weights alone on a 0.47 GB bf16 model (builds it)")
    p.add_argument("--_arm", help=argparse.SUPPRESS)
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    target, vector = str(args.demo / "models" / "instruct"), str(args.demo / "vector")
    tasks = args.work / "tasks"
    if args._arm == "naive-script":
        return naive_script(target, vector, args.work, tasks, args.limit)
    if args._arm == "weights":
        return weights_only(target, vector, args.work)
    if args._arm == "weights-large":
        return weights_only(*build_large(args.work), args.work, name="weights_large.json")

    shutil.rmtree(args.work, ignore_errors=True)
    tasks.mkdir(parents=True)
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(
        data=args.demo / "data" / "arithmetic_test.jsonl"))
    cli = [sys.executable, "-m", "mergekit_rl.cli"]
    alphas = ",".join(f"{a:g}" for a in ALPHAS)
    rows = {}
    rows["sweep"] = timed(cli + ["sweep", target, vector, "--alphas", alphas, "-o",
                                 str(args.work / "sweep")] + eval_args(tasks, args.limit))
    walls, peaks, shell = [], [], {}
    for alpha in ALPHAS:
        out = args.work / f"shell_{alpha:g}"
        for cmd in (cli + ["add", target, vector, "-o", str(out), "--alpha", f"{alpha:g}",
                           "-q", "--device", "cpu"],
                    cli + ["eval", str(out), "-o", str(out) + "_eval"]
                    + eval_args(tasks, args.limit)):
            wall, peak = timed(cmd)
            walls.append(wall)
            peaks.append(peak)
        rec = json.loads((Path(str(out) + "_eval") / "eval.json").read_text())
        shell[alpha] = rec["results"][0]["value"]
    rows["naive shell"] = (sum(walls), max(peaks))
    me = [sys.executable, str(Path(__file__).resolve()), "--demo", str(args.demo), "--work",
          str(args.work), "--limit", str(args.limit), "--threads", args.threads]
    rows["naive script"] = timed(me + ["--_arm", "naive-script"])
    timed(me + ["--_arm", "weights"])
    large = timed(me + ["--_arm", "weights-large"]) if args.large else None

    sweep = json.loads((args.work / "sweep" / "sweep.json").read_text())
    swept = {p["alpha"]: p["results"][0]["value"] for p in sweep["points"]}
    script = {float(k): v for k, v in json.loads((args.work / "script.json").read_text()).items()}
    weights = json.loads((args.work / "weights.json").read_text())
    print(f"{len(ALPHAS)} alphas ({alphas}), {args.limit} word problems each, models in "
          f"{args.demo}, OMP_NUM_THREADS={args.threads}")
    print(f"{'arm':<14}{'wall s':>9}{'peak RSS MB':>13}{'vs sweep':>10}")
    for name, (wall, peak) in rows.items():
        print(f"{name:<14}{wall:>9.1f}{peak:>13.0f}{wall / rows['sweep'][0]:>9.2f}x")
    print(f"weights only, per alpha (median of 3 x {len(ALPHAS)}): set_alpha in memory "
          f"{1000 * weights['set_alpha_s']:.1f} ms, add to disk + from_pretrained "
          f"{1000 * weights['add_and_load_s']:.1f} ms")
    if large:
        w = json.loads((args.work / "weights_large.json").read_text())
        print(f"weights only on the 0.47 GB bf16 model: set_alpha {w['set_alpha_s']:.2f} s, "
              f"add to disk + from_pretrained {w['add_and_load_s']:.2f} s per alpha")
    print(f"exact_match per alpha: sweep {swept}")
    same = swept == shell == script
    print(f"same numbers in all three arms: {'yes' if same else 'NO'}"
          + ("" if same else f" (shell {shell}, script {script})"))


if __name__ == "__main__":
    main()
