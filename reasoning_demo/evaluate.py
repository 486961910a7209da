"""Greedy generation and exact-match accuracy of a checkpoint on held-out items.

    result = evaluate(model_dir, examples, max_new_tokens=48)
    result = evaluate_model(model, tokenizer, examples, 48)   # a model already in memory

Prompts are rendered with the tokenizer's chat template (the assistant header is added), decoded
greedily with the KV cache from left-padded batches, and cut at the first end-of-turn token.
Scoring is `tasks.is_correct`: the final `#### N` number for word problems, the whole
stripped response for instructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from trainers.generation import greedy, stop_token_ids

from . import tasks


def greedy_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int = 256) -> list[str]:
    """The greedy response to each user prompt (text up to, not including, the end token)."""
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer.decode(tokens, skip_special_tokens=False)
            for tokens in greedy(model, encoded, max_new_tokens, pad, stops, batch_size)]


def load(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a local checkpoint folder, in fp32, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def evaluate(path: str | Path, examples: Sequence[tasks.Example], max_new_tokens: int,
             batch_size: int = 256) -> dict:
    """Exact-match accuracy of the checkpoint at `path` on `examples`, with a few samples;
    for word problems also the share of complete solutions (`tasks.is_complete`)."""
    model, tokenizer = load(path)
    return evaluate_model(model, tokenizer, examples, max_new_tokens, batch_size)


def evaluate_model(model, tokenizer, examples: Sequence[tasks.Example], max_new_tokens: int,
                   batch_size: int = 256) -> dict:
    """`evaluate` of a model in memory (the α sweep changes its weights in place)."""
    responses = greedy_responses(model, tokenizer, [e.prompt for e in examples], max_new_tokens,
                                 batch_size)
    correct = [tasks.is_correct(r, e) for r, e in zip(responses, examples)]
    result = {"accuracy": sum(correct) / len(examples), "n": len(examples)}
    complete = [tasks.is_complete(r, e) for r, e in zip(responses, examples)
                if e.task == tasks.ARITHMETIC]
    if complete:  # word problems: the share answered with every step worked
        result["complete"] = sum(complete) / len(complete)
    result["samples"] = [{"prompt": e.prompt, "response": r, "answer": e.answer, "correct": c}
                         for e, r, c in list(zip(examples, responses, correct))[:3]]
    return result
