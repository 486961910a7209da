"""`model.lm_head_grad: deferred` (`trainers/headgrad.py`) against autograd's dense gradient,
torch's `clip_grad_norm_` and `torch.optim.AdamW`: the same norms, weights and AdamW state."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainers import headgrad, logprobs
from trainers.logprobs import token_logprobs
from trainers.models import sparse_tied_embedding_grad


def _batches(vocab: int, seed: int = 0):
    """Micro-batches (ids, attention, completion mask, start, per-token loss weights)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(2):
        ids = torch.randint(0, vocab, (3, 9), generator=g)
        attention = torch.ones_like(ids)
        attention[0, :2] = 0  # left padding
        completion = torch.zeros_like(ids)
        completion[:, 4 + k:] = 1
        completion[2, -1] = 0  # right padding
        weights = torch.randn(ids.shape, generator=g)
        out.append((ids, attention, completion, 4 + k, weights))
    return out


def _load(path, tied: bool = True):
    torch.manual_seed(0)  # an untied head is initialised afresh: the same in both copies
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                tie_word_embeddings=tied)


def _groups(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_deferred_head_steps_equal_autograd_clip_and_adamw(tiny_model, monkeypatch, fused, tied):
    """Three optimizer steps of two accumulated micro-batches, clipped (the bound is below the
    norm, so the coefficient matters): a plain model (whole logits, dense gradients) stepped by
    torch, and one whose head gradient is deferred, formed in blocks of 10 vocabulary rows."""
    plain, lean = (_load(tiny_model, tied) for _ in range(2))
    assert sparse_tied_embedding_grad(lean) == tied
    deferred = headgrad.attach(lean)
    weight = lean.get_output_embeddings().weight
    arriving = []  # what autograd brings to the head's weight: the tied lookup's rows alone
    weight.register_hook(lambda grad: None if grad is None else arriving.append(grad.layout))
    vocab = weight.shape[0]
    monkeypatch.setattr(logprobs, "TILE_ELEMENTS", 270)  # tiles and step blocks of 10-67 rows
    opt_plain = torch.optim.AdamW(_groups(plain), lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
                                  fused=fused)
    opt_lean = torch.optim.AdamW(_groups(lean), lr=1e-2, betas=(0.8, 0.9), eps=1e-6, fused=fused)
    max_norm = 0.05
    for step in range(3):
        for ids, attention, completion, start, weights in _batches(vocab, step):
            for model, chunk in ((plain, 10 ** 9), (lean, 4)):
                out = token_logprobs(model, ids, attention, completion, start=start,
                                     chunk_size=chunk)
                (out * weights).sum().backward()
        assert weight.grad is None or weight.grad.is_sparse  # no dense [V, H] gradient
        expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
        norm, coef = deferred.clip(lean.parameters(), max_norm)
        assert float(expected) > 2 * max_norm  # clipping is on
        torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
        assert weight.grad is None  # the optimizer leaves the head to `deferred.step`
        opt_plain.step()
        opt_lean.step()
        torch.testing.assert_close(deferred.step(opt_lean, coef), expected, rtol=1e-5, atol=0)
        assert not deferred.records
        for opt in (opt_plain, opt_lean):
            opt.zero_grad(set_to_none=True)
    assert arriving == ([torch.sparse_coo] * 6 if tied else [])
    ref = dict(plain.named_parameters())
    for name, p in lean.named_parameters():
        # Adam's m/√v turns the rounding of a tiny gradient into ~1e-6 (a ten-thousandth of
        # one lr-1e-2 step): o_proj moves as much as the head, whose sums were reordered
        torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-5, msg=name)
    head_plain = plain.get_output_embeddings().weight
    for key in ("exp_avg", "exp_avg_sq", "step"):  # to the weights' 1e-5, of the largest entry
        want = opt_plain.state[head_plain][key]
        torch.testing.assert_close(opt_lean.state[weight][key], want, rtol=0,
                                   atol=1e-5 * float(want.abs().max()), msg=key)
    # the state a checkpoint saves and loads: the head's is in the optimizer's own state_dict
    state = opt_lean.state_dict()["state"]
    assert len(state) == len(opt_plain.state_dict()["state"])


@pytest.mark.parametrize("max_norm", [None, 1e3])
def test_a_bound_below_max_norm_skips_the_norm_pass(tiny_model, monkeypatch, max_norm):
    """No clipping, or a bound (‖dZ‖_F·‖H‖_2 per record, from the forward's tiles) below
    max_norm: no pass over the head before the update; `step` measures the norm while it
    updates, and the weights equal torch's clipped (coefficient 1) AdamW step."""
    lean, plain = _load(tiny_model), _load(tiny_model)
    sparse_tied_embedding_grad(lean)
    deferred = headgrad.attach(lean)
    passes = []
    real = headgrad.HeadGradient._head_sq
    monkeypatch.setattr(headgrad.HeadGradient, "_head_sq",
                        lambda self, *a: passes.append(1) or real(self, *a))
    opt_plain = torch.optim.AdamW(_groups(plain), lr=1e-2)
    opt_lean = torch.optim.AdamW(_groups(lean), lr=1e-2)
    for ids, attention, completion, start, weights in _batches(300):
        for model in (plain, lean):
            out = token_logprobs(model, ids, attention, completion, start=start)
            (out * weights).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm or float("inf"))
    bound, coef = deferred.clip(lean.parameters(), max_norm)
    assert coef is None and not passes
    assert float(expected) <= float(bound) < 3 * float(expected)  # a bound, and not a loose one
    opt_plain.step()
    opt_lean.step()
    torch.testing.assert_close(deferred.step(opt_lean, coef), expected, rtol=1e-5, atol=0)
    ref = dict(plain.named_parameters())
    for name, p in lean.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def _curve(out) -> list[dict]:
    from trainers.metrics import read_metrics

    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "step_s")}
            for row in read_metrics(out)]


def test_a_deferred_sft_run_equals_the_dense_one_and_resumes(load, monkeypatch):
    """`train sft` with `model.lm_head_grad: deferred`: the dense run's losses, gradient norms
    and weights (to rounding); killed after step 2 and resumed, the uninterrupted deferred run
    exactly (the head's AdamW state is in the checkpoint's optimizer state)."""
    import signal

    from safetensors.torch import load_file

    from trainers import checkpointing
    from trainers.errors import TrainingInterrupted
    from trainers.sft import train_sft

    args = ("train.max_steps=4", "train.save_steps=null", "optim.lr=1e-2",
            "optim.max_grad_norm=0.5", "model.lm_head_chunk_size=4")
    dense = train_sft(load("sft_tiny.yaml", *args, out="dense"))
    steps, real = [], headgrad.HeadGradient.step

    def counted(self, optimizer, coef):
        steps.append(len(self.records))
        return real(self, optimizer, coef)

    with monkeypatch.context() as patch:
        patch.setattr(headgrad.HeadGradient, "step", counted)
        deferred = train_sft(load("sft_tiny.yaml", *args, "model.lm_head_grad=deferred",
                                  out="deferred"))
    assert len(steps) == 4 and all(steps)  # every update formed the head's gradient itself
    a, b = _curve(dense), _curve(deferred)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    assert a[0]["grad_norm"] > 0.5  # clipped
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    wa, wb = load_file(dense / "model.safetensors"), load_file(deferred / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-5) for k in wa)

    calls = {"n": 0}

    def stop_after_step_2(self, accelerator):
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 2 else 0

    config = load("sft_tiny.yaml", *args, "model.lm_head_grad=deferred", out="cut")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        patch.setattr(checkpointing.StopSignal, "requested", stop_after_step_2)
        train_sft(config)
    cut = train_sft(config, resume="latest")
    assert _curve(cut) == b
    wc = load_file(cut / "model.safetensors")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)


@pytest.mark.parametrize("world, shard, precision, words", [
    (2, None, "no", "not under 2 processes"), (1, "fsdp", "no", "not under FSDP"),
    (1, "zero", "no", "not under DeepSpeed ZeRO"), (1, None, "fp16", "loss scaler")])
def test_deferred_head_refuses_what_it_cannot_do(world, shard, precision, words):
    from trainers.errors import TrainerConfigError
    from trainers.runtime import check_deferred_head

    with pytest.raises(TrainerConfigError, match=words):
        check_deferred_head(world, shard, precision)
    check_deferred_head(1, None, "bf16")  # one process, whole weights: fine


def test_under_bf16_autocast_the_blocks_equal_the_dense_bf16_gradient(tiny_model):
    """Autocast (bf16 matmuls, float32 softmax), as a GPU run has it: the deferred blocks equal
    the dense chunked backward's gradient to bf16 rounding, in float32."""
    plain, lean = _load(tiny_model), _load(tiny_model)
    for model in (plain, lean):
        sparse_tied_embedding_grad(model)
    deferred = headgrad.attach(lean)
    for ids, attention, completion, start, weights in _batches(300):
        for model in (plain, lean):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = token_logprobs(model, ids, attention, completion, start=start, chunk_size=4)
            (out * weights).sum().backward()
    assert {r.dtype for r in deferred.records} == {torch.bfloat16}
    deferred.clip(lean.parameters(), None)
    got = torch.cat([deferred._block_grad(lo, hi, deferred._groups(), deferred._sparse)
                     for lo, hi in deferred._blocks()])
    want = plain.get_output_embeddings().weight.grad
    assert got.dtype == torch.float32 and want.layout == torch.strided
    # 0.3% of the largest entry here: one bf16 rounding of the block matmuls against one per
    # micro-batch
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))
