"""The compiled `pair_sums` against float64 sums worked out in torch, and how it is built."""

from __future__ import annotations

import subprocess

import pytest
import torch

from mergekit_rl import kernels
from mergekit_rl.comparison import block_stats

pytestmark = pytest.mark.skipif(not kernels.compiler(), reason="no C compiler on this machine")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """The kernels built into an empty cache of this test's own."""
    monkeypatch.setenv("MERGEKIT_RL_CACHE", str(tmp_path / "cache"))
    kernels.reset()
    yield tmp_path / "cache" / "kernels"
    kernels.reset()


def reference(a, b, base=None):
    """(dot, sq_a, sq_b, same, opposite) in float64; the deltas rounded to float32 first, as
    the kernel and the torch path take them."""
    x, y = a.float(), b.float()
    if base is not None:
        x, y = x - base.float(), y - base.float()
    x, y = x.double(), y.double()
    both = (x != 0) & (y != 0)
    same = both & (torch.signbit(x) == torch.signbit(y))
    return (float(x @ y), float(x @ x), float(y @ y), int(same.sum()), int((both & ~same).sum()))


def inputs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g)
    b = 0.3 * a + torch.randn(n, generator=g)
    base = torch.randn(n, generator=g)
    a[::7] = 0.0  # zeros count for neither
    b[::11] = -0.0
    return a.to(dtype), b.to(dtype), base.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 255, 256, 257, 5003])
@pytest.mark.parametrize("with_base", [False, True])
def test_pair_sums_equal_float64_sums(dtype, n, with_base):
    a, b, base = inputs(n, dtype, seed=n)
    got = kernels.pair_sums(a, b, base if with_base else None)
    want = reference(a, b, base if with_base else None)
    assert got[3:] == want[3:]  # the sign counts exactly
    for g, w in zip(got[:3], want[:3]):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-9)
    if n and not with_base:  # the torch path of the same block agrees
        torch_sums = block_stats(torch.stack([a.float(), b.float()]))
        assert torch_sums[3:] == want[3:]
        assert torch_sums[0] == pytest.approx(got[0], rel=1e-6)


def test_signs_of_tiny_and_base_equal_entries():
    """Sign bits decide: products that would underflow still count, and an entry equal to the
    base (a zero delta) counts for neither."""
    a = torch.tensor([1e-30, -1e-30, 2.0, 3.0])
    b = torch.tensor([1e-30, 1e-30, 2.0, -1.0])
    assert kernels.pair_sums(a, b)[3:] == (2, 2)
    base = torch.tensor([0.0, 0.0, 2.0, 0.0])
    assert kernels.pair_sums(a, b, base)[3:] == (1, 2)


def test_same_bits_from_bfloat16_bytes_and_float32_rows():
    """A bfloat16 block reduced from its bytes equals the same block widened to float32: one
    summation order, whatever the input type."""
    a, b, base = inputs(3000, torch.bfloat16, seed=1)
    assert kernels.pair_sums(a, b, base) == kernels.pair_sums(a.float(), b.float(), base.float())


def test_bad_arguments_raise():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="one dtype and size"):
        kernels.pair_sums(a, torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one dtype and size"):
        kernels.pair_sums(a, torch.zeros(5))
    with pytest.raises(ValueError, match="one dtype and size"):
        kernels.pair_sums(torch.zeros(4, 2).t(), torch.zeros(2, 4))


def test_built_once_into_the_cache_and_then_loaded(fresh, monkeypatch):
    assert kernels.available() and kernels.why_not() == ""
    assert [p.name for p in fresh.iterdir()] == [next(fresh.glob("pair_sums-*.so")).name]
    kernels.reset()  # another process: the cached library is loaded, nothing compiled

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert kernels.available()
    assert kernels.pair_sums(torch.ones(3), torch.ones(3))[1] == 3.0


@pytest.mark.parametrize("cc, why", [("/nonexistent/cc", "no C compiler"),
                                     ("false", "failed")])
def test_without_a_working_compiler_the_torch_path_is_taken(fresh, monkeypatch, cc, why):
    monkeypatch.setenv("CC", cc)
    assert not kernels.available() and why in kernels.why_not()
    assert not fresh.exists() or not any(fresh.iterdir())  # no half-built file left
    with pytest.raises(RuntimeError, match="not available"):
        kernels.pair_sums(torch.ones(3), torch.ones(3))


def test_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("MERGEKIT_RL_NATIVE", "0")
    assert not kernels.available() and "MERGEKIT_RL_NATIVE" in kernels.why_not()
