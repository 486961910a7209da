"""WPO end to end on a tiny local model: a step moves the margin the right way, weighting works
with every loss (hinge included), resume reproduces the uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers import checkpointing
from trainers.config import load_config
from trainers.errors import TrainingInterrupted
from trainers.metrics import read_metrics
from trainers.wpo import WPOConfig, train_wpo

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"

TIMING = ("tokens_per_s", "step_s")


@pytest.fixture
def pairs(tmp_path):
    """8 pairs: the worked solution against the same solution with a wrong final answer."""
    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()[:8]]
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for r in rows:
            wrong = r["answer"].rsplit("#### ", 1)[0] + "#### 7"
            f.write(json.dumps({"prompt": r["question"], "chosen": r["answer"],
                                "rejected": wrong, "chosen_reward": 1.0,
                                "rejected_reward": 0.0}) + "\n")
    return path


@pytest.fixture
def wpo(tiny_model, pairs, tmp_path):
    def _load(*overrides: str, out: str = "run"):
        base = [f"model.path={tiny_model}", f"data.path={pairs}",
                f"train.output_dir={tmp_path / out}", "train.progress_bar=false",
                "train.report_to=[none]", "train.batch_size=8", "train.micro_batch_size=4",
                "train.save_steps=null", "data.shuffle=false", "optim.lr=1e-3",
                "optim.warmup_ratio=0"]
        return load_config(WPOConfig, MANIFESTS / "wpo_tiny.yaml", base + list(overrides))
    return _load


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def test_steps_change_parameters_and_move_the_margin(wpo, tiny_model):
    out = train_wpo(wpo("train.max_steps=3", "train.log_steps=1"))
    rows = read_metrics(out)
    # one pass over the 8 pairs per step: step 1 sees the starting policy (= reference)
    assert abs(rows[0]["rewards/margins"]) < 1e-5
    assert rows[2]["rewards/margins"] > 0 and rows[2]["rewards/accuracies"] > 0.5
    assert rows[2]["loss"] < rows[0]["loss"]
    assert 0 < rows[0]["wpo_weight"] <= 1  # clamped at 1 by default
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "README.md").read_text().count("wpo") > 0


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "copg", "robust"])
def test_weighting_trains_with_every_loss(wpo, loss_type):
    out = train_wpo(wpo("train.max_steps=2", f"wpo.loss_type={loss_type}",
                        "wpo.weighting=true", "wpo.label_smoothing=0.1"
                        if loss_type == "robust" else "wpo.label_smoothing=0"))
    rows = read_metrics(out)
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_resume_reproduces_the_uninterrupted_run(wpo, monkeypatch):
    full = train_wpo(wpo("train.max_steps=4", out="full"))
    calls = {"n": 0}

    def fake_requested(self, accelerator):
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 2 else 0

    config = wpo("train.max_steps=4", out="cut")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted) as e:
        patch.setattr(checkpointing.StopSignal, "requested", fake_requested)
        train_wpo(config)
    assert e.value.checkpoint.endswith("checkpoint-2")
    cut = train_wpo(config, resume="latest")
    assert curve(cut) == curve(full)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
