"""DELLA's magnitude-based sampling (MagPrune), as mergekit 0.1.5's `sparsify.della_magprune`.

Deep, Bhardwaj & Poria 2024, https://arxiv.org/abs/2406.11617: per row of a delta (a 1-D
delta is one row), rank the entries by |δ| (1 = smallest), map the ranks linearly onto keep
probabilities p ∈ [density − ε, density + ε] (larger magnitudes kept more often), keep each
entry with its probability, and rescale the survivors (in `merge_methods`): mergekit's
`rescale: true` scales the tensor back to its L1 norm; `rescale: density` divides each survivor
by its own p, as the paper. The draws come from the given CPU generator (mergekit: torch's
global one).
"""

from __future__ import annotations

import torch


def magprune_mask(delta: torch.Tensor, density: float, epsilon: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask, keep probabilities), shaped like `delta`, of DELLA's sampling; the caller
    masks and rescales (`merge_methods.merge_deltas`)."""
    if not 0 < density < 1:
        raise ValueError(f"density must be in (0, 1) to sample, got {density!r}")
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon {epsilon} with density {density}: density ± epsilon must "
                         "lie in (0, 1)")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(rows.dtype) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    # a row of one entry: mergekit divides 0 by 0 and fails; give it density − ε
    rank_norm = torch.where(high > low, ((ranks - low) / (high - low)).clamp(0, 1), 0)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    keep = torch.bernoulli(probs.cpu(), generator=generator).to(rows)
    return keep.reshape(delta.shape), probs.reshape(delta.shape)
