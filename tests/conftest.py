"""Shared fixtures: tiny local models (no Hub access), built once per session.

`tiny_models[variant][role]` is the directory of one model, for variants

- `qwen2_tied_fp32`: Qwen2, lm_head tied to the embedding (no `lm_head.weight`), float32, one file;
- `qwen2_untied_bf16_sharded`: Qwen2, untied, bfloat16, >= 3 shards with an index;
- `llama_untied_fp32_sharded`: Llama, untied, float32, >= 3 shards with an index;

and roles `base`, `sft` (base + noise), `grpo` (sft + noise, as GRPO starts from the SFT model)
and `instruct` (a separate sibling of base). The directories are shared by the whole session:
tests must not write into them, which the fixture checks when the session ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `helpers` importable whatever the import mode

from helpers import load_state, snapshot

from reasoning_demo.tiny import build_model, build_tokenizer, finetune_copy

__all__ = ["load_state", "snapshot"]

SHARD_SIZE = "20KB"  # small enough for >= 3 shards of these models
VARIANTS = {
    "qwen2_tied_fp32": {"arch": "qwen2", "tied": True, "dtype": torch.float32},
    "qwen2_untied_bf16_sharded": {
        "arch": "qwen2",
        "tied": False,
        "dtype": torch.bfloat16,
        "max_shard_size": SHARD_SIZE,
    },
    "llama_untied_fp32_sharded": {
        "arch": "llama",
        "tied": False,
        "dtype": torch.float32,
        "max_shard_size": SHARD_SIZE,
    },
}
ROLES = ("base", "sft", "grpo", "instruct")


@pytest.fixture(scope="session", autouse=True)
def tokenised_data_cache(tmp_path_factory):
    """The trainers' tokenised-data cache in a session folder, never in ~/.cache."""
    import os

    old = os.environ.get("MERGEKIT_RL_CACHE")
    os.environ["MERGEKIT_RL_CACHE"] = str(tmp_path_factory.mktemp("mergekit_rl_cache"))
    yield
    if old is None:
        os.environ.pop("MERGEKIT_RL_CACHE", None)
    else:
        os.environ["MERGEKIT_RL_CACHE"] = old


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Directory with the shared tiny tokenizer (tokenizer.json, config, chat template)."""
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, dict[str, Path]]:
    """`{variant: {"base"|"sft"|"grpo"|"instruct": model directory}}`, read-only by contract."""
    root = tmp_path_factory.mktemp("tiny_models")
    models: dict[str, dict[str, Path]] = {}
    for variant, options in VARIANTS.items():
        base = build_model(root / variant / "base", seed=0, tokenizer_dir=tokenizer_dir, **options)
        shard = options.get("max_shard_size")
        sft = finetune_copy(base, root / variant / "sft", seed=1, max_shard_size=shard)
        grpo = finetune_copy(sft, root / variant / "grpo", seed=2, max_shard_size=shard)
        instruct = finetune_copy(base, root / variant / "instruct", seed=3, max_shard_size=shard)
        models[variant] = {"base": base, "sft": sft, "grpo": grpo, "instruct": instruct}
    before = snapshot(root)
    yield models
    changed = sorted(set(before.items()) ^ set(snapshot(root).items()))
    assert not changed, f"tests modified the shared tiny models: {changed}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tied Qwen2 (hidden 32, 2 layers, vocab 300), like Qwen2.5-1.5B's tying; read-only."""
    return build_model(tmp_path_factory.mktemp("trainer_model") / "base", hidden_size=32,
                       intermediate_size=64, num_layers=2, tied=True, seed=0,
                       tokenizer_dir=tokenizer_dir)
