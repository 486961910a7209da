"""Greedy evaluation: batched, left-padded `generate` against a one-prompt-at-a-time argmax loop,
and the scores against hand-counted ones."""

from __future__ import annotations

import torch

from reasoning_demo import evaluate as ev
from reasoning_demo import tasks
from trainers.generation import stop_token_ids

PROMPTS = ["Ann has 23 pens. She buys 15 more. How many pens does Ann have now?",
           "Sort the words: owl cat sun", "Reverse the words: a b c d e f g h"]


@torch.no_grad()
def argmax_loop(model, tokenizer, prompt: str, steps: int, stops: list[int]) -> str:
    """Greedy decoding by hand: no padding, no cache, stop at the first stop token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(steps):
        token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token in stops:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=False)


def test_batched_greedy_equals_an_argmax_loop(tiny_model):
    model, tokenizer = ev.load(tiny_model)
    stops = sorted(stop_token_ids(tokenizer, model))
    assert tokenizer.convert_tokens_to_ids(tasks.IM_END) in stops
    want = [argmax_loop(model, tokenizer, p, 12, stops) for p in PROMPTS]
    # prompts of different lengths share a left-padded batch; batch_size=2 splits them too
    assert ev.greedy_responses(model, tokenizer, PROMPTS, 12, batch_size=2) == want


def test_scores_are_counted_per_task(tiny_model, monkeypatch):
    examples = [
        tasks.Example(tasks.ARITHMETIC, PROMPTS[0], "", "38"),
        tasks.Example(tasks.ARITHMETIC, "Ben has 20 cards. He loses 4. Then he buys 3 bags of "
                      "2 cards. How many cards does Ben have now?", "", "22"),
        tasks.Example(tasks.ARITHMETIC, PROMPTS[0], "", "38"),
        tasks.Example(tasks.INSTRUCTION, PROMPTS[1], "", "cat owl sun"),
    ]
    responses = ["23+15=38\n#### 38",  # right and complete
                 "20-4=16\n#### 16",  # one step short (the bags step has two lines): wrong
                 "#### 38",  # right answer, no working: not complete
                 " cat owl sun "]  # right (stripped)
    monkeypatch.setattr(ev, "greedy_responses", lambda *a, **k: responses)
    result = ev.evaluate(tiny_model, examples, 8)
    assert result["accuracy"] == 3 / 4 and result["n"] == 4
    assert result["complete"] == 1 / 3  # of the three word problems
    assert [s["correct"] for s in result["samples"]] == [True, False, True]
    monkeypatch.setattr(ev, "greedy_responses", lambda *a, **k: responses[3:])
    assert "complete" not in ev.evaluate(tiny_model, examples[3:], 8)
