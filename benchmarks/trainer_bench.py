"""Steps/s and peak RSS of our GRPO trainer, and of TRL's GRPOTrainer on the identical config.

The same tiny local Qwen2 model (built once under benchmarks/_cache/trainer/), the same 256
arithmetic prompts as plain text, G = 8 completions of at most 16 tokens for 8 prompts per step
(64 completions, one micro-batch), β = 0.04 (so both load a reference model), lr 1e-5 constant,
AdamW, clip 1.0, loss "dapo", group-scaled advantages, rewards exact_answer (1.0) + format (0.1)
from trainers/rewards.py, temperature 1, no top-k/top-p. No checkpoints, no trackers.

steps/s is measured inside each run between the end of step `--warmup` and the end of the last
step (startup, model loading and the first steps are left out); peak RSS is the run's own
ru_maxrss from `os.wait4`, so the whole process counts (imports included). Runs alternate
(ours, TRL, TRL, ours, ...) because timings on these 2-core machines drift ±30-60% between
invocations: compare ratios taken in one invocation.

    .venv/bin/python benchmarks/trainer_bench.py                              # ours only
    .venv/bin/python benchmarks/trainer_bench.py --trl-python /tmp/trlvenv/bin/python
    (side venv: python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl)

The driver imports no torch (a fat parent would inflate the children's ru_maxrss); the runs
are subprocesses of this file (`--_build`, `--_ours`, `--_trl`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / "_cache" / "trainer"
SIZES = {  # Qwen2 shapes; vocab is the tiny tokenizer's 300
    "tiny": dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                 num_kv_heads=2),
    "small": dict(hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=8,
                  num_kv_heads=4),
}
SETTINGS = dict(prompts_per_step=8, generations=8, max_completion_length=16, beta=0.04,
                lr=1e-5, seed=0)


# ---------------------------------------------------------------------------------------------
# children

def build(size: str) -> None:
    from mergekit_rl.tiny import build_model

    folder = CACHE / size
    build_model(folder / "model", seed=0, **SIZES[size])
    rng = random.Random(0)
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(256):
            a, b = rng.randint(1, 49), rng.randint(1, 49)
            f.write(json.dumps({"prompt": f"Question: What is {a} plus {b}?\nAnswer:",
                                "answer": f"#### {a + b}"}) + "\n")


def run_ours(size: str, steps: int, out: Path) -> dict:
    from trainers import metrics as metrics_mod
    from trainers.config import from_dict, resolve_paths
    from trainers.grpo import GRPOConfig, train_grpo

    s = SETTINGS
    raw = {
        "model": {"path": str(CACHE / size / "model")},
        "data": {"path": str(CACHE / size / "prompts.jsonl"), "chat": False},
        "train": {"output_dir": str(out), "batch_size": s["prompts_per_step"] * s["generations"],
                  "micro_batch_size": s["prompts_per_step"] * s["generations"],
                  "max_steps": steps, "seed": s["seed"], "report_to": ["none"],
                  "progress_bar": False, "overwrite_output_dir": True},
        "optim": {"lr": s["lr"], "scheduler": "constant", "max_grad_norm": 1.0},
        "grpo": {"num_generations": s["generations"],
                 "max_completion_length": s["max_completion_length"], "beta": s["beta"],
                 "loss_type": "dapo", "scale_rewards": "group", "top_k": 0, "top_p": 1.0,
                 "temperature": 1.0,
                 "rewards": [{"name": "exact_answer"}, {"name": "format", "weight": 0.1}]},
    }
    config = resolve_paths(from_dict(GRPOConfig, raw), out)
    ends: list[float] = []
    advance = metrics_mod.MetricsLogger.advance

    def timed_advance(self, step, metrics):
        ends.append(time.perf_counter())
        advance(self, step, metrics)

    metrics_mod.MetricsLogger.advance = timed_advance
    train_grpo(config)
    rows = metrics_mod.read_metrics(out)
    return {"ends": ends, "reward": [r["reward"] for r in rows],
            "completion_length": [r["completion_length/mean"] for r in rows]}


def run_trl(size: str, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainers.rewards import exact_answer, format_reward

    s = SETTINGS
    rows = [json.loads(line) for line in open(CACHE / size / "prompts.jsonl")]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=s["prompts_per_step"] * s["generations"],
        gradient_accumulation_steps=1, num_generations=s["generations"],
        max_completion_length=s["max_completion_length"], temperature=1.0, top_p=1.0, top_k=0,
        repetition_penalty=1.0, beta=s["beta"], learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        loss_type="dapo", scale_rewards="group", reward_weights=[1.0, 0.1], max_steps=steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        seed=s["seed"], disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"})
    trainer = GRPOTrainer(model=str(CACHE / size / "model"), args=args,
                          reward_funcs=[exact_answer, format_reward],
                          train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"ends": ends, "reward": [h["reward"] for h in logs],
            "completion_length": [h.get("completions/mean_length") for h in logs]}


# ---------------------------------------------------------------------------------------------
# driver

def busy_cpu_seconds() -> float:
    fields = open("/proc/stat").readline().split()[1:]
    ticks = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # minus idle, iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], log: Path, env: dict) -> dict:
    with open(log, "w") as fh:
        busy0, t0 = busy_cpu_seconds(), time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall, busy = time.perf_counter() - t0, busy_cpu_seconds() - busy0
    cpu = ru.ru_utime + ru.ru_stime
    return {"rc": os.waitstatus_to_exitcode(status), "wall": wall, "rss_mb": ru.ru_maxrss / 1024,
            "other_cpu": max(0.0, busy - cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of steps/s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trl-python", help="python of a venv with trl installed")
    ap.add_argument("--json", type=Path, help="also write the results here")
    for mode in ("_build", "_ours", "_trl"):
        ap.add_argument(f"--{mode}", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._build:
        return build(a.size)
    if a._ours or a._trl:
        result = (run_ours if a._ours else run_trl)(a.size, a.steps, a._out)
        print("RESULT " + json.dumps(result))
        return

    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    if not (CACHE / a.size / "model" / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--_build", "--size", a.size], check=True,
                       env=env)
    pythons = {"ours": sys.executable}
    if a.trl_python:
        pythons["trl"] = a.trl_python
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name in pythons}
    for r in range(a.repeats):
        order = list(pythons) if r % 2 == 0 else list(reversed(pythons))
        for name in order:
            out, log = runs / f"{name}-{r}", runs / f"{name}-{r}.log"
            cmd = [pythons[name], __file__, f"--_{name}", "--size", a.size, "--steps",
                   str(a.steps), "--_out", str(out)]
            m = timed(cmd, log, env)
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
            if m["rc"] != 0 or not lines:
                sys.exit(f"{name} run {r} failed (rc {m['rc']}); see {log}")
            child = json.loads(lines[-1][len("RESULT "):])
            ends = child["ends"]
            m["steps_per_s"] = (len(ends) - a.warmup) / (ends[-1] - ends[a.warmup - 1])
            m["reward_first_last"] = [child["reward"][0], child["reward"][-1]]
            m["completion_length"] = statistics.mean(x for x in child["completion_length"] if x)
            results[name].append(m)
            print(f"{name:5s} run {r}: {m['steps_per_s']:.2f} steps/s, peak RSS "
                  f"{m['rss_mb']:.0f} MB, wall {m['wall']:.1f} s, mean completion "
                  f"{m['completion_length']:.1f} tokens, other CPU {m['other_cpu']:.1f} s",
                  flush=True)
    summary = {name: {"steps_per_s_median": statistics.median(x["steps_per_s"] for x in rs),
                      "rss_mb_median": statistics.median(x["rss_mb"] for x in rs),
                      "wall_median": statistics.median(x["wall"] for x in rs)}
               for name, rs in results.items()}
    print(json.dumps(summary, indent=2))
    if "trl" in summary:
        o, t = summary["ours"], summary["trl"]
        print(f"ours / TRL: {o['steps_per_s_median'] / t['steps_per_s_median']:.2f}x steps/s, "
              f"{o['rss_mb_median'] / t['rss_mb_median']:.2f}x peak RSS")
    if a.json:
        a.json.write_text(json.dumps({"settings": {**SETTINGS, **SIZES[a.size], "size": a.size,
                                                   "steps": a.steps, "warmup": a.warmup},
                                      "runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
