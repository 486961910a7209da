"""`mergekit-rl merge`: results against independent in-memory computations, mergekit-format
equivalence, reproducible DARE, dry runs and errors."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import assert_failed, load_state, snapshot

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
    # --include changes only that tensor: every other one is the target's, bit for bit
    assert c.keys() == inst.keys()
    assert all(torch.equal(c[n], inst[n]) for n in inst if n != k)
    assert not torch.equal(c[k], inst[k])
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


# ---- masks: the command line's and the manifest's together -----------------------------------

def test_merge_exclude_leaves_the_excluded_tensors_alone(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    p = write(tmp_path, {"target": str(m["instruct"]), "include": ["layers"],
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    cli("merge", p, "-o", tmp_path / "out", "-q", "--exclude", r"mlp\.")
    out, inst = load_state(tmp_path / "out"), load_state(m["instruct"])
    grpo, sft = load_state(m["grpo"]), load_state(m["sft"])
    for k, t in inst.items():
        if "layers" in k and "mlp." not in k:  # selected by both masks
            assert torch.equal(out[k], t + (grpo[k] - sft[k])), k
        else:
            assert torch.equal(out[k], t), k
    rec = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert rec["selection"]["masks"] == [
        {"from": f"manifest {p}", "include": ["layers"], "exclude": []},
        {"from": "command line", "include": [], "exclude": [r"mlp\."]}]
    assert sorted(rec["excluded"]) == sorted(k for k in inst if "layers" not in k or "mlp." in k)


def test_merge_mask_matching_nothing_is_an_error(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"target": str(m["instruct"]), "exclude": ["embed"],
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    before = {m[r]: snapshot(m[r]) for r in ("instruct", "grpo", "sft")}
    out = tmp_path / "out"
    r = cli("merge", p, "-o", out, "--include", "embed", ok=False)  # excluded by the manifest
    assert_failed(r, out, before, f"{p}: exclude 'embed', --include 'embed': no tensor")
    r = cli("merge", p, "-o", out, "--include", "mpl", ok=False)
    assert_failed(r, out, before, "--include 'mpl' matches no tensor")
    r = cli("merge", p, "-o", out, "--set", "include=[attn, nothing_here]", ok=False)
    assert_failed(r, out, before, f"{p}: include 'nothing_here' matches no tensor")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear", "breadcrumbs"])
def test_normalising_by_weights_that_sum_to_zero_is_a_plan_time_error(tmp_path, tiny_models,
                                                                      method, monkeypatch):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"merge_method": method, "base_model": str(m["base"]),
                         "models": [{"model": str(m["grpo"]), "parameters": {"weight": 1.0}},
                                    {"model": str(m["sft"]), "parameters": {"weight": -1.0}}],
                         "parameters": {"normalize": True, "density": 0.5}}, "mk.yaml")
    from mergekit_rl.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "read", lambda self, name, *a, **k: pytest.fail(
        "data was read") if len(self.tensors[name].shape) > 1 else torch.ones(1))
    before = {m[r]: snapshot(m[r]) for r in ("base", "grpo", "sft")}
    r = cli("merge", p, "-o", tmp_path / "out", ok=False)
    assert_failed(r, tmp_path / "out", before, f"{p}: {method} with normalize: true divides by "
                  "the sum of the weights, which is 0 for", "(weights 1, -1)",
                  "set parameters.normalize: false")


def test_ties_keeps_its_per_entry_rule_with_cancelling_weights(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"target": str(m["base"]), "method": "ties",
                         "parameters": {"normalize": True, "density": 1.0},
                         "terms": [{"model": str(m["grpo"]), "weight": 1.0},
                                   {"model": str(m["sft"]), "weight": -1.0}]})
    cli("merge", p, "-o", tmp_path / "out", "-q")
    out, base = load_state(tmp_path / "out"), load_state(m["base"])
    grpo, sft = load_state(m["grpo"]), load_state(m["sft"])
    for k in base:
        # weighted deltas x_i = w_i·τ_i vote; agreeing entries are summed and divided by the
        # sum of their weights, which is 0 where both agree (then 1, as mergekit does)
        x = torch.stack([grpo[k] - base[k], -(sft[k] - base[k])])
        sign = torch.where(x.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(x) == sign
        divisor = (torch.tensor([1.0, -1.0]).view(2, *[1] * base[k].dim()) * agree).sum(0)
        divisor[divisor == 0] = 1
        ref = base[k] + (x * agree).sum(0) / divisor
        assert torch.allclose(out[k], ref, atol=1e-6), k
        assert (agree.all(0)).any()  # the cancelling case happens


def test_mergekit_config_as_users_write_it(tmp_path, tiny_models):
    # As configs on the Hub are written: int8_mask, an empty `parameters:`, the base model
    # listed without parameters, `dtype` only.
    m = tiny_models["llama_untied_fp32_sharded"]
    text = f"""models:
  - model: {m["base"]}
    # no parameters necessary for base model
  - model: {m["grpo"]}
    parameters:
      density: 0.5
      weight: 0.6
  - model: {m["instruct"]}
    parameters:
      density: 0.5
      weight: 0.4
merge_method: ties
base_model: {m["base"]}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""
    (tmp_path / "mk.yaml").write_text(text)
    (tmp_path / "plain.yaml").write_text(text.replace("  int8_mask: true\n", ""))
    r = cli("merge", tmp_path / "mk.yaml", "-o", tmp_path / "a")
    info = [line for line in r.output.splitlines() if line.startswith("info: ")]
    assert info == [f"info: {tmp_path / 'mk.yaml'}: parameters.int8_mask: True accepted and "
                    "ignored (mergekit keeps the TIES sign mask as int8 to save memory; the "
                    "result is the same, and mergekit-rl's masks are booleans already)"]
    cli("merge", tmp_path / "plain.yaml", "-o", tmp_path / "b", "-q")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base, grpo, inst = (load_state(m[r]) for r in ("base", "grpo", "instruct"))
    k = "model.layers.0.mlp.up_proj.weight"
    ref = _ties_reference(base[k], [grpo[k] - base[k], inst[k] - base[k]], [0.6, 0.4], 0.5)
    assert torch.allclose(a[k], ref, atol=1e-6)
    rec = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert any("int8_mask" in n for n in rec["ignored"])
    bad = write(tmp_path, {**yaml.safe_load(text), "parameters": {"int8_maks": True}}, "typo.yaml")
    r = cli("merge", bad, "-o", tmp_path / "c", ok=False)
    assert_failed(r, tmp_path / "c", {}, f"{bad}: parameters.int8_maks: unknown key")


def test_set_numbers_read_as_yaml_1_2(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"target": str(m["instruct"]),
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    cli("merge", p, "-o", tmp_path / "a", "-q", "--set", "parameters.lambda=1e-1")
    cli("merge", p, "-o", tmp_path / "b", "-q", "--set", "parameters.lambda=0.1")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    inst = load_state(m["instruct"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], inst["model.norm.weight"])


def test_set_errors_are_reported_against_the_set(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    p = write(tmp_path, {"target": str(m["instruct"]),
                         "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    r = cli("merge", p, "-o", tmp_path / "o", "--set", "parameters.lamda=1", ok=False)
    assert_failed(r, tmp_path / "o", {}, "--set parameters.lamda=1: unknown key; expected one of")
    assert str(p) not in r.output
    r = cli("merge", p, "-o", tmp_path / "o", "--set", "terms.0.weight=lots", ok=False)
    assert_failed(r, tmp_path / "o", {}, "--set terms.0.weight=lots: expected a number, got "
                  "'lots'")


def test_yaml_syntax_error_gives_the_line(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("target: x\nterms:\n  - vector: v\n   weight: 1\n")
    r = cli("merge", p, "-o", tmp_path / "o", ok=False)
    assert_failed(r, tmp_path / "o", {}, f"{p}:4:", "invalid YAML")


def test_command_line_paths_are_relative_to_cwd_and_shown(tmp_path, tiny_models, monkeypatch):
    import shutil

    m = tiny_models["qwen2_tied_fp32"]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    shutil.copytree(m["instruct"], tmp_path / "work" / "instruct")
    p = write(tmp_path / "cfg", {"target": "missing-in-cfg", "output": {"path": "from-manifest"},
                                 "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    monkeypatch.chdir(tmp_path / "work")
    r = cli("merge", p, "--dry-run", "--set", "target=instruct", "-o", "merged")
    assert f"output: {tmp_path / 'work' / 'merged'} (-o)" in r.output
    assert f"target  {tmp_path / 'work' / 'instruct'}" in r.output
    r = cli("merge", p, "--dry-run", "--set", "target=instruct")
    assert f"output: {tmp_path / 'cfg' / 'from-manifest'} (output.path)" in r.output
    r = cli("merge", p, "--dry-run", "--set", "target=instruct", "--set", "output.path=here")
    assert f"output: {tmp_path / 'work' / 'here'} (output.path)" in r.output
    cli("merge", p, "-q", "--set", "target=instruct", "-o", "merged")
    resolved = yaml.safe_load((tmp_path / "work" / "merged" / "merge.yaml").read_text())
    assert resolved["output"]["path"] == str(tmp_path / "work" / "merged")
    assert resolved["target"] == str(tmp_path / "work" / "instruct")
    assert not (tmp_path / "cfg" / "from-manifest").exists()


def test_home_in_manifest_paths(tmp_path, tiny_models, monkeypatch):
    import shutil

    m = tiny_models["qwen2_tied_fp32"]
    home = tmp_path / "home"
    shutil.copytree(m["instruct"], home / "models" / "instruct")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "cfg").mkdir()
    p = write(tmp_path / "cfg", {"target": "~/models/instruct", "output": {"path": "~/merged"},
                                 "terms": [{"plus": str(m["grpo"]), "minus": str(m["sft"])}]})
    cli("merge", p, "-q")
    assert (home / "merged" / "model.safetensors").is_file()
    rec = json.loads((home / "merged" / "provenance.json").read_text())
    assert rec["inputs"][0]["path"] == str(home / "models" / "instruct")


def test_terms_of_the_wrong_kind_are_refused(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    before = {m["instruct"]: snapshot(m["instruct"]), m["grpo"]: snapshot(m["grpo"])}
    p = write(tmp_path, {"target": str(m["instruct"]), "terms": [{"vector": str(m["grpo"])}]})
    r = cli("merge", p, "-o", tmp_path / "o", ok=False)
    assert_failed(r, tmp_path / "o", before, f"{m['grpo']}: is a model, not a task vector "
                  "(the t0)")
    p = write(tmp_path, {"target": str(m["instruct"]),
                         "terms": [{"model": str(tmp_path / "vec")}]}, "m2.yaml")
    r = cli("merge", p, "-o", tmp_path / "o", ok=False)
    assert_failed(r, tmp_path / "o", before, "is a task vector, not a model (the t0)")


def test_help_texts_say_what_each_command_does():
    def help_of(name):
        return " ".join(cli(name, "--help").output.split())

    merge_help = help_of("merge")
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                   "breadcrumbs_ties", "linear"):
        assert method in merge_help, method
    assert "Combined with the manifest's include/exclude" in merge_help
    assert "the others are left out of the vector" in help_of("extract")
    assert "the rest come from the target unchanged" in help_of("add")
    assert "left out of the vector" not in help_of("add")
