"""Faults of a training run (issue 14, item 6): SIGKILL between checkpoints, SIGKILL during the
final save, running out of memory, and the error policy (user mistakes are one line, bugs keep
their traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from trainers.cli import train
from trainers.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MANIFESTS = REPO / "manifests" / "train"
TIMING = ("tokens_per_s", "step_s", "gen_s")
DIGITS = "grpo.rewards=[grpo_rewards:digit_fraction]"


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def driver(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "kill_driver.py"), *args],
                          capture_output=True, text=True, timeout=180, env=env)


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_sigkill_between_checkpoints_then_resume_reproduces_the_run(kind, load, tiny_model,
                                                                    tmp_path):
    from trainers import registry

    common = ["train.max_steps=5", "train.save_steps=2", "train.progress_bar=false",
              "train.report_to=[none]", f"model.path={tiny_model}"]
    if kind == "grpo":  # the process's RNG stream: resume must restore it
        common += [DIGITS, "grpo.max_completion_length=6", "grpo.sample_seeding=global",
                   "optim.lr=1e-2"]
    name = f"{kind}_tiny.yaml"
    full = registry.run(kind, load(name, *common, out="full"))
    cut = tmp_path / "cut"
    args = ["train", kind, str(MANIFESTS / name), "-q",
            *sets(*common, f"train.output_dir={cut}")]
    killed = driver("--kill-at", "3", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (cut / "checkpoint-2").is_dir() and not (cut / "checkpoint-4").exists()
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3]  # step 3 was logged, then killed
    assert not (cut / "trainer_state.json").exists() and not (cut / "config.json").exists()
    resumed = driver(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert curve(cut) == curve(full)  # steps 3.. recomputed from checkpoint-2, step 3 once
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_the_final_save_leaves_no_half_model(load, tiny_model, tmp_path):
    from mergekit_rl.cli import main as tool
    from trainers.sft import train_sft

    common = ["train.max_steps=2", "train.save_steps=2", "train.progress_bar=false",
              "train.report_to=[none]", f"model.path={tiny_model}"]
    full = train_sft(load("sft_tiny.yaml", *common, out="full"))
    cut = tmp_path / "cut"
    args = ["train", "sft", str(MANIFESTS / "sft_tiny.yaml"), "-q",
            *sets(*common, f"train.output_dir={cut}")]
    killed = driver("--kill-in-final-save", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (cut / "final.tmp").is_dir()
    for marker in ("config.json", "trainer_state.json", "model.safetensors"):
        assert not (cut / marker).exists(), marker  # readers see no model, not half of one
    refused = CliRunner().invoke(tool, ["extract", str(cut), str(tiny_model), "-o",
                                        str(tmp_path / "v"), "-q"])
    assert refused.exit_code == 1 and not (tmp_path / "v").exists()
    resumed = driver(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (cut / "final.tmp").exists() and (cut / "trainer_state.json").is_file()
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def invoke(tiny_model, tmp_path, *overrides: str):
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["sft", str(MANIFESTS / "sft_tiny.yaml"), "-q",
                                        *sets(f"model.path={tiny_model}",
                                              f"train.output_dir={out}", "train.max_steps=2",
                                              *overrides)])
    return result, out


def test_out_of_memory_is_one_line_naming_the_step_and_what_to_lower(tiny_model, tmp_path,
                                                                     monkeypatch):
    import trainers.sft as sft

    real = sft.micro_batch_loss
    calls = {"n": 0}

    def oom_in_step_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # two micro-batches per step: the first of step 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "micro_batch_loss", oom_in_step_two)
    result, _ = invoke(tiny_model, tmp_path)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "out of accelerator memory at step 2 with train.micro_batch_size 4" in result.output
    assert "lower train.micro_batch_size" in result.output and "sft.max_length" in result.output


@pytest.mark.parametrize("bug", [KeyError("rows"), ValueError("a bug, not a config"),
                                 RuntimeError("shape mismatch")])
def test_a_bug_keeps_its_traceback(bug, tiny_model, tmp_path, monkeypatch):
    import trainers.sft as sft

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(sft, "build_examples", broken)
    result, _ = invoke(tiny_model, tmp_path, "data.cache=false")
    assert result.exception is bug  # not turned into SystemExit(1) with a message
    assert "Error:" not in result.output


def test_a_user_mistake_is_one_line(tiny_model, tmp_path):
    result, out = invoke(tiny_model, tmp_path, "sft.max_length=1")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "sft.max_length=1: expected > 1" in result.output and not out.exists()
