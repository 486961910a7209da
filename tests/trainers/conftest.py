"""Fixtures for the trainer tests: the shipped tiny configs on the shared tiny model, and a
helper that loads a shipped config with overrides pointing into `tmp_path` (no Hub access)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `grpo_rewards` importable by the tests and by `grpo_rewards:...` reward paths in configs
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests" / "train"


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
