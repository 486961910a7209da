"""Reward functions the GRPO tests name by `grpo_rewards:<function>` in their configs."""

from __future__ import annotations

import os
import signal

CALLS = {"count": 0}


def digit_fraction(prompts, completions, **columns):
    """Trivial reward: the share of characters that are digits (the tiny vocabulary is full of
    digit tokens, so a few steps of GRPO raise it)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def sigterm_at(prompts, completions, call: int = 0, **columns):
    """Reward 0 everywhere; sends SIGTERM to this process on its `call`-th call (1-based)."""
    CALLS["count"] += 1
    if CALLS["count"] == call:
        os.kill(os.getpid(), signal.SIGTERM)
    return [0.0] * len(completions)


def not_applicable(prompts, completions, **columns):
    return [None] * len(completions)
