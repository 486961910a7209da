"""Merges on the weights themselves (not their deltas), as pure functions: SLERP and Model Stock,
computed as mergekit 0.1.5 does (`merge_methods/slerp.py`, `merge_methods/model_stock.py`), op
for op, so a config with `dtype: float32` gives mergekit's tensors bit for bit on the same torch.

SLERP (Shoemake 1985, https://doi.org/10.1145/325165.325242) of two whole tensors flattened:
    θ = acos(⟨v0/‖v0‖, v1/‖v1‖⟩),  v = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1
with linear interpolation where |cos θ| > 0.9995; t = 0 gives v0 (the base model).

Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522): with w_0 the base and the
fine-tunes w_1..w_N, cos θ = the mean pairwise cosine of the offsets w_i − w_0, then
    t = N·cos θ / (1 + (N − 1)·cos θ),  w = t·mean(w_i) + (1 − t)·w_0
over the whole tensor, or per output row with `filter_wise`; where the denominator vanishes
(|·| < 1e-6) the base is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_CHUNK_ELEMENTS = 1024 * 1024  # mergekit's bound on full-precision scratch per pass


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) of two tensors of one shape, in
    float32 (float64 for float64 inputs), norms and dot product taken in chunks as mergekit."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(v0.shape)} and "
                         f"{tuple(v1.shape)}")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # mergekit's batch of one
    t = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    spans = [(s, s + _CHUNK_ELEMENTS) for s in range(0, a.shape[1], _CHUNK_ELEMENTS)]
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]),
        dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in spans]),
        dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:e].to(dtype) / norm_a) * (b[:, s:e].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s, e in spans]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for s, e in spans:
        result[:, s:e] = coef_a * a[:, s:e].to(dtype) + coef_b * b[:, s:e].to(dtype)
    return result.reshape(v0.shape)


def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor],
                filter_wise: bool = False) -> torch.Tensor:
    """Model Stock of `models` (at least two fine-tunes) around `base` (see the docstring)."""
    if len(models) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got "
                         f"{len(models)}")
    w_0, ws = base, list(models)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, offset_a in enumerate(offsets):
        for offset_b in offsets[i + 1:]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1)
                               / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count  # Python's sum from 0, as mergekit
    return (t * average + (1 - t) * w_0).reshape(out_shape)
