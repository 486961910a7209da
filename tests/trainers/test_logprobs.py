"""`token_logprobs` against a plain full-vocabulary log-softmax, with and without padding."""

from __future__ import annotations

import itertools

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


# ---------------------------------------------------------------------------------------------
# The chunked LM head: same values and gradients as the whole-logits computation

def _batch():
    ids = torch.tensor([[5, 17, 30, 44, 2, 9, 120, 7], [0, 0, 7, 8, 120, 33, 61, 0]])
    attention = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 0]])
    return ids, attention, completion


def _values_and_grads(model, chunk_size, temperature=1.0, alignment=None):
    model.zero_grad(set_to_none=True)
    ids, attention, completion = _batch()
    out = token_logprobs(model, ids, attention, completion, temperature, start=3,
                         alignment=alignment, chunk_size=chunk_size)
    logp, norms = out if alignment else (out, None)
    weights = torch.linspace(-1.0, 2.0, logp.numel()).view_as(logp)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logp.detach(), norms, grads


def test_chunked_head_equals_whole_logits_in_values_and_gradients(tiny_model):
    from trainers import logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    chunks, shapes = [], []
    real = logprobs._logits

    def spy(h, *args):
        chunks.append(h.shape[0])
        return real(h, *args)

    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    logprobs._logits = spy
    try:
        for temperature in (1.0, 0.7):
            whole = _values_and_grads(model, 10 ** 9, temperature)  # one chunk: plain path
            assert not chunks and shapes[-1] == (2, 6, 300)  # whole [B, keep, V] logits
            chunked = _values_and_grads(model, 3, temperature)
            assert shapes[-1] == (2, 6, 2)  # the head gave log-probs, never [B, keep, V]
            assert chunks and max(chunks) <= 3  # forward and backward: 3 tokens at a time
            chunks.clear()
            torch.testing.assert_close(chunked[0], whole[0], atol=1e-5, rtol=0)
            for name, grad in whole[2].items():
                torch.testing.assert_close(chunked[2][name], grad, atol=1e-5, rtol=1e-5,
                                           msg=name)
    finally:
        logprobs._logits = real
        handle.remove()
    assert (chunked[0][:, :3] == 0).all() and chunked[0][1, 7] == 0  # outside the mask


def test_chunked_alignment_norm_is_the_wpo_normaliser(tiny_model):
    """logsumexp(2z) − 2·logsumexp(z) = log Σ π² on the same chunk, and max z − lse(z)."""
    from trainers.losses.preference import alignment_norm

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids, attention, _ = _batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=attention).logits[:, 2:-1]  # predicts 3..7
    for alignment in ("sampled", "greedy"):
        _, norms, _ = _values_and_grads(model, 4, alignment=alignment)
        _, plain, _ = _values_and_grads(model, 10 ** 9, alignment=alignment)
        torch.testing.assert_close(norms[:, 3:], alignment_norm(logits, alignment), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(norms, plain, atol=1e-5, rtol=0)
        if alignment == "sampled":  # by hand: log Σ_v softmax(z)_v²
            p = torch.softmax(logits, -1)
            torch.testing.assert_close(norms[:, 3:], torch.log((p * p).sum(-1)), atol=1e-5,
                                       rtol=0)


def test_packed_rows_equal_separate_sequences(tiny_model):
    """One packed row (no attention mask, positions restarting) gives each example the
    log-probs it has alone: attention stays inside each example."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    a, b = [5, 17, 30, 44, 2], [7, 8, 120, 9]
    ids = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    mask = torch.ones_like(ids)
    mask[0, 0] = mask[0, len(a)] = 0  # each example's first token predicts nothing
    with torch.no_grad():
        packed = token_logprobs(model, ids, None, mask, position_ids=positions, start=1)
    torch.testing.assert_close(packed[0, 1:len(a)], reference(model, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, len(a) + 1:], reference(model, b), atol=1e-5, rtol=0)


def test_tied_embedding_gradients_without_full_vocabulary_copies(tiny_model):
    """`models.sparse_tied_embedding_grad`: the lookup's gradient is sparse and the chunked head
    adds into the accumulated `.grad` (made by the first micro-batch) in place, so autograd
    only brings the lookup's sparse gradient to the weight; over two accumulated micro-batches
    `.grad` is dense and equals a plain copy's (dense lookup, whole logits) to fp32 rounding."""
    from trainers import logprobs
    from trainers.models import sparse_tied_embedding_grad

    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lean = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert sparse_tied_embedding_grad(lean) and lean.get_input_embeddings().sparse
    weight = lean.get_input_embeddings().weight
    buffers, real = [], torch.zeros

    def counting_zeros(*shape, **kw):  # a [V, H] gradient buffer made by the head's backward
        out = real(*shape, **kw)
        if tuple(out.shape) == tuple(weight.shape):
            buffers.append(out)
        return out

    arriving = []  # what autograd brings to the weight's accumulation: the lookup's alone
    weight.register_hook(lambda grad: arriving.append(grad.layout))
    ids, attention, completion = _batch()
    for model, chunk in ((plain, 10 ** 9), (lean, 3)):
        for k in range(2):  # two micro-batches accumulate
            logprobs.torch.zeros = counting_zeros if model is lean else real
            try:
                out = token_logprobs(model, ids, attention, completion, start=3 + k,
                                     chunk_size=chunk)
                (out * torch.linspace(-1.0, 2.0, out.numel()).view_as(out)).sum().backward()
            finally:
                logprobs.torch.zeros = real
    assert not buffers  # both micro-batches' head gradients went straight into .grad
    assert arriving == [torch.sparse_coo] * 2  # no dense [V, H] sum made by autograd
    assert weight.grad.layout == torch.strided
    grads = dict(plain.named_parameters())
    for name, p in lean.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    # untied embeddings keep their dense gradients (a sparse one would be their .grad)
    untied = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                  tie_word_embeddings=False)
    assert not sparse_tied_embedding_grad(untied) and not untied.get_input_embeddings().sparse


def test_chunk_forward_equals_log_softmax_with_one_logits_buffer_per_chunk():
    """ChunkedLogprob with a biased, tempered head, whole-vocabulary tiles and tiles of 4 of the
    11 rows (an online log-sum-exp): log-probs, both normalisers and gradients equal plain
    autograd over whole logits (log_softmax), and the ops make one [c, b] tensor per tile (the
    logits, then overwritten in place): no out-of-place bias, temperature or normaliser, and no
    aten.logsumexp (its kernel allocates a second tile of its own); in forward and backward a
    tile's logits are gone before the next tile's exist."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from trainers.logprobs import ChunkedLogprob

    g = torch.Generator().manual_seed(0)
    n, d, v, chunk, tau = 7, 5, 11, 3, 0.7
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    z = (leaves[0] @ leaves[1].t() + leaves[2]) / tau
    logp = torch.log_softmax(z, -1)
    want = logp.gather(-1, labels[:, None])[:, 0]
    (want * upstream).sum().backward()
    p = logp.detach().exp()
    want_norm = {"sampled": torch.log((p * p).sum(-1)), "greedy": logp.detach().amax(-1),
                 "none": torch.zeros(n, dtype=torch.float64)}

    class Made(TorchDispatchMode):  # non-in-place ops whose output is a whole chunk's logits
        def __init__(self):
            super().__init__()
            self.made, self.ops, self.alive, self.overlap = [], set(), [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.add(func.__name__.split(".")[0])
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.dim() == 2 and \
                    out.shape[0] in (chunk, n % chunk) and out.shape[1] in (b, v % b) \
                    and out.untyped_storage().data_ptr() not in inputs:  # new, not a view
                self.made.append(func.__name__)
                self.overlap = max(self.overlap, sum(r() is not None for r in self.alive))
                self.alive.append(weakref.ref(out))
            return out

    for block, alignment in itertools.product((None, 4), ("sampled", "greedy", "none")):
        b = block or v
        tiles = -(-n // chunk) * -(-v // b)
        mine = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with Made() as mode:
            got, norms = ChunkedLogprob.apply(*mine, labels, tau, chunk, alignment, block)
        assert len(mode.made) == tiles, (alignment, mode.made)
        assert "logsumexp" not in mode.ops and mode.overlap == 0
        torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(norms, want_norm[alignment], atol=1e-10, rtol=0)
        with Made() as mode:
            (got * upstream).sum().backward()
        assert len(mode.made) == tiles and mode.overlap == 0, mode.made
        for a, b in zip(mine, leaves):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


def test_tiles_under_bf16_autocast_match_bf16_matmuls_with_a_float32_softmax():
    """Under autocast the tiles cast a block of the head at a time: the result is that of bf16
    matmuls and a float32 log-softmax over whole logits (values and gradients, to bf16
    rounding), and the gradients come back in the leaves' float32."""
    from trainers.logprobs import ChunkedLogprob

    g = torch.Generator().manual_seed(1)
    n, d, v, tau = 9, 8, 13, 0.9
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)

    h_ref, w_ref = (t.clone().requires_grad_() for t in (hidden, weight))
    z = (h_ref.bfloat16() @ w_ref.bfloat16().t()).float() / tau
    want = torch.log_softmax(z, -1).gather(-1, labels[:, None])[:, 0]
    (want * upstream).sum().backward()

    h, w = (t.clone().requires_grad_() for t in (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ChunkedLogprob.apply(h, w, None, labels, tau, 4, "none", 5)
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=2e-2, rtol=2e-2)
