"""Every trainer and sampler by name: the one table the CLI, the experiment and the benchmarks
read. A new trainer is one line here (module, config class, function) and one command in
`trainers.cli`."""

from __future__ import annotations

import importlib
from pathlib import Path

TRAINERS = {"sft": ("trainers.sft", "SFTConfig", "train_sft"),
            "grpo": ("trainers.grpo", "GRPOConfig", "train_grpo"),
            "wpo": ("trainers.wpo", "WPOConfig", "train_wpo"),
            "judge": ("trainers.judge", "JudgeConfig", "train_judge"),
            "pairwise": ("trainers.pairwise", "PairwiseConfig", "train_pairwise")}
SAMPLERS = {"pairs": ("trainers.sampling", "SamplePairsConfig", "sample_pairs"),
            "rso": ("trainers.sampling", "SampleRSOConfig", "sample_rso")}


def lookup(kind: str) -> tuple[type, object]:
    """(config class, function) of a trainer or sampler."""
    module_name, config_name, fn_name = {**TRAINERS, **SAMPLERS}[kind]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, fn_name)


def load(kind: str, path: str | Path, overrides=()):
    """The validated config of trainer or sampler `kind` from a YAML file and `--set` items."""
    from .config import load_config
    from .sampling import load_sample_config

    config_cls, _ = lookup(kind)
    loader = load_sample_config if kind in SAMPLERS else load_config
    return loader(config_cls, path, overrides)


def run(kind: str, config, resume: str | None = None) -> Path:
    """Run a loaded config, exactly as `mergekit-rl train|sample KIND` does."""
    _, fn = lookup(kind)
    return fn(config) if kind in SAMPLERS else fn(config, resume=resume)
