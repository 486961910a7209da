"""Manifest loading: every shipped manifest parses; settings evaluate as mergekit's do; errors
name the file, the key path and what was expected."""

from pathlib import Path

import pytest

from mergekit_rl.errors import ConfigError
from mergekit_rl.manifest import Cond, evaluate, from_dict, load, to_dict

# merge manifests; the trainer and accelerate configs under manifests/train/ and
# manifests/accelerate/ are checked by the trainer tests
MANIFESTS = sorted(p for p in (Path(__file__).resolve().parents[2] / "manifests").rglob("*.yaml")
                   if not {"train", "accelerate"} & set(p.parts))
assert MANIFESTS, "no shipped manifests found"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_shipped_manifest_parses(path):
    m = load(path)
    assert m.terms and m.method
    again = from_dict(to_dict(m), path)  # the resolved form written as merge.yaml reloads
    assert again.method == m.method and again.terms == m.terms


def test_gradient_interpolates_like_mergekit():
    # [0, 1, 4] over t: t=0 → 0, t=0.25 → 0.5 (halfway 0..1), t=0.5 → 1, t=0.75 → 2.5, t=1 → 4
    for t, expected in ((0, 0), (0.25, 0.5), (0.5, 1), (0.75, 2.5), (1, 4)):
        assert evaluate([0.0, 1.0, 4.0], "x", t) == pytest.approx(expected)


def test_conditions_first_match_wins_and_fall_through():
    s = [Cond(0.3, filter="mlp"), Cond([0.0, 1.0], match=r"layers\.\d+\.self_attn"),
         Cond(0.9, filter="*")]
    assert evaluate(s, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(s, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(s, "model.norm.weight", 1.0) == 0.9
    assert evaluate([Cond(1.0, filter="mlp")], "model.norm.weight", 0) is None


def test_term_then_global_then_default(tmp_path):
    m = from_dict({"target": str(tmp_path), "terms": [
        {"vector": str(tmp_path), "weight": [{"filter": "mlp", "value": 2.0}]},
        {"vector": str(tmp_path)}],
        "parameters": {"weight": 0.5}}, None)
    t0, t1 = m.terms
    assert m.term_param(t0, "weight", "a.mlp.w", 0, 1.0) == 2.0
    assert m.term_param(t0, "weight", "a.attn.w", 0, 1.0) == 0.5   # falls through to global
    assert m.term_param(t1, "density", "a.attn.w", 0, 1.0) == 1.0  # default


def test_paths_resolve_relative_to_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.yaml").write_text(
        "target: ./t\noutput: {path: out}\nterms:\n  - {plus: ../g, minus: ../s}\n")
    m = load(tmp_path / "sub" / "m.yaml")
    assert m.target == str((tmp_path / "sub" / "t").resolve())
    assert m.out_path == (tmp_path / "sub" / "out").resolve()
    assert m.terms[0].inputs == (str((tmp_path / "g").resolve()), str((tmp_path / "s").resolve()))


def test_hub_ids_kept(tmp_path):
    m = from_dict({"target": "Qwen/Qwen2.5-1.5B-Instruct@main",
                   "terms": [{"vector": "org/vec"}]}, tmp_path / "m.yaml")
    assert m.target == "Qwen/Qwen2.5-1.5B-Instruct@main" and m.terms[0].inputs == ("org/vec",)


def test_set_overrides(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("target: org/t\nmethod: ties\nterms:\n  - {vector: org/v, weight: 1.0}\n")
    m = load(p, ["terms.0.weight=0.25", "parameters.density=0.5", "method=dare_ties"])
    assert m.terms[0].params["weight"] == 0.25
    assert m.params["density"] == 0.5 and m.method == "dare_ties"
    with pytest.raises(ConfigError, match="terms.3 is not an index"):
        load(p, ["terms.3.weight=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load(p, ["terms"])


def test_mergekit_config(tmp_path):
    m = from_dict({"merge_method": "ties", "base_model": "org/base",
                   "models": [{"model": "org/base"},
                              {"model": "org/a", "parameters": {"weight": 1.0, "density": 0.5}},
                              {"model": "org/b", "parameters": {"weight": [0.2, 0.8]}}],
                   "parameters": {"normalize": True, "lambda": 0.9}, "dtype": "float32",
                   "out_dtype": "bfloat16"}, tmp_path / "mk.yaml")
    assert m.style == "mergekit" and m.target == "org/base" and m.method == "ties"
    assert [t.inputs for t in m.terms] == [("org/a",), ("org/b",)]  # base gives no delta
    assert all(t.kind == "model" for t in m.terms)
    assert m.out_dtype == "bfloat16" and m.params["lambda"] == 0.9


@pytest.mark.parametrize("raw,needle", [
    ({"terms": [{"vector": "a/b"}]}, "exactly one of `target` or `base`"),
    ({"target": "a/b", "terms": []}, "terms: expected a non-empty list"),
    ({"target": "a/b", "terms": [{"vector": "a/b", "wieght": 1}]}, "terms[0].wieght: unknown key"),
    ({"target": "a/b", "terms": [{"plus": "a/b"}]}, "needs both `plus` and `minus`"),
    ({"target": "a/b", "terms": [{"vector": "a/b", "model": "c/d"}]}, "exactly one of"),
    ({"target": "a/b", "method": "nuslerp", "terms": [{"vector": "a/b"}]}, "unknown method 'nuslerp'"),
    ({"target": "a/b", "method": "slerp", "terms": [{"vector": "a/b"}]}, "combines models"),
    ({"target": "a/b", "method": "slerp", "terms": [{"model": "c/d"}]}, "parameters.t: slerp needs t"),
    ({"target": "a/b", "method": "slerp", "parameters": {"t": 0.5},
      "terms": [{"model": "c/d"}, {"model": "e/f"}]}, "terms: slerp needs exactly one model"),
    ({"target": "a/b", "method": "model_stock", "terms": [{"model": "c/d"}]},
     "terms: model_stock needs two or more"),
    ({"target": "a/b", "terms": [{"vector": "a/b", "weight": "high"}]},
     "terms[0].weight: expected a number"),
    ({"target": "a/b", "terms": [{"vector": "a/b"}], "parameters": {"normalize": 1}},
     "parameters.normalize: expected true or false"),
    ({"target": "a/b", "terms": [{"vector": "a/b"}], "include": ["("]}, "include[0]: invalid"),
    ({"target": "a/b", "terms": [{"vector": "a/b"}], "output": {"dtype": "int8"}},
     "output.dtype: expected auto"),
    ({"target": "a/b", "terms": [{"vector": "a/b"}], "colour": 1}, "colour: unknown key"),
    ({"target": "a/b", "method": "linear", "terms": [{"vector": "a/b"}]}, "give `model:` terms"),
    ({"merge_method": "nuslerp", "base_model": "a/b", "models": [{"model": "c/d"}]},
     "'nuslerp' is not supported"),
    ({"merge_method": "slerp", "base_model": "a/b", "models": [{"model": "c/d"}]},
     "parameters.t: slerp needs t"),
    ({"merge_method": "ties", "base_model": "a/b", "slices": []}, "slices: only one slice"),
    ({"merge_method": "slerp", "base_model": "a/b", "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": "a/b", "layer_range": [0, 4]},
                     {"model": "c/d", "layer_range": [2, 6]}]}]}, "frankenmerges"),
    ({"merge_method": "slerp", "base_model": "a/b", "parameters": {"t": 0.5},
      "models": [{"model": "c/d"}], "slices": []}, "models: give exactly one of"),
    ({"merge_method": "ties", "models": [{"model": "c/d"}]}, "ties needs a base_model"),
    ({"merge_method": "ties", "base_model": "a/b", "models": [{"model": "c/d"}]},
     "models[0].parameters.weight: missing"),
    ({"merge_method": "ties", "base_model": "a/b", "tokenizer_source": "union",
      "models": [{"model": "c/d", "parameters": {"weight": 1}}]}, "'union' is not supported"),
])
def test_errors_name_file_and_key(tmp_path, raw, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(raw, tmp_path / "bad.yaml")
    assert str(e.value).startswith(str(tmp_path / "bad.yaml"))
    assert needle in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "m.yaml").write_text("target: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(tmp_path / "m.yaml")
    with pytest.raises(ConfigError, match="manifest not found"):
        load(tmp_path / "none.yaml")
