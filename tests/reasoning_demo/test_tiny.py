"""The tiny models and tokenizer the other tests are built on."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_state, shard_files, snapshot
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning_demo.tiny import IM_END, IM_START, build_model, build_tokenizer, finetune_copy

VARIANTS = ["qwen2_tied_fp32", "qwen2_untied_bf16_sharded", "llama_untied_fp32_sharded"]
TEXTS = [
    "12 + 345 = 357",
    "Hello  world\n\n  indented\tline",
    "It's 2025!! The cat reads a book.",
    "café naïve\r\n",
    f"{IM_START}user\nWhat is 3 + 4?{IM_END}\n",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_models_reload_and_generate(tiny_models, variant):
    path = tiny_models[variant]["base"]
    dtype = load_state(path)["model.embed_tokens.weight"].dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer("1 + 2 =", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    # The model sees exactly the tensors the reference reader finds in the files.
    loaded = model.state_dict()
    for name, tensor in load_state(path).items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_ids_stable_across_reload(tiny_models, tokenizer_dir, variant):
    reference = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    in_model = AutoTokenizer.from_pretrained(tiny_models[variant]["base"])
    if variant.startswith("qwen2"):  # the SPEC §4 pitfall: transformers rebuilds Qwen's tokenizer
        assert type(in_model).__name__ == "Qwen2Tokenizer"
    for text in TEXTS:
        ids = reference.encode(text).ids
        assert plain.encode(text) == ids
        assert in_model.encode(text) == ids
        assert in_model.decode(ids) == text
    assert len(in_model) == len(plain) == 300
    assert in_model.convert_tokens_to_ids([in_model.eos_token, IM_START, IM_END]) == [0, 1, 2]
    assert in_model.pad_token_id == 0


def test_tokenizer_chat_template(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tokenizer_dir / "chat_template.jinja").is_file()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"


def test_tokenizer_accepts_corpus(tmp_path):
    tokenizer = build_tokenizer(tmp_path, corpus=["abc abc abd"] * 10, vocab_size=262)
    assert len(tokenizer) == 262


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_head_present_only_when_untied(tiny_models, variant):
    for role, path in tiny_models[variant].items():
        names = set(load_state(path))
        assert ("lm_head.weight" in names) == ("untied" in variant), role
        assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] == (
            "untied" not in variant
        )


def test_tied_model_stays_tied(tiny_models):
    path = tiny_models["qwen2_tied_fp32"]["grpo"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_shard_layout_and_dtype(tiny_models, variant):
    expected = torch.bfloat16 if "bf16" in variant else torch.float32
    layouts = set()
    for role, path in tiny_models[variant].items():
        files = shard_files(path)
        if "sharded" in variant:
            assert (path / "model.safetensors.index.json").is_file()
            assert len(files) >= 3
            assert all(f.name.startswith("model-0000") for f in files)
        else:
            assert [f.name for f in files] == ["model.safetensors"]
        assert {t.dtype for t in load_state(path).values()} == {expected}, role
        layouts.add(tuple(f.name for f in files))
    assert len(layouts) == 1  # fine-tuned siblings keep the base's sharding


@pytest.mark.parametrize("variant", VARIANTS)
def test_siblings_differ_in_every_tensor(tiny_models, variant):
    states = {role: load_state(path) for role, path in tiny_models[variant].items()}
    base = states["base"]
    for tensor in base.values():
        assert tensor.float().unique().numel() > 1  # no all-ones norms, no all-zero biases
    for role in ("sft", "grpo", "instruct"):
        assert {k: v.shape for k, v in states[role].items()} == {
            k: v.shape for k, v in base.items()
        }
        for name, tensor in states[role].items():
            assert not torch.equal(tensor, base[name]), (role, name)
    if "fp32" in variant:
        delta = (
            states["sft"]["model.layers.0.mlp.up_proj.weight"]
            - base["model.layers.0.mlp.up_proj.weight"]
        )
        assert delta.std().item() == pytest.approx(0.01, rel=0.2)


def test_builds_are_deterministic(tmp_path, tokenizer_dir, tiny_models):
    kwargs = {"arch": "llama", "max_shard_size": "20KB", "tokenizer_dir": tokenizer_dir}
    a = load_state(build_model(tmp_path / "a", seed=0, **kwargs))
    b = load_state(build_model(tmp_path / "b", seed=1, **kwargs))
    assert all(not torch.equal(a[name], b[name]) for name in a)
    reference = load_state(tiny_models["llama_untied_fp32_sharded"]["base"])
    assert all(torch.equal(a[name], reference[name]) for name in reference)
    sft = load_state(finetune_copy(tmp_path / "a", tmp_path / "sft", seed=1))
    reference = load_state(tiny_models["llama_untied_fp32_sharded"]["sft"])
    assert all(torch.equal(sft[name], reference[name]) for name in reference)


def test_unknown_arch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="arch 'gpt2'"):
        build_model(tmp_path, arch="gpt2")


def test_snapshot_sees_changes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"abc")
    before = snapshot(tmp_path)
    assert set(before) == {"sub/x.bin"}
    assert snapshot(tmp_path) == before
    (tmp_path / "sub" / "x.bin").write_bytes(b"abd")
    assert snapshot(tmp_path) != before
