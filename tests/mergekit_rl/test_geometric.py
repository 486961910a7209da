"""slerp, model_stock and DELLA: values worked out by hand (always run), the merge command against
an independent float64 recomputation, and mergekit 0.1.5's own functions where it is installed
(`/tmp/<name>-venv/bin/python -m pytest tests/mergekit_rl/test_geometric.py`)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import load_state

from mergekit_rl.cli import main
from mergekit_rl.maths.della import magprune_mask
from mergekit_rl.maths.geometric import model_stock, slerp
from mergekit_rl.maths.merge_methods import _masked, merge_deltas, tensor_seed

HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None
needs_mergekit = pytest.mark.skipif(
    not HAS_MERGEKIT, reason="mergekit 0.1.5 (a dev dependency, the reference) is not "
    "installed: pip install -e '.[dev]'")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---- hand values -------------------------------------------------------------------------------

def test_slerp_by_hand():
    # orthogonal unit vectors: θ = π/2, t = ½ → sin(π/4)/sin(π/2) on each
    torch.testing.assert_close(slerp(0.5, t(1, 0), t(0, 1)), t(math.sqrt(0.5), math.sqrt(0.5)))
    # [1,0] and [1,1]: θ = π/4; both coefficients sin(π/8)/sin(π/4) = 0.5411961, applied to the
    # raw (unnormalised) tensors: [2c, c]
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    torch.testing.assert_close(slerp(0.5, t(1, 0), t(1, 1)), t(2 * c, c))
    torch.testing.assert_close(slerp(0.0, t(1, 0), t(1, 1)), t(1, 0))
    torch.testing.assert_close(slerp(1.0, t(1, 0), t(1, 1)), t(1, 1))
    # collinear (cos θ = 1 > 0.9995): linear interpolation
    torch.testing.assert_close(slerp(0.25, t(1, 2), t(2, 4)), t(1.25, 2.5))
    # the whole tensor is one vector: a 2x2 tensor behaves as its flattening
    torch.testing.assert_close(slerp(0.5, t(1, 0, 0, 0).reshape(2, 2), t(0, 0, 0, 1).reshape(2, 2)),
                               t(math.sqrt(0.5), 0, 0, math.sqrt(0.5)).reshape(2, 2))


def test_model_stock_by_hand():
    base = t(0, 0)
    # orthogonal offsets: cos θ = 0 → t = 0 → the base
    torch.testing.assert_close(model_stock(base, [t(1, 0), t(0, 1)]), t(0, 0))
    # equal offsets: cos θ = 1 → t = 2/(1+1) = 1 → their mean
    torch.testing.assert_close(model_stock(base, [t(1, 0), t(1, 0)]), t(1, 0))
    # cos θ = 1/√2 → t = 2c/(1+c) = 0.8284271; mean [1, ½] → [0.8284271, 0.4142136]
    c = 1 / math.sqrt(2)
    k = 2 * c / (1 + c)
    torch.testing.assert_close(model_stock(base, [t(1, 0), t(1, 1)]), t(k, k / 2))
    # filter_wise: per output row
    rows = model_stock(torch.zeros(2, 2), [t(1, 0, 1, 0).reshape(2, 2), t(0, 1, 1, 0).reshape(2, 2)],
                       filter_wise=True)
    torch.testing.assert_close(rows, t(0, 0, 1, 0).reshape(2, 2))  # row 0 orthogonal, row 1 equal
    # opposite offsets: 1 + (2−1)(−1) = 0 → the base is kept
    torch.testing.assert_close(model_stock(base, [t(1, 0), t(-1, 0)]), t(0, 0))


def test_della_probabilities_and_rescale_by_hand():
    delta = t(1, -2, 3, 4)
    keep, probs = magprune_mask(delta, 0.5, 0.2, torch.Generator().manual_seed(0))
    # ranks 1..4 → (r−1)/3 → p = 0.3 + 0.4·(r−1)/3
    torch.testing.assert_close(probs, t(0.3, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3, 0.7))
    assert set(keep.tolist()) <= {0.0, 1.0}
    # mergekit's rescale: survivors scaled back to the L1 norm (10) of the delta
    out = _masked(delta, keep, 0.5, True)
    kept = (delta * keep).abs().sum()
    torch.testing.assert_close(out, delta * keep * (10 / kept) if kept > 0 else delta * 0)
    # the draws follow the probabilities (4,000 rows of the same ranks)
    many = delta.repeat(4000, 1)
    keep, probs = magprune_mask(many, 0.5, 0.2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(keep.mean(0), probs[0], atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="epsilon"):
        magprune_mask(delta, 0.9, 0.2, torch.Generator())


def test_della_merge_rescale_density_is_the_paper():
    deltas = [t(1, -2, 3, 4), t(-1, 1, 2, 2)]
    seeds = [5, 6]
    out = merge_deltas(deltas, [1, 1], method="della_linear", densities=[0.5, 0.5],
                       epsilon=0.2, rescale="density", seeds=seeds)
    want = sum(d * k / p for d, (k, p) in zip(deltas, (
        magprune_mask(d, 0.5, 0.2, torch.Generator().manual_seed(s)) for d, s in zip(deltas,
                                                                                    seeds))))
    torch.testing.assert_close(out, want)


# ---- the merge command -------------------------------------------------------------------------

def _slerp64(t_, a, b):
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t_) * a64 + t_ * b64).reshape(a.shape)
    th = math.acos(max(-1.0, min(1.0, cos)))
    return ((math.sin((1 - t_) * th) * a64 + math.sin(t_ * th) * b64) / math.sin(th)).reshape(
        a.shape)


def test_mergekit_slerp_slices_config_with_filters_and_gradient(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    config = {"merge_method": "slerp", "base_model": str(m["instruct"]), "dtype": "float32",
              "slices": [{"sources": [{"model": str(m["instruct"]), "layer_range": [0, 2]},
                                      {"model": str(m["grpo"]), "layer_range": [0, 2]}]}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                   {"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.3}]}}
    (tmp_path / "slerp.yml").write_text(yaml.safe_dump(config))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "slerp.yml"), "-o",
                                  str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    out, a, b = (load_state(p) for p in (tmp_path / "out", m["instruct"], m["grpo"]))
    for k, v in out.items():
        layer = 1 if ".layers.1." in k else 0  # 2 layers: positions 0 and 1
        t_ = (float(layer) if "self_attn" in k else 1.0 - layer if "mlp" in k else 0.3)
        torch.testing.assert_close(v.double(), _slerp64(t_, a[k], b[k]), rtol=0, atol=2e-6)
    bad = {**config, "slices": [{"sources": [{**s, "layer_range": [0, 1]}
                                             for s in config["slices"][0]["sources"]]}]}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "bad.yml"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "layer_range [0, 1]" in r.output and not (tmp_path / "x").exists()


def test_model_stock_and_della_merges(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    stock = {"target": str(m["base"]), "method": "model_stock",
             "terms": [{"model": str(m["sft"])}, {"model": str(m["instruct"])}]}
    (tmp_path / "stock.yaml").write_text(yaml.safe_dump(stock))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "stock.yaml"), "-o",
                                  str(tmp_path / "stock"), "-q", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    out, base, ws = load_state(tmp_path / "stock"), load_state(m["base"]), \
        [load_state(m[k]) for k in ("sft", "instruct")]
    for k, v in out.items():
        w0 = base[k].double().flatten()
        o = [w[k].double().flatten() - w0 for w in ws]
        cos = float(o[0] @ o[1] / (o[0].norm() * o[1].norm()))
        tk = 2 * cos / (1 + cos)
        want = tk * (ws[0][k].double().flatten() + ws[1][k].double().flatten()) / 2 + (1 - tk) * w0
        torch.testing.assert_close(v.double().flatten(), want, rtol=0, atol=2e-6)
    della = {"target": str(m["base"]), "method": "della", "parameters": {"density": 0.5,
             "epsilon": 0.1, "seed": 3},
             "terms": [{"model": str(m["sft"]), "weight": 1.0}, {"model": str(m["grpo"]),
                                                                  "weight": 0.5}]}
    (tmp_path / "della.yaml").write_text(yaml.safe_dump(della))
    for run in ("a", "b"):
        r = CliRunner().invoke(main, ["merge", str(tmp_path / "della.yaml"), "-o",
                                      str(tmp_path / run), "-q"])
        assert r.exit_code == 0, r.output
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: reproducible
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = [ws_k[name].float() - base[name].float() for ws_k in
              (ws[0], load_state(m["grpo"]))]
    merged = merge_deltas(deltas, [1.0, 0.5], method="della", densities=[0.5, 0.5], epsilon=0.1,
                          seeds=[tensor_seed(3, name, i) for i in range(2)])
    torch.testing.assert_close(a[name], (base[name].float() + merged).to(torch.bfloat16))


# ---- mergekit's own functions ------------------------------------------------------------------

@needs_mergekit
@pytest.mark.parametrize("seed", range(20))
def test_slerp_equals_mergekit(seed):
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    g = torch.Generator().manual_seed(seed)
    shape = [(3000, 700), (64,), (2, 3, 5)][seed % 3]
    a = torch.randn(shape, generator=g)
    b = a + torch.randn(shape, generator=g) * (0.01 if seed % 2 else 1.0)
    if seed == 4:
        b = 2 * a  # collinear branch
    tt = float(torch.rand((), generator=g))
    want = mk_slerp(torch.tensor([tt]), a.unsqueeze(0), b.unsqueeze(0))[0]
    assert torch.equal(slerp(tt, a, b), want)


@needs_mergekit
@pytest.mark.parametrize("seed", range(12))
def test_model_stock_equals_mergekit(seed):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.model_stock import model_stock_merge_method as mk

    g = torch.Generator().manual_seed(seed)
    shape = [(40, 30), (50,)][seed % 2]
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) * 0.1 for _ in range(2 + seed % 3)]
    filter_wise = seed % 4 >= 2
    want = mk.merge_group(TensorGroup.from_tensors([base, *models], base_index=0),
                          filter_wise=filter_wise)
    assert torch.equal(model_stock(base, models, filter_wise), want)


@needs_mergekit
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_equals_mergekit(monkeypatch, seed, method):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod,
        GeneralizedTaskArithmeticMerge,
    )
    from mergekit.sparsify import SparsificationMethod

    mk = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.sum if method == "della" else None,
        sparsification_method=SparsificationMethod.della_magprune,
        default_normalize=method == "della", default_rescale=True, method_name=method,
        method_pretty_name=None, method_reference_url=None)
    g = torch.Generator().manual_seed(seed)
    shape = [(30, 40), (70,)][seed % 2]
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) * 0.1 for _ in range(2 + seed % 2)]
    n = len(models)
    weights = [0.5 + i * 0.3 for i in range(n)]
    dens = [0.3 + 0.1 * i for i in range(n)]
    eps = [0.1 + 0.02 * i for i in range(n)]
    seeds = [tensor_seed(seed, "w", i) for i in range(n)]
    # mergekit draws from the global generator, one tensor after the other: hand it ours
    generators = iter(torch.Generator().manual_seed(s) for s in seeds)
    real = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, **kw: real(p, generator=next(generators)))
    ids = list(range(1, n + 1))
    want = mk.merge_group(
        TensorGroup.from_tensors([base, *models], base_index=0),
        int8_mask=False, normalize=method == "della", rescale=True, **{"lambda": 1.0},
        weight=dict(zip(ids, weights)), density=dict(zip(ids, dens)),
        epsilon=dict(zip(ids, eps)))
    monkeypatch.setattr(torch, "bernoulli", real)
    merged = merge_deltas([w - base for w in models], weights, method=method, densities=dens,
                          epsilon=eps, seeds=seeds)
    assert torch.equal(base + merged, want)
