"""Data-parallel and sharded runs on this CPU: 2 processes (torchrun, gloo) follow the same
per-step losses and end at the same weights as 1 process with the same global batch, for SFT,
GRPO (per-prompt seeded samples, so the split over processes does not change them) and WPO; a
2-process run killed with SIGKILL and resumed reproduces the uninterrupted one; and FSDP2
(torch's fully_shard over gloo, through accelerate's FSDP path) does the same with sharded
optimizer state, a sharded reference, generation with whole parameters and a resume.

The global batch is fixed by the config, so 2 processes also split it differently (one
micro-batch each where 1 process accumulates two). Each launch runs several jobs
(`dist_driver.py`) to pay torch's start-up once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers import registry
from trainers.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MANIFESTS = REPO / "manifests" / "train"
TORCHRUN = Path(sys.executable).parent / "torchrun"
TIMING = ("tokens_per_s", "step_s", "gen_s")
COMMON = ["train.progress_bar=false", "train.report_to=[none]"]
JOBS = {  # kind: overrides (model.path, data.path, output_dir added per test)
    "sft": ["train.max_steps=4", "train.save_steps=2", "train.batch_size=8",
            "train.micro_batch_size=4", "model.lm_head_chunk_size=16"],  # the chunked head
    "grpo": ["train.max_steps=2", "train.save_steps=null", "train.batch_size=32",
             "train.micro_batch_size=16", "grpo.beta=0.04", "optim.lr=1e-2",
             "grpo.max_completion_length=6", "grpo.rewards=[grpo_rewards:digit_fraction]"],
    "wpo": ["train.max_steps=3", "train.save_steps=null", "train.batch_size=4",
            "train.micro_batch_size=2", "optim.lr=1e-2", "data.shuffle=false",
            "model.lm_head_chunk_size=16"],
}

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to "
                                "this python")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()[:8]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["question"], "chosen": r["answer"],
                                        "rejected": r["answer"][:-1] + "7"}) + "\n"
                            for r in rows))
    return path


def overrides(kind: str, model: Path, out: Path, pairs: Path) -> list[str]:
    extra = [f"data.path={pairs}"] if kind == "wpo" else []
    return [f"model.path={model}", f"train.output_dir={out}", *COMMON, *JOBS[kind], *extra]


def cli_job(kind: str, items: list[str], *flags: str) -> list[str]:
    return ["train", kind, str(MANIFESTS / f"{kind}_tiny.yaml"), "-q", *flags,
            *[x for item in items for x in ("--set", item)]]


def torchrun(tmp_path: Path, name: str, script: str, *args: str, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                           str(HERE / script), *args], capture_output=True, text=True,
                          timeout=240, env=env, cwd=tmp_path)


def run_jobs(tmp_path: Path, name: str, jobs: list[list[str]], env: dict | None = None):
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    done = torchrun(tmp_path, name, "dist_driver.py", str(spec), env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def same_run(one: Path, two: Path, rows_one=None, rows_two=None) -> None:
    a, b = rows_one or curve(one), rows_two or curve(two)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # one writer, not one per process
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, abs=1e-5, rel=1e-5), (x["step"], key)
            else:
                assert y[key] == value, key
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def one_process(kind, model, out, pairs):
    from trainers.config import load_config

    cls, _ = registry.lookup(kind)
    return registry.run(kind, load_config(cls, MANIFESTS / f"{kind}_tiny.yaml",
                                          overrides(kind, model, out, pairs)))


def test_two_processes_match_one_and_a_killed_run_resumes(tiny_model, tmp_path, pairs):
    two = {k: tmp_path / f"two-{k}" for k in JOBS}
    run_jobs(tmp_path, "ddp", [cli_job(k, overrides(k, tiny_model, two[k], pairs))
                               for k in JOBS])
    for kind in JOBS:
        same_run(one_process(kind, tiny_model, tmp_path / f"one-{kind}", pairs), two[kind])
    # 2 processes killed (SIGKILL to rank 0) after step 3, between checkpoints 2 and 4
    cut = tmp_path / "cut-sft"
    job = cli_job("sft", overrides("sft", tiny_model, cut, pairs))
    killed = torchrun(tmp_path, "kill", "kill_driver.py", "--kill-at", "3", *job)
    assert killed.returncode != 0 and (cut / "checkpoint-2").is_dir()
    assert not (cut / "checkpoint-4").exists() and not (cut / "config.json").exists()
    resumed = torchrun(tmp_path, "resume", "kill_driver.py", *job, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    same_run(two["sft"], cut)


def test_fsdp2_matches_one_process_and_resumes_sharded_state(tiny_model, tmp_path, pairs):
    fsdp = {k: tmp_path / f"fsdp-{k}" for k in ("sft", "grpo")}
    saved = tmp_path / "first-pass.jsonl"
    resume = str(fsdp["sft"] / "checkpoint-2")
    run_jobs(tmp_path, "fsdp", [
        cli_job("sft", overrides("sft", tiny_model, fsdp["sft"], pairs)),
        ["copy", str(fsdp["sft"] / "metrics.jsonl"), str(saved)],
        cli_job("sft", overrides("sft", tiny_model, fsdp["sft"], pairs), "--resume", resume),
        cli_job("grpo", overrides("grpo", tiny_model, fsdp["grpo"], pairs))],
        env={"MERGEKIT_RL_TEST_CPU_FSDP2": "1"})
    state = fsdp["sft"] / "checkpoint-2" / "training_state"
    assert (state / "optimizer_0").is_dir() and (state / "pytorch_model_fsdp_0").is_dir()
    assert [p.name for p in (fsdp["sft"] / "checkpoint-2").glob("*.safetensors")] == \
        ["model.safetensors"]  # the gathered weights, what extract and transformers read
    one = one_process("sft", tiny_model, tmp_path / "one-sft", pairs)
    first = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in saved.read_text().splitlines()]
    same_run(one, fsdp["sft"], rows_two=first)  # first pass
    same_run(one, fsdp["sft"])  # resumed from the sharded checkpoint-2
    same_run(one_process("grpo", tiny_model, tmp_path / "one-grpo", pairs), fsdp["grpo"])


def same_curves(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    curve_one, curve_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in curve_two] == [r["step"] for r in curve_one]
    for a, b in zip(curve_one, curve_two):
        assert set(a) == set(b)
        for key in set(keys) & set(a):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert keys[-1] in curve_one[-1]
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_judge_and_pairwise_two_processes_match_one(tiny_model, digit_judge, tmp_path):
    from conftest import write_pairs

    from trainers.config import load_config
    from trainers.judge import JudgeConfig, train_judge
    from trainers.pairwise import PairwiseConfig, train_pairwise

    pairs = write_pairs(tmp_path / "pairs.jsonl", "complete")
    common = [f"model.path={tiny_model}", "train.progress_bar=false", "train.report_to=[none]",
              "train.save_steps=null"]
    judge = common + [f"data.path={pairs}", "train.max_steps=3", "train.batch_size=8",
                      "train.micro_batch_size=2", "judge.eval_size=8", "optim.lr=3e-3"]
    # samples are seeded per prompt, so the split over processes does not change them (2 x 2
    # prompts in one micro-batch each against 2 micro-batches of 2 prompts)
    policy = common + [f"pairwise.judge={digit_judge}", "train.max_steps=2",
                       "train.batch_size=32", "train.micro_batch_size=8",
                       "pairwise.max_completion_length=6", "pairwise.anchor_field=source",
                       "optim.lr=1e-2", "pairwise.critic=true"]
    run_jobs(tmp_path, "judge-pairwise", [
        cli_job("judge", judge + [f"train.output_dir={tmp_path / 'j2'}"]),
        cli_job("pairwise", policy + [f"train.output_dir={tmp_path / 'p2'}"])])
    one = train_judge(load_config(JudgeConfig, MANIFESTS / "judge_tiny.yaml",
                                  judge + [f"train.output_dir={tmp_path / 'j1'}"]))
    same_curves(one, tmp_path / "j2", ("loss", "grad_norm", "accuracy", "eval/accuracy",
                                       "eval/position_consistency"))
    one = train_pairwise(load_config(PairwiseConfig, MANIFESTS / "pairwise_tiny.yaml",
                                     policy + [f"train.output_dir={tmp_path / 'p1'}"]))
    same_curves(one, tmp_path / "p2", ("loss", "grad_norm", "reward", "value_loss"))
