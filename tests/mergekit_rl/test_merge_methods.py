"""Merge methods against values worked out by hand, an element-by-element TIES written here, and
mergekit 0.1.5's own selection rule (argsort of |τ|) where equal magnitudes make it arbitrary."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mergekit_rl.maths.merge_methods import (
    DEFAULT_NORMALIZE,
    DEFAULT_RESCALE,
    METHODS,
    _sum_terms,
    apply_merged,
    drop_random,
    linear,
    merge_deltas,
    sign_consensus,
    tensor_seed,
    trim_magnitude,
    trim_outliers,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected) -> None:
    expected = (
        expected
        if isinstance(expected, torch.Tensor)
        else torch.tensor(expected, dtype=actual.dtype)
    )
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_defaults_match_mergekit_registry():
    # mergekit 0.1.5 merge_methods/registry.py (default_normalize, default_rescale) and linear.py.
    assert DEFAULT_NORMALIZE == {
        "task_arithmetic": False,
        "ties": True,
        "dare_linear": False,
        "dare_ties": False,
        "breadcrumbs": False,
        "breadcrumbs_ties": False,
        "della": True,
        "della_linear": False,
        "linear": True,
    }
    assert DEFAULT_RESCALE == {
        "task_arithmetic": False,
        "ties": False,
        "dare_linear": True,
        "dare_ties": True,
        "breadcrumbs": False,
        "breadcrumbs_ties": False,
        "della": True,
        "della_linear": True,
    }
    assert set(METHODS) == set(DEFAULT_RESCALE)


# --- task arithmetic ---------------------------------------------------------------------------


def test_task_arithmetic_by_hand():
    deltas = [t(1, -2, 3), t(0.5, 0.5, -1)]
    # 1·[1, -2, 3] + 0.5·[0.5, 0.5, -1] = [1.25, -1.75, 2.5]; default normalize is false
    close(merge_deltas(deltas, [1, 0.5], method="task_arithmetic"), [1.25, -1.75, 2.5])
    # normalize: divide by Σw = 1.5 -> [0.8333, -1.1667, 1.6667]
    close(
        merge_deltas(deltas, [1, 0.5], method="task_arithmetic", normalize=True),
        [1.25 / 1.5, -1.75 / 1.5, 2.5 / 1.5],
    )
    # Σw = 0 with normalize: mergekit divides by 1 instead (|Σw| < 1e-8) -> τ1 − τ2 = [0.5, -2.5, 4]
    close(merge_deltas(deltas, [1, -1], method="task_arithmetic", normalize=True), [0.5, -2.5, 4])


def test_apply_merged_by_hand():
    base, merged = t(1, 2, 3), t(0.5, -1, 2)
    close(apply_merged(base, merged), [1.5, 1, 5])  # λ = 1 (mergekit default)
    close(apply_merged(base, merged, 2.0), [2, 0, 7])  # 1 + 2·0.5, 2 − 2, 3 + 4
    bf16 = apply_merged(base.bfloat16(), merged.bfloat16(), 0.5)  # output in the base's dtype
    assert bf16.dtype == torch.bfloat16


# --- TIES ------------------------------------------------------------------------------------

# density 0.5 on 6 entries: k = int(0.5·6) = 3 per tensor, weights w = [1, 0.5, 2]
TIES_DELTAS = [
    t(4, -1, 2, 0.5, -3, 1.5),  # keeps |4|, |-3|, |2|  -> [4, 0, 2, 0, -3, 0]
    t(2, -5, 1, 0.1, 6, -0.2),  # keeps |6|, |-5|, |2|  -> [2, -5, 0, 0, 6, 0]
    t(0.5, 3, -4, 0.2, 0.1, -2.5),
]  # keeps |-4|, |3|, |-2.5| -> [0, 3, -4, 0, 0, -2.5]
TIES_WEIGHTS = [1, 0.5, 2]
# weighted x_i:  x1 = [4, 0, 2, 0, -3, 0], x2 = [1, -2.5, 0, 0, 3, 0], x3 = [0, 6, -8, 0, 0, -5]
# entry 0: Σ = 5 > 0, x1 and x2 agree (x3 = 0 agrees with neither): (4 + 1) / (1 + 0.5) = 10/3
# entry 1: Σ = 3.5, conflict: only x3 is +: 6 / 2 = 3
# entry 2: Σ = -6, conflict: only x3 is −: -8 / 2 = -4
# entry 3: every term trimmed to 0: no agreeing term, divisor 0 -> 1: 0
# entry 4: Σ = -3 + 3 + 0 = 0 -> elects + (mergekit: sum >= 0): x2 only: 3 / 0.5 = 6
# entry 5: Σ = -5: x3 only: -5 / 2 = -2.5
TIES_NORMALIZED = [10 / 3, 3, -4, 0, 6, -2.5]
TIES_SUMMED = [5, 6, -8, 0, 3, -5]


def test_ties_trim_elect_disjoint_mean_by_hand():
    densities = [0.5] * 3
    close(trim_magnitude(TIES_DELTAS[0], 0.5), [4, 0, 2, 0, -3, 0])
    merged = merge_deltas(TIES_DELTAS, TIES_WEIGHTS, method="ties", densities=densities)
    close(merged, TIES_NORMALIZED)  # normalize defaults to true for ties
    close(
        merge_deltas(
            TIES_DELTAS, TIES_WEIGHTS, method="ties", densities=densities, normalize=False
        ),
        TIES_SUMMED,
    )


def test_sign_consensus_by_hand():
    x = torch.stack([t(4, 0, 2, 0, -3, 0), t(1, -2.5, 0, 0, 3, 0), t(0, 6, -8, 0, 0, -5)])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # zeros agree with neither sign
            [1, 0, 0, 0, 1, 0],  # entry 4: zero sum elects +
            [0, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(sign_consensus(x), expected)


def test_ties_negative_weight_flips_the_vote():
    # mergekit votes on w_i·τ̂_i: τ = [1] with w = -1 is a vote for −.
    # x = [-1, 0.5]: Σ = -0.5 -> −, agreeing x1 = -1, divisor w1 = -1 -> -1 / -1 = 1
    close(merge_deltas([t(1.0), t(0.5)], [-1, 1], method="ties"), [1.0])
    # both votes +1 but the agreeing weights sum to 0 -> divide by 1: x1 + x2 = 2
    close(merge_deltas([t(1.0), t(-1.0)], [1, -1], method="ties"), [2.0])


def test_trim_magnitude_count_and_edges():
    x = torch.arange(1, 101, dtype=torch.float32)
    assert int(0.29 * 100) == 28  # float product 28.999999999999996, truncated like mergekit
    assert torch.count_nonzero(trim_magnitude(x, 0.29)) == 28
    # k = int(0.1·5) = 0 -> mergekit 0.1.5 keeps max(1, k) = 1: the largest, |-5|
    close(trim_magnitude(t(1, 2, -5, 3, 4), 0.1), [0, 0, -5, 0, 0])
    x = t(3, -1, 0.5, -0.5)
    assert trim_magnitude(x, 1.0) is x  # density 1: untouched
    # rescale (mergekit `rescale: true`, L1): keep [3, -1]; |.|₁ 5 before, 4 after -> ×1.25
    close(trim_magnitude(x, 0.5, rescale=True), [3.75, -1.25, 0, 0])
    # all-zero delta: nothing to rescale (norms < 1e-7), stays 0
    close(trim_magnitude(torch.zeros(4), 0.5, rescale=True), [0, 0, 0, 0])
    # a run of zeros across the cut: k = 3 keeps 5 and two zeros, which are 0 either way
    close(trim_magnitude(t(0, 0, 0, 0, 5), 0.6), [0, 0, 0, 0, 5])


def _mergekit_selection(delta, start, stop, descending):
    # mergekit 0.1.5 sparsify: positions [start, stop) of torch's sort of |delta| (TIES: argsort).
    keep = torch.zeros(delta.numel())
    keep[torch.sort(delta.abs().reshape(-1).float(), descending=descending).indices[start:stop]] = 1
    return delta * keep.reshape(delta.shape)


@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros", "bf16"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
def test_selection_matches_mergekit_sort_with_equal_magnitudes(kind, density):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 50, generator=g) * 1e-3
    if kind == "ties":
        delta = torch.randint(-4, 5, (40, 50), generator=g).float()
    elif kind == "zeros":
        delta[torch.rand(40, 50, generator=g) < 0.8] = 0.0
    elif kind == "bf16":  # differences of bf16 weights: few distinct magnitudes, many ties at a cut
        base = (torch.randn(40, 50, generator=g) * 0.02).bfloat16().float()
        delta = (base + delta).bfloat16().float() - base
    n = delta.numel()
    k = max(1, int(density * n))
    assert torch.equal(trim_magnitude(delta, density), _mergekit_selection(delta, 0, k, True))
    for gamma in (0.0, 0.05, 0.6):
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        expected = _mergekit_selection(delta, bottom, bottom + target, False)
        assert torch.equal(trim_outliers(delta, density, gamma), expected)


def test_selection_sorts_only_when_equal_magnitudes_straddle_a_cut(monkeypatch):
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    distinct = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    trim_magnitude(distinct, 0.2)
    trim_outliers(distinct, 0.2, 0.1)
    zeros = torch.zeros(1000)
    zeros[:100] = torch.arange(1, 101)  # 900 zeros, where the cuts below fall
    trim_magnitude(zeros, 0.2)
    trim_outliers(zeros, 0.5, 0.01)
    assert torch.equal(trim_outliers(zeros, 0.2, 0.85), torch.zeros(1000))  # keeps 200 zeros
    assert not sorts
    trim_magnitude(torch.ones(10), 0.5)  # 5 of 10 equal magnitudes: only torch's sort can say which
    assert len(sorts) == 1


def _naive_ties(deltas, weights, density):
    """TIES element by element in Python floats (float64), from the paper's three steps."""
    flat = [d.reshape(-1).tolist() for d in deltas]
    trimmed = []
    for values in flat:
        k = max(1, int(density * len(values)))
        order = sorted(range(len(values)), key=lambda j: -abs(values[j]))  # distinct magnitudes
        kept = set(order[:k])
        trimmed.append([v if j in kept else 0.0 for j, v in enumerate(values)])
    out = []
    for j in range(len(flat[0])):
        x = [w * tv[j] for w, tv in zip(weights, trimmed)]
        sign = 1.0 if sum(x) >= 0 else -1.0
        agree = [i for i in range(len(x)) if x[i] != 0 and math.copysign(1.0, x[i]) == sign]
        divisor = sum(weights[i] for i in agree)
        out.append(sum(x[i] for i in agree) / (divisor if divisor != 0 else 1.0))
    return torch.tensor(out, dtype=torch.float64).reshape(deltas[0].shape)


@pytest.mark.parametrize("n_terms,seed", [(2, 0), (3, 1), (3, 2)])
def test_ties_matches_naive_reimplementation(n_terms, seed):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(4, 5, generator=g) for _ in range(n_terms)]
    weights = [0.7, 1.3, 0.4][:n_terms]
    merged = merge_deltas(deltas, weights, method="ties", densities=[0.4] * n_terms)
    torch.testing.assert_close(
        merged.double(), _naive_ties(deltas, weights, 0.4), rtol=1e-5, atol=1e-6
    )


# --- DARE ------------------------------------------------------------------------------------


def test_dare_density_one_is_identity():
    x = t(1, -2, 3)
    assert drop_random(x, 1.0, torch.Generator().manual_seed(0)) is x
    deltas = [t(1, -2, 3), t(0.5, 0.5, -1)]
    dare = merge_deltas(deltas, [1, 2], method="dare_linear", densities=[1, 1], seeds=[1, 2])
    assert torch.equal(dare, merge_deltas(deltas, [1, 2], method="task_arithmetic"))


def test_dare_keeps_density_and_rescales_survivors():
    n, density = 100_000, 0.3
    delta = (
        torch.rand(n, generator=torch.Generator().manual_seed(5)) + 0.5
    )  # no zeros: kept <=> != 0
    out = drop_random(delta, density, torch.Generator().manual_seed(7), rescale="density")
    kept = out != 0
    # binomial: mean n·p = 30000, sd sqrt(n·p·(1−p)) ≈ 145; allow 5 sd
    assert abs(int(kept.sum()) - n * density) < 5 * math.sqrt(n * density * (1 - density))
    assert torch.equal(out[kept], delta[kept] / density)  # the paper's 1/density, exactly
    # mergekit's rescale (True, "l1"): one factor for all survivors, restoring the L1 norm
    out = drop_random(delta, density, torch.Generator().manual_seed(7))
    assert torch.equal(out != 0, kept)  # same draws
    factor = delta.abs().sum() / delta[kept].abs().sum()
    torch.testing.assert_close(out[kept], delta[kept] * factor)
    assert abs(float(factor) - 1 / density) < 0.05
    plain = drop_random(delta, density, torch.Generator().manual_seed(7), rescale=False)
    assert torch.equal(plain[kept], delta[kept])


def test_tensor_seed_is_deterministic_and_distinct():
    assert tensor_seed(1, "a.weight", 0) == tensor_seed(1, "a.weight", 0)
    seeds = {
        tensor_seed(1, "a.weight", 0),
        tensor_seed(1, "b.weight", 0),
        tensor_seed(1, "a.weight", 1),
        tensor_seed(2, "a.weight", 0),
    }
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_dare_masks_follow_seed_name_and_term_not_order():
    names = ["layers.0.w", "layers.1.w", "embed"]
    delta = {
        name: torch.randn(1000, generator=torch.Generator().manual_seed(i))
        for i, name in enumerate(names)
    }

    def run(order):
        return {
            name: merge_deltas(
                [delta[name], -delta[name]],
                [1, 1],
                method="dare_linear",
                densities=[0.5, 0.5],
                seeds=[tensor_seed(42, name, i) for i in range(2)],
            )
            for name in order
        }

    forward, backward = run(names), run(reversed(names))
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    same = drop_random(
        delta["embed"], 0.5, torch.Generator().manual_seed(tensor_seed(42, "embed", 0))
    )
    again = drop_random(
        delta["embed"], 0.5, torch.Generator().manual_seed(tensor_seed(42, "embed", 0))
    )
    other = drop_random(
        delta["embed"], 0.5, torch.Generator().manual_seed(tensor_seed(42, "layers.0.w", 0))
    )
    assert torch.equal(same, again)
    assert not torch.equal(same != 0, other != 0)
    # the two terms of one tensor get different masks (else x − x would always cancel)
    assert torch.count_nonzero(forward["embed"]) > 0


def test_dare_ties_is_dare_then_ties_election():
    g = torch.Generator().manual_seed(11)
    deltas = [torch.randn(200, generator=g) for _ in range(3)]
    weights, seeds = [1.0, 0.5, 2.0], [tensor_seed(0, "w", i) for i in range(3)]
    merged = merge_deltas(deltas, weights, method="dare_ties", densities=[0.6] * 3, seeds=seeds)
    dropped = [
        drop_random(d, 0.6, torch.Generator().manual_seed(s)) * w
        for d, s, w in zip(deltas, seeds, weights)
    ]
    mask = sign_consensus(torch.stack(dropped))
    torch.testing.assert_close(
        merged, (torch.stack(dropped) * mask).sum(0)
    )  # normalize: false by default
    divisor = (torch.tensor(weights)[:, None] * mask).sum(0)
    normalized = merge_deltas(
        deltas, weights, method="dare_ties", densities=[0.6] * 3, seeds=seeds, normalize=True
    )
    divisor = torch.where(divisor == 0, 1.0, divisor)  # mergekit: no agreeing term -> divide by 1
    torch.testing.assert_close(normalized, (torch.stack(dropped) * mask).sum(0) / divisor)


# --- breadcrumbs ----------------------------------------------------------------------------------

CRUMBS = t(
    0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 1.0, -0.4, 0.6, -0.8
)  # magnitudes 0.1 … 1.0, all distinct


def test_breadcrumbs_by_hand():
    # density 0.5, gamma 0.2 on 10: keep int(5) = 5, drop the int(2) = 2 largest (1.0, 0.9) and the
    # 10 − 5 − 2 = 3 smallest (0.1, 0.2, 0.3): keep 0.4, 0.5, 0.6, 0.7, 0.8
    close(trim_outliers(CRUMBS, 0.5, 0.2), [0, 0, 0.5, 0, -0.7, 0, 0, -0.4, 0.6, -0.8])
    # gamma 0.7 does not fit beside 5 survivors: mergekit drops fewer outliers, keeps the 5 smallest
    close(trim_outliers(CRUMBS, 0.5, 0.7), [0.1, 0, 0.5, 0.3, 0, 0.2, 0, -0.4, 0, 0])
    assert trim_outliers(CRUMBS, 1.0, 0.2) is CRUMBS  # density 1: untouched, whatever gamma
    close(trim_outliers(CRUMBS, 0.05, 0.2), [0] * 10)  # int(0.5) = 0 survivors
    # merge: term 2 = −CRUMBS at weight 0.5 keeps the same entries; breadcrumbs sums (normalize off)
    merged = merge_deltas(
        [CRUMBS, -CRUMBS], [1, 0.5], method="breadcrumbs", densities=[0.5, 0.5], gamma=0.2
    )
    close(merged, [0, 0, 0.25, 0, -0.35, 0, 0, -0.2, 0.3, -0.4])
    # breadcrumbs_ties: every kept entry conflicts, the weight-1 term wins the vote, normalize off
    merged = merge_deltas(
        [CRUMBS, -CRUMBS],
        [1, 0.5],
        method="breadcrumbs_ties",
        densities=[0.5, 0.5],
        gamma=[0.2, 0.2],
    )
    close(merged, [0, 0, 0.5, 0, -0.7, 0, 0, -0.4, 0.6, -0.8])


# --- linear ----------------------------------------------------------------------------------


def test_linear_by_hand():
    a, b = t(1, 2, 3), t(3, 0, -1)
    # (1·[1, 2, 3] + 3·[3, 0, -1]) / (1 + 3) = [10, 2, 0] / 4
    close(linear([a, b], [1, 3]), [2.5, 0.5, 0])
    close(linear([a, b], [1, 3], normalize=False), [10, 2, 0])
    # the reasoning-vector recipe: +base −sft +grpo, normalize false
    close(linear([a, b, t(0, 1, 1)], [1, -1, 1], normalize=False), [-2, 3, 5])
    out = linear([a.bfloat16(), b.bfloat16()], [0.5, 0.5])  # computed in fp32, returned in bf16
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), t(2, 1, 1))


# --- summation order --------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
def test_sum_terms_is_bitwise_torch_stack_sum(count):
    # The bit-for-bit claim: mergekit sums torch.stack(terms) over dim 0.
    g = torch.Generator().manual_seed(count)
    for size in (1, 7, 33, 1000, 4099):
        terms = [torch.randn(size, generator=g) * 10.0**i for i in range(count)]
        for term in terms:
            term[::5] = -0.0
        expected = torch.stack(terms).sum(0)
        actual = _sum_terms(iter(terms), count)
        assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "nuslerp"}, "method must be one of task_arithmetic, ties, dare_linear"),
        ({"method": "ties", "weights": [1.0]}, "weights"),
        ({"method": "ties", "densities": [0.5]}, "densities"),
        ({"method": "ties", "densities": [0.0, 0.5]}, "density"),
        ({"method": "ties", "densities": [1.5, 0.5]}, "density"),
        ({"method": "ties", "densities": [float("nan"), 0.5]}, "density"),
        ({"method": "breadcrumbs", "densities": [0.5, 0.5], "gamma": -0.1}, "gamma"),
        ({"method": "breadcrumbs", "densities": [0.5, 0.5], "gamma": 1.0}, "gamma"),
        ({"method": "breadcrumbs", "gamma": [0.1]}, "gamma"),
        ({"method": "dare_ties"}, "seeds"),
        ({"method": "dare_linear", "seeds": [1]}, "seeds"),
        ({"method": "ties", "rescale": "l2"}, "rescale"),
        ({"method": "ties", "deltas": []}, "deltas"),
        ({"method": "ties", "deltas": [t(1, 2), t(1, 2, 3)]}, "deltas"),
        ({"method": "ties", "deltas": [t(1, 2), t(1, 2).double()]}, "deltas"),
    ],
)
def test_merge_deltas_validation(kwargs, match):
    args = {"deltas": [t(1, 2), t(3, 4)], "weights": [1.0, 1.0]} | kwargs
    with pytest.raises(ValueError, match=match):
        merge_deltas(args.pop("deltas"), args.pop("weights"), **args)


def test_sparsifier_validation():
    x = t(1, 2, 3)
    with pytest.raises(ValueError, match="density"):
        trim_magnitude(x, 0.0)
    with pytest.raises(ValueError, match="density"):
        trim_outliers(x, 1.2, 0.0)
    with pytest.raises(ValueError, match="gamma"):
        trim_outliers(x, 0.5, 1.5)
    with pytest.raises(ValueError, match="density"):
        drop_random(x, -0.5, torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        drop_random(x, 0.5, SimpleNamespace(device=torch.device("cuda")))
    with pytest.raises(ValueError, match="rescale"):
        drop_random(x, 0.5, torch.Generator(), rescale="l3")


@pytest.mark.parametrize(
    "tensors,weights,match",
    [
        ([], [], "tensors"),
        ([t(1, 2)], [1.0, 2.0], "weights"),
        ([t(1, 2), t(1, 2, 3)], [1.0, 2.0], "shape"),
        ([torch.tensor([1, 2])], [1.0], "floating point"),
        ([t(1, 2), t(3, 4)], [1.0, -1.0], "weights sum to ~0"),
    ],
)
def test_linear_validation(tensors, weights, match):
    with pytest.raises(ValueError, match=match):
        linear(tensors, weights)
