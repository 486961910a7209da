"""Preference losses and WPO weights against values worked out by hand (arithmetic in the
comments), gradient flow with weighting on, and CoPG's bandit / IPO checks from SPEC §2.

SPEC §2's TRL reference numbers (0.778937 / 1.001056 / 0.334799) come from "one fixed input"
that neither the SPEC nor TRL's test suite records, so they cannot be reproduced here; the
formulas are checked by hand instead; `benchmarks/trainer_bench.py --only wpo` runs our WPO and
TRL 1.16's DPOTrainer(use_weighting=True, unclamped) side by side (per-step losses agreed to
5e-5, TRL's log rounding, over 30 steps).
"""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses.preference import (
    alignment_norm,
    combine_weights,
    implicit_rewards,
    nll_loss,
    pair_loss,
    sequence_weight,
    wpo_weight,
)

LOG = math.log

# ρ_w = policy_c − ref_c = (0.5, −0.5); ρ_l = (−1.0, 1.0); Δ = ρ_w − ρ_l = (1.5, −1.5)
POLICY_C, POLICY_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-1.5, -1.5]), torch.tensor([-2.0, -2.0])
ARGS = (POLICY_C, POLICY_R, REF_C, REF_R)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


def test_sigmoid_cdpo_and_robust():
    # βΔ = ±0.15; −log σ(0.15) = log(1 + e^−0.15) = 0.620957, −log σ(−0.15) = 0.770957
    close(pair_loss(*ARGS, loss_type="sigmoid", beta=0.1), [0.620957, 0.770957])
    # cDPO ε = 0.1: 0.9·0.620957 + 0.1·0.770957 = 0.635957; mirrored 0.755957
    close(pair_loss(*ARGS, loss_type="sigmoid", beta=0.1, label_smoothing=0.1),
          [0.635957, 0.755957])
    # robust ε = 0.1: (0.9·0.620957 − 0.1·0.770957) / 0.8 = 0.602207;
    # (0.9·0.770957 − 0.1·0.620957) / 0.8 = 0.789707
    close(pair_loss(*ARGS, loss_type="robust", beta=0.1, label_smoothing=0.1),
          [0.602207, 0.789707])
    # ε = 0: robust is DPO
    close(pair_loss(*ARGS, loss_type="robust", beta=0.1), [0.620957, 0.770957])


def test_ipo_is_length_normalised():
    lengths_c, lengths_r = torch.tensor([2.0, 5.0]), torch.tensor([4.0, 1.0])
    # Δ̄ = 0.5/2 − (−1.0)/4 = 0.5 and −0.5/5 − 1.0/1 = −1.1; 1/(2β) = 5
    # (0.5 − 5)² = 20.25, (−1.1 − 5)² = 37.21
    close(pair_loss(*ARGS, loss_type="ipo", beta=0.1, chosen_lengths=lengths_c,
                    rejected_lengths=lengths_r), [20.25, 37.21], atol=1e-4)
    with pytest.raises(ValueError, match="chosen_lengths"):
        pair_loss(*ARGS, loss_type="ipo", beta=0.1)


def test_hinge_rso_and_slic():
    # RSO hinge-norm, γ = 0.1: max(0, 1 − 0.15) = 0.85, max(0, 1 + 0.15) = 1.15
    close(pair_loss(*ARGS, loss_type="hinge", beta=0.1), [0.85, 1.15])
    # γ = 1: max(0, 1 − 1.5) = 0 (inside the margin: no loss), max(0, 2.5)
    close(pair_loss(*ARGS, loss_type="hinge", beta=1.0), [0.0, 2.5])
    # SLiC (reference-free, δ = 1/β = 2): β·max(0, δ − log π(y_w) + log π(y_l))
    zeros = torch.zeros(2)
    slic = pair_loss(POLICY_C, POLICY_R, zeros, zeros, loss_type="hinge", beta=0.5)
    # log π(y_w) − log π(y_l) = (2.0, −1.0): 0.5·max(0, 2 − 2) = 0, 0.5·max(0, 2 + 1) = 1.5
    close(slic, [0.0, 1.5])


def test_copg_values():
    rewards_c, rewards_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # −(R_w − R_l)·Δ + (β/2)·Δ²: −(1)(1.5) + 0.05·2.25 = −1.3875; −(−2)(−1.5) + 0.1125 = −2.8875
    close(pair_loss(*ARGS, loss_type="copg", beta=0.1, chosen_rewards=rewards_c,
                    rejected_rewards=rewards_r), [-1.3875, -2.8875])
    # which answer is "chosen" does not matter
    swapped = pair_loss(POLICY_R, POLICY_C, REF_R, REF_C, loss_type="copg", beta=0.1,
                        chosen_rewards=rewards_r, rejected_rewards=rewards_c)
    close(swapped, [-1.3875, -2.8875])
    with pytest.raises(ValueError, match="rewards"):
        pair_loss(*ARGS, loss_type="copg", beta=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        pair_loss(*ARGS, loss_type="kto", beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        pair_loss(*ARGS, loss_type="sigmoid", beta=0.0)
    with pytest.raises(ValueError, match="robust needs label_smoothing"):
        pair_loss(*ARGS, loss_type="robust", beta=0.1, label_smoothing=0.5)


def test_nll_and_implicit_rewards():
    close(nll_loss(POLICY_C), [1.0, 2.0])  # SLiC: −log π(y_w|x)
    close(nll_loss(POLICY_C, torch.tensor([2.0, 4.0])), [0.5, 0.5])  # per token
    chosen, rejected = implicit_rewards(*ARGS, beta=0.1)
    close(chosen, [0.05, -0.05])
    close(rejected, [-0.1, 0.1])


# ---------------------------------------------------------------------------------------------
# WPO weights

def probs_logits(*rows):
    """Logits whose softmax is exactly the given probability rows. -> [1, T, V]"""
    return torch.log(torch.tensor([rows], dtype=torch.float32))


def test_wpo_weight_by_hand():
    # every position: π = (0.5, 0.25, 0.25); Σπ² = 0.375; max π = 0.5
    p = (0.5, 0.25, 0.25)
    chosen, chosen_labels, chosen_mask = probs_logits(p, p), torch.tensor([[0, 1]]), \
        torch.tensor([[1, 1]])
    rejected, rejected_labels, rejected_mask = probs_logits(p, p), torch.tensor([[0, 0]]), \
        torch.tensor([[1, 0]])  # one completion token
    args = (chosen, chosen_labels, chosen_mask, rejected, rejected_labels, rejected_mask)
    # sampled: token 0 → 0.5/0.375 = 4/3, token 1 → 0.25/0.375 = 2/3
    # w(y_w) = exp(mean(log 4/3, log 2/3)) = sqrt(8/9) = 0.942809; w(y_l) = 4/3
    # pair: 0.942809 · 4/3 = 1.257079 → clamped at 1
    close(wpo_weight(*args, clamp=None), [1.257079])
    close(wpo_weight(*args), [1.0])  # default: sampled, clamp 1 (the official code)
    close(wpo_weight(*args, clamp=1.1), [1.1])
    # greedy: π/max π = 1 and 0.5 → sqrt(0.5) = 0.707107; w(y_l) = 1
    close(wpo_weight(*args, alignment="greedy", clamp=None), [0.707107])
    # none: sqrt(0.5 · 0.25) = 0.353553; w(y_l) = 0.5 → 0.176777
    close(wpo_weight(*args, alignment="none", clamp=None), [0.176777])


def test_uniform_policy_has_weight_one_and_greedy_never_exceeds_one():
    torch.manual_seed(0)
    uniform = torch.zeros(2, 3, 5)
    labels, mask = torch.randint(0, 5, (2, 3)), torch.ones(2, 3)
    # π = 1/5 everywhere: Σπ² = 1/5 = π(y_t) → every aligned token is 1
    close(wpo_weight(uniform, labels, mask, uniform, labels, mask, clamp=None), [1.0, 1.0])
    logits = torch.randn(4, 6, 11) * 3
    labels = torch.randint(0, 11, (4, 6))
    greedy = wpo_weight(logits, labels, mask.new_ones(4, 6), logits, labels,
                        mask.new_ones(4, 6), alignment="greedy", clamp=None)
    assert (greedy <= 1 + 1e-6).all()


def test_weight_pieces_match_and_norms_are_float32():
    torch.manual_seed(1)
    logits = (torch.randn(3, 4, 7) * 2).to(torch.bfloat16)
    labels, mask = torch.randint(0, 7, (3, 4)), torch.tensor([[0, 1, 1, 1]] * 3)
    norms = alignment_norm(logits, "sampled")
    assert norms.dtype == torch.float32
    expected = torch.log((torch.softmax(logits.float(), -1) ** 2).sum(-1))  # the paper's form
    torch.testing.assert_close(norms, expected, atol=1e-5, rtol=0)
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    w = sequence_weight(logps, norms, mask)
    torch.testing.assert_close(combine_weights(w, w, None),
                               wpo_weight(logits, labels, mask, logits, labels, mask, clamp=None))


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "copg"])
def test_gradients_flow_with_weighting_for_every_loss(loss_type):
    torch.manual_seed(2)
    logits = torch.randn(4, 5, 9, requires_grad=True)  # rows 0-1 chosen, 2-3 rejected
    labels, mask = torch.randint(0, 9, (4, 5)), torch.ones(4, 5)
    token = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = token.sum(-1)
    ref = logps.detach() - torch.tensor([0.3, -0.2, 0.1, 0.4])
    weight = wpo_weight(logits[:2], labels[:2], mask[:2], logits[2:], labels[2:], mask[2:],
                        clamp=None)
    assert not weight.requires_grad
    kwargs = dict(loss_type=loss_type, beta=0.5, label_smoothing=0.1 if loss_type == "robust"
                  else 0.0, chosen_lengths=mask[:2].sum(-1), rejected_lengths=mask[2:].sum(-1),
                  chosen_rewards=torch.tensor([1.0, 0.5]), rejected_rewards=torch.zeros(2))
    losses = pair_loss(logps[:2], logps[2:], ref[:2], ref[2:], **kwargs)
    (losses * weight).mean().backward()  # hinge too: the weight multiplies a new tensor
    grad = logits.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the weight is a constant: the gradient is that of Σ w_i·loss_i with w fixed
    logits.grad = None
    token = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = token.sum(-1)
    constant = weight.clone()
    (pair_loss(logps[:2], logps[2:], ref[:2], ref[2:], **kwargs) * constant).mean().backward()
    torch.testing.assert_close(grad, logits.grad)


def test_in_place_weighting_of_hinge_is_the_trl_defect():
    # TRL 1.16 does `per_sequence_loss *= weights` on relu's output, which relu's backward needs
    x = torch.tensor([0.5, -0.5], requires_grad=True)
    loss = torch.relu(1 - x)
    loss *= torch.tensor([0.3, 0.7])
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.sum().backward()


# ---------------------------------------------------------------------------------------------
# CoPG (https://arxiv.org/abs/2406.19185)

REWARDS = torch.tensor([2.5, 2.0, 1.0])
BETA = 0.5


def regret(pi: torch.Tensor) -> float:
    """J(π*) − J(π), J(π) = E_π[R] − β·KL(π‖π_ref), π_ref uniform over 3 arms."""
    def objective(p):
        return float((p * REWARDS).sum() - BETA * (p * torch.log(p * 3)).sum())
    return objective(torch.softmax(REWARDS / BETA, 0)) - objective(pi)


def copg_expected_loss(theta: torch.Tensor, behaviour: torch.Tensor) -> torch.Tensor:
    """E over pairs (y, y') drawn independently from `behaviour` of the CoPG pair loss."""
    logpi = torch.log_softmax(theta, 0)
    y, y2 = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    y, y2 = y.reshape(-1), y2.reshape(-1)
    ref = torch.full((9,), math.log(1 / 3))
    losses = pair_loss(logpi[y], logpi[y2], ref, ref, loss_type="copg", beta=BETA,
                       chosen_rewards=REWARDS[y], rejected_rewards=REWARDS[y2])
    return (behaviour[y] * behaviour[y2] * losses).sum()


@pytest.mark.parametrize("behaviour", [(0.1, 0.2, 0.7), (0.05, 0.05, 0.9)])
def test_copg_bandit_reaches_zero_regret(behaviour):
    behaviour = torch.tensor(behaviour)
    theta = torch.zeros(3, requires_grad=True)  # start at π_ref
    optimizer = torch.optim.Adam([theta], lr=0.05)
    assert regret(torch.softmax(theta.detach(), 0)) > 0.25  # 0.2919 by hand
    for _ in range(1500):
        optimizer.zero_grad()
        copg_expected_loss(theta, behaviour).backward()
        optimizer.step()
    pi = torch.softmax(theta.detach(), 0)
    # optimum π_ref·exp(R/β) ∝ exp(5, 4, 2) = (0.705385, 0.259496, 0.035119)
    torch.testing.assert_close(pi, torch.tensor([0.705385, 0.259496, 0.035119]), atol=1e-4,
                               rtol=0)
    assert regret(pi) < 1e-6


def test_copg_bandit_from_sampled_pairs():
    # The same with a finite sample of pairs from the skewed behaviour policy: still the optimum.
    generator = torch.Generator().manual_seed(0)
    behaviour = torch.tensor([0.05, 0.05, 0.9])
    y = torch.multinomial(behaviour, 4000, replacement=True, generator=generator)
    y2 = torch.multinomial(behaviour, 4000, replacement=True, generator=generator)
    theta = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    ref = torch.full((4000,), math.log(1 / 3))
    for _ in range(1500):
        optimizer.zero_grad()
        logpi = torch.log_softmax(theta, 0)
        pair_loss(logpi[y], logpi[y2], ref, ref, loss_type="copg", beta=BETA,
                  chosen_rewards=REWARDS[y], rejected_rewards=REWARDS[y2]).mean().backward()
        optimizer.step()
    assert regret(torch.softmax(theta.detach(), 0)) < 1e-6


def test_ipo_with_quarter_rewards_has_copgs_gradient():
    # With R = ±1/4 and |y| = 1: (β/2)·IPO = (β/2)(Δ − 1/(2β))² = (β/2)Δ² − Δ/2 + 1/(8β)
    # = CoPG + 1/(8β), so ∇IPO = (2/β)·∇CoPG: same direction, same fixed point Δ = 1/(2β).
    beta = 0.3
    policy = torch.tensor([[-1.0, -2.5], [-0.4, -0.1]], requires_grad=True)  # [chosen, rejected]
    ref = torch.tensor([[-1.2, -2.0], [-0.5, -0.3]])
    ones = torch.ones(2)

    def grad(**kwargs):
        policy.grad = None
        pair_loss(policy[0], policy[1], ref[0], ref[1], beta=beta, **kwargs).sum().backward()
        return policy.grad.clone()

    ipo = grad(loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)
    copg = grad(loss_type="copg", chosen_rewards=ones / 4, rejected_rewards=-ones / 4)
    torch.testing.assert_close(ipo * beta / 2, copg)
    assert copg.abs().sum() > 0
