"""Reward functions for GRPO: plain callables `(prompts, completions, **columns) -> rewards`.

`prompts` and `completions` are lists of the same length (one entry per completion; a prompt
appears G times). `columns` holds the other dataset fields of each row, aligned the same way
(GSM8K: `answer`). A reward is a float, or None where the function does not apply; None is
left out of the weighted sum (like TRL's nansum).

Config names a reward by built-in name (`exact_answer`, `format`, `judge`: a generative pairwise
judge's P̄(completion ≻ anchor), `kwargs: {model: JUDGE_FOLDER, anchor: FIELD}`) or by
`module:function`.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from fractions import Fraction

RewardFunction = Callable[..., list]

_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str, last_number_fallback: bool = False) -> str | None:
    """The final answer of a solution: after the last `####`, else in the last `\\boxed{}`,
    else (optionally) the last number in the text."""
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if last_number_fallback:
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    return None


def normalize_number(text: str) -> Fraction | str:
    """`"1,234"`, `"$1234.00"`, `"\\frac{3}{4}"`, `"0.75"` -> an exact Fraction; else the text."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\\text\{[^{}]*\}|\\!|\\,|%", "", s)
    match = _NUMBER.search(s)
    if match and match.group(0) == s:
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            pass
    return s


def exact_answer(prompts: list, completions: list[str], answer: list | None = None,
                 last_number_fallback: bool = False, **columns) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference numerically, else 0.0.

    The reference is the `answer` column (a GSM8K solution ending in `#### 42`, or the bare
    answer). Rows without a reference give None.
    """
    if answer is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        reference = str(reference)
        expected = extract_answer(reference) or reference
        got = extract_answer(completion, last_number_fallback)
        ok = got is not None and normalize_number(got) == normalize_number(expected)
        rewards.append(1.0 if ok else 0.0)
    return rewards


def format_reward(prompts: list, completions: list[str], pattern: str | None = None,
                  **columns) -> list[float]:
    """1.0 when the completion is well formed, else 0.0.

    Default: it states a final answer as `#### <answer>` or `\\boxed{<answer>}`. With `pattern`,
    a regex the whole completion must match (re.DOTALL), e.g. R1's
    `<think>.*?</think>\\s*<answer>.*?</answer>`.
    """
    if pattern is not None:
        compiled = re.compile(pattern, re.DOTALL)
        return [1.0 if compiled.fullmatch(c.strip()) else 0.0 for c in completions]
    return [1.0 if extract_answer(c) else 0.0 for c in completions]


def check_rewards(values, count: int, what: str) -> list[float | None]:
    """What a reward function returned, checked once for every caller (GRPO, the samplers): a
    list or tuple of `count` numbers or None (bools are refused: a predicate is not a score).
    NaN is read as None: no reward for that completion. Errors name `what` returned it."""
    from .errors import TrainerConfigError

    if not isinstance(values, (list, tuple)) or len(values) != count:
        size = len(values) if hasattr(values, "__len__") else "?"
        raise TrainerConfigError(f"{what}: returned {type(values).__name__} of length {size} for "
                                 f"{count} completions; expected a list of floats")
    out: list[float | None] = []
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TrainerConfigError(f"{what}: value {v!r} is not a number or None")
        out.append(None if v is None or v != v else float(v))
    return out


BUILTIN: dict[str, RewardFunction] = {"exact_answer": exact_answer, "format": format_reward}
# Rewards built from their kwargs (a model to load): name -> (module, factory).
FACTORIES = {"judge": ("trainers.judging", "judge_reward")}  # P̄(completion ≻ anchor column)


def resolve_reward(name: str, kwargs: dict | None = None) -> RewardFunction:
    """A built-in by name, or `package.module:function` (also `package.module.function`).

    Raises ValueError naming the reward when it cannot be imported or is not callable.
    """
    if name in FACTORIES:  # checks its kwargs now; any model loads on the first call
        module_name, factory = FACTORIES[name]
        try:
            return getattr(importlib.import_module(module_name), factory)(**(kwargs or {}))
        except TypeError as e:
            raise ValueError(f"reward {name!r}: {e}") from None
    if name in BUILTIN:
        fn = BUILTIN[name]
    else:
        module_name, sep, attr = name.partition(":")
        if not sep:
            module_name, _, attr = name.rpartition(".")
        if not module_name or not attr:
            raise ValueError(f"reward {name!r} is not a built-in ({', '.join(BUILTIN)}) "
                             "nor a module:function path")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r} cannot be imported ({e})") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return functools.partial(fn, **kwargs) if kwargs else fn
