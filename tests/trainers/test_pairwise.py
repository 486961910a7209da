"""`train pairwise` end to end on the tiny Qwen2 with a judge trained in the session (digits ≻
letters): the judged win rate rises, a step changes every tensor, the critic trains and resumes,
greedy anchors are the starting policy's; the judge as a GRPO reward and in `sample pairs`."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import MANIFESTS
from safetensors.torch import load_file

from trainers import checkpointing
from trainers.config import load_config
from trainers.errors import TrainingInterrupted
from trainers.metrics import read_metrics
from trainers.pairwise import GREEDY_CACHE, PairwiseConfig, group_anchor_members, train_pairwise

TIMING = ("tokens_per_s", "step_s", "gen_s", "judge_s")


@pytest.fixture
def pairwise(tiny_model, digit_judge, tmp_path):
    def _load(*overrides: str, out: str = "run"):
        base = [f"model.path={tiny_model}", f"pairwise.judge={digit_judge}",
                f"train.output_dir={tmp_path / out}", "train.progress_bar=false",
                "train.report_to=[none]", "train.save_steps=null", "train.max_steps=1",
                "pairwise.max_completion_length=10", "pairwise.anchor_field=source"]
        return load_config(PairwiseConfig, MANIFESTS / "pairwise_tiny.yaml",
                           base + list(overrides))
    return _load


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def test_one_step_changes_every_tensor(pairwise, tiny_model):
    out = train_pairwise(pairwise("optim.lr=1e-2"))
    before, after = load_file(tiny_model / "model.safetensors"), \
        load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    [row] = read_metrics(out)
    assert 0 < row["reward"] < 1 and row["grad_norm"] > 0 and row["kl"] == 0.0
    assert 0 <= row["win_rate"] <= 1 and "judge/position_consistency" in row
    card = (out / "README.md").read_text()
    assert "## Reward" in card and "the row's `source`" in card


def test_a_short_run_raises_the_judged_win_rate(pairwise):
    # anchors are words ("weak", "expert"); the judge prefers digits; A = r − ½
    out = train_pairwise(pairwise("train.max_steps=10", "optim.lr=3e-2", "train.batch_size=64",
                                  "train.micro_batch_size=32"))
    rewards = [row["reward"] for row in read_metrics(out)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards


def test_critic_trains_and_resume_reproduces_the_run(pairwise, monkeypatch):
    args = ("train.max_steps=4", "optim.lr=1e-2", "pairwise.critic=true", "pairwise.beta=0.04",
            "train.save_steps=2")
    full = train_pairwise(pairwise(*args, out="full"))
    rows = read_metrics(full)
    assert all("value_loss" in r and "critic/explained_variance" in r for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[-1]["kl"] > 0
    calls = {"n": 0}

    def fake_requested(self, accelerator):
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 3 else 0

    config = pairwise(*args, out="cut")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted) as e:
        patch.setattr(checkpointing.StopSignal, "requested", fake_requested)
        train_pairwise(config)
    assert e.value.checkpoint.endswith("checkpoint-3")
    assert (Path(config.train.output_dir) / "critic" / "step-3.pt").is_file()
    cut = train_pairwise(config, resume="latest")
    assert curve(cut) == curve(full)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_anchors_are_the_starting_policys_and_cached(pairwise, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = pairwise("pairwise.anchor=greedy", "data.max_examples=8", "train.batch_size=16")
    out = train_pairwise(config)
    cached = json.loads((out / GREEDY_CACHE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()[:8]]
    for row, anchor in zip(rows, cached["anchors"]):
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            tokens = model.generate(ids, do_sample=False, max_new_tokens=10,
                                    eos_token_id=[0, 2], pad_token_id=0)[0, ids.shape[1]:]
        ends = [i for i, t in enumerate(tokens.tolist()) if t in (0, 2)]
        expected = tokenizer.decode(tokens[:ends[0]] if ends else tokens,
                                    skip_special_tokens=True)
        assert anchor == expected
    mtime = (out / GREEDY_CACHE).stat().st_mtime_ns
    train_pairwise(replace(config, train=replace(config.train, overwrite_output_dir=True)))
    assert (out / GREEDY_CACHE).stat().st_mtime_ns == mtime  # read back, not recomputed


def test_group_anchors_and_group_advantages(pairwise):
    members = group_anchor_members([3, 3, 3, 3, 9, 9, 9, 9], 4, seed=0, round_=5)
    assert members == group_anchor_members([3, 3, 3, 3], 4, 0, 5) + \
        group_anchor_members([9, 9, 9, 9], 4, 0, 5)  # per prompt: any split over processes
    assert all(0 <= m < 4 for m in members)
    [row] = read_metrics(train_pairwise(pairwise("pairwise.anchor=group",
                                                 "pairwise.advantage=group")))
    # each group holds its own anchor, judged against itself: exactly ½, a half win
    assert row["win_rate"] > 0 and row["reward"] > 0


def test_the_judge_as_a_grpo_reward_and_in_sample_pairs(tiny_model, digit_judge, tmp_path):
    from trainers.grpo import GRPOConfig, train_grpo
    from trainers.sampling import SamplePairsConfig, load_sample_config, sample_pairs

    reward = f"grpo.rewards=[{{name: judge, kwargs: {{model: '{digit_judge}', anchor: source}}}}]"
    config = load_config(GRPOConfig, MANIFESTS / "grpo_tiny.yaml", [
        f"model.path={tiny_model}", f"train.output_dir={tmp_path / 'grpo'}", reward,
        "train.max_steps=1", "train.progress_bar=false", "grpo.max_completion_length=8"])
    [row] = read_metrics(train_grpo(config))
    assert 0 < row["rewards/judge/mean"] < 1
    for anchor in ("reference", "greedy"):
        out = tmp_path / f"pairs_{anchor}.jsonl"
        config = load_sample_config(SamplePairsConfig, MANIFESTS / "sample_pairs_tiny.yaml", [
            f"model.path={tiny_model}", f"output={out}", "data.max_examples=4",
            "reward.function=null", f"reward.judge={digit_judge}", f"reward.anchor={anchor}",
            "reward.anchor_field=source", "generation.max_completion_length=8"])
        sample_pairs(config)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows and all(0 <= r["rejected_reward"] < r["chosen_reward"] <= 1 for r in rows)


def test_an_offloaded_reference_gives_the_same_anchors_and_run(pairwise):
    """`model.reference_offload`: greedy anchors and the KL to the reference as with a resident
    copy (the reference is read in for the anchors and for each round's pass)."""
    args = ("pairwise.anchor=greedy", "pairwise.beta=0.04", "train.max_steps=2",
            "optim.lr=1e-2", "data.max_examples=8", "train.batch_size=16")
    resident = train_pairwise(pairwise(*args, out="resident"))
    offloaded = train_pairwise(pairwise(*args, "model.reference_offload=true", out="offloaded"))
    assert json.loads((resident / GREEDY_CACHE).read_text())["anchors"] == \
        json.loads((offloaded / GREEDY_CACHE).read_text())["anchors"]
    a, b = curve(resident), curve(offloaded)
    assert a[-1]["kl"] > 0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        assert all(ra[k] == pytest.approx(rb[k], abs=1e-6) for k in ra), (ra, rb)
