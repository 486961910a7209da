"""Task-vector maths as pure functions on tensors (no I/O).

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (https://arxiv.org/abs/2212.04089):
τ = θ_ft − θ_pre, θ = θ_target + λ·τ. Zbeeb et al. 2025, "Reasoning Vectors"
(https://arxiv.org/abs/2509.01363): v = θ_GRPO − θ_SFT, θ_new = θ_instruct + α·(m ⊙ v); the mask m
is applied by the planner (tensors outside it are copied from the target).
"""

from __future__ import annotations

import torch


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


# Conversions are explicit: a mixed-dtype kernel (bf16 + fp32 -> bf16 `out`) is not vectorised
# and ran 1.4-7x slower than widening to fp32, computing in place and rounding once on copy.

def task_vector(finetuned: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """τ = θ_ft − θ_base in fp32, rounded once into `out`'s dtype when `out` is given."""
    if out is not None and out.dtype == torch.float32 and out.shape == finetuned.shape:
        return out.copy_(finetuned).sub_(_fp32(base))
    result = _fp32(finetuned).sub(_fp32(base))
    return result if out is None else out.copy_(result)


def apply_vector(target: torch.Tensor, vector: torch.Tensor, alpha: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """θ = θ_target + α·τ in fp32 (α < 0 subtracts), rounded once into `out`'s dtype."""
    result = target.to(torch.float32, copy=True).add_(_fp32(vector), alpha=alpha)
    return result if out is None else out.copy_(result)
