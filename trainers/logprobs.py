"""Per-token log-probabilities of a causal LM, the quantity every loss here is built from.

`log π(y_t | x, y_<t)` is read from the logits at position t-1. Only the positions from the
first completion token on go through the LM head (`logits_to_keep`). When those logits would be
larger than `CHUNK_ELEMENTS` (16 MiB of float32; at Qwen2.5's 151,936-token vocabulary 27
tokens), the head runs inside the model's own forward (so under FSDP its weights are whole
there) through `ChunkedLogprob`: in chunks of up to `TOKEN_CHUNK` tokens, each by tiles of a
block of vocabulary rows (`tile_rows`: 8 MiB of float32 logits on the CPU, 64 MiB on an
accelerator), with an online log-sum-exp, so each chunk reads the head once and only a tile's
logits exist at a time; per token only the log-sum-exp is kept, and backward recomputes each
tile's logits. Neither the [B, T, V] logits nor their float32 copy ever exists whole. Smaller
batches take the plain path.

WPO's alignment normaliser is taken on the same tiles: `log Σ_v π(v)² = logsumexp(2z) −
2·logsumexp(z)` (sampled) or `max z − logsumexp(z)` (greedy), detached.

The step code passes `start` (the first completion column, a host-side int the collate step
knows): finding it from the mask would be a host sync inside the step.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

ROW_BLOCK = 8  # sequences per log-softmax block of the plain path
CHUNK_ELEMENTS = 2 ** 22  # logits the plain path may hold whole: 16 MiB in float32
TOKEN_CHUNK = 2048  # tokens per chunk of the tiled LM head (each chunk reads the head once)
# logits per tile of the tiled LM head: 8 MiB of float32 on the CPU (lean, cache-sized), 64 MiB
# on an accelerator (fewer, larger matmuls and kernel launches)
TILE_ELEMENTS = 2 ** 21
ACCELERATOR_TILE_ELEMENTS = 2 ** 24
# Config fields of models whose forward changes the head's output (softcapping, scaling): the
# chunked head would bypass that, so such models take the plain path.
POSTPROCESSED = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_tokens(vocab: int, chunk_size: int | None) -> int:
    """Positions up to which the head's logits are taken whole (the plain path)."""
    return chunk_size or max(1, CHUNK_ELEMENTS // vocab)


def tile_rows(chunk: int, tokens: int, device_type: str) -> int:
    """Vocabulary rows per tile of a `chunk`-token chunk (of `tokens` in all) on a device."""
    elements = TILE_ELEMENTS if device_type == "cpu" else ACCELERATOR_TILE_ELEMENTS
    return max(1, elements // max(1, min(chunk, tokens)))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def first_completion_column(completion_mask: torch.Tensor) -> int:
    """The first column with a completion token (a host sync: keep it out of step code)."""
    columns = completion_mask.bool().any(0).nonzero()
    return max(int(columns[0]) if len(columns) else completion_mask.shape[1], 1)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits)[..., index]` in float32, a row block at a time.

    logits: [B, T, V], index: [B, T] -> [B, T]
    """
    out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], ROW_BLOCK):
        block = logits[start:start + ROW_BLOCK].float()  # [b, T, V]
        picked = block.gather(-1, index[start:start + ROW_BLOCK].unsqueeze(-1)).squeeze(-1)
        out[start:start + ROW_BLOCK] = picked - torch.logsumexp(block, dim=-1)
    return out


def _label_in_tile(labels: torch.Tensor, lo: int, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's column in the tile of rows lo .. lo+width (clamped), and whether it is in."""
    local = labels - lo
    return local.clamp(0, width - 1), (local >= 0) & (local < width)


def _tile_stats(z: torch.Tensor, labels: torch.Tensor, lo: int, state: dict,
                squares: bool) -> None:
    """Fold a tile's logits z [c, b] (vocabulary rows lo .. lo+b) into a token chunk's running
    statistics, overwriting z: the running maximum m, Σ e^(z−m) (and with `squares`
    Σ e^(2(z−m)), for sampled alignment and a deferred head gradient's bound, from the same
    exponentials squared in place), and the label's logit where the
    label falls in the tile. An online log-sum-exp: each tile rescales the sums by e^(m_old −
    m_new). No other [c, b] temporary (`torch.logsumexp` would make a second)."""
    index, inside = _label_in_tile(labels, lo, z.shape[1])
    picked = z.gather(-1, index[:, None])[:, 0]
    state["picked"] = torch.where(inside, picked, state["picked"])
    peak = torch.maximum(state["peak"], z.amax(dim=-1))
    rescale = (state["peak"] - peak).exp_()  # 0 at the first tile (its old peak is −inf)
    z.sub_(peak[:, None]).exp_()
    state["sum"] = state["sum"] * rescale + z.sum(-1)
    if squares:
        state["sum2"] = state["sum2"] * rescale.square_() + z.square_().sum(-1)
    state["peak"] = peak


class ChunkedLogprob(torch.autograd.Function):
    """logp[n] = log_softmax(h[n] Wᵀ + b)[y[n]] / τ-tempered, in tiles of `chunk` tokens by
    `block` vocabulary rows (None: `tile_rows`).

    Each token chunk reads the head once, a block of rows at a time, and keeps per token only a
    running log-sum-exp (`_tile_stats`); backward recomputes each tile's logits:
    ∂logp/∂z = onehot(y) − softmax(z), so ∂h = g·(onehot − p)·W/τ and ∂W = Σ g·(onehot − p)ᵀh/τ,
    the rows of ∂W a tile at a time. Under autocast the matmuls run in the autocast dtype (a
    block of the head cast at a time), the softmax in float32 (or wider).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk, alignment, block=None,
                rows=None):
        """`rows(lo, hi)`: the head's rows lo .. hi from elsewhere (a reference streamed from
        its file, `models.StreamedVocabulary`; `weight` is then a stand-in of its shape, and
        there is no backward)."""
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if _autocast_on(device_type) \
            else weight.dtype
        wide = torch.promote_types(dtype, torch.float32)  # the softmax's dtype
        block = block or tile_rows(chunk, hidden.shape[0], device_type)
        vocab = weight.shape[0]
        logp = torch.empty(labels.shape, dtype=wide, device=hidden.device)
        lse = torch.empty_like(logp)
        norms = torch.zeros_like(logp)
        # a deferred head gradient (`headgrad`) bounds its norm by ‖onehot − p‖² per token,
        # 1 − 2·p_y + Σ p², from the same squared exponentials as WPO's normaliser
        deferred = ctx.needs_input_grad[1] and hasattr(weight, "deferred_grad")
        squares = alignment == "sampled" or deferred
        spread = torch.zeros_like(logp) if deferred else None
        with _no_autocast(device_type):
            for s in range(0, hidden.shape[0], chunk):
                h, y = hidden[s:s + chunk].to(dtype), labels[s:s + chunk]
                state = {"peak": torch.full(y.shape, float("-inf"), dtype=wide,
                                            device=h.device)}
                state["sum"] = torch.zeros_like(state["peak"])
                state["sum2"] = torch.zeros_like(state["peak"])
                state["picked"] = torch.zeros_like(state["peak"])
                for lo in range(0, vocab, block):
                    w = rows(lo, min(lo + block, vocab)) if rows is not None \
                        else weight[lo:lo + block]
                    z = _logits(h, w,
                                None if bias is None else bias[lo:lo + block], dtype,
                                temperature)  # [c, b] in float32
                    _tile_stats(z, y, lo, state, squares)
                    del z  # before the next tile's logits exist: one [c, b] at a time
                log_sum = state["sum"].log()
                chunk_lse = state["peak"] + log_sum
                lse[s:s + chunk] = chunk_lse
                logp[s:s + chunk] = state["picked"] - chunk_lse
                if alignment == "sampled":  # log Σ π² = log Σ e^(2(z−m)) − 2·log Σ e^(z−m)
                    norms[s:s + chunk] = state["sum2"].log() - 2 * log_sum
                elif alignment == "greedy":  # log max π
                    norms[s:s + chunk] = state["peak"] - chunk_lse
                if deferred:
                    spread[s:s + chunk] = (1 - 2 * logp[s:s + chunk].exp() + state["sum2"]
                                           / state["sum"].square()).clamp_(min=0)
        ctx.spread = spread
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.settings = (temperature, chunk, block, dtype, rows is not None)
        ctx.mark_non_differentiable(norms)
        return logp, norms

    @staticmethod
    def backward(ctx, grad_logp, grad_norms):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        temperature, chunk, block, dtype, streamed = ctx.settings
        if streamed:
            raise RuntimeError("a head streamed from its file (a frozen reference) has no "
                               "backward")
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        wide = lse.dtype
        vocab = weight.shape[0]
        # `model.lm_head_grad: deferred` (`headgrad.HeadGradient`): ∂W is formed at the step
        # from what is recorded here; only ∂h (and the bias's) are made now
        deferred = getattr(weight, "deferred_grad", None) if need_w else None
        if deferred is not None:
            deferred.record(hidden, labels, lse, grad_logp, temperature, dtype, ctx.spread)
            need_w = False
        # the tied head of an unsharded policy (`models.sparse_tied_embedding_grad`) adds its
        # gradient into the accumulated `.grad` in place, made here at a step's first
        # micro-batch: no second [V, H] buffer (returned, autograd would add the lookup's sparse
        # gradient to it out of place, into a third)
        in_place = need_w and getattr(weight, "grad_in_place", False) and \
            (weight.grad.dtype if weight.grad is not None else weight.dtype) == wide
        if in_place and weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad_w = weight.grad if in_place else \
            torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) \
            if need_b and bias is not None else None
        with _no_autocast(hidden.device.type):
            for s in range(0, hidden.shape[0], chunk):
                h, y = hidden[s:s + chunk], labels[s:s + chunk]
                g = grad_logp[s:s + chunk, None].to(wide) / temperature  # [c, 1]
                h_low = h.to(dtype)
                gh = torch.zeros(h.shape, dtype=wide, device=h.device) if need_h else None
                for lo in range(0, vocab, block):
                    w = weight[lo:lo + block].to(dtype)
                    dz = logit_grad(h_low, w, None if bias is None else bias[lo:lo + block],
                                    lse[s:s + chunk], g, y, lo, dtype, temperature)
                    if grad_b is not None:
                        grad_b[lo:lo + block] += dz.sum(0)
                    if need_w:  # before dz is cast: in place in the softmax's dtype
                        add_weight_grad(grad_w[lo:lo + block], dz, h, dtype)
                    if need_h:
                        gh += dz.to(dtype) @ w
                    del dz  # before the next tile's logits exist: one [c, b] at a time
                if need_h:
                    grad_h[s:s + chunk] = gh.to(hidden.dtype)
        return (grad_h, grad_w.to(weight.dtype) if need_w and not in_place else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None,
                None, None)


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and \
        torch.is_autocast_enabled(device_type)


def _no_autocast(device_type: str):
    """The chunk's casts are explicit; autocast off (where the device has it at all)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _logits(h, w, bias, dtype, temperature) -> torch.Tensor:
    """A chunk's logits in float32 (or wider), a fresh tensor the caller may overwrite; the bias
    and temperature are applied in place (no second [c, V])."""
    z = h.to(dtype) @ w.to(dtype).t()
    if bias is not None:
        z.add_(bias.to(dtype))
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z.div_(temperature) if temperature != 1.0 else z


def logit_grad(h_low, w, bias, lse, g, labels, lo: int, dtype, temperature) -> torch.Tensor:
    """∂/∂z of Σ g·logp over a tile (vocabulary rows lo .. lo+b of the head, `w`, `bias`):
    g·(onehot(y) − softmax(z)) [c, b] in the softmax's dtype, recomputed from the tile's logits
    and the saved log-sum-exp; `g` is [c, 1] (∂loss/∂logp / τ)."""
    z = _logits(h_low, w, bias, dtype, temperature)
    dz = z.sub_(lse[:, None]).exp_().mul_(-g)  # −g·softmax, in place
    index, inside = _label_in_tile(labels, lo, z.shape[1])
    return dz.scatter_add_(-1, index[:, None], g * inside[:, None])  # + g at the label


def add_weight_grad(out: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, dtype) -> None:
    """out += dzᵀh for a tile's rows of ∂W: in place when the matmuls run in the softmax's
    dtype (no second tile), else through a `dtype` matmul (autocast), widened."""
    if dtype == out.dtype:
        out.addmm_(dz.t(), h.to(out.dtype))
    else:
        out += (dz.to(dtype).t() @ h.to(dtype)).to(out.dtype)


def _chunked_only(head: torch.nn.Linear) -> bool:
    """A head whose weight is not whole in memory (streamed from its file) or whose gradient is
    deferred (`headgrad`) runs chunked at any size."""
    return hasattr(head, "streamed_rows") or hasattr(head.weight, "deferred_grad")


def output_head(model):
    """The LM head the forward calls, found through DDP/FSDP/DeepSpeed/peft wrappers and the
    LoRA reference; None when only the plain path is safe."""
    owner = model.head_owner() if hasattr(model, "head_owner") else model
    while hasattr(owner, "module") and not hasattr(owner, "get_output_embeddings"):
        owner = owner.module  # DDP, DeepSpeed engines
    config = getattr(owner, "config", None)
    if any(getattr(config, name, None) for name in POSTPROCESSED):
        return None
    head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear else None


@contextlib.contextmanager
def chunked_head(head: torch.nn.Linear, labels: torch.Tensor, temperature: float, chunk: int,
                 alignment: str | None):
    """While active, `head(hidden)` returns [B, K, 2] (log-prob of `labels`, normaliser)
    instead of [B, K, V] logits; `labels` [B, K] are the tokens each position predicts."""
    rows = getattr(head, "streamed_rows", None)

    def forward(hidden):  # [B, K, H]
        flat = hidden.reshape(-1, hidden.shape[-1])
        logp, norms = ChunkedLogprob.apply(flat, head.weight, head.bias, labels.reshape(-1),
                                           temperature, chunk, alignment, None, rows)
        return torch.stack([logp, norms], -1).view(*labels.shape, 2)

    head.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del head.forward


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   completion_mask: torch.Tensor | None = None, temperature: float = 1.0, *,
                   start: int | None = None, position_ids: torch.Tensor | None = None,
                   alignment: str | None = None, chunk_size: int | None = None):
    """`out[b, t] = log π(input_ids[b, t] | input_ids[b, :t])` where `completion_mask` is set.

    input_ids, attention_mask, completion_mask: [B, T] -> [B, T] float32, 0 where the mask is 0
    and at t = 0 (no prediction). Logits are divided by `temperature`, so that GRPO's ratios are
    taken against the distribution the completions were sampled from. `attention_mask` None
    with `position_ids` that restart is a packed batch (attention stays inside each example).
    With `alignment` ("sampled", "greedy", "none") also returns WPO's detached per-position
    normaliser [B, T]. `chunk_size`: tokens per LM-head chunk (default `TOKEN_CHUNK`, and the
    plain path while the whole logits fit in `CHUNK_ELEMENTS`).
    """
    batch, length = input_ids.shape
    if completion_mask is None:
        completion_mask = attention_mask.clone()
        completion_mask[:, 0] = 0
    if start is None:
        start = first_completion_column(completion_mask)
    out = torch.zeros(batch, length, dtype=torch.float32, device=input_ids.device)
    norms = torch.zeros_like(out) if alignment is not None else None
    if start >= length:
        return out if alignment is None else (out, norms)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    keep = length - start + 1  # logits at positions start-1 .. T-1 (the last is dropped)
    labels = input_ids[:, start:]
    head = output_head(model)
    chunk = chunk_size or TOKEN_CHUNK
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=keep, use_cache=False)
    if head is not None and (batch * keep > plain_tokens(head.out_features, chunk_size)
                             or _chunked_only(head)):
        padded = torch.cat([labels, labels[:, :1]], 1)  # the last position predicts nothing
        with chunked_head(head, padded, temperature, chunk, alignment):
            both = model(**call).logits[:, :-1]  # [B, T-start, 2]
        out[:, start:] = both[..., 0]
        if norms is not None:
            norms[:, start:] = both[..., 1]
    else:
        logits = model(**call).logits[:, :-1]  # [B, T-start, V]
        if temperature != 1.0:
            logits = logits / temperature
        out[:, start:] = selective_log_softmax(logits, labels)
        if norms is not None:
            from .losses.preference import alignment_norm

            with torch.no_grad():
                for b in range(0, batch, ROW_BLOCK):
                    norms[b:b + ROW_BLOCK, start:] = alignment_norm(
                        logits[b:b + ROW_BLOCK].detach(), alignment)
    out = out * completion_mask.to(out.dtype)
    return out if alignment is None else (out, norms)
