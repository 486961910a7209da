"""Truncated SVD of a 2-D delta, as pure functions on tensors (no I/O).

The best rank-r approximation of Δ in the Frobenius norm is U_r·S_r·V_rᵀ (Eckart & Young 1936);
the energy it keeps is Σ_{i≤r} s_i² / ‖Δ‖_F². It is stored as LoRA factors split evenly,
B = U_r·√S_r [m, r] and A = √S_r·V_rᵀ [r, n], so Δ_r = B·A and both factors have the same scale
(bf16 storage loses the same relative precision on each).

Method: `torch.linalg.svd` (exact) when the smaller side is at most `EXACT_MAX_SIDE` or the
rank is a large part of it; otherwise the randomized range finder with subspace iteration of
Halko, Martinsson & Tropp 2011 (https://arxiv.org/abs/0909.4061, Algorithms 4.4 and 5.1) with
`OVERSAMPLE` extra columns and `POWER_ITERS` iterations, its Gaussian test matrix drawn from a
seeded CPU generator (the same on CPU and CUDA). For a delta of rank ≤ r both recover Δ to fp32
rounding. `torch.svd_lowrank` is the same algorithm but draws from torch's global generator.
For an energy target the randomized rank doubles until the target is met, then falls back to
the exact SVD when the rank would exceed half the smaller side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_MAX_SIDE = 512
OVERSAMPLE = 16
POWER_ITERS = 4
FIRST_RANK = 32  # the randomized search for an energy target starts here
METHODS = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class Truncation:
    """Δ ≈ u·diag(s)·vh with u [m, r], s [r], vh [r, n]; `energy` kept of `total` = ‖Δ‖_F²,
    `method` used."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    energy: float
    method: str
    total: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with B·A = u·diag(s)·vh, √s on each side."""
        root = self.s.sqrt()
        return self.u * root, root[:, None] * self.vh


def energy_rank(s: torch.Tensor, total: float, energy: float) -> int | None:
    """The smallest r whose top-r singular values keep `energy` of `total` = ‖Δ‖_F², or None
    when all of `s` keeps less."""
    if total <= 0:
        return 0
    kept = torch.cumsum(s.double() ** 2, 0) / total
    hit = torch.nonzero(kept >= energy - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else None


def _exact(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(delta, full_matrices=False)


def randomized_svd(delta: torch.Tensor, rank: int, generator: torch.Generator,
                   oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` (u, s, vh) of `delta` [m, n] by randomized subspace iteration."""
    m, n = delta.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=torch.float32).to(delta)
    basis = torch.linalg.qr(delta @ omega).Q                   # [m, q]: range of Δ
    for _ in range(power_iters):  # re-orthonormalise each product (Algorithm 4.4)
        basis = torch.linalg.qr(delta.mT @ basis).Q              # [n, q]
        basis = torch.linalg.qr(delta @ basis).Q                 # [m, q]
    u, s, vh = torch.linalg.svd(basis.mT @ delta, full_matrices=False)  # [q, n] is small
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


def truncated_svd(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  method: str = "auto", generator: torch.Generator | None = None) -> Truncation:
    """Truncate `delta` [m, n] (float32) to `rank`, or to the smallest rank keeping `energy`.

    `method`: auto (see the module docstring), exact or randomized. Raises ValueError when the
    rank exceeds the smaller side or both or neither of rank and energy are given."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    side = min(delta.shape)
    if rank is not None and not 1 <= rank <= side:
        raise ValueError(f"rank {rank} must be between 1 and the smaller side {side}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    total = float(torch.linalg.vector_norm(delta)) ** 2

    def cut(u, s, vh, r, how):
        kept = float((s[:r].double() ** 2).sum()) / total if total > 0 else 1.0
        return Truncation(u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous(),
                          min(kept, 1.0), how, total)

    exact = method == "exact" or (method == "auto" and side <= EXACT_MAX_SIDE)
    if rank is not None:
        if exact or (method == "auto" and 2 * (rank + OVERSAMPLE) >= side):
            return cut(*_exact(delta), rank, "exact")
        return cut(*randomized_svd(delta, rank, generator), rank, "randomized")
    if not exact:
        k = min(FIRST_RANK, side)
        while 2 * (k + OVERSAMPLE) < side or method == "randomized":
            u, s, vh = randomized_svd(delta, k, generator)
            r = energy_rank(s, total, energy)
            if r is not None:
                return cut(u, s, vh, r, "randomized")
            if k >= side:
                break
            k = min(2 * k, side)
    u, s, vh = _exact(delta)
    return cut(u, s, vh, energy_rank(s, total, energy) or side, "exact")
