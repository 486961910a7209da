"""Pairwise preference losses and WPO weights as pure functions of tensors (no models, no I/O).

Conventions, fixed for the whole module (SPEC §2):

- `*_logps` are sequence log-probabilities **summed** over completion tokens,
  `log π(y|x) = Σ_t log π(y_t | x, y_<t)`: shape [B], one entry per pair.
- `ρ_w = log π(y_w|x) − log π_ref(y_w|x)` (chosen), `ρ_l` likewise (rejected), `Δ = ρ_w − ρ_l`.
  A positive Δ means the policy prefers the chosen answer more than the reference does.
- Only IPO divides each log-ratio by its completion length (`Δ̄`); every other loss uses the sums.
- `pair_loss` returns the per-pair loss [B], not reduced: the trainer multiplies it by the WPO
  weight (never in place, so every loss, hinge included, keeps its gradient) and takes the mean
  over the global batch, as the official WPO code does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "robust", "ipo", "hinge", "copg"]
Alignment = Literal["sampled", "greedy", "none"]
LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "copg")
ALIGNMENTS = ("sampled", "greedy", "none")


def pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: LossType,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_rewards: torch.Tensor | None = None,
    rejected_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss [B] of one member of the DPO family; all inputs [B].

    sigmoid  DPO (https://arxiv.org/abs/2305.18290, eq. 7) with cDPO label smoothing ε
             (https://ericmitchell.ai/cdpo.pdf): −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ).
             With β = γ this is also RSO's sigmoid-norm loss (https://arxiv.org/abs/2309.06657).
    robust   robust DPO (https://arxiv.org/abs/2403.00409): (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ))
             / (1 − 2ε), an unbiased loss under preference flips with rate ε < 1/2.
    ipo      IPO (https://arxiv.org/abs/2310.12036, eq. 17): (Δ̄ − 1/(2β))², where
             Δ̄ = ρ_w/|y_w| − ρ_l/|y_l| (needs `chosen_lengths`, `rejected_lengths`).
    hinge    RSO hinge-norm (https://arxiv.org/abs/2309.06657): max(0, 1 − βΔ) with β = γ.
             With the reference log-probs set to 0 it is SLiC's calibration loss
             (https://arxiv.org/abs/2305.10425) max(0, δ − log π(y_w) + log π(y_l)) times β,
             δ = 1/β; add SLiC's regulariser with `nll_loss`.
    copg     CoPG (https://arxiv.org/abs/2406.19185): with R̃(y) = R(y) − (β/2)·ρ(y), the loss
             −[(R̃(y_w) − R̃(y_l))·ρ_w + (R̃(y_l) − R̃(y_w))·ρ_l] = −(R_w − R_l)·Δ + (β/2)·Δ²,
             no stop-gradient (needs `chosen_rewards`, `rejected_rewards`). Its optimum is
             π_ref·exp(R/β) whatever distribution the pairs came from; which answer is called
             "chosen" does not matter.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rho_w = policy_chosen_logps - ref_chosen_logps  # [B]
    rho_l = policy_rejected_logps - ref_rejected_logps  # [B]
    delta = rho_w - rho_l  # [B]
    eps = label_smoothing
    if loss_type == "sigmoid":
        if not 0 <= eps < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {eps}")
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) \
            / (1 - 2 * eps)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo is length-normalised: pass chosen_lengths and rejected_lengths")
        delta_bar = rho_w / chosen_lengths.clamp(min=1) - rho_l / rejected_lengths.clamp(min=1)
        return (delta_bar - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "copg":
        if chosen_rewards is None or rejected_rewards is None:
            raise ValueError("copg needs chosen_rewards and rejected_rewards (scalar R per answer)")
        shaped_w = chosen_rewards - beta / 2 * rho_w  # R̃(y_w)
        shaped_l = rejected_rewards - beta / 2 * rho_l  # R̃(y_l)
        return -((shaped_w - shaped_l) * rho_w + (shaped_l - shaped_w) * rho_l)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen answer [B].

    Without lengths: −log π(y_w|x), SLiC's regulariser −λ·log π(y_ref|x) with y_ref = y_w
    (https://arxiv.org/abs/2305.10425). With lengths: the per-token mean −log π(y_w|x)/|y_w|,
    the SFT term of RPO (https://arxiv.org/abs/2404.19733). The caller multiplies by λ.
    """
    if chosen_lengths is None:
        return -chosen_logps
    return -chosen_logps / chosen_lengths.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# WPO weights (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, eq. 2)

def alignment_norm(logits: torch.Tensor, alignment: Alignment = "sampled") -> torch.Tensor:
    """Per-position log-normaliser of the weight's alignment, float32. [B, T, V] -> [B, T]

    sampled: log Σ_v π(v|·)²  (logsumexp(2·log_softmax) in float32, SPEC §2)
    greedy:  log max_v π(v|·)
    none:    0 (the raw per-token probability)
    """
    if alignment == "none":
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    if alignment == "sampled":
        return torch.logsumexp(2 * logp, dim=-1)
    if alignment == "greedy":
        return logp.max(dim=-1).values
    raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")


def sequence_weight(token_logps: torch.Tensor, token_norms: torch.Tensor, mask: torch.Tensor
                    ) -> torch.Tensor:
    """w(x, y) = exp((1/|y|) Σ_t [log π(y_t|x,y_<t) − norm_t]), detached. [B, T] x 3 -> [B]"""
    mask = mask.to(torch.float32)
    aligned = (token_logps.detach().float() - token_norms.detach().float()) * mask
    return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))


def combine_weights(chosen_weight: torch.Tensor, rejected_weight: torch.Tensor,
                    clamp: float | None = 1.0) -> torch.Tensor:
    """Pair weight w(x,y_w)·w(x,y_l) [B], clamped at `clamp` as the official code does
    (https://github.com/wzhouad/WPO, scripts/run_wpo.py); None leaves it unclamped (TRL ≥ 0.29)."""
    weight = chosen_weight * rejected_weight
    return weight if clamp is None else weight.clamp(max=clamp)


def wpo_weight(
    chosen_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logits: torch.Tensor,
    rejected_labels: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alignment: Alignment = "sampled",
    clamp: float | None = 1.0,
) -> torch.Tensor:
    """WPO pair weight [B], detached: `w(x,y_w)·w(x,y_l)`, clamped at `clamp` (None: unclamped).

    logits [B, T, V]: position t predicts `labels[:, t]` (already shifted); mask [B, T] is 1 on
    completion tokens. The weight is computed under the current policy. Defaults are the official
    code's: sampled alignment, clamp 1. "greedy" can never exceed 1 per token; "sampled" can.
    """
    with torch.no_grad():
        weights = []
        for logits, labels, mask in ((chosen_logits, chosen_labels, chosen_mask),
                                     (rejected_logits, rejected_labels, rejected_mask)):
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
            weights.append(sequence_weight(picked, alignment_norm(logits, alignment), mask))
        return combine_weights(weights[0], weights[1], clamp)


def implicit_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                     beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards β·ρ_w, β·ρ_l [B] (detached), for logging margins and accuracy."""
    with torch.no_grad():
        return (beta * (policy_chosen_logps - ref_chosen_logps),
                beta * (policy_rejected_logps - ref_rejected_logps))
