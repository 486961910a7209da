"""Task-vector maths as pure functions on tensors (no I/O).

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (https://arxiv.org/abs/2212.04089):
τ = θ_ft − θ_pre, θ = θ_target + λ·τ. Zbeeb et al. 2025, "Reasoning Vectors"
(https://arxiv.org/abs/2509.01363): v = θ_GRPO − θ_SFT, θ_new = θ_instruct + α·(m ⊙ v); the mask m
is applied by the planner (tensors outside it are copied from the target).
"""

from __future__ import annotations

import torch


def task_vector(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = θ_ft − θ_base."""
    return finetuned - base


def apply_vector(target: torch.Tensor, vector: torch.Tensor, alpha: float) -> torch.Tensor:
    """θ = θ_target + α·τ (α < 0 subtracts the vector)."""
    return torch.add(target, vector, alpha=alpha)
