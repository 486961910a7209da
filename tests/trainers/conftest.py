"""Fixtures for the trainer tests: one tiny local Qwen2 model, the shipped tiny data, and a
helper that loads a shipped config with overrides pointing into `tmp_path` (no Hub access)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_rl.tiny import build_model

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests" / "train"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tied Qwen2 (hidden 32, 2 layers, vocab 300), like Qwen2.5-1.5B's tying; read-only."""
    return build_model(tmp_path_factory.mktemp("trainer_model") / "base", hidden_size=32,
                       intermediate_size=64, num_layers=2, tied=True, seed=0,
                       tokenizer_dir=tokenizer_dir)


@pytest.fixture(autouse=True)
def _reward_module_importable(monkeypatch):
    """`grpo_rewards:...` reward paths in configs resolve to tests/trainers/grpo_rewards.py."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture
def load(tiny_model, tmp_path):
    """`load("sft_tiny.yaml", "train.max_steps=3", ...)`: a shipped config on the tiny model,
    writing under tmp_path, no progress bar."""
    from trainers.config import load_config
    from trainers.grpo import GRPOConfig
    from trainers.sft import SFTConfig

    def _load(name: str, *overrides: str, out: str = "run"):
        cls = GRPOConfig if name.startswith("grpo") else SFTConfig
        base = [f"model.path={tiny_model}", f"train.output_dir={tmp_path / out}",
                "train.progress_bar=false", "train.report_to=[none]"]
        return load_config(cls, MANIFESTS / name, base + list(overrides))

    return _load
