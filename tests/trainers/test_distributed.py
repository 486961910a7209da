"""Data-parallel on CPU: 2 processes (torchrun, gloo) follow the same loss curve as 1 process
with the same global batch. The global batch is fixed by the config, so the 2-process run also
splits it differently (2 x 4 rows in one micro-batch each, against 2 micro-batches of 4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.metrics import read_metrics
from trainers.sft import train_sft

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to this python")
def test_two_processes_match_one(load, tiny_model, tmp_path):
    overrides = ["train.max_steps=3", "train.save_steps=null", "train.batch_size=8",
                 "train.micro_batch_size=4", "train.progress_bar=false", "train.report_to=[none]"]
    one = train_sft(load("sft_tiny.yaml", *overrides, out="one"))
    two = tmp_path / "two"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc_per_node", "2", "-m", "trainers", "train", "sft",
               str(MANIFESTS / "sft_tiny.yaml"),
               "-q", "--set", f"model.path={tiny_model}", "--set", f"train.output_dir={two}"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    curve_one, curve_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in curve_two] == [1, 2, 3]  # one writer, not one per process
    for a, b in zip(curve_one, curve_two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
        assert b["tokens"] == a["tokens"] and b["weight_sum"] == a["weight_sum"]
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def torchrun(kind: str, config: Path, overrides: list[str]) -> None:
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc_per_node", "2", "-m", "trainers", "train", kind, str(config), "-q"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


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


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to this python")
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
    one = train_judge(load_config(JudgeConfig, MANIFESTS / "judge_tiny.yaml",
                                  judge + [f"train.output_dir={tmp_path / 'j1'}"]))
    torchrun("judge", MANIFESTS / "judge_tiny.yaml",
             judge + [f"train.output_dir={tmp_path / 'j2'}"])
    same_curves(one, tmp_path / "j2", ("loss", "grad_norm", "accuracy", "eval/accuracy",
                                       "eval/position_consistency"))
    # top_k 1: every process samples the same tokens, whatever its seed, so the maths can be
    # compared (2 x 2 prompts in one micro-batch each against 2 micro-batches of 2 prompts)
    policy = common + [f"pairwise.judge={digit_judge}", "train.max_steps=2",
                       "train.batch_size=32", "train.micro_batch_size=8", "pairwise.top_k=1",
                       "pairwise.max_completion_length=6", "pairwise.anchor_field=source",
                       "optim.lr=1e-2", "pairwise.critic=true"]
    one = train_pairwise(load_config(PairwiseConfig, MANIFESTS / "pairwise_tiny.yaml",
                                     policy + [f"train.output_dir={tmp_path / 'p1'}"]))
    torchrun("pairwise", MANIFESTS / "pairwise_tiny.yaml",
             policy + [f"train.output_dir={tmp_path / 'p2'}"])
    same_curves(one, tmp_path / "p2", ("loss", "grad_norm", "reward", "value_loss"))
