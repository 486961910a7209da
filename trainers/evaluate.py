"""Greedy generation and exact-match accuracy of a checkpoint on held-out items.

    accuracy = evaluate(model_dir, examples, max_new_tokens=48)

Prompts are rendered with the tokenizer's chat template (the assistant header is added), decoded
greedily with the KV cache from left-padded batches, and cut at the first end-of-turn token.
Scoring is `trainers.tasks.is_correct`: the final `#### N` number for word problems, the whole
stripped response for instructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import tasks
from .data import left_pad


def end_token_ids(tokenizer, model) -> list[int]:
    """The trainers' stop tokens (`runtime.stop_token_ids`) plus `<|im_end|>` when the
    tokenizer knows it, so a chat model stops at the end of its turn."""
    from .runtime import stop_token_ids

    ids = stop_token_ids(tokenizer, model)
    im_end = tokenizer.convert_tokens_to_ids(tasks.IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int = 256) -> list[str]:
    """The greedy response to each user prompt (text up to, not including, the end token)."""
    from transformers import GenerationConfig

    stops = end_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # Every knob explicit: unset fields would be filled from the model's generation_config.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True,
                              pad_token_id=pad, eos_token_id=stops, temperature=None,
                              top_p=None, top_k=None)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model.eval()
    device = next(model.parameters()).device
    responses: list[str] = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start:start + batch_size], pad)
        width = ids.shape[1]
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)[:, width:].tolist()
        for tokens in out:
            end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
            responses.append(tokenizer.decode(tokens[:end], skip_special_tokens=False))
    return responses


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
