"""`mergekit-rl merge`: results against independent in-memory computations, mergekit-format
equivalence, reproducible DARE, dry runs and errors."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import load_state, snapshot

from mergekit_rl.cli import main


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def write(tmp_path, data, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_one_pass_pair_equals_extract_then_add(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    p = write(tmp_path, {"target": str(m["instruct"]), "output": {"path": "merged"},
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    cli("merge", p, "-q")
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "added", "-q")
    merged, added = load_state(tmp_path / "merged"), load_state(tmp_path / "added")
    assert merged.keys() == added.keys()
    assert all(torch.equal(merged[k], added[k]) for k in merged)
    for f in ("merge.yaml", "provenance.json", "README.md", "config.json", "tokenizer.json"):
        assert (tmp_path / "merged" / f).is_file(), f
    resolved = yaml.safe_load((tmp_path / "merged" / "merge.yaml").read_text())
    assert resolved["terms"][0]["plus"] == str(m["grpo"])
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "task_arithmetic" in card and "plus0 − minus0" in card


def test_mergekit_config_matches_our_schema_and_reference(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    mk = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(m["base"]),
                          "models": [{"model": str(m["base"])},
                                     {"model": str(m["grpo"]), "parameters": {"weight": 1.0}},
                                     {"model": str(m["sft"]), "parameters": {"weight": -1.0}}],
                          "parameters": {"normalize": False}, "dtype": "float32"}, "mk.yaml")
    ours = write(tmp_path, {"target": str(m["base"]), "parameters": {"normalize": False},
                            "terms": [{"model": str(m["grpo"]), "weight": 1.0},
                                      {"model": str(m["sft"]), "weight": -1.0}]}, "ours.yaml")
    cli("merge", mk, "-o", tmp_path / "a", "-q")
    cli("merge", ours, "-o", tmp_path / "b", "-q")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    base, grpo, sft = (load_state(m[r]) for r in ("base", "grpo", "sft"))
    for k in base:
        ref = base[k] + ((grpo[k] - base[k]) - (sft[k] - base[k]))
        assert torch.allclose(a[k], ref, atol=1e-6, rtol=0), k
        assert torch.equal(a[k], b[k]), k


def _ties_reference(base, deltas, weights, density, lam=1.0):
    """TIES written out independently: trim per vector, elect by weighted sum, disjoint mean."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().sort(descending=True, stable=True).indices[:k]] = True
        trimmed.append(torch.where(keep.view_as(d), d, torch.zeros_like(d)))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    total = sum(weighted)
    sign = torch.where(total >= 0, 1.0, -1.0)
    num = sum(torch.where(torch.sign(t) == sign, wt, torch.zeros_like(wt))
              for t, wt in zip(trimmed, weighted))
    den = sum(torch.where(torch.sign(t) == sign, torch.full_like(t, w), torch.zeros_like(t))
              for t, w in zip(trimmed, weights))
    den = torch.where(den.abs() < 1e-8, torch.ones_like(den), den)
    return base + lam * num / den


def test_ties_equals_independent_reference(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "v1", "-q")
    cli("extract", m["instruct"], m["base"], "-o", tmp_path / "v2", "-q")
    p = write(tmp_path, {"target": str(m["base"]), "method": "ties",
                         "parameters": {"density": 0.3, "lambda": 0.8},
                         "terms": [{"vector": str(tmp_path / "v1"), "weight": 1.0},
                                   {"vector": str(tmp_path / "v2"), "weight": 0.5}]})
    cli("merge", p, "-o", tmp_path / "out", "-q")
    out, base = load_state(tmp_path / "out"), load_state(m["base"])
    v1, v2 = load_state(tmp_path / "v1"), load_state(tmp_path / "v2")
    for k in base:
        ref = _ties_reference(base[k], [v1[k], v2[k]], [1.0, 0.5], 0.3, 0.8)
        assert torch.allclose(out[k], ref, atol=1e-6), k


def test_layer_gradient_and_regex_override(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]  # 2 layers: t = 0 and 1
    p = write(tmp_path, {"target": str(m["instruct"]), "terms": [{
        "plus": str(m["grpo"]), "minus": str(m["sft"]),
        "weight": [{"match": r"mlp\.down_proj", "value": 0.0}, {"value": [0.25, 0.75]}]}]})
    cli("merge", p, "-o", tmp_path / "out", "-q")
    out, inst = load_state(tmp_path / "out"), load_state(m["instruct"])
    grpo, sft = load_state(m["grpo"]), load_state(m["sft"])
    for k, t in inst.items():
        w = (0.0 if "mlp.down_proj" in k else 0.25 if ".layers.0." in k or "embed" in k
             else 0.75)
        assert torch.allclose(out[k], t + w * (grpo[k] - sft[k]), atol=1e-7), k


def test_dare_reproducible_and_independent_of_other_tensors(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    spec = {"target": str(m["instruct"]), "method": "dare_linear",
            "parameters": {"density": 0.5, "seed": 7, "rescale": "density"},
            "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]}
    p = write(tmp_path, spec)
    cli("merge", p, "-o", tmp_path / "a", "-q")
    cli("merge", p, "-o", tmp_path / "b", "-q")
    cli("merge", p, "-o", tmp_path / "c", "-q", "--include", "layers.1.mlp.up_proj")
    cli("merge", p, "-o", tmp_path / "d", "-q", "--set", "parameters.seed=8")
    a, b, c, d = (load_state(tmp_path / x) for x in "abcd")
    inst, grpo, sft = (load_state(m[r]) for r in ("instruct", "grpo", "sft"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(a[k], c[k]) and not torch.equal(a[k], d[k])
    delta = a[k] - inst[k]
    kept = delta != 0
    assert 0.35 < kept.float().mean() < 0.65
    assert torch.allclose(delta[kept], 2 * (grpo[k] - sft[k])[kept], atol=1e-6)  # 1/p exactly
    # mergekit's default rescale: one factor per tensor that keeps the L1 norm of the delta
    cli("merge", p, "-o", tmp_path / "e", "-q", "--set", "parameters.rescale=true")
    e = load_state(tmp_path / "e")
    delta, full = e[k] - inst[k], grpo[k] - sft[k]
    kept = delta != 0
    ratio = delta[kept] / full[kept]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)
    assert float(delta.abs().sum()) == pytest.approx(float(full.abs().sum()), rel=1e-3)


def test_dry_run_describes_plan_and_writes_nothing(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"target": str(m["instruct"]), "output": {"path": "out"},
                         "method": "ties", "exclude": ["norm"],
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"]),
                                    "density": [{"match": "mlp", "value": 0.5}, {"value": 0.2}]}]})
    r = cli("merge", p, "--dry-run")
    assert "method: ties" in r.output and "bytes: read" in r.output
    assert "expected peak memory" in r.output and "override terms[0].density" in r.output
    assert "nothing was written" in r.output
    assert not (tmp_path / "out").exists()


def test_merge_errors(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    other = tiny_models["llama_untied_fp32_sharded"]
    p = write(tmp_path, {"target": str(m["instruct"]),
                         "terms": [{"plus": str(other["grpo"]), "minus": str(m["sft"])}]})
    before = snapshot(m["instruct"])
    r = cli("merge", p, "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and "cannot merge" in r.output and "(in t0+)" in r.output
    assert not (tmp_path / "out").exists() and snapshot(m["instruct"]) == before
    r = cli("merge", p, ok=False)
    assert r.exit_code == 1 and "no output folder" in r.output
    bad = write(tmp_path, {"target": str(m["instruct"]), "terms": [{"vector": "x/y", "wat": 1}]},
                "bad.yaml")
    r = cli("merge", bad, "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and "bad.yaml: terms[0].wat: unknown key" in r.output
    p2 = write(tmp_path, {"target": str(m["instruct"]), "method": "ties",
                          "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"]),
                                     "density": 1.5}]}, "dens.yaml")
    r = cli("merge", p2, "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and "density 1.5" in r.output


def test_provenance_records_method(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"target": str(m["instruct"]), "method": "dare_ties",
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    cli("merge", p, "-o", tmp_path / "out", "-q")
    rec = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert rec["method"] == "dare_ties" and [i["role"] for i in rec["inputs"]] == [
        "target", "t0+", "t0-"]
