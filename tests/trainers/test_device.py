"""Device discipline without a GPU: each trainer's step code runs with the model and the batch
on the `meta` device, where a tensor made on the CPU and mixed in raises (as it would on CUDA),
and so does any host sync (`.item()`, `float()`, `.tolist()`, `nonzero()`), which would stall
an accelerator every micro-batch. Both LM-head paths (whole logits and chunked) are covered.

Eager attention: transformers' SDPA mask code checks the padding mask on the host itself.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainers.config import ModelConfig, from_dict
from trainers.models import meta_model

CHUNKS = [None, 5]  # plain path (everything fits one chunk), chunked path


@pytest.fixture
def meta(tiny_model):
    model = meta_model(ModelConfig(path=str(tiny_model), attn_implementation="eager"))
    model.train()
    assert next(model.parameters()).device.type == "meta"
    return model


def test_a_cpu_tensor_or_a_host_sync_raises_on_meta():
    """What the tests below rely on."""
    x = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError):
        torch.stack([x.sum(), torch.zeros(())])  # the SFT bug of issue 13: CUDA with CPU
    with pytest.raises(RuntimeError):
        x + torch.zeros(3)
    with pytest.raises(RuntimeError):
        float(x.sum())


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sft_step_stays_on_the_device(meta, chunk, monkeypatch):
    from transformers import masking_utils

    from trainers.sft import Example, collate, micro_batch_loss

    # transformers' own packed-sequence detection checks on the host whether anything is
    # packed (an optimisation); the same mask without that check:
    def packed(position_ids):
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", packed)

    examples = [Example([3, 4, 5, 6, 7], [0, 0, 1.0, 1.0, 1.0]),
                Example([8, 9, 10], [0, 0.1, 0.1])]
    for pack in (False, True):
        mb = collate(examples, 0, "meta", pack)
        total = sum(m.sum() for m in [mb["weights"]])  # as the loop computes it
        loss = micro_batch_loss(meta, mb, total, chunk)
        assert loss.device.type == "meta" and loss.shape == ()
        loss.backward()
        assert meta.get_output_embeddings().weight.grad.device.type == "meta"


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("mu", [1, 2])
def test_grpo_step_stays_on_the_device(meta, chunk, mu):
    from trainers.grpo import GRPOParams
    from trainers.rollout import pad_rollout, piece_loss

    params = GRPOParams(rewards=({"name": "format"},), beta=0.04, num_iterations=mu)
    piece = pad_rollout([[3, 4, 5], [6]], [[7, 8], [9, 10, 11]], 0, "meta")
    piece["advantages"] = torch.tensor([0.5, -0.5], device="meta")
    piece["ref"] = torch.zeros(piece["input_ids"].shape, device="meta")
    piece["old"] = torch.zeros(piece["input_ids"].shape, device="meta") if mu > 1 else None
    loss, metrics = piece_loss(meta, piece, params, temperature=0.9, eps_high=0.28,
                               num_sequences=2, num_tokens=torch.tensor(5.0, device="meta"),
                               chunk_size=chunk)
    assert loss.device.type == "meta" and all(v.device.type == "meta"
                                              for v in metrics.values())
    loss.backward()


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "copg"])
def test_wpo_step_stays_on_the_device(meta, chunk, loss_type, tiny_model):
    from trainers.wpo import PairExample, WPOConfig, collate, pair_losses

    config = from_dict(WPOConfig, {
        "model": {"path": str(tiny_model), "lm_head_chunk_size": chunk},
        "data": {"path": "pairs.jsonl"}, "train": {"output_dir": "out", "batch_size": 2},
        "wpo": {"loss_type": loss_type, "weighting": True, "sft_weight": 0.1}})
    pairs = [PairExample([3, 4], [5, 6, 7], [True, True, True], [8, 9], [True, True], 1.0, 0.0),
             PairExample([3], [10, 11], [True, True], [12, 13, 14], [False, True, True])]
    mb = collate(pairs, 0, "meta")
    loss, sums = pair_losses(meta, config, mb, torch.zeros(2, 2, device="meta"), "sampled")
    assert loss.device.type == "meta" and sums.device.type == "meta" and sums.shape == (9,)
    loss.backward()
    json.dumps(mb["start"])  # the first completion column is a host int, known before the step
