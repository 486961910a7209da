"""What a GPU user runs first: one short bf16 mixed-precision run of every trainer and sampler,
and `extract` / `add` / `merge` on the accelerator, on a tiny local model. Exits 1 if any case
fails; about a minute on one GPU (each case is its own `mergekit-rl` process).

    python benchmarks/gpu_smoke.py                 # on CUDA (refuses to start without one)
    python benchmarks/gpu_smoke.py --device cpu    # the same on the CPU: tests this script
    python benchmarks/gpu_smoke.py --only "train sft" --keep
    make gpu-smoke

The cases are the table CASES, in order (later cases read what earlier ones wrote: GRPO and the
samplers start from the SFT run, WPO and the judge train on the sampled pairs, Pairwise-RL
uses that judge, `extract` takes GRPO − SFT).
A new trainer or sampler is one more line. `{work}`, `{manifests}` and `{device}` are filled
in (double the braces of a YAML flow mapping); every training case also gets the TRAIN
overrides (bf16 autocast, a few steps, a checkpoint). The weight commands print their
throughput.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests" / "train"


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # mergekit-rl arguments
    train: bool = False  # add TRAIN
    weights: bool = False  # a weight command: print its throughput
    sets: tuple[str, ...] = field(default=())  # extra --set items
    needs: str | None = None  # a module the case needs ("vllm"); skipped without it


TRAIN = ("train.max_steps=3", "train.save_steps=2", "train.mixed_precision=bf16",
         "train.progress_bar=false", "train.report_to=[none]", "train.overwrite_output_dir=true")
SAMPLE = ("model.dtype=bfloat16", "data.max_examples=8", "overwrite=true")

CASES = [
    Case("train sft", ("train", "sft", "{manifests}/sft_tiny.yaml"), train=True,
         sets=("model.path={work}/base", "train.output_dir={work}/sft")),
    Case("train sft (deferred head gradient)", ("train", "sft", "{manifests}/sft_tiny.yaml"),
         train=True, sets=("model.path={work}/base", "train.output_dir={work}/sft_deferred",
                           "model.lm_head_grad=deferred", "optim.max_grad_norm=0.01")),
    Case("train sft (LoRA, packing)", ("train", "sft", "{manifests}/sft_tiny.yaml"), train=True,
         sets=("model.path={work}/base", "train.output_dir={work}/sft_lora",
               "model.lora={{r: 8, merge: true}}", "sft.packing=true")),
    Case("train grpo", ("train", "grpo", "{manifests}/grpo_tiny.yaml"), train=True,
         sets=("model.path={work}/sft", "train.output_dir={work}/grpo", "grpo.beta=0.04",
               "grpo.max_completion_length=16", "train.save_steps=1")),
    Case("sample pairs", ("sample", "pairs", "{manifests}/sample_pairs_tiny.yaml"),
         sets=("model.path={work}/sft", "output={work}/pairs.jsonl", *SAMPLE)),
    Case("sample rso", ("sample", "rso", "{manifests}/sample_rso_tiny.yaml"),
         sets=("model.path={work}/sft", "output={work}/rso.jsonl", *SAMPLE)),
    Case("train wpo", ("train", "wpo", "{manifests}/wpo_tiny.yaml"), train=True,
         sets=("model.path={work}/sft", "data.path={work}/pairs.jsonl",
               "train.output_dir={work}/wpo", "train.batch_size=4", "train.micro_batch_size=2")),
    Case("train judge", ("train", "judge", "{manifests}/judge_tiny.yaml"), train=True,
         sets=("model.path={work}/sft", "data.path={work}/pairs.jsonl",
               "train.output_dir={work}/judge", "train.batch_size=4", "train.micro_batch_size=2",
               "judge.eval_size=2")),
    Case("train pairwise (critic, ref. offload)",
         ("train", "pairwise", "{manifests}/pairwise_tiny.yaml"),
         train=True, sets=("model.path={work}/sft", "pairwise.judge={work}/judge",
                           "train.output_dir={work}/pairwise", "pairwise.critic=true",
                           "pairwise.beta=0.04", "model.reference_offload=true")),
    # backend: vllm (when vllm is installed) on a model with head_dim 64, which every vLLM
    # attention backend runs (the demo's tiny models have 24)
    Case("train sft (head_dim 64)", ("train", "sft", "{manifests}/sft_tiny.yaml"), train=True,
         needs="vllm", sets=("model.path={work}/base64", "train.output_dir={work}/sft64")),
    Case("train grpo (vllm)", ("train", "grpo", "{manifests}/grpo_tiny.yaml"), train=True,
         needs="vllm", sets=("model.path={work}/sft64", "train.output_dir={work}/grpo64",
                             "backend=vllm", "grpo.beta=0.04", "grpo.max_completion_length=16")),
    Case("sample pairs (vllm)", ("sample", "pairs", "{manifests}/sample_pairs_tiny.yaml"),
         needs="vllm", sets=("model.path={work}/sft64", "output={work}/pairs64.jsonl",
                             "backend=vllm", *SAMPLE)),
    Case("train pairwise (vllm)", ("train", "pairwise", "{manifests}/pairwise_tiny.yaml"),
         train=True, needs="vllm", sets=("model.path={work}/sft64", "backend=vllm",
                                         "pairwise.judge={work}/judge",
                                         "train.output_dir={work}/pairwise64")),
    Case("extract (trained donors)", ("extract", "{work}/grpo", "{work}/sft", "-o",
                                      "{work}/vector", "--device", "{device}", "--overwrite"),
         weights=True),
    # a bf16 trio of 0.2 GB per model, so that the throughput means something
    Case("extract", ("extract", "{work}/big/grpo", "{work}/big/sft", "-o", "{work}/big/vector",
                     "--device", "{device}", "--overwrite"), weights=True),
    Case("add", ("add", "{work}/big/base", "{work}/big/vector", "-o", "{work}/big/plus",
                 "--device", "{device}", "--overwrite"), weights=True),
    Case("merge", ("merge", "{work}/merge.yaml", "-o", "{work}/big/merged", "--device",
                   "{device}", "--overwrite"), weights=True),
]

MERGE = """target: {work}/big/base
method: task_arithmetic
parameters: {{normalize: false}}
terms:
  - {{plus: {work}/big/grpo, minus: {work}/big/sft, weight: 1.0}}
output: {{path: {work}/big/merged}}
"""
SUMMARY = re.compile(r"wrote (\d+) tensors .*?, ([\d.e+-]+) GB in ([\d.]+)s on ([\w:]+)")
ENGINE = re.compile(r"GB through the engine at ([\d.]+) GB/s \(busy: ([^)]*)\)")


def build(work: Path) -> None:
    """The tiny model to train (hidden 64, 2 layers, tied, the demo's tokenizer), a bf16 trio
    for the weight commands (hidden 1024, 8 layers: 0.2 GB each) and the merge YAML."""
    sys.path.insert(0, str(REPO))
    import torch

    from reasoning_demo.tiny import build_model, build_tokenizer, finetune_copy

    build_tokenizer(work / "tokenizer")
    build_model(work / "base", hidden_size=64, intermediate_size=128, num_layers=2, tied=True,
                seed=0, tokenizer_dir=work / "tokenizer")
    build_model(work / "base64", hidden_size=128, intermediate_size=256, num_layers=2,
                num_heads=2, num_kv_heads=1, tied=True, seed=0, tokenizer_dir=work / "tokenizer")
    big = build_model(work / "big" / "base", hidden_size=1024, intermediate_size=2816,
                      num_layers=8, num_heads=8, num_kv_heads=4, dtype=torch.bfloat16, seed=0,
                      tokenizer_dir=work / "tokenizer")
    sft = finetune_copy(big, work / "big" / "sft", seed=1)
    finetune_copy(sft, work / "big" / "grpo", seed=2)
    (work / "merge.yaml").write_text(MERGE.format(work=work))


def command(case: Case, work: Path, device: str) -> list[str]:
    fill = {"work": str(work), "manifests": str(MANIFESTS), "device": device}
    args = [a.format(**fill) for a in case.args]
    sets = (TRAIN if case.train else ()) + case.sets
    if "backend=vllm" in case.sets and device == "cpu":  # vLLM's CPU build: eager, small KV cache
        sets += ("vllm.enforce_eager=true", f"vllm.kv_cache_memory_bytes={64 * 2 ** 20}")
    for item in sets:
        args += ["--set", item.format(**fill)]
    return [sys.executable, "-m", "mergekit_rl.cli", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", action="append", help="run only this case (repeatable; the "
                    "cases it reads from must have been run into --work before)")
    ap.add_argument("--work", type=Path, help="folder for models and runs (default: a "
                    "temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per case")
    a = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("MERGEKIT_RL_CACHE", "")  # filled below with the work folder
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainers pick CUDA whenever they see one
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu-smoke: no CUDA device is visible (use --device cpu to test the script)",
                  file=sys.stderr)
            return 1
        print(f"gpu-smoke on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    env["MERGEKIT_RL_CACHE"] = env["MERGEKIT_RL_CACHE"] or str(work / "cache")
    if not (work / "base" / "config.json").is_file():
        build(work)
    cases = [c for c in CASES if not a.only or c.name in a.only]
    missing = {c.needs for c in cases if c.needs and importlib.util.find_spec(c.needs) is None}
    for name in sorted(missing):
        print(f"skip {name} cases: {name} is not installed here", flush=True)
    cases = [c for c in cases if c.needs not in missing]
    unknown = set(a.only or ()) - {c.name for c in CASES}
    if unknown:
        print(f"gpu-smoke: unknown case {sorted(unknown)}; cases: "
              f"{', '.join(c.name for c in CASES)}", file=sys.stderr)
        return 1
    failed, t_all = [], time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command(case, work, a.device), capture_output=True, text=True,
                                  env=env, timeout=a.timeout, cwd=work)
            rc, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", e.stdout or "", e.stderr or ""
        seconds = time.perf_counter() - t0
        line = f"{'ok  ' if rc == 0 else 'FAIL'} {case.name:38s} {seconds:6.1f} s"
        match = SUMMARY.search(out if isinstance(out, str) else "")
        if case.weights and match and rc == 0:
            tensors, gb, busy, where = match.groups()
            line += f"   {tensors} tensors, {float(gb):.3g} GB written in {float(busy):.2f} s"
            line += f" on {where}" + (f": {float(gb) / float(busy):.3g} GB/s"
                                      if float(busy) >= 0.05 else "")
            engine = ENGINE.search(out)
            if engine:  # read + write through the pipeline, and which stage was the bottleneck
                line += f"; engine {engine.group(1)} GB/s (busy: {engine.group(2)})"
        print(line, flush=True)
        if rc != 0:
            failed.append(case.name)
            text = (out if isinstance(out, str) else "") + (err if isinstance(err, str) else "")
            tail = "\n".join(text.splitlines()[-25:])
            print(f"  exit {rc}; last lines of its output:\n{tail}", flush=True)
    total = time.perf_counter() - t_all
    print(f"gpu-smoke: {len(cases) - len(failed)} of {len(cases)} cases passed in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if not a.keep and a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
