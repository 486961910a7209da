"""Loss functions against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses.policy import aggregate, group_advantages, grpo_token_loss, kl_k3, sft_loss

LOG = math.log


def test_group_advantages_group_scale_and_zero_variance():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, Bessel std sqrt((4 * 0.25) / 3) = 0.577350; ±0.5 / 0.577450 = ±0.865876
    # group 2: all rewards equal -> (r - mean) = 0 -> advantage 0, no division by zero
    expected = torch.tensor([0.865876, -0.865876, -0.865876, 0.865876, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_group_advantages_batch_and_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # batch std: mean 1.25, squares 0.0625 + 1.5625 + 1.5625 + 0.0625 + 4 * 0.5625 = 5.5;
    # 5.5 / 7 = 0.785714 -> std 0.886405; group-centred ±0.5 / 0.886505 = ±0.564013
    batch = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch, torch.tensor([0.564013, -0.564013, -0.564013, 0.564013,
                                                    0, 0, 0, 0]), atol=1e-6, rtol=0)
    # none (Dr. GRPO): only centred
    none = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_group_advantages_ignore_nan_rewards():
    # NaN = no reward applied: mean of (1, 0, 1) = 2/3; Bessel std sqrt((1/9 + 4/9 + 1/9) / 2)
    # = 0.577350; A = (1/3, -2/3, 1/3) / 0.577450; the NaN row gets 0
    adv = group_advantages(torch.tensor([1.0, math.nan, 0.0, 1.0]), 4, "group")
    torch.testing.assert_close(adv, torch.tensor([0.577250, 0.0, -1.154500, 0.577250]),
                               atol=1e-6, rtol=0)


def test_kl_k3():
    logp = torch.tensor([LOG(0.5), LOG(0.3)])
    ref = torch.tensor([LOG(0.25), LOG(0.3)])
    # token 1: delta = log 0.25 - log 0.5 = -0.693147; exp(delta) - delta - 1 = 0.5 + 0.693147 - 1
    # token 2: identical distributions -> 0
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.193147, 0.0]), atol=1e-6, rtol=0)


def test_clipped_ratio_values_and_gradients():
    old = torch.zeros(4, 1)
    logp = torch.tensor([[LOG(1.5)], [LOG(1.5)], [LOG(0.5)], [LOG(0.5)]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, metrics = grpo_token_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2,
                                    aggregation="bnpo")
    # ratio 1.5, A=+1: -min(1.5, 1.2) = -1.2 (clipped high: no gradient)
    # ratio 1.5, A=-1: -min(-1.5, -1.2) = 1.5 (unclipped: d/dlogp = ratio = 1.5)
    # ratio 0.5, A=+1: -min(0.5, 0.8) = -0.5 (unclipped: d/dlogp = -0.5)
    # ratio 0.5, A=-1: -min(-0.5, -0.8) = 0.8 (clipped low: no gradient)
    # bnpo over 4 tokens: (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [1.5], [-0.5], [0.0]]) / 4)
    assert metrics["clip_high"].item() == pytest.approx(0.25)  # token 1
    assert metrics["clip_low"].item() == pytest.approx(0.25)  # token 4
    assert metrics["clip_region"].item() == pytest.approx(1.0)  # every ratio is outside [0.8, 1.2]


def test_asymmetric_epsilon():
    # ratio 1.25, A=+1: with eps_high 0.28 it is inside [0.8, 1.28] -> -1.25; with 0.2 -> -1.2
    logp, old = torch.tensor([[LOG(1.25)]]), torch.zeros(1, 1)
    args = (logp, old, None, torch.tensor([1.0]), torch.ones(1, 1))
    assert grpo_token_loss(*args, eps_high=0.28)[0].item() == pytest.approx(-1.25)
    assert grpo_token_loss(*args, eps_high=0.2)[0].item() == pytest.approx(-1.2)


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # grpo: sequence means 2 and 4 -> 3; with 4 sequences in the global batch: (2 + 4) / 4
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "grpo", num_sequences=4).item() == pytest.approx(1.5)
    # bnpo: (1 + 2 + 3 + 4) / 4 tokens
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(2.5)
    # dr_grpo: 10 / (2 sequences * max_completion_length 5)
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=5).item() == \
        pytest.approx(1.0)
    # dapo: 10 / 4 tokens here; 10 / 8 tokens in the global batch
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(2.5)
    assert aggregate(per_token, mask, "dapo", num_tokens=8).item() == pytest.approx(1.25)


def test_grpo_loss_with_kl_penalty_on_policy():
    # ratio 1 (old = logp), A = (+1, -1), every token: logp = log 0.5, ref = log 0.25 -> KL 0.193147
    logp = torch.full((2, 2), LOG(0.5))
    ref = torch.full((2, 2), LOG(0.25))
    loss, metrics = grpo_token_loss(logp, logp, ref, torch.tensor([1.0, -1.0]), torch.ones(2, 2),
                                    beta=0.1, aggregation="grpo")
    # sequence 1: -1 + 0.1 * 0.193147; sequence 2: +1 + 0.1 * 0.193147; mean = 0.0193147
    assert loss.item() == pytest.approx(0.0193147, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.193147, abs=1e-6)
    assert metrics["clip_region"].item() == 0.0


def test_grpo_loss_rejects_beta_without_reference():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.ones(1),
                        torch.ones(1, 1), beta=0.1)


def test_sft_loss_c_rlft_weights():
    logps = torch.tensor([[0.0, LOG(0.5), LOG(0.25)]])
    weights = torch.tensor([[0.0, 1.0, 0.1]])  # prompt token, expert token, sub-optimal token
    # Σ w·(-logp) = 0.693147 + 0.1 * 1.386294 = 0.831777; Σ w = 1.1 -> 0.756161
    assert sft_loss(logps, weights).item() == pytest.approx(0.756161, abs=1e-6)
    # as one piece of a global batch whose weights sum to 2.2
    assert sft_loss(logps, weights, 2.2).item() == pytest.approx(0.378081, abs=1e-6)
