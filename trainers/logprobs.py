"""Per-token log-probabilities of a causal LM, the quantity every loss here is built from.

`log π(y_t | x, y_<t)` is read from the logits at position t-1. Only the positions that predict
completion tokens go through the LM head (`logits_to_keep`), and the log-softmax is taken one
row block at a time in float32, so a [B, T, V] float32 tensor is never materialised whole.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 8  # sequences per log-softmax block: bounds the float32 copy of the logits


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits)[..., index]` in float32 without a full [B, T, V] float32 copy.

    logits: [B, T, V], index: [B, T] -> [B, T]
    """
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], ROW_BLOCK):
        block = logits[start:start + ROW_BLOCK].float()  # [b, T, V]
        picked = block.gather(-1, index[start:start + ROW_BLOCK].unsqueeze(-1)).squeeze(-1)
        out[start:start + ROW_BLOCK] = picked - torch.logsumexp(block, dim=-1)
    return out


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor | None = None, temperature: float = 1.0
                   ) -> torch.Tensor:
    """`out[b, t] = log π(input_ids[b, t] | input_ids[b, :t])` where `completion_mask` is set.

    input_ids, attention_mask, completion_mask: [B, T] -> [B, T] float32, 0 where the mask is 0
    and at t = 0 (no prediction). Logits are divided by `temperature`, so that GRPO's ratios are
    taken against the distribution the completions were sampled from.
    """
    batch, length = input_ids.shape
    if completion_mask is None:
        completion_mask = attention_mask.clone()
        completion_mask[:, 0] = 0
    columns = completion_mask.bool().any(0).nonzero()
    start = max(int(columns[0]) if len(columns) else length, 1)  # first predicted position
    out = torch.zeros(batch, length, dtype=torch.float32, device=input_ids.device)
    if start >= length:
        return out
    keep = length - start + 1  # logits at positions start-1 .. T-1 (the last is dropped)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask),
                   logits_to_keep=keep, use_cache=False).logits[:, :-1]  # [B, T-start, V]
    if temperature != 1.0:
        logits = logits / temperature
    out[:, start:] = selective_log_softmax(logits, input_ids[:, start:])
    return out * completion_mask.to(out.dtype)
