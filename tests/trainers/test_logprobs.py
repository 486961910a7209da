"""`token_logprobs` against a plain full-vocabulary log-softmax, with and without padding."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from trainers.logprobs import token_logprobs


def reference(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from an unpadded forward, the textbook way."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_matches_reference_with_left_and_right_padding(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    a, b = [5, 17, 30, 44, 2, 9], [7, 8, 120]
    # row 0: no padding; row 1: left-padded prompt [7, 8], completion [120], right padding
    ids = torch.tensor([a, [0, 0, 7, 8, 120, 0]])
    attention = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0]])
    with torch.no_grad():
        out = token_logprobs(model, ids, attention, completion)
        ref_a, ref_b = reference(model, a), reference(model, b)
    torch.testing.assert_close(out[0, 3:], ref_a[2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 4], ref_b[1], atol=1e-5, rtol=0)
    assert (out[0, :3] == 0).all() and (out[1, [0, 1, 2, 3, 5]] == 0).all()


def test_default_mask_and_temperature(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = [3, 4, 5, 6]
    with torch.no_grad():
        out = token_logprobs(model, torch.tensor([ids]), torch.ones(1, 4, dtype=torch.long))
        hot = token_logprobs(model, torch.tensor([ids]), torch.ones(1, 4, dtype=torch.long),
                             temperature=2.0)
        logits = model(torch.tensor([ids])).logits[0, :-1] / 2.0
    torch.testing.assert_close(out[0, 1:], reference(model, ids), atol=1e-5, rtol=0)
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(hot[0, 1:], expected, atol=1e-5, rtol=0)
