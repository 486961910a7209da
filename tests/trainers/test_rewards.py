"""Built-in rewards and reward resolution."""

from __future__ import annotations

import pytest

from trainers.rewards import (
    exact_answer,
    extract_answer,
    format_reward,
    normalize_number,
    resolve_reward,
)

GSM8K_REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


@pytest.mark.parametrize("completion, expected", [
    ("so the answer is\n#### 72", 1.0),
    ("#### 72.00", 1.0),
    ("She sold $72 in total. \\boxed{72}", 1.0),
    ("#### 1,072", 0.0),
    ("The answer is 72.", 0.0),  # no marker: strict by default
    ("#### 71", 0.0),
])
def test_exact_answer_gsm8k(completion, expected):
    assert exact_answer(["p"], [completion], answer=[GSM8K_REFERENCE]) == [expected]


def test_exact_answer_fallback_none_and_numbers():
    assert exact_answer(["p"], ["The answer is 72."], answer=["72"],
                        last_number_fallback=True) == [1.0]
    assert exact_answer(["p", "q"], ["#### 1", "#### 2"], answer=[None, "2"]) == [None, 1.0]
    assert exact_answer(["p"], ["#### 1"]) == [None]  # no answer column at all
    assert normalize_number("\\frac{3}{4}") == normalize_number("0.75")
    assert normalize_number("1,234") == normalize_number("$1234.00")
    assert extract_answer("\\boxed{\\frac{1}{2}} and more") == "\\frac{1}{2}"


def test_format_reward():
    assert format_reward([], ["x\n#### 3", "\\boxed{4}", "no answer"]) == [1.0, 1.0, 0.0]
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    assert format_reward([], ["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>"],
                         pattern=pattern) == [1.0, 0.0]


def test_resolve_reward():
    assert resolve_reward("exact_answer") is exact_answer
    fn = resolve_reward("trainers.rewards:format_reward", {"pattern": "a+"})
    assert fn([], ["aaa", "b"]) == [1.0, 0.0]
    assert resolve_reward("trainers.rewards.exact_answer") is exact_answer
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_reward("no_such_module:fn")
    with pytest.raises(ValueError, match="not a built-in"):
        resolve_reward("typo")
