"""`check` and `merge --dry-run`: the pre-flight report from headers and configs (Hub inputs by
range requests, counted on the local FakeHub), tokenizer identity, `--init`; Hub lineage in
cards and what a push publishes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import snapshot
from hub_server import FakeHub, configure_hf_client, front_matter

from mergekit_rl import hub as hub_mod
from mergekit_rl.cli import main
from mergekit_rl.tokenizer_id import differences, fingerprint
from reasoning_demo.tiny import build_model

TOKEN = "hf_secret_token_for_tests_123"


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def with_tokenizer_change(src, dst, edit):
    """A copy of model folder `src` whose tokenizer.json is changed by edit(dict)."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    edit(tok)
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


def add_token(tok):
    tok["added_tokens"].append({"id": 299, "content": "<extra>", "special": True,
                                "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False})


def swap_two_tokens(tok):
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def test_fingerprint_by_hand(tmp_path, tiny_models):
    base = tiny_models["qwen2_tied_fp32"]["base"]
    fp = fingerprint(base)
    assert fp["vocab_size"] == len(json.loads((base / "tokenizer.json").read_text())["model"]["vocab"])
    assert set(fp["added_tokens"]) >= {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    same = fingerprint(tiny_models["qwen2_tied_fp32"]["instruct"])
    assert differences(fp, same) == ([], [])
    other = fingerprint(with_tokenizer_change(base, tmp_path / "x", add_token))
    problems, _ = differences(fp, other)
    assert problems == ["added tokens differ: '<extra>'"]
    swapped = fingerprint(with_tokenizer_change(base, tmp_path / "y", swap_two_tokens))
    assert "vocabularies differ" in differences(fp, swapped)[0][0]
    (tmp_path / "y" / "chat_template.jinja").write_text("{{ messages }}")
    assert differences(same, fingerprint(tmp_path / "y"))[1] == [
        "the chat templates differ (the output keeps the target's)"]


def test_check_passes_for_a_family_and_reports_facts(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "v", "-q")
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "lr", "--rank", "2", "-q")
    before = snapshot(tmp_path)
    r = cli("check", m["instruct"], m["sft"], tmp_path / "v", tmp_path / "lr", "--init")
    assert snapshot(tmp_path) == before  # nothing written
    out = r.output
    assert "architecture Qwen2ForCausalLM" in out and "bfloat16" in out
    assert "tied embeddings no" in out and "quantisation none" in out and "tokenizer " in out
    assert "(low-rank vector)" in out and "(vector)" in out
    assert "shares the target's initialisation" in out and "read " in out
    assert out.strip().endswith("check: the inputs can be combined")


def test_check_reasons_exit_1(tmp_path, tiny_models):
    q, ll = tiny_models["qwen2_tied_fp32"], tiny_models["llama_untied_fp32_sharded"]
    r = cli("check", q["base"], ll["base"], ok=False)
    assert r.exit_code == 1
    assert "problem: input 1: architecture LlamaForCausalLM but the target is Qwen2ForCausalLM" \
        in r.output
    assert "missing" in r.output  # the tensors, as add/merge would name them
    # another tokenizer: same size, other ids; and an extra added token
    swapped = with_tokenizer_change(q["instruct"], tmp_path / "swapped", swap_two_tokens)
    r = cli("check", q["base"], swapped, ok=False)
    assert r.exit_code == 1 and "tokenizer: the vocabularies differ" in r.output
    # independent initialisation
    other = build_model(tmp_path / "other", seed=9, arch="qwen2", tied=True,
                        tokenizer_dir=q["base"])
    r = cli("check", q["base"], other, "--init", ok=False)
    assert r.exit_code == 1 and "does not share the target's initialisation" in r.output
    # quantised weights declared by the config
    quant = tmp_path / "quant"
    shutil.copytree(q["instruct"], quant)
    cfg = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "gptq", "bits": 4}}))
    r = cli("check", q["base"], quant, ok=False)
    assert r.exit_code == 1 and "quantised weights" in r.output and "gptq" in r.output
    # chat template only: a warning, exit 0
    tmpl = tmp_path / "tmpl"
    shutil.copytree(q["instruct"], tmpl)
    (tmpl / "chat_template.jinja").write_text("{{ messages }}")
    r = cli("check", q["base"], tmpl)
    assert "warning: input 1: the chat templates differ" in r.output


def test_vector_records_donor_tokenizer_and_add_compares_it(tmp_path, tiny_models):
    q = tiny_models["qwen2_tied_fp32"]
    cli("extract", q["grpo"], q["sft"], "-o", tmp_path / "v", "-q")
    rec = json.loads((tmp_path / "v" / "provenance.json").read_text())
    assert rec["inputs"][0]["tokenizer"] == fingerprint(q["grpo"])
    swapped = with_tokenizer_change(q["instruct"], tmp_path / "target", swap_two_tokens)
    before = snapshot(tmp_path)
    r = cli("add", swapped, tmp_path / "v", "-o", tmp_path / "out", ok=False)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "different tokenizers" in r.output and "--allow-vocab-mismatch" in r.output
    assert snapshot(tmp_path) == before
    r = cli("check", swapped, tmp_path / "v", ok=False)
    assert r.exit_code == 1 and "tokenizer: the vocabularies differ" in r.output
    cli("add", swapped, tmp_path / "v", "-o", tmp_path / "out", "--allow-vocab-mismatch", "-q")


def test_merge_dry_run_prints_the_report(tmp_path, tiny_models):
    q, ll = tiny_models["qwen2_tied_fp32"], tiny_models["llama_untied_fp32_sharded"]
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"target": str(q["instruct"]),
                                    "terms": [{"plus": str(q["grpo"]), "minus": str(q["sft"])}]}))
    r = cli("merge", good, "--dry-run")
    assert "target: " in r.output and "check: the inputs can be combined" in r.output
    assert "dry run: nothing was written" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"target": str(q["instruct"]),
                                   "terms": [{"model": str(ll["grpo"])}]}))
    r = cli("merge", bad, "--dry-run", ok=False)
    assert r.exit_code == 1 and "problem: t0: architecture LlamaForCausalLM" in r.output
    assert "nothing was written" in r.output.splitlines()[-1]


# ---- Hub inputs: headers by range requests -------------------------------------------------

@pytest.fixture
def fake(monkeypatch, tmp_path):
    with FakeHub(token=TOKEN) as server:
        configure_hf_client(monkeypatch, server.endpoint, home=tmp_path / "hf_home", token=TOKEN)
        monkeypatch.setattr(hub_mod, "RETRY_DELAYS", (0.0, 0.0, 0.0))
        yield server


def weight_bytes(fake, repo):
    return sum(n for k, n in fake.served.items() if k.startswith(repo) and
               k.endswith(".safetensors"))


def test_hub_inputs_are_read_header_only(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    for role in ("instruct", "grpo", "sft"):
        cli("push", m[role], f"org/{role}")
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "lr", "--rank", "2", "-q",
        "--push-to-hub", "org/lr")
    sizes = {role: sum(f.stat().st_size for f in m[role].glob("*.safetensors"))
             for role in ("instruct", "grpo", "sft")}
    fake.served.clear()
    r = cli("check", "org/instruct", "org/grpo", "org/lr", "--init")
    assert "header-only" in r.output and "check: the inputs can be combined" in r.output
    # --init read a few rows of a few tensors; nothing else but headers
    assert 0 < weight_bytes(fake, "org/instruct") < sizes["instruct"] / 2
    fake.served.clear()
    cli("check", "org/instruct", "org/grpo")
    assert weight_bytes(fake, "org/grpo") < 4096 * 4  # headers of its shards only
    manifest = tmp_path / "m.yaml"
    manifest.write_text("target: org/instruct\nterms:\n  - {plus: org/grpo, minus: org/sft}\n")
    fake.served.clear()
    r = cli("merge", manifest, "--dry-run")
    assert "bytes: read" in r.output and "header-only" in r.output
    assert all(weight_bytes(fake, f"org/{x}") < 4096 * 4 for x in ("instruct", "grpo", "sft"))
    fake.served.clear()
    r = cli("inspect", "org/grpo")
    assert "header-only" in r.output and weight_bytes(fake, "org/grpo") < 4096 * 4


# ---- lineage and what a push publishes ------------------------------------------------------

def test_lineage_from_cache_folder_trainer_card_and_vector(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    snap = tmp_path / "hub" / "models--Org--Base-1.5B" / "snapshots" / ("a" * 40)
    shutil.copytree(m["sft"], snap)
    trained = tmp_path / "grpo"
    shutil.copytree(m["grpo"], trained)
    (trained / "README.md").write_text("---\nbase_model: Org/Sft-1.5B\nlicense: mit\n---\n# x\n")
    cli("extract", trained, snap, "-o", tmp_path / "v", "-q")
    meta = front_matter((tmp_path / "v" / "README.md").read_text())
    assert meta["base_model"] == ["Org/Sft-1.5B", "Org/Base-1.5B"]
    cli("add", m["instruct"], tmp_path / "v", "-o", tmp_path / "out", "-q")
    meta = front_matter((tmp_path / "out" / "README.md").read_text())
    assert meta["base_model"] == ["Org/Sft-1.5B", "Org/Base-1.5B"]  # through the vector


def test_push_publishes_repo_id_and_folder_names(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q", "--push-to-hub", "org/vec")
    files = fake.repos["model/org/vec"].files
    card, record = files["README.md"].decode(), files["provenance.json"].decode()
    assert "mergekit-rl add TARGET_MODEL org/vec" in card
    assert str(tmp_path) not in card and str(m["grpo"]) not in card + record
    assert json.loads(record)["inputs"][0]["path"] == "grpo"
    assert str(m["grpo"]) in (tmp_path / "vec" / "provenance.json").read_text()  # local stays
    cli("push", tmp_path / "vec", "org/vec2", "--card-local-paths")
    assert str(m["grpo"]) in fake.repos["model/org/vec2"].files["provenance.json"].decode()
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "model", "-q",
        "--push-to-hub", "org/model")
    card = fake.repos["model/org/model"].files["README.md"].decode()
    assert 'from_pretrained("org/model")' in card and str(tmp_path) not in card
    state = fake.repos["model/org/model"].files
    assert "model.safetensors" in state and not any(".push-" in k for k in state)
    assert torch.tensor(1)  # the upload itself is covered by test_hub.py
