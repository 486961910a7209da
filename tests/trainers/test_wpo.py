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
    loss, weight = reference_step(wpo("train.max_steps=3", "train.log_steps=1"))
    assert rows[0]["loss"] == pytest.approx(loss, rel=1e-4)  # weights clamped at 1 by default
    assert rows[0]["wpo_weight"] == pytest.approx(weight, rel=1e-4)
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "README.md").read_text().count("wpo") > 0


def reference_step(config) -> tuple[float, float]:
    """The first step's loss and mean WPO weight, recomputed independently: each sequence alone
    (no padding), float64, the weight and the loss written out from the papers. At step 1 the
    policy is the reference, so every log-ratio is 0 and each pair's loss is a constant c:
    -log σ(0) = ln 2 (sigmoid and robust), max(0, 1 − 0) = 1 (hinge), (0 − 1/(2β))² (IPO)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.data import load_rows
    from trainers.wpo import build_pairs

    params = config.wpo
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    examples = build_pairs(load_rows(config.data, ("chosen", "rejected")), tokenizer, config)
    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float64).eval()
    weights = []
    for e in examples:
        w = 1.0
        for ids, mask in ((e.chosen, e.chosen_mask), (e.rejected, e.rejected_mask)):
            seq = torch.tensor([e.prompt + ids])
            with torch.no_grad():
                logp = model(seq).logits[0, :-1].log_softmax(-1)  # row t predicts token t + 1
            rows = torch.arange(len(e.prompt) - 1, seq.shape[1] - 1)
            token = logp[rows, seq[0, rows + 1]]
            # WPO eq. 2: sampled alignment divides by Σ_v π(v)², greedy by max_v π(v)
            norm = (torch.logsumexp(2 * logp[rows], -1) if params.weight_alignment == "sampled"
                    else logp[rows].max(-1).values)
            m = torch.tensor(mask, dtype=torch.float64)
            w *= float(torch.exp(((token - norm) * m).sum() / m.sum()))
        weights.append(w if params.weight_clamp is None else min(w, params.weight_clamp))
    if not params.weighting:
        weights = [1.0] * len(weights)
    c = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0,
         "ipo": (1 / (2 * params.beta)) ** 2}[params.loss_type]
    mean_w = sum(weights) / len(weights)
    return c * mean_w, mean_w


@pytest.mark.parametrize("overrides", [
    ("wpo.loss_type=sigmoid", "wpo.weight_clamp=null"),
    ("wpo.loss_type=hinge", "wpo.weight_alignment=greedy", "wpo.weight_clamp=0.45"),
    ("wpo.loss_type=ipo", "wpo.weight_alignment=greedy", "wpo.weight_clamp=null"),
    ("wpo.loss_type=robust", "wpo.label_smoothing=0.1", "wpo.weight_clamp=null"),
    ("wpo.loss_type=sigmoid", "wpo.weighting=false"),
], ids=["sigmoid", "hinge-greedy-clamped", "ipo-greedy", "robust", "unweighted"])
def test_first_step_loss_and_weight_match_a_recomputation(wpo, overrides):
    config = wpo("train.max_steps=1", *overrides)
    loss, weight = reference_step(config)
    row = read_metrics(train_wpo(config))[0]
    assert row["loss"] == pytest.approx(loss, rel=1e-4)
    assert row["wpo_weight"] == pytest.approx(weight, rel=1e-4)
    assert abs(row["rewards/margins"]) < 1e-5


def test_a_deferred_head_gradient_gives_the_dense_run(wpo):
    """`model.lm_head_grad: deferred` under WPO's sampled alignment (the same squared tiles
    feed the normaliser and the deferred gradient's bound), clipped and not: the dense run's
    losses, weights and gradient norms to rounding."""
    for clip in ("optim.max_grad_norm=0.05", "optim.max_grad_norm=null"):
        args = ("train.max_steps=3", "wpo.weight_alignment=sampled", "model.lm_head_chunk_size=5",
                clip)
        dense = curve(train_wpo(wpo(*args, out=f"dense{clip[-4:]}")))
        out = train_wpo(wpo(*args, "model.lm_head_grad=deferred", out=f"deferred{clip[-4:]}"))
        deferred = curve(out)
        for key in ("loss", "wpo_weight", "grad_norm"):
            assert [r[key] for r in dense] == pytest.approx([r[key] for r in deferred],
                                                            rel=1e-5), key
        a = load_file(out.parent / f"dense{clip[-4:]}" / "model.safetensors")
        b = load_file(out / "model.safetensors")
        # Adam's first steps move an entry by about lr = 1e-3 whatever its gradient's size, so
        # the rounding of a gradient that is ~0 shows as up to 2e-5 (2% of one step)
        assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)


def test_copg_starts_at_zero_and_moves_towards_the_reward(wpo):
    # CoPG at Δ = 0 is exactly 0 whatever the weights; its gradient, −(R_w − R_l)·∇Δ, raises
    # the margin of the pair with the higher reward (chosen_reward 1 > rejected_reward 0).
    rows = read_metrics(train_wpo(wpo("train.max_steps=3", "wpo.loss_type=copg",
                                      "wpo.weighting=true")))
    assert rows[0]["loss"] == 0.0
    assert rows[2]["rewards/margins"] > 0 and rows[2]["loss"] < 0


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


def test_a_reference_kept_or_offloaded_gives_the_precomputed_run(wpo):
    """`wpo.precompute_ref: false` keeps the reference model for every micro-batch, resident or
    (`model.reference_offload`) read in for each one: both give the precomputed run's curve."""
    args = ("train.max_steps=3", "train.log_steps=1")
    runs = [curve(train_wpo(wpo(*args, *extra, out=f"run{k}"))) for k, extra in enumerate(
        [(), ("wpo.precompute_ref=false",),
         ("wpo.precompute_ref=false", "model.reference_offload=true")])]
    assert runs[0][-1]["rewards/margins"] != 0
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a.keys() == b.keys()
            assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a), (a, b)
