"""mergekit_rl: streaming task-vector arithmetic. The commands live in `mergekit_rl.cli`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MERGEKIT_RL_CACHE"


def cache_root() -> Path:
    """Where mergekit_rl and its trainers keep what they can rebuild (compiled kernels,
    tokenised data): $MERGEKIT_RL_CACHE, else ~/.cache/mergekit_rl. Safe to delete."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergekit_rl").expanduser()
