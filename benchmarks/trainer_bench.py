"""Steps/s, peak RSS and per-step losses of our GRPO and WPO trainers against TRL's, on the same
fixed batches at a real vocabulary.

TRL's side is GRPOTrainer, and DPOTrainer with use_weighting=True (its WPO).

Model: a Qwen2-shaped model built locally with random weights (built once under
benchmarks/_cache/trainer/): `--size qwen` is hidden 256, intermediate 1024, 4 layers, 4 heads
(2 KV), tied embeddings; `--vocab 151936` gives it Qwen2.5's vocabulary size (the tokenizer is
the demo's tiny one, so the tokens are few but every log-softmax runs over 151,936 entries).
fp32 on the CPU, AdamW (weight decay 0), clip 1.0, a constant learning rate, no gradient
checkpointing (TRL's default is on: it is switched off), no checkpoints, no trackers.

grpo: 8 plain-text prompts x G = 8 completions of exactly 32 tokens, pre-generated once by
sampling from the model (`min_new_tokens` = `max_new_tokens` = 32) and replayed on both sides
(ours: `generation.sample`, TRL: `GRPOTrainer._generate_single_turn` are replaced), so both
train on the same rollouts: a sampled GRPO loss is ~0 by construction and compares nothing.
Every step takes the same 64 completions in micro-batches of 8 (8 accumulation steps), β 0.04
(a reference model on both sides; ours with `model.reference_offload: true`, read in for each
round's pass only, its embedding and head streamed from the file; BENCH_REFERENCE=resident
keeps it loaded as TRL does; and with `model.lm_head_grad: deferred`, BENCH_HEAD_GRAD=dense
for the default), lr 1e-5, loss
"dapo", group-scaled advantages; the reward is the share of digit characters of the completion
text (deterministic, so the rewards match).

wpo: 8 plain-text preference pairs from the demo's word problems (prompt "Question: ...\\n
Answer:\\n", chosen = the worked solution, rejected = the same with a wrong final "#### N"; EOS
appended by both trainers; up to 256 tokens, none truncated), all 8 per step in one micro-batch
(16 sequences), loss sigmoid, β 0.1, lr 1e-4, WPO weighting with sampled alignment and no clamp
(`weight_clamp: null`, what TRL's `use_weighting` computes), reference log-probs precomputed on
both sides.

steps/s: between the end of step `--warmup` and the end of the last step, inside each run
(start-up, loading, reference precompute and the final save are left out). Peak RSS: the run's
ru_maxrss from `os.wait4` (the whole process, imports included). Runs alternate (ours, TRL, TRL,
ours, ...) because timings on these 2-core machines drift ±30-60%: compare ratios taken in one
invocation. `--lora R` adds our run with LoRA adapters of rank R on every linear layer.

    /tmp/oursvenv/bin/python benchmarks/trainer_bench.py --size qwen --vocab 151936 \\
        --trl-python /tmp/trlvenv/bin/python --steps 6 --repeats 3 --threads 1 --lora 16
    (side venvs, each with what a user of that side installs: python3 -m venv /tmp/trlvenv &&
     /tmp/trlvenv/bin/pip install torch==2.13.0 trl==1.16.0; python3 -m venv /tmp/oursvenv &&
     /tmp/oursvenv/bin/pip install torch==2.13.0 -e '.[peft]'. Our side runs on the driver's
     python: from .venv, the dev extras' scipy and Pillow, which TRL's venv lacks, are imported
     by transformers.modeling_utils and add about 40 MB to our peak.)

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
SIZES = {  # Qwen2 shapes
    "tiny": dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                 num_kv_heads=2),
    "qwen": dict(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                 num_kv_heads=2),
}
BENCHES = ("grpo", "wpo")
OFFLOAD = os.environ.get("BENCH_REFERENCE", "offload") == "offload"  # ours' GRPO reference
HEAD_GRAD = os.environ.get("BENCH_HEAD_GRAD", "deferred")  # ours' GRPO model.lm_head_grad
GRPO = dict(prompts=8, generations=8, completion_tokens=32, micro_batch=8, beta=0.04, lr=1e-5,
            seed=0)
WPO = dict(pairs=8, pairs_per_step=8, max_length=256, max_prompt_length=192, beta=0.1, lr=1e-4,
           seed=0)


def folder_of(size: str, vocab: int | None) -> Path:
    return CACHE / (f"{size}-v{vocab}" if vocab else size)


def digit_share(prompts, completions, **columns):
    """The reward: share of digit characters (deterministic, the same on both sides)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


# ---------------------------------------------------------------------------------------------
# children: inputs

def build(size: str, vocab: int | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasoning_demo.tiny import build_model

    folder = folder_of(size, vocab)
    if not (folder / "model" / "config.json").is_file():
        build_model(folder / "model", seed=0, tied=True, vocab_size=vocab, **SIZES[size])
    rng = random.Random(0)
    prompts = []
    for _ in range(GRPO["prompts"]):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        prompts.append({"prompt": f"Question: What is {a} plus {b}?\nAnswer:"})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    # the fixed rollouts: G samples of exactly 32 tokens per prompt, stop tokens ignored
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    from transformers import LogitsProcessorList

    def text_tokens_only(input_ids, scores):  # ids the tokenizer can write, no special ones
        scores[:, len(tokenizer):] = -float("inf")
        scores[:, tokenizer.all_special_ids] = -float("inf")
        return scores

    torch.manual_seed(0)
    rollouts = {}
    n = GRPO["completion_tokens"]
    for p in prompts:
        ids = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids] * GRPO["generations"]), do_sample=True,
                                 min_new_tokens=n, max_new_tokens=n,
                                 pad_token_id=tokenizer.pad_token_id, top_k=0, top_p=1.0,
                                 temperature=1.0,
                                 logits_processor=LogitsProcessorList([text_tokens_only]))
        rollouts[json.dumps(ids)] = out[:, len(ids):].tolist()
        assert all(len(c) == n for c in rollouts[json.dumps(ids)])
    (folder / "rollouts.json").write_text(json.dumps(rollouts))
    build_pairs(folder)


def build_pairs(folder: Path) -> None:
    """pairs.jsonl: word problem, worked solution, the same with a wrong final answer."""
    from transformers import AutoTokenizer

    from reasoning_demo.tasks import arithmetic_example

    s = WPO
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


def replayed(folder: Path):
    """completions_for(prompt ids list) -> the fixed rollouts of that prompt, in turn."""
    rollouts = json.loads((folder / "rollouts.json").read_text())

    def completions_for(prompt_ids: list[list[int]]) -> list[list[int]]:
        seen: dict[str, int] = {}
        out = []
        for ids in prompt_ids:
            key = json.dumps(list(ids))
            k = seen.get(key, 0)
            seen[key] = k + 1
            out.append(rollouts[key][k])
        return out

    return completions_for


# ---------------------------------------------------------------------------------------------
# children: runs

def run_ours_grpo(folder: Path, steps: int, out: Path, lora: int | None) -> dict:
    import trainers.generation as generation
    from trainers import metrics as metrics_mod
    from trainers.config import from_dict, resolve_paths
    from trainers.grpo import GRPOConfig, train_grpo

    s = GRPO
    completions_for = replayed(folder)
    generation.sample = lambda model, prompts, *a, **k: completions_for(prompts)
    raw = {
        "model": {"path": str(folder / "model")},
        "data": {"path": str(folder / "prompts.jsonl"), "chat": False, "cache": False},
        "train": {"output_dir": str(out), "batch_size": s["prompts"] * s["generations"],
                  "micro_batch_size": s["micro_batch"], "max_steps": steps, "seed": s["seed"],
                  "report_to": ["none"], "progress_bar": False, "overwrite_output_dir": True},
        "optim": {"lr": s["lr"], "scheduler": "constant", "max_grad_norm": 1.0},
        "grpo": {"num_generations": s["generations"],
                 "max_completion_length": s["completion_tokens"], "beta": s["beta"],
                 "loss_type": "dapo", "scale_rewards": "group", "top_k": 0, "top_p": 1.0,
                 "temperature": 1.0, "rewards": ["trainer_bench:digit_share"]},
    }
    if lora:
        raw["model"]["lora"] = {"r": lora, "alpha": 2 * lora}
    else:
        raw["model"]["lm_head_grad"] = HEAD_GRAD
        if OFFLOAD:  # the reference is read in for each round's pass only
            raw["model"]["reference_offload"] = True
    config = resolve_paths(from_dict(GRPOConfig, raw), out)
    ends = patch_step_clock()
    train_grpo(config)
    rows = metrics_mod.read_metrics(out)
    return {"ends": ends, "loss": [r["loss"] for r in rows], "reward": [r["reward"] for r in rows]}


def run_trl_grpo(folder: Path, steps: int, out: Path, lora: int | None) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    s = GRPO
    completions_for = replayed(folder)
    GRPOTrainer._generate_single_turn = \
        lambda self, prompt_ids, *a, **k: (completions_for(prompt_ids), None)
    rows = [json.loads(line) for line in open(folder / "prompts.jsonl")]
    ends, clock = trl_step_clock()
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=s["prompts"] * s["generations"] // s["micro_batch"],
        num_generations=s["generations"], max_completion_length=s["completion_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, beta=s["beta"],
        learning_rate=s["lr"], gradient_checkpointing=False, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, loss_type="dapo",
        scale_rewards="group", max_steps=steps, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=s["seed"], disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"})
    trainer = GRPOTrainer(model=str(folder / "model"), args=args, reward_funcs=[digit_share],
                          train_dataset=Dataset.from_list(rows), callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"ends": ends, "loss": [h["loss"] for h in logs], "reward": [h["reward"] for h in logs]}


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


def run_ours_wpo(folder: Path, steps: int, out: Path, lora: int | None) -> dict:
    from trainers.config import from_dict, resolve_paths
    from trainers.metrics import read_metrics
    from trainers.wpo import WPOConfig, train_wpo

    s = WPO
    raw = {
        "model": {"path": str(folder / "model"), "dtype": "float32"},
        "data": {"path": str(folder / "pairs.jsonl"), "chat": False, "cache": False},
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
    if lora:
        raw["model"]["lora"] = {"r": lora, "alpha": 2 * lora}
    config = resolve_paths(from_dict(WPOConfig, raw), out)
    ends = patch_step_clock()
    train_wpo(config)
    rows = read_metrics(out)
    return {"ends": ends, "loss": [r["loss"] for r in rows]}


def run_trl_wpo(folder: Path, steps: int, out: Path, lora: int | None) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = WPO
    rows = [json.loads(line) for line in open(folder / "pairs.jsonl")]
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
    trainer = DPOTrainer(model=str(folder / "model"), args=args,
                         train_dataset=Dataset.from_list(rows), callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {"ends": ends, "loss": [h["loss"] for h in logs]}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="qwen")
    ap.add_argument("--vocab", type=int, help="vocabulary size of the model (default: the tiny "
                    "tokenizer's 300); Qwen2.5: 151936")
    ap.add_argument("--only", choices=BENCHES, help="run one comparison (default: both)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of steps/s")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trl-python", help="python of a venv with trl installed")
    ap.add_argument("--lora", type=int, metavar="R", help="also run ours with LoRA rank R")
    ap.add_argument("--threads", type=int,
                    help="torch threads of every run (OMP_NUM_THREADS; default: torch's own)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    for mode in ("_build", "_ours", "_trl"):
        ap.add_argument(f"--{mode}", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bench", choices=BENCHES, default="grpo", help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_lora", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = folder_of(a.size, a.vocab)
    if a._build:
        return build(a.size, a.vocab)
    if a._ours or a._trl:
        result = CHILDREN[a.bench, "ours" if a._ours else "trl"](folder, a.steps, a._out,
                                                                 a._lora)
        print("RESULT " + json.dumps(result))
        return

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}",
           "TOKENIZERS_PARALLELISM": "false"}
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if not all((folder / f).is_file() for f in ("model/config.json", "rollouts.json",
                                                 "pairs.jsonl")):
        cmd = [sys.executable, __file__, "--_build", "--size", a.size]
        subprocess.run(cmd + (["--vocab", str(a.vocab)] if a.vocab else []), check=True, env=env)
    variants = {"ours": (sys.executable, "ours", None)}
    if a.trl_python:
        variants["trl"] = (a.trl_python, "trl", None)
    if a.lora:
        variants[f"ours-lora{a.lora}"] = (sys.executable, "ours", a.lora)
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    benches = [a.only] if a.only else list(BENCHES)
    results: dict[str, dict[str, list[dict]]] = {b: {name: [] for name in variants}
                                                  for b in benches}
    for bench in benches:
        for r in range(a.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                python, side, lora = variants[name]
                out, log = runs / f"{bench}-{name}-{r}", runs / f"{bench}-{name}-{r}.log"
                shutil.rmtree(out, ignore_errors=True)  # no cached reference log-probs
                cmd = [python, __file__, f"--_{side}", "--bench", bench, "--size", a.size,
                       "--steps", str(a.steps), "--_out", str(out)]
                cmd += (["--vocab", str(a.vocab)] if a.vocab else []) + \
                    (["--_lora", str(lora)] if lora else [])
                m = timed(cmd, log, env)
                lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
                if m["rc"] != 0 or not lines:
                    sys.exit(f"{bench} {name} run {r} failed (rc {m['rc']}); see {log}")
                child = json.loads(lines[-1][len("RESULT "):])
                ends = child["ends"]
                if len(ends) != a.steps:
                    sys.exit(f"{bench} {name} run {r}: {len(ends)} step ends, expected {a.steps}")
                m["steps_per_s"] = (len(ends) - a.warmup) / (ends[-1] - ends[a.warmup - 1])
                m["loss"] = child["loss"]
                results[bench][name].append(m)
                print(f"{bench} {name:11s} run {r}: {m['steps_per_s']:.3f} steps/s, peak RSS "
                      f"{m['rss_mb']:.0f} MB, wall {m['wall']:.0f} s, loss "
                      f"{m['loss'][0]:.6f} -> {m['loss'][-1]:.6f}, other CPU "
                      f"{m['other_cpu']:.0f} s", flush=True)
    summary = {bench: {name: {"steps_per_s_median": statistics.median(x["steps_per_s"] for x in rs),
                              "rss_mb_median": statistics.median(x["rss_mb"] for x in rs),
                              "wall_median": statistics.median(x["wall"] for x in rs),
                              "loss": rs[0]["loss"]}
                       for name, rs in per_bench.items()}
               for bench, per_bench in results.items()}
    print(json.dumps(summary, indent=2))
    for bench, per_bench in summary.items():
        o = per_bench["ours"]
        if "trl" in per_bench:
            t = per_bench["trl"]
            gap = max(abs(x - y) for x, y in zip(o["loss"], t["loss"]))
            print(f"{bench}: ours / TRL: {o['steps_per_s_median'] / t['steps_per_s_median']:.2f}x "
                  f"steps/s, {o['rss_mb_median'] / t['rss_mb_median']:.2f}x peak RSS; per-step "
                  f"losses differ by at most {gap:.1e}")
        for name, v in per_bench.items():
            if name.startswith("ours-lora"):
                print(f"{bench}: {name} / ours full: {v['rss_mb_median'] / o['rss_mb_median']:.2f}x"
                      f" peak RSS ({v['rss_mb_median']:.0f} vs {o['rss_mb_median']:.0f} MB), "
                      f"{v['steps_per_s_median'] / o['steps_per_s_median']:.2f}x steps/s")
    if a.json:
        settings = {"size": a.size, **SIZES[a.size], "vocab": a.vocab, "steps": a.steps,
                    "warmup": a.warmup, "threads": a.threads, "grpo": GRPO, "wpo": WPO}
        a.json.write_text(json.dumps({"settings": settings, "runs": results, "summary": summary},
                                     indent=2))


if __name__ == "__main__":
    main()
