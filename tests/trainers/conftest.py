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


def write_pairs(path: Path, kind: str) -> Path:
    """Preference pairs over the tiny arithmetic rows, written to `path`:

    - "complete": the worked solution against the same solution without its `####` line (a
      flawed solution that stops short, as half the demo's are);
    - "incomplete": the same pairs with chosen and rejected swapped;
    - "digits": a random digit string against a random letter string (what a tiny policy can
      learn to produce in a few steps; the anchor `source` column holds words)."""
    import json
    import random

    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    with path.open("w") as f:
        for r in rows:
            if kind == "digits":
                n = rng.randint(3, 10)
                good = "".join(rng.choice("0123456789 ") for _ in range(n))
                bad = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
            else:
                good, bad = r["answer"], r["answer"].split("\n")[0]
                if kind == "incomplete":
                    good, bad = bad, good
            f.write(json.dumps({"prompt": r["question"], "chosen": good, "rejected": bad}) + "\n")
    return path


@pytest.fixture(scope="session")
def digit_judge(tiny_model, tmp_path_factory) -> Path:
    """A judge trained (30 steps) to prefer digits over letters; read-only for the tests."""
    from trainers.config import load_config
    from trainers.judge import JudgeConfig, train_judge

    root = tmp_path_factory.mktemp("digit_judge")
    pairs = write_pairs(root / "pairs.jsonl", "digits")
    config = load_config(JudgeConfig, MANIFESTS / "judge_tiny.yaml", [
        f"model.path={tiny_model}", f"data.path={pairs}", f"train.output_dir={root / 'judge'}",
        "train.progress_bar=false", "train.report_to=[none]", "train.max_steps=30",
        "train.batch_size=16", "train.micro_batch_size=16", "train.save_steps=null",
        "optim.lr=3e-3", "judge.eval_size=32"])
    return train_judge(config)
