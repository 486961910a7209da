"""Generation throughput and GRPO step time with `backend: hf` and `backend: vllm`, on the same
model and config, alternating in one invocation.

The model is a seeded random Qwen2 with head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...;
the demo's head_dim 24 is refused), built once under benchmarks/_cache/generation/. Two sizes:
`tiny` (hidden 64, 1 head, 2 layers: 0.1 M parameters) and `small` (hidden 512, 8 heads,
8 layers, intermediate 2048: 31.6 M parameters with the 300-token vocabulary).

- `generate`: 16 prompts x G = 8 completions of exactly --tokens tokens (random weights rarely
  stop; the stop set is empty so every completion has the same length), through
  `generation.make_sampler` as GRPO uses it. One untimed call, then --calls timed calls; the
  median gives tokens/s. `start_s` is the engine start (vllm) or model load (hf).
- `grpo`: `mergekit-rl train grpo` on the shipped manifests/train/grpo_tiny.yaml (4 prompts x 8
  completions of up to 16 tokens per step, the shipped rewards) for --steps steps; the median
  `step_s` over steps 2.. (the first step warms up), and of `gen_s` (sampling, with vllm
  including the weight sync, whose own `sync_s` is shown too), and the run's wall time.

Every run is its own process (`--_gen`, `--_grpo`, `--_build` are the children), so an engine's
start-up and memory stay in its run; runs alternate (hf, vllm, vllm, hf, ...). On a CPU the
engine is eager (no compilation: `vllm.enforce_eager`) with a 256 MiB KV cache
(`vllm.kv_cache_memory_bytes`; otherwise vLLM's CPU build reserves gpu_memory_utilization of RAM),
and OMP_NUM_THREADS is --threads for both backends (vLLM would otherwise drop the process to one
torch thread). On a GPU it runs unchanged with vLLM's defaults (CUDA graphs, 0.3 of the memory).

    python benchmarks/generation_bench.py --python .venv-vllm/bin/python   # make bench-generation
    python benchmarks/generation_bench.py --size small --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / "_cache" / "generation"
MANIFEST = REPO / "manifests" / "train" / "grpo_tiny.yaml"
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1,
                 num_kv_heads=1),
    "small": dict(hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8,
                  num_kv_heads=4),
}
BACKENDS = ("hf", "vllm")
CPU_ENGINE = ("vllm.enforce_eager=true", f"vllm.kv_cache_memory_bytes={256 * 2**20}")


# ---------------------------------------------------------------------------------------------
# children

def build(size: str) -> None:
    from reasoning_demo.tiny import build_model

    folder = CACHE / size
    if not (folder / "config.json").is_file():
        build_model(folder, seed=0, tied=True, **SIZES[size])


def config_overrides(size: str, backend: str, out: Path) -> list[str]:
    import torch

    sets = [f"model.path={CACHE / size}", f"train.output_dir={out}", f"backend={backend}",
            "train.progress_bar=false", "train.report_to=[none]", "train.save_steps=null",
            "train.overwrite_output_dir=true"]
    return sets + ([] if torch.cuda.is_available() else list(CPU_ENGINE))


def generate(size: str, backend: str, tokens: int, calls: int) -> dict:
    from dataclasses import replace

    import torch

    from trainers import generation, models, runtime
    from trainers.config import load_config
    from trainers.grpo import GRPOConfig
    from trainers.rollout import load_prompts

    config = load_config(GRPOConfig, MANIFEST, config_overrides(size, backend, CACHE / "unused"))
    params = replace(config.grpo, max_completion_length=tokens)
    tokenizer = runtime.load_tokenizer(config.model)
    rows, _ = load_prompts(config.data, config.grpo.max_prompt_length, tokenizer,
                           config.train.seed)
    prompts = [p for p in rows.ids[:16] for _ in range(8)]
    t0 = time.perf_counter()
    sampler = generation.make_sampler(config, tokenizer.pad_token_id,
                                      params.max_prompt_length + tokens, seed=0)
    policy = None
    if backend == "hf":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        policy = models.load_model(config.model, trainable=False).to(device)
    start = time.perf_counter() - t0
    sampler.sample(prompts, params, set(), policy=policy)  # warm-up
    seconds, made = [], 0
    for _ in range(calls):
        t0 = time.perf_counter()
        made = sum(len(c) for c in sampler.sample(prompts, params, set(), policy=policy).tokens)
        seconds.append(time.perf_counter() - t0)
    sampler.close()
    s = statistics.median(seconds)
    return {"start_s": start, "tokens": made, "seconds": s, "tokens_per_s": made / s}


def grpo(size: str, backend: str, steps: int) -> dict:
    from trainers.config import load_config
    from trainers.grpo import GRPOConfig, train_grpo
    from trainers.metrics import read_metrics

    out = CACHE / "runs" / f"{size}-{backend}"
    t0 = time.perf_counter()
    train_grpo(load_config(GRPOConfig, MANIFEST, config_overrides(size, backend, out)
                           + [f"train.max_steps={steps}"]))
    wall = time.perf_counter() - t0
    rows = read_metrics(out)[1:]
    result = {"wall_s": wall, "step_s": statistics.median(r["step_s"] for r in rows),
              "gen_s": statistics.median(r["gen_s"] for r in rows)}
    if backend == "vllm":
        result["sync_s"] = statistics.median(r["sync_s"] for r in rows)
        result["logp_abs_diff"] = max(r["sampling/logp_abs_diff"] for r in rows)
    return result


# ---------------------------------------------------------------------------------------------
# driver

def child(python: str, *args: str, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=env,
                          cwd=REPO)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-20:])
        raise SystemExit(f"{' '.join(args)} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter of every run; it needs vllm for the vllm runs")
    ap.add_argument("--size", choices=sorted(SIZES), action="append")
    ap.add_argument("--only", choices=["generate", "grpo"], action="append")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each backend")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per completion (generate)")
    ap.add_argument("--calls", type=int, default=3, help="timed calls per generate run")
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per run")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of every run (default: 1 without a GPU, unset with)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--_build"), ap.add_argument("--_gen"), ap.add_argument("--_grpo")
    ap.add_argument("--_backend")
    a = ap.parse_args()
    if a._build or a._gen or a._grpo:
        if a._build:
            build(a._build)
            result = {}
        elif a._gen:
            result = generate(a._gen, a._backend, a.tokens, a.calls)
        else:
            result = grpo(a._grpo, a._backend, a.steps)
        print(json.dumps(result))
        return 0

    gpu = _has_gpu(a.python)
    threads = a.threads if a.threads is not None else (None if gpu else 1)
    rows = []
    for size in a.size or ["tiny"]:
        child(a.python, "--_build", size, threads=threads)
        for bench in a.only or ["generate", "grpo"]:
            for k in range(a.repeats):
                for backend in BACKENDS if k % 2 == 0 else BACKENDS[::-1]:
                    flag = "--_gen" if bench == "generate" else "--_grpo"
                    result = child(a.python, flag, size, "--_backend", backend, "--tokens",
                                   str(a.tokens), "--calls", str(a.calls), "--steps",
                                   str(a.steps), threads=threads)
                    rows.append({"size": size, "bench": bench, "backend": backend, **result})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'GPU' if gpu else 'CPU'}, OMP_NUM_THREADS={threads or 'unset'}")
    for size in a.size or ["tiny"]:
        for bench in a.only or ["generate", "grpo"]:
            for backend in BACKENDS:
                mine = [r for r in rows if (r["size"], r["bench"], r["backend"]) ==
                        (size, bench, backend)]
                if not mine:
                    continue
                if bench == "generate":
                    print(f"{size:5s} generate {backend:4s}: "
                          f"{statistics.median(r['tokens_per_s'] for r in mine):9.0f} tokens/s "
                          f"({mine[0]['tokens']} tokens per call), start "
                          f"{statistics.median(r['start_s'] for r in mine):5.1f} s")
                else:
                    extra = (f", sync {statistics.median(r['sync_s'] for r in mine):.3f} s, "
                             f"max |Δlogp| {max(r['logp_abs_diff'] for r in mine):.1e}"
                             if backend == "vllm" else "")
                    print(f"{size:5s} grpo     {backend:4s}: step "
                          f"{statistics.median(r['step_s'] for r in mine):6.2f} s "
                          f"(generation {statistics.median(r['gen_s'] for r in mine):.2f} s"
                          f"{extra}), run {statistics.median(r['wall_s'] for r in mine):5.1f} s")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def _has_gpu(python: str) -> bool:
    done = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)
    return done.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main())
