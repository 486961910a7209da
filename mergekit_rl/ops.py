"""Task-vector maths as pure functions on tensors (no I/O).

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (https://arxiv.org/abs/2212.04089):
τ = θ_ft − θ_pre, θ = θ_target + λ·τ. Zbeeb et al. 2025, "Reasoning Vectors"
(https://arxiv.org/abs/2509.01363): v = θ_GRPO − θ_SFT, θ_new = θ_instruct + α·(m ⊙ v); the mask m
is applied by the planner (tensors outside it are copied from the target).
"""

from __future__ import annotations

import torch


def _fp32_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make one operand fp32 so that type promotion computes in fp32; the other (bf16/fp16, both
    exact in fp32) is widened inside the kernel, element by element, with no copy."""
    if a.dtype == torch.float32 or b.dtype == torch.float32:
        return a, b
    return a.to(torch.float32), b


def task_vector(finetuned: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """τ = θ_ft − θ_base in fp32, rounded once into `out`'s dtype when `out` is given."""
    return torch.sub(*_fp32_pair(finetuned, base), out=out)


def apply_vector(target: torch.Tensor, vector: torch.Tensor, alpha: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """θ = θ_target + α·τ in fp32 (α < 0 subtracts), rounded once into `out`'s dtype."""
    return torch.add(*_fp32_pair(target, vector), alpha=alpha, out=out)
