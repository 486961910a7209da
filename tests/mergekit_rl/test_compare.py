"""`compare`: values worked out by hand, and an in-memory recomputation with safetensors' loader."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import load_state, snapshot
from safetensors.torch import save_file

from mergekit_rl.cli import main
from mergekit_rl.inspection import group_of


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def folder(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_hand_values(tmp_path):
    a = folder(tmp_path / "a", {"model.layers.0.w": torch.tensor([1.0, 2.0, -1.0, 0.0])})
    b = folder(tmp_path / "b", {"model.layers.0.w": torch.tensor([2.0, -1.0, -3.0, 5.0])})
    out = json.loads(cli("compare", a, b, "--json").output)
    t = out["total"]
    # <a,b> = 2 - 2 + 3 + 0 = 3; |a|² = 6; |b|² = 39; signs: + - + (the 0 counts for neither)
    assert t["cosine"] == pytest.approx(3 / math.sqrt(6 * 39))
    assert t["norm_ratio"] == pytest.approx(math.sqrt(6 / 39))
    assert t["sign_agreement"] == pytest.approx(2 / 3)
    assert out["groups"][0]["name"] == "layer 0"


def reference(a: dict, b: dict, base: dict | None = None) -> dict[str, dict]:
    groups: dict[str, list] = {}
    for k in a:
        x, y = a[k].double().flatten(), b[k].double().flatten()
        if base is not None:
            x, y = x - base[k].double().flatten(), y - base[k].double().flatten()
        g = groups.setdefault(group_of(k), [0.0, 0.0, 0.0, 0, 0])
        g[0] += float(x @ y)
        g[1] += float(x @ x)
        g[2] += float(y @ y)
        g[3] += int(((x * y) > 0).sum())
        g[4] += int(((x * y) < 0).sum())
    return {k: {"cosine": d / math.sqrt(p * q), "norm_ratio": math.sqrt(p / q),
                "sign_agreement": s / (s + n)} for k, (d, p, q, s, n) in groups.items()}


@pytest.fixture(params=["compiled", "torch"])
def reduction(request, monkeypatch):
    """compare's two reductions: the compiled kernel, and torch's (no C compiler)."""
    from mergekit_rl import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif not kernels.available():
        pytest.skip(f"no compiled kernel: {kernels.why_not()}")
    return request.param


@pytest.mark.parametrize("block, workers", [(None, None), (64, 3), (50, 1)],
                         ids=["default", "64-entry blocks on 3 threads", "50 on 1"])
def test_per_layer_against_in_memory(tmp_path, tiny_models, monkeypatch, block, workers,
                                     reduction):
    """Whole tensors, and blocks of a few rows reduced by several threads (summed in block
    order whichever thread took them): the in-memory float64 values, from bfloat16 files
    (the models) and float32 ones (the vectors)."""
    from mergekit_rl import comparison

    if block:
        monkeypatch.setattr(comparison, "BLOCK_ELEMENTS", block)
        monkeypatch.setattr(comparison, "WORKERS", workers)
    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "v1", "-q")
    cli("extract", m["instruct"], m["base"], "-o", tmp_path / "v2", "-q")
    before = snapshot(tmp_path)
    out = json.loads(cli("compare", tmp_path / "v1", tmp_path / "v2", "--json").output)
    assert snapshot(tmp_path) == before
    want = reference(load_state(tmp_path / "v1"), load_state(tmp_path / "v2"))
    assert {g["name"] for g in out["groups"]} == set(want)
    for g in out["groups"]:
        for key in ("cosine", "norm_ratio", "sign_agreement"):
            assert g[key] == pytest.approx(want[g["name"]][key], rel=1e-5, abs=1e-7), key
    # the deltas of two models to a base, computed on the fly
    out = json.loads(cli("compare", m["grpo"], m["instruct"], "--base", m["base"],
                         "--json").output)
    want = reference(load_state(m["grpo"]), load_state(m["instruct"]), load_state(m["base"]))
    for g in out["groups"]:
        assert g["cosine"] == pytest.approx(want[g["name"]]["cosine"], rel=1e-4, abs=1e-6)
    # a bfloat16 model against a float32 vector: both widened for the one reduction
    out = json.loads(cli("compare", m["grpo"], tmp_path / "v1", "--json").output)
    want = reference(load_state(m["grpo"]), load_state(tmp_path / "v1"))
    for g in out["groups"]:
        assert g["sign_agreement"] == pytest.approx(want[g["name"]]["sign_agreement"])
        assert g["cosine"] == pytest.approx(want[g["name"]]["cosine"], rel=1e-5, abs=1e-7)


def test_table_and_plot(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "v", "-q")
    r = cli("compare", tmp_path / "v", tmp_path / "v", "--plot", tmp_path / "c.png")
    assert "total" in r.output and "1.0000" in r.output and "100.00%" in r.output
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_compare_different_tensor_sets_is_one_line(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "v1", "-q")
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "v2", "-q", "--exclude", "norm")
    before = snapshot(tmp_path)
    r = cli("compare", tmp_path / "v1", tmp_path / "v2", "--plot", tmp_path / "p.png", ok=False)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "only in" in r.output and "norm.weight" in r.output and "--include" in r.output
    assert snapshot(tmp_path) == before  # no plot written
    # selecting the common tensors is the remedy
    cli("compare", tmp_path / "v1", tmp_path / "v2", "--exclude", "norm")


def test_a_read_failing_in_one_thread_is_one_line_and_stops_the_others(tmp_path, tiny_models,
                                                                        monkeypatch, reduction):
    from mergekit_rl import comparison
    from mergekit_rl.checkpoint import Checkpoint
    from mergekit_rl.errors import CheckpointError

    monkeypatch.setattr(comparison, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(comparison, "WORKERS", 2)
    calls = []

    def failing(real):  # read (bfloat16 bytes for the kernel) or read_into (widened)
        def read(self, name, rows, *args, **kwargs):
            calls.append(name)
            if len(calls) == 7:
                raise CheckpointError(f"{self.path}: file ended early; re-download it")
            return real(self, name, rows, *args, **kwargs)
        return read

    monkeypatch.setattr(Checkpoint, "read_into", failing(Checkpoint.read_into))
    monkeypatch.setattr(Checkpoint, "read", failing(Checkpoint.read))
    m = tiny_models["qwen2_untied_bf16_sharded"]
    r = cli("compare", m["grpo"], m["sft"], ok=False)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "file ended early" in r.output
    assert len(calls) < 20  # the other thread stopped too, long before the last block
