"""PEFT adapters read as vectors: `extract ADAPTER BASE` and `add TARGET ADAPTER` against peft's
own `merge_and_unload` (the independent reference), across LoRA's variants."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import load_state, snapshot

from mergekit_rl.checkpoint import folder_kind
from mergekit_rl.cli import main

peft = pytest.importorskip("peft")


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def make_adapter(base_dir, out_dir, seed=0, **lora):
    """A LoRA adapter on `base_dir` with random (non-zero) factors, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    settings.update(lora)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_merged(target_dir, adapter_dir, keep_target_copies=False) -> dict[str, torch.Tensor]:
    """The reference: peft loads the adapter on the target and merges it. peft also loads the
    copies of embedding layers it saved (the base's weights); with keep_target_copies the
    target's own weight stands in for such a copy (merged − copy + target's), which is what
    `add` applies to a sibling."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    out = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    if keep_target_copies:
        tied = model.config.tie_word_embeddings
        copies = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                  for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
                  if ".base_layer." in k}
        if tied and "lm_head.weight" in copies:  # one shared matrix: adjust it once
            copies.setdefault("model.embed_tokens.weight", copies.pop("lm_head.weight"))
        for name, copy in copies.items():
            out[name] = out[name] - copy + own[name]
        if tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    "modules_to_save": {"modules_to_save": ["model.norm"]},
    "embeddings": {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_extract_adapter_equals_merged_minus_base(tmp_path, tiny_models, case):
    base = tiny_models["llama_untied_fp32_sharded"]["base"]
    adapter = make_adapter(base, tmp_path / "adapter", **CASES[case])
    assert folder_kind(adapter) == "adapter" and folder_kind(base) == "model"
    before = snapshot(adapter)
    cli("extract", adapter, base, "-o", tmp_path / "vec", "-q")
    assert snapshot(adapter) == before
    vec, ref, b = load_state(tmp_path / "vec"), peft_merged(base, adapter), load_state(base)
    assert set(vec) == set(b)
    changed = 0
    for k, v in vec.items():
        want = ref[k] - b[k]
        torch.testing.assert_close(v, want, rtol=0, atol=2e-7 * (1 + b[k].abs().max().item()))
        changed += bool(want.abs().max() > 0)
    assert changed >= 4  # the adapter did change something: the test can fail
    rec = json.loads((tmp_path / "vec" / "provenance.json").read_text())
    assert rec["kind"] == "vector"


@pytest.mark.parametrize("case", ["plain", "modules_to_save", "embeddings"])
def test_add_adapter_equals_peft_merge_on_another_target(tmp_path, tiny_models, case):
    m = tiny_models["llama_untied_fp32_sharded"]
    adapter = make_adapter(m["base"], tmp_path / "adapter", seed=1, **CASES[case])
    cli("add", m["instruct"], adapter, "-o", tmp_path / "out", "-q")
    out, ref = load_state(tmp_path / "out"), peft_merged(m["instruct"], adapter, True)
    assert set(out) <= set(ref)
    for k, v in out.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6), k


def test_tied_model_adapter_on_embeddings_and_head(tmp_path, tiny_models):
    # peft merges both the embedding's and the head's delta into the one shared matrix.
    m = tiny_models["qwen2_tied_fp32"]
    adapter = make_adapter(m["base"], tmp_path / "adapter",
                           target_modules=["q_proj", "embed_tokens", "lm_head"])
    cli("add", m["instruct"], adapter, "-o", tmp_path / "out", "-q")
    cli("extract", adapter, m["base"], "-o", tmp_path / "vec", "-q")
    out, ref = load_state(tmp_path / "out"), peft_merged(m["instruct"], adapter, True)
    for k, v in out.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6), k
    vec, base_ref, b = load_state(tmp_path / "vec"), peft_merged(m["base"], adapter), \
        load_state(m["base"])
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(vec[emb], base_ref[emb] - b[emb], rtol=0, atol=1e-6)


def test_add_with_alpha_scales_the_delta(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    adapter = make_adapter(m["base"], tmp_path / "adapter", seed=2)
    cli("add", m["instruct"], adapter, "-o", tmp_path / "half", "--alpha", "0.5", "-q")
    half, ref, inst = (load_state(tmp_path / "half"), peft_merged(m["instruct"], adapter),
                       load_state(m["instruct"]))
    for k, v in half.items():
        torch.testing.assert_close(v, inst[k] + 0.5 * (ref[k] - inst[k]), rtol=0, atol=1e-6)


def test_adapter_bad_inputs_one_line_nothing_written(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    q = tiny_models["qwen2_untied_bf16_sharded"]
    adapter = make_adapter(m["base"], tmp_path / "adapter", modules_to_save=["model.norm"])
    before = snapshot(tmp_path / "adapter")
    # base architecture differs from the target
    r = cli("add", q["instruct"], adapter, "-o", tmp_path / "o1", ok=False)
    assert r.exit_code == 1 and "LlamaForCausalLM" in r.output and "Qwen2ForCausalLM" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # a full weight cannot be scaled
    r = cli("add", m["instruct"], adapter, "-o", tmp_path / "o2", "--alpha", "0.5", ok=False)
    assert r.exit_code == 1 and "model.norm.weight" in r.output and "extract" in r.output
    # DoRA is not s·B·A
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
    r = cli("extract", dora, m["base"], "-o", tmp_path / "o3", ok=False)
    assert r.exit_code == 1 and "use_dora" in r.output
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))
    assert snapshot(tmp_path / "adapter") == before


def test_merge_takes_an_adapter_as_a_vector_term(tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    adapter = make_adapter(m["base"], tmp_path / "adapter", seed=3,
                           target_modules=["q_proj", "lm_head"])
    (tmp_path / "m.yaml").write_text(f"target: {m['instruct']}\nterms:\n"
                                     f"  - {{vector: {adapter}, weight: 0.5}}\n")
    cli("merge", tmp_path / "m.yaml", "-o", tmp_path / "merge", "-q")
    cli("extract", adapter, m["base"], "-o", tmp_path / "vec", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "add", "-q", "--alpha", "0.5")
    merged, added = load_state(tmp_path / "merge"), load_state(tmp_path / "add")
    for k in merged:
        torch.testing.assert_close(merged[k], added[k], rtol=0, atol=1e-6), k
    emb = "model.embed_tokens.weight"
    assert not torch.equal(merged[emb], load_state(m["instruct"])[emb])  # the tied head's delta
