"""Pairwise-RL maths as pure functions of tensors: the generative judge's probabilities and loss,
the symmetrised judgment, anchor-relative advantages, and GAE for the critic.

Pairwise-RL (Xu et al. 2025, https://arxiv.org/abs/2504.04950) publishes no equations. What is
here is **our reconstruction** from its abstract and the work it builds on (SPEC §2):

- the judge answers "is A better than B?" with one token, `p(a≻b) = σ(ℓ_Yes − ℓ_No)` read at
  the position that predicts the answer (GenRM, https://arxiv.org/abs/2408.15240: P("Yes"));
- it is trained on both orders of every pair (position-swap augmentation; RLHFlow pair-pm),
  `L = −½[log p(y_w≻y_l) + log(1 − p(y_l≻y_w))]` (`two_way`), or GenRM's cross-entropy of the
  label token over the whole vocabulary (`full_vocab`);
- downstream every judgment is symmetrised, `P̄(y≻y') = ½[p(y≻y') + 1 − p(y'≻y)]`, so
  `P̄(y≻y') + P̄(y'≻y) = 1`, `P̄(y≻y) = ½`, and a judge with a pure position bias gives ½;
- the policy's reward is `P̄(y ≻ anchor)`; with `anchor` advantages the anchor is the baseline
  (A = r − ½, a tie is worth nothing), with a critic the PPO form uses GAE
  (https://arxiv.org/abs/1506.02438).

Where the paper may differ: its prompt, whether it symmetrises, its loss weights and its value
function ("consistent with the anchor-relative reward") are not public.

Shapes: B pairs or sequences, T token positions, V vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

JudgeLoss = Literal["two_way", "full_vocab"]


def preference_probability(yes_logit: torch.Tensor, no_logit: torch.Tensor) -> torch.Tensor:
    """p(a≻b) = σ(ℓ_Yes − ℓ_No): the two-way softmax over the label tokens. Same shape."""
    return torch.sigmoid(yes_logit.float() - no_logit.float())


def symmetrised(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """P̄(a≻b) = ½[p(a≻b) + 1 − p(b≻a)], written as ½ + ½(p(a≻b) − p(b≻a)) so that equal
    judgments in both orders (the same response twice, a pure position bias) give ½ exactly."""
    return 0.5 + 0.5 * (p_ab - p_ba)


def position_consistency(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """|p(a≻b) + p(b≻a) − 1| per pair: 0 for a judge that does not care which response is A."""
    return (p_ab + p_ba - 1).abs()


def judge_loss(logits_wl: torch.Tensor, logits_lw: torch.Tensor, yes_id: int, no_id: int,
               loss: JudgeLoss = "two_way", consistency_weight: float = 0.0) -> torch.Tensor:
    """Per-pair loss of the generative judge, both orders of the pair at once.

    logits_wl: [B, V] next-token logits after "A = chosen, B = rejected" (label: Yes);
    logits_lw: [B, V] after the swapped order (label: No) -> [B]

    two_way:    −½[log σ(ℓ_Yes − ℓ_No)|_wl + log σ(ℓ_No − ℓ_Yes)|_lw]
    full_vocab: −½[log softmax(ℓ)_Yes|_wl + log softmax(ℓ)_No|_lw]  (GenRM's SFT on the label)
    `consistency_weight` λ adds λ·(p(w≻l) + p(l≻w) − 1)², with p the two-way probabilities.
    """
    wl, lw = logits_wl.float(), logits_lw.float()
    gap_wl = wl[:, yes_id] - wl[:, no_id]
    gap_lw = lw[:, yes_id] - lw[:, no_id]
    if loss == "two_way":
        per_pair = -0.5 * (F.logsigmoid(gap_wl) + F.logsigmoid(-gap_lw))
    elif loss == "full_vocab":
        per_pair = -0.5 * (torch.log_softmax(wl, -1)[:, yes_id]
                           + torch.log_softmax(lw, -1)[:, no_id])
    else:
        raise ValueError(f"judge loss must be two_way or full_vocab, got {loss!r}")
    if consistency_weight:
        per_pair = per_pair + consistency_weight * (
            torch.sigmoid(gap_wl) + torch.sigmoid(gap_lw) - 1) ** 2
    return per_pair


def pairwise_accuracy(p_wl: torch.Tensor, p_lw: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the symmetrised judgment prefers the chosen answer, ½ on a tie, else 0."""
    preference = symmetrised(p_wl, p_lw)
    return (preference > 0.5).float() + 0.5 * (preference == 0.5).float()


def anchor_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A = P̄(y ≻ anchor) − ½: the anchor is the baseline, so no group statistics are needed and
    a response judged as good as its anchor has no advantage. [N] -> [N]"""
    return rewards - 0.5


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards with each sequence's reward on its last completion token (0 elsewhere).

    rewards: [B]; mask: [B, T], 1 on completion tokens (contiguous) -> [B, T]
    """
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.bool() * positions).amax(dim=1)  # [B]
    has = mask.bool().any(dim=1)
    out[has, last[has]] = rewards[has].to(out.dtype)
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438
    eq. 16) over completion tokens: δ_t = r_t + γ·V_{t+1} − V_t (V = 0 after the last token),
    A_t = δ_t + γλ·A_{t+1}; returns R_t = A_t + V_t, the critic's regression target.

    rewards, values, mask: [B, T] (mask 1 on contiguous completion tokens) -> (A, R): [B, T],
    0 where the mask is 0. With V ≡ ½, γ = λ = 1 and the reward at the end, A_t = r − ½: the
    `anchor` advantage.
    """
    mask = mask.to(torch.float32)
    values = values.float() * mask
    rewards = rewards.float() * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], device=values.device)
    next_value = torch.zeros_like(running)
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        # a padded position passes nothing back to the real token before it
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """½·Σ_t (V_t − R_t)² over completion tokens / the global batch's token count (default:
    this batch's), so that micro-batches and processes add up to the whole batch's loss."""
    mask = mask.to(torch.float32)
    tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens,
                                                                  device=values.device)
    return 0.5 * (((values.float() - returns.detach()) ** 2) * mask).sum() / tokens.clamp(min=1)
