"""Losses as pure functions of tensors: no models, no I/O, no distributed calls.

Shapes: B sequences (B = prompts x G for GRPO), T token positions. `mask` is 1 on the tokens a
loss is taken over (completion tokens up to and including EOS), 0 elsewhere.

The training loops split a global batch over processes and micro-batches; the optional
normalisers (`total_weight`, `num_sequences`, `num_tokens`) let each piece be scaled by the
global count, so that the summed gradients equal those of the whole batch at once.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
RewardScale = Literal["group", "batch", "none"]
ADVANTAGE_EPS = 1e-4  # TRL/DeepSeekMath: (r - mean) / (std + 1e-4)


def sft_loss(logps: torch.Tensor, weights: torch.Tensor,
             total_weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """Weighted token cross-entropy, C-RLFT style.

    OpenChat (https://arxiv.org/abs/2309.11235), eq. 6: every assistant token carries its
    example's class weight (user tokens 0); loss = Σ w·(−log π) / Σ w over the global batch.
    Plain SFT is w = 1 on completion tokens: the token mean.

    logps, weights: [B, T]; total_weight: the batch's Σ w (default: this piece's) -> scalar
    """
    if total_weight is None:
        total_weight = weights.sum()
    total = torch.as_tensor(total_weight, dtype=torch.float32, device=logps.device)
    return -(weights * logps).sum() / total.clamp(min=1e-12)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN (torch has no nanstd); NaN with fewer than 2 values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim) if dim is not None else \
        (~torch.isnan(x)).sum()
    squares = torch.nansum((x - mean) ** 2, dim=dim, keepdim=keepdim) if dim is not None else \
        torch.nansum((x - mean) ** 2)
    return torch.sqrt(squares / (count - 1))


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale: RewardScale = "group") -> torch.Tensor:
    """Group-relative advantages, DeepSeekMath (https://arxiv.org/abs/2402.03300) §4.1.2.

    A_i = (r_i − mean(group)) / (std + 1e-4), with the Bessel-corrected std of the group
    ("group"), of the whole batch ("batch", as in TRL), or no division ("none", Dr. GRPO,
    https://arxiv.org/abs/2503.20783). Completions of one prompt are consecutive.
    A group whose rewards are all equal gets advantage 0 (no signal, no division by zero).
    A NaN reward (no reward function applied) is left out of the group's statistics and gets
    advantage 0, as in TRL.

    rewards: [N] with N = prompts x group_size -> [N]
    """
    grouped = rewards.view(-1, group_size)  # [P, G]
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)  # [N]
    if scale == "none":
        advantages = centred
    elif scale == "group":
        std = nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # [N]
        advantages = centred / (std + ADVANTAGE_EPS)
    elif scale == "batch":
        advantages = centred / (nanstd(rewards) + ADVANTAGE_EPS)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    return torch.nan_to_num(advantages, nan=0.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref) (http://joschu.net/blog/kl-approx.html),
    DeepSeekMath eq. 4: exp(ref − logp) − (ref − logp) − 1 ≥ 0. Same shape as the inputs."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation,
              max_completion_length: int | None = None, num_sequences: int | None = None,
              num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    grpo:    mean over each sequence's tokens, then over sequences (DeepSeekMath eq. 3)
    bnpo:    Σ / tokens in this batch
    dr_grpo: Σ / (sequences · max_completion_length)  (Dr. GRPO, https://arxiv.org/abs/2503.20783)
    dapo:    Σ / tokens in the global batch  (DAPO, https://arxiv.org/abs/2503.14476 eq. 8)
    `num_sequences` / `num_tokens` default to this batch's counts.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    sequences = num_sequences if num_sequences is not None else per_token.shape[0]
    if aggregation == "grpo":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
        return per_sequence.sum() / sequences
    if aggregation == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return masked.sum() / (sequences * max_completion_length)
    if aggregation == "dapo":
        tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens)
        return masked.sum() / tokens.to(masked.dtype).clamp(min=1)
    raise ValueError(f"aggregation must be grpo, bnpo, dr_grpo or dapo, got {aggregation!r}")


def clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2) -> torch.Tensor:
    """The PPO clipped surrogate (https://arxiv.org/abs/1707.06347 eq. 7), to be maximised:
    min(c·A, clip(c, 1−ε_low, 1+ε_high)·A) per token, broadcasting `advantages` over `ratio`.
    Where the clipped term is the smaller one, the gradient with respect to c is 0."""
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.min(ratio * advantages, clipped * advantages)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    aggregation: Aggregation = "dapo",
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO loss with a k3 KL penalty, DeepSeekMath eq. 3.

    per token: −min(c·A, clip(c, 1−ε_low, 1+ε_high)·A) + β·KL_k3,  c = exp(logp − old_logp)
    (asymmetric ε: DAPO "clip-higher"). With one update per generation round old_logp is
    logp.detach(): c = 1 and the gradient is −A·∇logp.

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B] (one per sequence) or [B, T] (per
    token, as GAE gives) -> (loss scalar, metrics)
    metrics (detached, means over masked tokens): kl, clip_low, clip_high, clip_region, tokens.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [B, 1] | [B, T]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    per_token = -clipped_objective(ratio, adv, eps_low, eps_high)  # [B, T]
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs ref_logp")
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_completion_length, num_sequences,
                     num_tokens)

    with torch.no_grad():
        m = mask.bool()
        tokens = m.sum().clamp(min=1)
        low = (ratio < 1 - eps_low) & (adv < 0)  # clipped from below on a negative advantage
        high = (ratio > 1 + eps_high) & (adv > 0)
        region = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
        metrics = {
            "clip_low": (low & m).sum() / tokens,
            "clip_high": (high & m).sum() / tokens,
            "clip_region": (region & m).sum() / tokens,
            "kl": ((kl * m).sum() / tokens if kl is not None
                   else torch.zeros((), device=logp.device)),
            "tokens": m.sum().float(),
        }
    return loss, metrics
