"""The LM head's weight gradient formed at the optimizer step (`model.lm_head_grad: deferred`).

At a real vocabulary the head is most of a small model's weights (151,936 x 256 is 39 M of the
trainer bench's 43 M parameters), and its dense gradient is a [V, H] buffer that lives from the
first backward of a step to its update: 150 MB in fp32 there, 0.9 GB at Qwen2.5-1.5B's.

Deferred, the chunked head (`logprobs.ChunkedLogprob`) still returns the hidden states'
gradient in backward, but instead of adding ∂W = Σ_t g_t·(onehot(y_t) − softmax(z_t))ᵀ h_t / τ
into that buffer it records what the sum is made of: h, y, the log-sum-exp and g of every token
(a few MB per micro-batch). At the step, `HeadGradient` forms ∂W a block of vocabulary rows at a
time from the records of all of the step's micro-batches, plus what autograd left in `.grad`
(the tied input embedding's sparse lookup gradient), and applies it: those rows are updated
by torch's own AdamW function with the optimizer's state and hyper-parameters (so the state is
saved, loaded and resumed like any other weight's). Clipping needs the whole
gradient's norm before any weight moves: a bound from the records (`HeadGradient._bound`, no
pass over the head) settles it when it is below `max_norm`; otherwise a first pass over the
blocks measures the norm. The sums are the same in another order: equal to rounding (tested
against autograd, clip_grad_norm_ and torch.optim.AdamW).

The price is one more pass of two matmuls over the head per optimizer step; when the bound
does not rule clipping out, one and a half (the norm pass keeps `KEEP_FRACTION` of the blocks
for the update). One process only: under DDP the blocks would have to be all-reduced, and a
sharded head is not whole anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw

from . import logprobs

# Of the head's gradient blocks formed by the norm pass, the share kept for the update (which
# recomputes only the others and frees the kept ones as it goes): the update's pass then costs
# half as much, and at the step's end, when the activations are gone, at most half a [V, H]
# gradient exists.
KEEP_FRACTION = 0.5


@dataclass
class _Record:
    """One backward's share of ∂W: ∂W = Σ_n (onehot(y_n) − softmax(z_n))ᵀ·g_n·h_n."""

    hidden: torch.Tensor  # [N, H], as the head saw it
    labels: torch.Tensor  # [N]
    lse: torch.Tensor  # [N], log Σ_v e^(z_v) in the softmax's dtype
    grad: torch.Tensor  # [N], ∂loss/∂logp / τ in the softmax's dtype
    temperature: float
    dtype: torch.dtype  # the matmuls' dtype (autocast's, or the weight's)
    spread: torch.Tensor  # [N], ‖onehot(y_n) − softmax(z_n)‖² = 1 − 2·p_y + Σ_v p_v²


class HeadGradient:
    """Records the head's backward (`record`, called by `ChunkedLogprob.backward` for a weight
    whose `deferred_grad` is this) and forms and applies its gradient at the step."""

    def __init__(self, head: torch.nn.Linear):
        self.weight = head.weight
        self.bias = head.bias
        self.records: list[_Record] = []
        self._stash: torch.Tensor | None = None  # what autograd accumulated in `.grad`
        self._sparse = None  # the stash as (row ids, rows) when it is sparse
        self._kept: dict[int, torch.Tensor] = {}  # row → block gradient kept by the norm pass
        self._total: torch.Tensor | None = None  # the norm, when the norm pass measured it
        self._others = torch.zeros(())
        self.weight.deferred_grad = self

    def record(self, hidden, labels, lse, grad_logp, temperature: float, dtype, spread) -> None:
        self.records.append(_Record(hidden.detach(), labels, lse, grad_logp.to(lse.dtype)
                                    / temperature, temperature, dtype, spread))

    @property
    def _wide(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _groups(self) -> list[_Record]:
        """The records joined into one per (temperature, dtype): fewer, taller matmuls."""
        joined: dict[tuple, list[_Record]] = {}
        for r in self.records:
            joined.setdefault((r.temperature, r.dtype), []).append(r)
        out = []
        for (temperature, dtype), rs in joined.items():
            if len(rs) == 1:
                out.append(rs[0])
                continue
            out.append(_Record(torch.cat([r.hidden for r in rs]), torch.cat([r.labels for r in rs]),
                               torch.cat([r.lse for r in rs]), torch.cat([r.grad for r in rs]),
                               temperature, dtype, torch.cat([r.spread for r in rs])))
        self.records = out
        return out

    def _sparse_rows(self):
        """The stashed `.grad` as (sorted row ids, rows) when sparse (the tied lookup's)."""
        stash = self._stash
        if stash is None or not stash.is_sparse:
            return None
        stash = stash.coalesce()
        return stash.indices()[0], stash.values()

    def _blocks(self):
        # no records (only the lookup's rows): blocks as for a whole token chunk, not [V, H]
        tokens = sum(r.hidden.shape[0] for r in self.records) or logprobs.TOKEN_CHUNK
        rows = logprobs.tile_rows(logprobs.TOKEN_CHUNK, tokens, self.weight.device.type)
        vocab = self.weight.shape[0]
        return [(lo, min(lo + rows, vocab)) for lo in range(0, vocab, rows)]

    def _block_grad(self, lo: int, hi: int, groups: list[_Record], sparse) -> torch.Tensor:
        """∂W[lo:hi] in the softmax's dtype: what backward would have added, plus the stash."""
        wide = self._wide
        weight = self.weight.detach()
        out = torch.zeros((hi - lo, weight.shape[1]), dtype=wide, device=weight.device)
        bias = None if self.bias is None else self.bias.detach()[lo:hi]
        for r in groups:
            w = weight[lo:hi].to(r.dtype)
            for s in range(0, r.hidden.shape[0], logprobs.TOKEN_CHUNK):
                piece = slice(s, s + logprobs.TOKEN_CHUNK)
                h = r.hidden[piece]
                dz = logprobs.logit_grad(h.to(r.dtype), w, bias, r.lse[piece],
                                         r.grad[piece, None], r.labels[piece], lo, r.dtype,
                                         r.temperature)
                logprobs.add_weight_grad(out, dz, h, r.dtype)
                del dz
        if sparse is not None:
            ids, values = sparse
            a, b = torch.searchsorted(ids, torch.tensor([lo, hi], device=ids.device)).tolist()
            if b > a:
                out.index_add_(0, ids[a:b] - lo, values[a:b].to(wide))
        elif self._stash is not None:  # a dense `.grad` (a plain-path backward)
            out += self._stash[lo:hi].to(wide)
        return out

    def _bound(self, groups: list[_Record], sparse) -> torch.Tensor:
        """An upper bound of ‖∂W‖ from the records alone (no pass over the head):
        ‖dZᵀH‖_F ≤ ‖dZ‖_F·‖H‖_2 per record, where ‖dZ‖_F² = Σ_n g_n²·‖onehot − p_n‖² came
        out of the forward's tiles, plus the stashed part's own norm; 1% over for the rounding
        of low-precision matmuls."""
        bound = torch.zeros((), dtype=torch.float64, device=self.weight.device)
        for r in groups:
            dz = (r.grad.double().square() * r.spread.double()).sum().sqrt()
            bound += dz * torch.linalg.matrix_norm(r.hidden.double(), ord=2)
        if sparse is not None:
            bound += torch.linalg.vector_norm(sparse[1], dtype=torch.float64)
        elif self._stash is not None:
            bound += torch.linalg.vector_norm(self._stash, dtype=torch.float64)
        return bound * 1.01

    def _head_sq(self, groups, sparse) -> torch.Tensor:
        """‖∂W‖², a pass over the head's blocks; the first KEEP_FRACTION of them are kept for
        `step`, which then recomputes only the others."""
        head_sq = torch.zeros((), dtype=torch.float64, device=self.weight.device)
        budget = KEEP_FRACTION * self.weight.numel()
        for lo, hi in self._blocks():
            grad = self._block_grad(lo, hi, groups, sparse)
            head_sq += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
            if (hi - lo) * grad.shape[1] <= budget:
                self._kept[lo] = grad
                budget -= grad.numel()
        return head_sq

    @torch.no_grad()
    def clip(self, parameters, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip the other gradients as `clip_grad_norm_` does, counting the head's in the norm.
        -> (the norm, or an upper bound of it when the bound shows that nothing is clipped;
        `step` returns the norm itself; the clip coefficient or None).

        The head's norm needs a pass over its blocks, unless the bound (`_bound`) is finite and
        below `max_norm` (or there is no bound to clip to): the coefficient is then 1, and
        `step` measures the norm on its own pass. The head's `.grad` is taken off the weight
        here, so the optimizer's step leaves that weight to `step`."""
        self._stash, self.weight.grad = self.weight.grad, None
        self._kept = {}
        self._sparse = sparse = self._sparse_rows()
        groups = self._groups()
        grads = [p.grad for p in parameters if p.grad is not None]
        zero = torch.zeros((), device=self.weight.device)
        self._others = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g).to(torch.float32) for g in grads])) if grads else zero
        clipping = max_norm is not None and not math.isinf(max_norm)
        bound = torch.hypot(self._others.double(), self._bound(groups, sparse))
        self._total = None
        if bool(torch.isfinite(bound)) and (not clipping or float(bound) + 1e-6 < max_norm):
            return bound.to(torch.float32), None  # nothing is clipped: the norm comes in `step`
        self._total = torch.hypot(self._others, self._head_sq(groups, sparse).sqrt().float())
        if not clipping:
            return self._total, None
        coef = (max_norm / (self._total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return self._total, coef

    @torch.no_grad()
    def step(self, optimizer, coef: torch.Tensor | None) -> torch.Tensor:
        """The AdamW update of the head, a block of rows at a time, with the state and
        hyper-parameters the optimizer keeps for this weight; then forget the step's records.
        `clip` must have run first. -> the gradient norm (as `clip_grad_norm_` gives it)."""
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        weight = self.weight
        group = next(g for g in opt.param_groups if any(p is weight for p in g["params"]))
        if group.get("amsgrad") or group.get("capturable") or group.get("differentiable"):
            raise RuntimeError("model.lm_head_grad: deferred supports AdamW without amsgrad, "
                               "capturable or differentiable")
        state = opt.state[weight]
        if not state:  # as torch.optim.AdamW initialises it
            state["step"] = torch.zeros((), dtype=torch.float32, device=weight.device
                                        if group.get("fused") else "cpu")
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        groups, sparse = self._groups(), self._sparse
        beta1, beta2 = group["betas"]
        data = weight.detach()
        head_sq = torch.zeros((), dtype=torch.float64, device=weight.device)
        steps = [state["step"]]
        for lo, hi in self._blocks():
            grad = self._kept.pop(lo, None)  # freed block by block
            if grad is None:
                grad = self._block_grad(lo, hi, groups, sparse)
            if self._total is None:
                head_sq += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
            if coef is not None:
                grad.mul_(coef.to(grad.dtype))
            steps = [state["step"].clone()]  # each block's update is the step's first
            adamw(
                [data[lo:hi]], [grad.to(weight.dtype)], [state["exp_avg"][lo:hi]],
                [state["exp_avg_sq"][lo:hi]], [], steps, foreach=group.get("foreach"),
                fused=group.get("fused"), capturable=False, differentiable=False,
                grad_scale=None, found_inf=None, has_complex=False, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=group.get("maximize", False))
        state["step"] = steps[0]
        total = self._total if self._total is not None else \
            torch.hypot(self._others, head_sq.sqrt().float())
        self.records, self._stash, self._sparse, self._total, self._kept = [], None, None, None, {}
        return total


def attach(policy) -> HeadGradient:
    """Defer the gradient of `policy`'s LM head (a plain, unsharded nn.Linear)."""
    from .errors import TrainerConfigError

    head = logprobs.output_head(policy)
    if head is None or not head.weight.requires_grad:
        raise TrainerConfigError("model.lm_head_grad: deferred needs a trainable nn.Linear LM "
                                 "head the chunked log-probs can run (this model's is another "
                                 "module, post-processed or frozen); set lm_head_grad: dense")
    return HeadGradient(head)
