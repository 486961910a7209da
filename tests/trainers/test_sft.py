"""SFT end to end on a tiny local model: C-RLFT weighting, outputs, resume, failure modes."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers import checkpointing, models
from trainers.data import load_rows
from trainers.errors import NonFiniteLossError, TrainerConfigError, TrainingInterrupted
from trainers.metrics import read_metrics
from trainers.sft import build_examples, train_sft

TIMING = ("tokens_per_s", "step_s")


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def test_crlft_loss_is_weighted_cross_entropy_over_global_batch(load, tiny_model):
    # 8 rows per step in 2 micro-batches of 4; the weak class (every 4th row) weighs 0.1
    config = load("sft_crlft_tiny.yaml", "train.max_steps=1", "data.shuffle=false")
    out = train_sft(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = build_examples(load_rows(config.data, ()), tokenizer, config)[:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # the weights before the update
    numerator = denominator = 0.0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.ids])).logits[0, :-1]
            ce = F.cross_entropy(logits, torch.tensor(e.ids[1:]), reduction="none")
            w = torch.tensor(e.weights[1:])
            numerator += float((w * ce).sum())
            denominator += float(w.sum())
    assert {w for e in examples for w in e.weights} == {0.0, 0.1, 1.0}
    [row] = read_metrics(out)
    assert row["loss"] == pytest.approx(numerator / denominator, abs=1e-5)
    assert row["weight_sum"] == pytest.approx(denominator, abs=1e-4)


def test_sft_changes_weights_and_writes_an_extractable_donor(load, tiny_model, tmp_path):
    out = train_sft(load("sft_tiny.yaml", "train.max_steps=2", "train.save_steps=1",
                         "train.save_total_limit=1"))
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out /
                                                                          "model.safetensors")
    assert "lm_head.weight" not in after  # tied like the input: the shared matrix is saved once
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "trainer_config.yaml").is_file() and (out / "chat_template.jinja").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # limit 1
    # readers that glob shards must see only the weights
    assert [p.name for p in (out / "checkpoint-2").rglob("*.safetensors")] == ["model.safetensors"]
    from mergekit_rl.cli import main

    result = CliRunner().invoke(main, ["extract", str(out), str(tiny_model), "-o",
                                       str(tmp_path / "vector"), "-q"])
    assert result.exit_code == 0, result.output


def test_resume_reproduces_the_uninterrupted_run(load, monkeypatch):
    full = train_sft(load("sft_tiny.yaml", "train.max_steps=4", "train.save_steps=null",
                          out="full"))
    # Same run, stopped by a (simulated) SIGTERM after step 2, then resumed.
    calls = {"n": 0}

    def fake_requested(self, accelerator):
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 2 else 0

    config = load("sft_tiny.yaml", "train.max_steps=4", "train.save_steps=null", out="cut")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted) as e:
        patch.setattr(checkpointing.StopSignal, "requested", fake_requested)
        train_sft(config)
    assert e.value.signum == signal.SIGTERM and e.value.checkpoint.endswith("checkpoint-2")
    with pytest.raises(TrainerConfigError, match="already holds a run; pass --resume"):
        train_sft(config)
    cut = train_sft(config, resume="latest")
    assert curve(cut) == curve(full)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_names_the_step(load, monkeypatch):
    from trainers.losses import policy as losses

    real = losses.sft_loss
    monkeypatch.setattr(losses, "sft_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1"):
        train_sft(load("sft_tiny.yaml", "train.max_steps=2"))


def test_bad_data_fails_before_the_model_loads(load, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(TrainerConfigError, match="line 2 is not JSON"):
        train_sft(load("sft_tiny.yaml", f"data.path={bad}"))
    with pytest.raises(TrainerConfigError, match="no field 'solution'"):
        train_sft(load("sft_tiny.yaml", "data.completion_field=solution"))
    with pytest.raises(TrainerConfigError, match="train.batch_size: 512 is more than the 256"):
        train_sft(load("sft_tiny.yaml", "train.batch_size=512"))
