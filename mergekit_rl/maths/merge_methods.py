"""mergekit's merge methods as pure functions on tensors (no I/O).

Task arithmetic (https://arxiv.org/abs/2212.04089), TIES (https://arxiv.org/abs/2306.01708), DARE
(https://arxiv.org/abs/2311.03099), Model Breadcrumbs (https://arxiv.org/abs/2312.06795), DELLA
(https://arxiv.org/abs/2406.11617, sampling in `della`) and `linear`, computed as mergekit 0.1.5
does (`merge_methods/generalized_task_arithmetic.py`,
`sparsify.py`, `merge_methods/linear.py`, `merge_methods/registry.py`), so that a config with
`dtype: float32` gives mergekit's tensors, bit for bit on CPU for the deterministic methods.
For τ_i = θ_i − θ_base:

    τ̂_i = sparsify(τ_i)        per tensor: trim (TIES), drop (DARE), trim outliers (breadcrumbs),
                                drop by magnitude rank (DELLA)
    x_i = w_i·τ̂_i               w_i rounded to the tensors' dtype
    s   = [Σ_i x_i ≥ 0]         sign election ("sum" consensus): a zero sum elects +
    a_i = [sign(x_i) = ±s]      0 agrees with neither sign; it is x_i, so w_i < 0 flips the vote
    τ_m = Σ a_i x_i / Σ a_i w_i  (no election: Σ x_i / Σ w_i); the division only with normalize
    θ   = θ_base + λ·τ_m        `apply_merged`; `lambda` defaults to 1 for every method

A divisor of 0 becomes 1 (exactly 0 with election, |Σ w_i| < 1e-8 without), so an entry no term
agrees on comes out 0. mergekit's `density` defaults to 1 (the TIES paper used 0.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

from .della import magprune_mask

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear")
# registry.py: method -> (sparsification, sign election, default normalize, default rescale).
_SPECS = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("magprune", True, True, True),
    "della_linear": ("magprune", False, False, True),
}
DEFAULT_NORMALIZE: dict[str, bool] = {m: s[2] for m, s in _SPECS.items()} | {"linear": True}
DEFAULT_RESCALE: dict[str, bool] = {m: s[3] for m, s in _SPECS.items()}
# "l1" = mergekit's `rescale: true` (sparsify.rescaled_masked_tensor: scale the survivors back to
# the L1 norm of the unpruned delta); "density" = the DARE paper's 1/density.
RESCALES = ("l1", "density")
_CHUNK = 1 << 22  # elements per bincount pass of the radix select


def tensor_seed(seed: int, tensor_name: str, term: int) -> int:
    """Deterministic 63-bit seed from (seed, tensor name, term index) via sha256 — independent of
    processing order and of the device."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{term}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_density(density: float) -> None:
    if not 0 < density <= 1:  # also NaN; mergekit would drop all at <= 0 and read > 1 as 1
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def _rescale_mode(rescale: bool | str) -> str | None:
    if rescale is False or rescale is True:
        return "l1" if rescale else None
    if rescale in RESCALES:
        return rescale
    raise ValueError(f"rescale must be a bool or one of {', '.join(RESCALES)}, got {rescale!r}")


def _masked(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool | str):
    masked = delta * keep  # a multiply, not `where`: the same -0.0 and NaN bits as mergekit
    mode = _rescale_mode(rescale)
    if mode == "density":
        return masked / density
    if mode == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        if before < 1e-7 or after < 1e-7:  # mergekit leaves (near-)empty tensors unscaled
            return masked
        return masked * (before / after)
    return masked


def _order_statistic(bits: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """(value, #below, #at or below) at ascending 0-based `rank` of non-negative float32 viewed
    as int32 (same order, NaN last as in torch.sort). Two-pass radix select (16 + 15 bits) by
    chunked bincount: O(chunk) memory, where kthvalue copies and adds int64 indices (3x)."""
    high = sum(torch.bincount(c >> 15, minlength=1 << 16) for c in bits.split(_CHUNK))
    cum = high.cumsum(0)
    top = int(torch.searchsorted(cum, rank, right=True))
    below = int(cum[top - 1]) if top else 0
    low = sum(torch.bincount(c[(c >> 15) == top] & 0x7FFF, minlength=1 << 15)
              for c in bits.split(_CHUNK))
    cum = low.cumsum(0)
    bottom = int(torch.searchsorted(cum, rank - below, right=True))
    less = below + (int(cum[bottom - 1]) if bottom else 0)
    return (top << 15) | bottom, less, below + int(cum[bottom])


def _rank_mask(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Bool mask, shaped like delta, of the entries at [start, stop) of torch.sort(|delta| as
    float32, descending) — mergekit's selection.

    That is every magnitude between two cut values, found without sorting, unless a run of equal
    magnitudes straddles a cut. Which of those mergekit keeps is whatever torch's unstable sort
    puts first (bf16-derived deltas: ~4% of entries tie at a density-0.2 cut), so then we sort as
    mergekit does: same selection on the same torch build, at mergekit's cost. A run of zeros may
    straddle a cut: a kept and a dropped 0 give the same bits."""
    magnitude = delta.abs().reshape(-1).float()  # as mergekit on CPU (fp64 is rounded too)
    n = magnitude.numel()
    lo, hi = (n - stop, n - start) if descending else (start, stop)  # as ascending ranks
    bits = magnitude.view(torch.int32)
    low, high, straddled = 0, 0, False
    if lo > 0 and lo < hi:
        low, less, _ = _order_statistic(bits, lo)
        straddled = less != lo and low != 0
    if hi < n and lo < hi and not straddled:
        high, _, less_equal = _order_statistic(bits, hi - 1)
        if less_equal != hi and high == 0:  # the cut splits the zeros: all selected are 0
            lo = hi
        straddled = less_equal != hi and high != 0
    if lo >= hi or straddled:
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        if straddled:
            keep[torch.sort(magnitude, descending=descending).indices[start:stop]] = True
    else:
        keep = bits >= low
        if hi < n:
            keep &= bits <= high
    return keep.reshape(delta.shape)


def trim_magnitude(delta: torch.Tensor, density: float,
                   rescale: bool | str = False) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(density·numel)) largest |delta| of this tensor.

    As sparsify.magnitude: density 1 returns delta untouched (no rescale); k truncates the float
    product (0.29·100 → 28); 0.1.5 keeps at least one entry where 0.1.4 asserted k > 0."""
    _check_density(density)
    if density == 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    return _masked(delta, _rank_mask(delta, 0, k, descending=True), density, rescale)


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator,
                rescale: bool | str = True) -> torch.Tensor:
    """DARE: keep each entry with probability density; rescale survivors (True/"l1" as mergekit,
    "density" as the paper: τ̂ = m ⊙ τ / density). The mask is drawn on the CPU generator, then
    moved to delta.device, so CPU and CUDA give identical results. Density 1: delta untouched."""
    _check_density(density)
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if density == 1:
        return delta
    keep = torch.empty(delta.shape, dtype=torch.bool).bernoulli_(density, generator=generator)
    return _masked(delta, keep.to(delta.device), density, rescale)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float,
                  rescale: bool | str = False) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma·n) largest |delta|, keep the next int(density·n).

    As sparsify.magnitude_outliers (0.1.5): density 1 returns delta untouched whatever gamma; if
    density + gamma > 1, fewer outliers are dropped so int(density·n) survive; 0 keeps none."""
    _check_density(density)
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
    if density == 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    keep = _rank_mask(delta, bottom, bottom + target, descending=False)
    return _masked(delta, keep, density, rescale)


def _agrees(weighted: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return torch.where(positive, weighted > 0, weighted < 0)  # 0 (and NaN) agree with neither


def sign_consensus(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES election on stacked w_i·τ̂_i [n, ...] → bool mask [n, ...] of the entries whose sign
    is sign(Σ_i w_i τ̂_i), a zero sum counting as + (generalized_task_arithmetic.get_mask)."""
    return _agrees(weighted_deltas, weighted_deltas.sum(dim=0) >= 0)


def _sum_terms(terms: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """Σ terms, bit-identical to mergekit's torch.stack(terms).sum(0): for up to 4 terms that
    kernel adds left to right onto +0.0 (torch 2.13 CPU; tested), so no stacked copy is needed;
    beyond 4 its order is blocked, so stack."""
    if count > 4:
        return torch.stack(list(terms)).sum(dim=0)
    total = None
    for term in terms:  # the first step, 0.0 + t, is t + 0.0 (−0.0 becomes +0.0): one pass
        total = term.add(0.0) if total is None else total.add_(term)
    return total


def merge_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], *, method: str,
                 densities: Sequence[float] | None = None, normalize: bool | None = None,
                 gamma: float | Sequence[float] = 0.01, rescale: bool | str | None = None,
                 seeds: Sequence[int] | None = None,
                 epsilon: float | Sequence[float] = 0.15) -> torch.Tensor:
    """The combined delta τ_m (before lambda; see the module docstring).

    normalize/rescale None → the method's mergekit default (DEFAULT_NORMALIZE/DEFAULT_RESCALE);
    rescale True = mergekit's L1 rescale, "density" = the DARE paper's 1/density. densities
    default to 1 (mergekit); gamma is one value or one per term. seeds: one per term (from
    tensor_seed) for the random methods; required for dare_*."""
    if method not in _SPECS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    sparsify, elect, default_normalize, default_rescale = _SPECS[method]
    n = len(deltas)
    if n == 0:
        raise ValueError("deltas must hold at least one tensor")
    if any(d.shape != deltas[0].shape or d.dtype != deltas[0].dtype for d in deltas):
        raise ValueError(f"deltas must share one shape and dtype, got "
                         f"{[(tuple(d.shape), d.dtype) for d in deltas]}")
    densities = [1.0] * n if densities is None else list(densities)
    gammas = [gamma] * n if isinstance(gamma, (int, float)) else list(gamma)
    epsilons = [epsilon] * n if isinstance(epsilon, (int, float)) else list(epsilon)
    for name, values in (("weights", weights), ("densities", densities), ("gamma", gammas),
                         ("epsilon", epsilons)):
        if len(values) != n:
            raise ValueError(f"{name} must have one value per delta ({n}), got {len(values)}")
    for density in densities:
        _check_density(density)
    if sparsify in ("random", "magprune") and (seeds is None or len(seeds) != n):
        raise ValueError(f"seeds must have one value per delta ({n}) for {method}")
    normalize = default_normalize if normalize is None else normalize
    rescale = default_rescale if rescale is None else rescale
    _rescale_mode(rescale)

    weight = torch.tensor([float(w) for w in weights], dtype=deltas[0].dtype,
                          device=deltas[0].device)
    weighted = []  # [n] tensors like delta; the unweighted sparsified one is dropped at once
    for i, delta in enumerate(deltas):
        if sparsify == "magnitude":
            delta = trim_magnitude(delta, densities[i], rescale)
        elif sparsify == "outliers":
            delta = trim_outliers(delta, densities[i], gammas[i], rescale)
        elif sparsify == "random":
            generator = torch.Generator().manual_seed(seeds[i])
            delta = drop_random(delta, densities[i], generator, rescale)
        elif sparsify == "magprune" and densities[i] < 1:
            generator = torch.Generator().manual_seed(seeds[i])
            keep, probs = magprune_mask(delta, densities[i], epsilons[i], generator)
            # rescale "density": each survivor over its own keep probability (the paper)
            delta = delta * keep / probs if rescale == "density" else \
                _masked(delta, keep, densities[i], rescale)
        # x·1 is x exactly (signed zeros included): skip the pass
        weighted.append(delta if weights[i] == 1 else delta * weight[i])

    if elect:
        positive = _sum_terms(weighted, n) >= 0
        mixed = _sum_terms((x * _agrees(x, positive) for x in weighted), n)
        if normalize:
            divisor = _sum_terms((w * _agrees(x, positive) for x, w in zip(weighted, weight)), n)
            mixed /= divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = _sum_terms(weighted, n)
        if normalize:  # mergekit sums the weights shaped [n, 1, ...]: same kernel, same rounding
            divisor = weight.reshape(n, *[1] * mixed.dim()).sum(dim=0)
            mixed /= divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    return mixed


def apply_merged(base: torch.Tensor, merged: torch.Tensor, lam: float = 1.0,
                 inplace: bool = False) -> torch.Tensor:
    """θ_base + λ·τ_m in mergekit's order: multiply only when λ ≠ 1, then add (torch.add with
    alpha= rounds once instead of twice and differs in the last bit). `inplace` reuses
    `merged` (same bits: a + b == b + a in IEEE arithmetic)."""
    if not inplace or merged.dtype != base.dtype:
        if lam != 1:
            merged = merged * lam
        return (base + merged).to(base.dtype)
    if lam != 1:
        merged.mul_(lam)
    return merged.add_(base)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float],
           normalize: bool = True) -> torch.Tensor:
    """Σ w_i θ_i, divided by Σ w_i with normalize (mergekit's default): on models, not deltas
    (https://arxiv.org/abs/2203.05482). As merge_methods/linear.py (0.1.5): in float32 (float64
    for float64 inputs), fused multiply-adds onto +0.0 in input order, cast back to the input
    dtype. Where the weights sum to ~0 mergekit divides anyway (inf/NaN); this raises."""
    if not tensors:
        raise ValueError("tensors must hold at least one tensor")
    if len(weights) != len(tensors):
        raise ValueError(f"weights must have one value per tensor ({len(tensors)}), "
                         f"got {len(weights)}")
    first = tensors[0]
    if any(t.shape != first.shape for t in tensors):
        raise ValueError(f"tensors must share one shape, got {[tuple(t.shape) for t in tensors]}")
    if not first.is_floating_point():
        raise ValueError(f"tensors must be floating point for a linear merge, got {first.dtype}")
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor([float(w) for w in weights], dtype=work, device=first.device)
    total = weight.sum()
    if normalize and total.abs() < 1e-8:
        raise ValueError(f"weights sum to ~0 ({float(total)!r}); use normalize: false")
    result = torch.zeros(first.shape, dtype=work, device=first.device)
    for tensor, coefficient in zip(tensors, weight.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(total)
    return result.to(first.dtype)
