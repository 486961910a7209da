"""Steps/s and peak RSS of our GRPO and WPO trainers against TRL's, on identical configs.

TRL's side is GRPOTrainer, and DPOTrainer with use_weighting=True (its WPO).

Both comparisons use the same tiny local Qwen2 model (built once under benchmarks/_cache/trainer/),
fp32 on CPU, AdamW, clip 1.0, a constant learning rate, one micro-batch per step (no gradient
accumulation), no gradient checkpointing (TRL's default is on: it is switched off), no
checkpoints, no trackers.

grpo: the same 256 arithmetic prompts as plain text, G = 8 completions of at most 16 tokens for 8
prompts per step (64 completions), β = 0.04 (so both load a reference model), lr 1e-5, loss
"dapo", group-scaled advantages, rewards exact_answer (1.0) + format (0.1) from
trainers/rewards.py, temperature 1, no top-k/top-p.

wpo: 256 plain-text preference pairs from reasoning_demo/tasks.py word problems (prompt
"Question: ...\nAnswer:\n", chosen = the worked solution, rejected = the same with a wrong
final "#### N"; EOS appended by both trainers), 8 pairs (16 sequences) per step, loss sigmoid,
β = 0.1, lr 1e-4, WPO weighting with sampled alignment and no clamp (`weight_clamp: null`, what
TRL >= 0.29's `use_weighting` computes), reference log-probs precomputed before training on both
sides (`precompute_ref` / `precompute_ref_log_probs`), max_length 256 (max_prompt_length 192 on
our side); the build checks that no pair is truncated and that tokenizing prompt and answer
apart gives TRL's tokens, so both train on the same sequences.

steps/s is measured inside each run between the end of step `--warmup` and the end of the last
step (startup, model loading, reference precompute and the first steps are left out); peak RSS
is the run's own ru_maxrss from `os.wait4`, so the whole process counts (imports included). Runs
alternate (ours, TRL, TRL, ours, ...) because timings on these 2-core machines drift ±30-60%
between invocations: compare ratios taken in one invocation.

    .venv/bin/python benchmarks/trainer_bench.py                              # ours only
    .venv/bin/python benchmarks/trainer_bench.py --trl-python /tmp/trlvenv/bin/python
    .venv/bin/python benchmarks/trainer_bench.py --only wpo --trl-python /tmp/trlvenv/bin/python
    ... --threads 1     # when another job holds a core: 2 torch threads on the 1 free core
                        # ran the tiny model 8-17x slower than 1 thread, in both trainers
    (side venv: python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl)

The driver imports no torch (a fat parent would inflate the children's ru_maxrss); the runs
are subprocesses of this file (`--_build`, `--_ours`, `--_trl`, with `--bench grpo|wpo`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
BENCHES = ("grpo", "wpo")
SETTINGS = dict(prompts_per_step=8, generations=8, max_completion_length=16, beta=0.04,
                lr=1e-5, seed=0)
WPO_SETTINGS = dict(pairs=256, pairs_per_step=8, max_length=256, max_prompt_length=192, beta=0.1,
                    lr=1e-4, seed=0)


# ---------------------------------------------------------------------------------------------
# children

def build(size: str) -> None:
    from reasoning_demo.tiny import build_model

    folder = CACHE / size
    if not (folder / "model" / "config.json").is_file():
        build_model(folder / "model", seed=0, **SIZES[size])
    rng = random.Random(0)
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(256):
            a, b = rng.randint(1, 49), rng.randint(1, 49)
            f.write(json.dumps({"prompt": f"Question: What is {a} plus {b}?\nAnswer:",
                                "answer": f"#### {a + b}"}) + "\n")
    build_pairs(folder)


def build_pairs(folder: Path) -> None:
    """pairs.jsonl: word problem, worked solution, the same with a wrong final answer."""
    from transformers import AutoTokenizer

    from reasoning_demo.tasks import arithmetic_example

    s = WPO_SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    rng = random.Random(0)
    rows = []
    for _ in range(s["pairs"]):
        ex = arithmetic_example(rng)
        head, _, final = ex.completion.rpartition("#### ")
        right, delta = int(final), rng.randint(1, 9)
        wrong = right - delta if right >= delta and rng.random() < 0.5 else right + delta
        rows.append({"prompt": f"Question: {ex.prompt}\nAnswer:\n", "chosen": ex.completion,
                     "rejected": f"{head}#### {wrong}"})
    # TRL tokenizes prompt + answer + EOS in one piece, we tokenize prompt and answer apart: the
    # tokens must be the same, and nothing may be truncated, or the two would train on different
    # sequences.
    for i, row in enumerate(rows):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert len(prompt) <= s["max_prompt_length"], f"pair {i}: prompt too long"
        for key in ("chosen", "rejected"):
            answer = tokenizer(row[key] + tokenizer.eos_token, add_special_tokens=False)
            whole = tokenizer(row["prompt"] + row[key] + tokenizer.eos_token)["input_ids"]
            assert whole == prompt + answer["input_ids"], f"pair {i}: {key} tokenizes differently"
            assert len(whole) <= s["max_length"], f"pair {i}: {key} longer than max_length"
    with open(folder / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def run_ours_grpo(size: str, steps: int, out: Path) -> dict:
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
    ends = patch_step_clock()
    train_grpo(config)
    rows = metrics_mod.read_metrics(out)
    return {"ends": ends, "curve": [r["reward"] for r in rows],
            "completion_length": [r["completion_length/mean"] for r in rows]}


def run_trl_grpo(size: str, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trainers.rewards import exact_answer, format_reward

    s = SETTINGS
    rows = [json.loads(line) for line in open(CACHE / size / "prompts.jsonl")]
    ends, clock = trl_step_clock()
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=s["prompts_per_step"] * s["generations"],
        gradient_accumulation_steps=1, num_generations=s["generations"],
        max_completion_length=s["max_completion_length"], temperature=1.0, top_p=1.0, top_k=0,
        repetition_penalty=1.0, beta=s["beta"], learning_rate=s["lr"], gradient_checkpointing=False,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        loss_type="dapo", scale_rewards="group", reward_weights=[1.0, 0.1], max_steps=steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        seed=s["seed"], disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"})
    trainer = GRPOTrainer(model=str(CACHE / size / "model"), args=args,
                          reward_funcs=[exact_answer, format_reward],
                          train_dataset=Dataset.from_list(rows), callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"ends": ends, "curve": [h["reward"] for h in logs],
            "completion_length": [h.get("completions/mean_length") for h in logs]}


def trl_step_clock():
    """(perf_counter at the end of each TRL optimizer step, the callback that records it)."""
    from transformers import TrainerCallback

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    return ends, Clock()


def patch_step_clock() -> list[float]:
    """perf_counter at the end of each of our optimizer steps (MetricsLogger.advance)."""
    from trainers import metrics as metrics_mod

    ends: list[float] = []
    advance = metrics_mod.MetricsLogger.advance

    def timed_advance(self, step, metrics):
        ends.append(time.perf_counter())
        advance(self, step, metrics)

    metrics_mod.MetricsLogger.advance = timed_advance
    return ends


def run_ours_wpo(size: str, steps: int, out: Path) -> dict:
    from trainers.config import from_dict, resolve_paths
    from trainers.metrics import read_metrics
    from trainers.wpo import WPOConfig, train_wpo

    s = WPO_SETTINGS
    raw = {
        "model": {"path": str(CACHE / size / "model"), "dtype": "float32"},
        "data": {"path": str(CACHE / size / "pairs.jsonl"), "chat": False},
        "train": {"output_dir": str(out), "batch_size": s["pairs_per_step"],
                  "micro_batch_size": s["pairs_per_step"], "max_steps": steps, "seed": s["seed"],
                  "report_to": ["none"], "progress_bar": False, "overwrite_output_dir": True},
        "optim": {"lr": s["lr"], "scheduler": "constant", "max_grad_norm": 1.0,
                  "weight_decay": 0.0},
        "wpo": {"loss_type": "sigmoid", "beta": s["beta"], "label_smoothing": 0.0,
                "weighting": True, "weight_alignment": "sampled", "weight_clamp": None,
                "precompute_ref": True, "max_length": s["max_length"],
                "max_prompt_length": s["max_prompt_length"]},
    }
    config = resolve_paths(from_dict(WPOConfig, raw), out)
    ends = patch_step_clock()
    train_wpo(config)
    rows = read_metrics(out)
    return {"ends": ends, "curve": [r["loss"] for r in rows],
            "tokens": [r["tokens"] for r in rows]}


def run_trl_wpo(size: str, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = WPO_SETTINGS
    rows = [json.loads(line) for line in open(CACHE / size / "pairs.jsonl")]
    ends, clock = trl_step_clock()
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=s["pairs_per_step"],
        gradient_accumulation_steps=1, loss_type=["sigmoid"], beta=s["beta"], label_smoothing=0.0,
        use_weighting=True, precompute_ref_log_probs=True, max_length=s["max_length"],
        truncation_mode="keep_start", learning_rate=s["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, seed=s["seed"], disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"})
    trainer = DPOTrainer(model=str(CACHE / size / "model"), args=args,
                         train_dataset=Dataset.from_list(rows), callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {"ends": ends, "curve": [h["loss"] for h in logs]}


CHILDREN = {("grpo", "ours"): run_ours_grpo, ("grpo", "trl"): run_trl_grpo,
            ("wpo", "ours"): run_ours_wpo, ("wpo", "trl"): run_trl_wpo}


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


def describe(bench: str, child: dict) -> tuple[dict, str]:
    """Sanity figures of one run (the curve's first and last value, lengths) and their text."""
    curve = child["curve"]
    if bench == "grpo":
        length = statistics.mean(x for x in child["completion_length"] if x)
        return ({"reward_first_last": [curve[0], curve[-1]], "completion_length": length},
                f"reward {curve[0]:.2f} -> {curve[-1]:.2f}, mean completion {length:.1f} tokens")
    return ({"loss_first_last": [curve[0], curve[-1]]},
            f"loss {curve[0]:.4f} -> {curve[-1]:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--only", choices=BENCHES, help="run one comparison (default: both)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of steps/s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trl-python", help="python of a venv with trl installed")
    ap.add_argument("--threads", type=int,
                    help="torch threads of every run (OMP_NUM_THREADS; default: torch's own)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    for mode in ("_build", "_ours", "_trl"):
        ap.add_argument(f"--{mode}", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bench", choices=BENCHES, default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._build:
        return build(a.size)
    if a._ours or a._trl:
        result = CHILDREN[a.bench, "ours" if a._ours else "trl"](a.size, a.steps, a._out)
        print("RESULT " + json.dumps(result))
        return

    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    folder = CACHE / a.size
    if not all((folder / f).is_file() for f in ("model/config.json", "prompts.jsonl",
                                                 "pairs.jsonl")):
        subprocess.run([sys.executable, __file__, "--_build", "--size", a.size], check=True,
                       env=env)
    pythons = {"ours": sys.executable}
    if a.trl_python:
        pythons["trl"] = a.trl_python
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    benches = [a.only] if a.only else list(BENCHES)
    results: dict[str, dict[str, list[dict]]] = {b: {name: [] for name in pythons}
                                                  for b in benches}
    for bench in benches:
        for r in range(a.repeats):
            order = list(pythons) if r % 2 == 0 else list(reversed(pythons))
            for name in order:
                out, log = runs / f"{bench}-{name}-{r}", runs / f"{bench}-{name}-{r}.log"
                shutil.rmtree(out, ignore_errors=True)  # no cached reference log-probs
                cmd = [pythons[name], __file__, f"--_{name}", "--bench", bench, "--size", a.size,
                       "--steps", str(a.steps), "--_out", str(out)]
                m = timed(cmd, log, env)
                lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
                if m["rc"] != 0 or not lines:
                    sys.exit(f"{bench} {name} run {r} failed (rc {m['rc']}); see {log}")
                child = json.loads(lines[-1][len("RESULT "):])
                ends = child["ends"]
                if len(ends) != a.steps:
                    sys.exit(f"{bench} {name} run {r}: {len(ends)} step ends, expected {a.steps}")
                m["steps_per_s"] = (len(ends) - a.warmup) / (ends[-1] - ends[a.warmup - 1])
                extra, text = describe(bench, child)
                m.update(extra)
                results[bench][name].append(m)
                print(f"{bench} {name:4s} run {r}: {m['steps_per_s']:.2f} steps/s, peak RSS "
                      f"{m['rss_mb']:.0f} MB, wall {m['wall']:.1f} s, {text}, other CPU "
                      f"{m['other_cpu']:.1f} s", flush=True)
    summary = {bench: {name: {"steps_per_s_median": statistics.median(x["steps_per_s"] for x in rs),
                              "rss_mb_median": statistics.median(x["rss_mb"] for x in rs),
                              "wall_median": statistics.median(x["wall"] for x in rs)}
                       for name, rs in per_bench.items()}
               for bench, per_bench in results.items()}
    print(json.dumps(summary, indent=2))
    for bench, per_bench in summary.items():
        if "trl" in per_bench:
            o, t = per_bench["ours"], per_bench["trl"]
            print(f"{bench}: ours / TRL: {o['steps_per_s_median'] / t['steps_per_s_median']:.2f}x "
                  f"steps/s, {o['rss_mb_median'] / t['rss_mb_median']:.2f}x peak RSS")
    if a.json:
        settings = {"size": a.size, **SIZES[a.size], "steps": a.steps, "warmup": a.warmup,
                    "threads": a.threads,
                    "grpo": SETTINGS, "wpo": WPO_SETTINGS}
        a.json.write_text(json.dumps({"settings": settings, "runs": results, "summary": summary},
                                     indent=2))

if __name__ == "__main__":
    main()
