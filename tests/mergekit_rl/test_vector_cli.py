"""extract / add / subtract through the CLI, checked against an independent in-memory
computation with safetensors' own loader."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_failed, load_state, snapshot
from safetensors.torch import save_file

from mergekit_rl.cli import main
from mergekit_rl.job import Options
from mergekit_rl.vectors import apply, extract

VARIANTS = ["qwen2_tied_fp32", "qwen2_untied_bf16_sharded", "llama_untied_fp32_sharded"]


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of t, in t's dtype."""
    return (torch.nextafter(t.float().abs().to(t.dtype), torch.tensor(float("inf"), dtype=t.dtype))
            .float() - t.float().abs())


@pytest.mark.parametrize("variant", VARIANTS)
def test_extract_then_add_reproduces_finetuned(tmp_path, tiny_models, variant):
    m = tiny_models[variant]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", m["sft"], tmp_path / "vec", "-o", tmp_path / "out", "-q")
    grpo, sft, vec, out = (load_state(p) for p in (m["grpo"], m["sft"], tmp_path / "vec",
                                                    tmp_path / "out"))
    assert set(vec) == set(grpo) and set(out) == set(sft)
    for k in grpo:
        assert vec[k].dtype == torch.float32
        assert torch.equal(vec[k], grpo[k].float() - sft[k].float()), k  # fp32 is exact here
        assert out[k].dtype == sft[k].dtype
        diff = (out[k].float() - grpo[k].float()).abs()
        assert (diff <= ulp(grpo[k])).all(), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_add_equals_in_memory_and_subtract_restores(tmp_path, tiny_models, variant):
    m = tiny_models[variant]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "plus", "--alpha", "0.5", "-q")
    cli("subtract", tmp_path / "plus", tmp_path / "vec", "-o", tmp_path / "back", "--alpha", "0.5",
        "-q", "--dtype", "float32")
    grpo, sft, inst = (load_state(m[r]) for r in ("grpo", "sft", "instruct"))
    plus, back = load_state(tmp_path / "plus"), load_state(tmp_path / "back")
    for k, t in inst.items():
        src = k if k in grpo else "model.embed_tokens.weight"
        ref = (t.float() + 0.5 * (grpo[src].float() - sft[src].float())).to(t.dtype)
        assert torch.equal(plus[k], ref), k
        assert back[k].dtype == torch.float32
        tol = ulp(plus[k]).float() if t.dtype == torch.bfloat16 else 1e-6
        assert ((back[k] - t.float()).abs() <= tol).all(), k


def test_output_has_side_files_card_provenance_and_generates(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "out", "-q")
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 "README.md", "provenance.json"):
        assert (tmp_path / "out" / name).is_file(), name
    rec = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert rec["kind"] == "model" and rec["formula"] == "target + 1·vector"
    assert [i["role"] for i in rec["inputs"]] == ["target", "vector"]
    assert all("sample_sha256" in f for i in rec["inputs"] for f in i["files"])
    assert rec["command"].startswith("mergekit-rl add")
    vrec = json.loads((tmp_path / "vec" / "provenance.json").read_text())
    assert vrec["kind"] == "vector" and vrec["out_dtype"] == "float32"
    card = (tmp_path / "vec" / "README.md").read_text()
    assert card.startswith("---") and "mergekit-rl add" in card
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("12+7=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4


def test_full_hash_records_sha256(tmp_path, tiny_models):
    import hashlib

    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q", "--hash")
    rec = json.loads((tmp_path / "vec" / "provenance.json").read_text())
    f = rec["inputs"][0]["files"][0]
    assert f["sha256"] == hashlib.sha256((m["grpo"] / f["file"]).read_bytes()).hexdigest()


def test_tied_target_changes_shared_matrix_once(tmp_path, tiny_models):
    """Vector from an untied pair (has lm_head) onto a tied target: the embedding delta only."""
    tied = tiny_models["qwen2_tied_fp32"]
    # Make an untied fp32 vector whose names match the tied model's shapes.
    t = load_state(tied["base"])
    g = torch.Generator().manual_seed(5)
    vec = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in t.items()}
    vec["lm_head.weight"] = torch.randn(t["model.embed_tokens.weight"].shape, generator=g)
    (tmp_path / "vec").mkdir()
    save_file(vec, tmp_path / "vec" / "model.safetensors")
    r = cli("add", tied["base"], tmp_path / "vec", "-o", tmp_path / "out")
    assert "ties lm_head.weight to the embeddings" in r.output
    out = load_state(tmp_path / "out")
    assert out.keys() == t.keys() and "lm_head.weight" not in out
    for k in t:  # every tensor gets its own delta once; the vector's lm_head is not used
        assert torch.equal(out[k], t[k] + vec[k]), k


def test_untied_target_vector_from_tied_pair(tmp_path, tiny_models):
    tied = tiny_models["qwen2_tied_fp32"]
    cli("extract", tied["grpo"], tied["sft"], "-o", tmp_path / "vec", "-q")
    # an untied target with the tied family's shapes: materialise lm_head from the embedding
    t = load_state(tied["instruct"])
    emb = "model.embed_tokens.weight"
    t["lm_head.weight"] = t[emb].clone() * 1.5
    (tmp_path / "target").mkdir()
    save_file(t, tmp_path / "target" / "model.safetensors")
    r = cli("add", tmp_path / "target", tmp_path / "vec", "-o", tmp_path / "out")
    assert "applying its model.embed_tokens.weight delta to lm_head.weight too" in r.output
    out, v = load_state(tmp_path / "out"), load_state(tmp_path / "vec")
    assert "lm_head.weight" not in v
    assert torch.equal(out["lm_head.weight"], t["lm_head.weight"] + v[emb])
    assert torch.equal(out[emb], t[emb] + v[emb])


def test_exclude_mask_copies_from_target_end_to_end(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q", "--exclude", r"embed|lm_head")
    v = load_state(tmp_path / "vec")
    assert not any("embed" in k or "lm_head" in k for k in v)
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "out", "-q",
        "--include", r"layers\.0\.")
    out, inst = load_state(tmp_path / "out"), load_state(m["instruct"])
    for k, t in inst.items():
        if "layers.0." in k:
            assert torch.equal(out[k], t + v[k]), k
        else:
            assert torch.equal(out[k], t), k


def test_dtype_option_and_integer_tensors_copied(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    t = load_state(m["instruct"])
    t["model.position_ids"] = torch.arange(8)
    (tmp_path / "target").mkdir()
    save_file(t, tmp_path / "target" / "model.safetensors")
    shutil.copyfile(m["instruct"] / "config.json", tmp_path / "target" / "config.json")
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", tmp_path / "target", tmp_path / "vec", "-o", tmp_path / "out", "-q",
        "--dtype", "bfloat16")
    out = load_state(tmp_path / "out")
    assert torch.equal(out["model.position_ids"], torch.arange(8))
    assert all(v.dtype == torch.bfloat16 for k, v in out.items() if k != "model.position_ids")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_vocab_mismatch(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    t = load_state(m["instruct"])
    emb = "model.embed_tokens.weight"
    t[emb] = torch.cat([t[emb], torch.randn(5, t[emb].shape[1])])
    (tmp_path / "target").mkdir()
    save_file(t, tmp_path / "target" / "model.safetensors")
    before = snapshot(tmp_path / "target")
    r = cli("add", tmp_path / "target", tmp_path / "vec", "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and "vocabulary rows" in r.output and "--allow-vocab-mismatch" in r.output
    assert not (tmp_path / "out").exists()
    r = cli("add", tmp_path / "target", tmp_path / "vec", "-o", tmp_path / "out",
            "--allow-vocab-mismatch")
    assert "are kept from the target" in r.output
    out, v = load_state(tmp_path / "out"), load_state(tmp_path / "vec")
    n = v[emb].shape[0]
    assert torch.equal(out[emb][:n], t[emb][:n] + v[emb])
    assert torch.equal(out[emb][n:], t[emb][n:])
    assert snapshot(tmp_path / "target") == before


def test_row_blocks_give_identical_results(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    extract(str(m["grpo"]), str(m["sft"]), tmp_path / "v1")
    extract(str(m["grpo"]), str(m["sft"]), tmp_path / "v2", Options(block_bytes=512))
    apply(str(m["instruct"]), str(tmp_path / "v1"), tmp_path / "o1")
    apply(str(m["instruct"]), str(tmp_path / "v1"), tmp_path / "o2", options=Options(block_bytes=512))
    for a, b in (("v1", "v2"), ("o1", "o2")):
        sa, sb = load_state(tmp_path / a), load_state(tmp_path / b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_inspect_matches_independent_norms(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    r = cli("inspect", tmp_path / "vec", "--json", "--plot", tmp_path / "n.png")
    rep = json.loads(r.output)
    v = load_state(tmp_path / "vec")
    assert rep["kind"] == "vector" and rep["tensors"] == len(v)
    total = torch.sqrt(sum((t.double() ** 2).sum() for t in v.values()))
    assert rep["l2_norm"] == pytest.approx(float(total), rel=1e-9)
    layer0 = torch.sqrt(sum((t.double() ** 2).sum() for k, t in v.items() if ".layers.0." in k))
    g = {x["group"]: x for x in rep["groups"]}
    assert g["layer 0"]["l2_norm"] == pytest.approx(float(layer0), rel=1e-9)
    assert (tmp_path / "n.png").stat().st_size > 1000
    assert "layer 1" in cli("inspect", m["base"]).output


# ---- bad input: exit 1, one line naming the problem, no OUT, inputs untouched -----------------

def _check_failed(result, tmp_path, out, inputs, before, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")
    for n in needles:
        assert n in result.output, result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    for p, snap in zip(inputs, before):
        assert snapshot(p) == snap


@pytest.fixture
def copies(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    for r in ("base", "grpo"):
        shutil.copytree(m[r], tmp_path / r)
    return tmp_path / "grpo", tmp_path / "base"


def _run_bad(tmp_path, inputs, *args):
    before = [snapshot(p) for p in inputs]
    out = tmp_path / "out"
    return cli(*args, "-o", out, ok=False), out, before


def test_bad_path(tmp_path, copies):
    ft, base = copies
    r, out, before = _run_bad(tmp_path, [ft], "extract", ft, tmp_path / "missing")
    _check_failed(r, tmp_path, out, [ft], before, "missing: no such file or folder")


def test_truncated_shard(tmp_path, copies):
    ft, base = copies
    shard = sorted(base.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-3])
    r, out, before = _run_bad(tmp_path, [ft, base], "extract", ft, base)
    _check_failed(r, tmp_path, out, [ft, base], before, shard.name, "not a valid safetensors")


def test_bad_index(tmp_path, copies):
    ft, base = copies
    (base / "model.safetensors.index.json").write_text('{"weight_map": {"x": "nope.safetensors"}}')
    r, out, before = _run_bad(tmp_path, [ft, base], "extract", ft, base)
    _check_failed(r, tmp_path, out, [ft, base], before, "nope.safetensors", "missing")


def test_architecture_mismatch_lists_tensors(tmp_path, copies, tiny_models):
    ft, _ = copies
    other = tiny_models["qwen2_untied_bf16_sharded"]["base"]
    r, out, before = _run_bad(tmp_path, [ft], "extract", ft, other)
    _check_failed(r, tmp_path, out, [ft], before, "cannot extract", "6 missing: model.layers.0.self_attn.k_proj.bias")


def test_missing_and_extra_tensors(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    s = load_state(m["base"])
    s["extra.weight"] = torch.zeros(3)
    del s["model.norm.weight"]
    (tmp_path / "odd").mkdir()
    save_file(s, tmp_path / "odd" / "model.safetensors")
    r, out, before = _run_bad(tmp_path, [tmp_path / "odd"], "extract", tmp_path / "odd", m["base"])
    _check_failed(r, tmp_path, out, [tmp_path / "odd"], before, "1 missing: model.norm.weight",
                  "1 unexpected: extra.weight")


def test_dtype_kind_mismatch(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    s = load_state(m["base"])
    s["model.norm.weight"] = s["model.norm.weight"].to(torch.int32)
    (tmp_path / "odd").mkdir()
    save_file(s, tmp_path / "odd" / "model.safetensors")
    r, out, before = _run_bad(tmp_path, [tmp_path / "odd"], "extract", m["grpo"], tmp_path / "odd")
    _check_failed(r, tmp_path, out, [tmp_path / "odd"], before, "model.norm.weight is torch.float32")


def test_existing_output_needs_overwrite(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "out", "--overwrite", "-q")
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_output_inside_or_equal_input_refused(tmp_path, copies):
    ft, base = copies
    for out in (base, base / "sub", tmp_path):
        before = snapshot(base)
        r = cli("extract", ft, base, "-o", out, "--overwrite", ok=False)
        assert r.exit_code == 1 and "overlaps input" in r.output, out
        assert snapshot(base) == before


def test_non_finite_result_names_tensor(tmp_path, copies):
    ft, base = copies
    cli("extract", ft, base, "-o", tmp_path / "vec", "-q")
    r, out, before = _run_bad(tmp_path, [base], "add", base, tmp_path / "vec", "--alpha", "1e38",
                              "--dtype", "float16")
    _check_failed(r, tmp_path, out, [base], before, "contains NaN or Inf", ".weight: the result")


def test_bad_options(tmp_path, copies):
    ft, base = copies
    r = cli("extract", ft, base, "-o", tmp_path / "o", "--include", "(", ok=False)
    assert r.exit_code == 1 and "invalid regular expression" in r.output
    r = cli("extract", ft, base, "-o", tmp_path / "o", "--device", "cuda:0", ok=False)
    assert r.exit_code == 1 and "CUDA is not available" in r.output
    r = cli("add", base, ft, "-o", tmp_path / "o", "--alpha", "nan", ok=False)
    assert r.exit_code == 1 and "finite" in r.output
    r = cli("add", base, ft, "-o", tmp_path / "o", "--max-shard-size", "big", ok=False)
    assert r.exit_code == 2 and "invalid size" in r.output
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_nothing(tmp_path, copies, monkeypatch):
    """An error while writing (after some tensors) removes the temporary folder."""
    from mergekit_rl.maths import task_vectors as ops

    ft, base = copies
    calls = []

    def boom(a, b, out=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return a - b

    monkeypatch.setattr(ops, "task_vector", boom)
    before = [snapshot(ft), snapshot(base)]
    r = cli("extract", ft, base, "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 130 and "no output was written" in r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert [snapshot(ft), snapshot(base)] == before


def test_stale_temporary_from_killed_run_is_cleaned(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    stale = tmp_path / ".out.tmp-999999999-deadbeef"
    stale.mkdir()
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "out", "-q")
    assert not stale.exists() and (tmp_path / "out").is_dir()


def test_a_model_where_the_vector_belongs_is_refused(tmp_path, copies):
    ft, base = copies
    before = {ft: snapshot(ft), base: snapshot(base)}
    for command in ("add", "subtract"):
        r = cli(command, base, ft, "-o", tmp_path / "out", ok=False)
        assert_failed(r, tmp_path / "out", before, f"{ft}: is a model, not a task vector",
                      "mergekit-rl extract FINETUNED BASE -o VECTOR", "{model: ...}")


def test_a_vector_where_a_model_is_differenced_is_refused(tmp_path, copies):
    ft, base = copies
    cli("extract", ft, base, "-o", tmp_path / "vec", "-q")
    vec = tmp_path / "vec"
    before = {ft: snapshot(ft), vec: snapshot(vec)}
    r = cli("extract", vec, ft, "-o", tmp_path / "out", ok=False)
    assert_failed(r, tmp_path / "out", before, f"{vec}: is a task vector, not a model "
                  "(the finetuned)")


@pytest.mark.parametrize("command", ["add", "subtract"])
def test_mask_matching_nothing_is_an_error(tmp_path, copies, command):
    ft, base = copies
    cli("extract", ft, base, "-o", tmp_path / "vec", "-q")
    vec = tmp_path / "vec"
    before = {base: snapshot(base), vec: snapshot(vec)}
    out = tmp_path / "out"
    r = cli(command, base, vec, "-o", out, "--include", "self_atn", ok=False)
    assert_failed(r, out, before, "--include 'self_atn' matches no tensor of", str(base))
    r = cli(command, base, vec, "-o", out, "--include", "layers", "--include", "nope", ok=False)
    assert_failed(r, out, before, "--include 'nope' matches no tensor")
    r = cli(command, base, vec, "-o", out, "--exclude", ".", ok=False)
    assert_failed(r, out, before, "--exclude '.': no tensor of", "is left to change")
    r = cli(command, base, vec, "-o", out, "--include", "mlp", "--exclude", "layers", ok=False)
    assert_failed(r, out, before, "--include 'mlp', --exclude 'layers': no tensor")


def test_extract_mask_matching_nothing_is_an_error(tmp_path, copies):
    ft, base = copies
    before = {ft: snapshot(ft), base: snapshot(base)}
    r = cli("extract", ft, base, "-o", tmp_path / "out", "--include", "lm_haed", ok=False)
    assert_failed(r, tmp_path / "out", before, "--include 'lm_haed' matches no tensor")


def test_provenance_says_what_the_mask_did(tmp_path, copies):
    ft, base = copies
    cli("extract", ft, base, "-o", tmp_path / "vec", "-q")
    cli("add", base, tmp_path / "vec", "-o", tmp_path / "out", "-q", "--exclude", "mlp")
    rec = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert rec["selection"]["masks"] == [{"from": "command line", "include": [],
                                          "exclude": ["mlp"]}]
    out, target, v = (load_state(p) for p in (tmp_path / "out", base, tmp_path / "vec"))
    unchanged = sorted(k for k in target if torch.equal(out[k], target[k]))
    assert sorted(rec["excluded"]) == sorted(k for k in target if "mlp" in k) == unchanged
    assert all(torch.equal(out[k], target[k] + v[k]) for k in target if "mlp" not in k)
