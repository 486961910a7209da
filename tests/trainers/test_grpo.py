"""GRPO end to end on a tiny local model: learning, reference model, reuse, resume."""

from __future__ import annotations

import signal

import grpo_rewards
import pytest
import torch
from safetensors.torch import load_file

from trainers import models
from trainers.errors import TrainingInterrupted
from trainers.grpo import train_grpo
from trainers.metrics import read_metrics
from trainers.rollout import pad_rollout

DIGITS = "grpo.rewards=[grpo_rewards:digit_fraction]"
SMALL = ("grpo.max_completion_length=8", "train.save_steps=null")
TIMING = ("tokens_per_s", "step_s", "gen_s")


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def test_one_step_changes_the_parameters(load, tiny_model):
    out = train_grpo(load("grpo_tiny.yaml", DIGITS, "train.max_steps=1", "grpo.loss_type=grpo",
                          *SMALL))
    before, after = load_file(tiny_model / "model.safetensors"), \
        load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor gets a gradient
    [row] = read_metrics(out)
    # ratio 1 and per-sequence means: the loss is −mean(A), and advantages sum to 0 per group
    assert row["loss"] == pytest.approx(0.0, abs=1e-6)
    assert row["grad_norm"] > 0 and row["kl"] == 0.0  # β = 0: no reference model, no KL


def test_grpo_raises_a_trivial_reward(load):
    out = train_grpo(load("grpo_tiny.yaml", DIGITS, "train.max_steps=6", "optim.lr=3e-2",
                          "train.batch_size=64", "train.micro_batch_size=32", *SMALL))
    rewards = [row["reward"] for row in read_metrics(out)]
    # completions are sampled from the updated policy each step: the share of digits grows
    assert sum(rewards[-2:]) / 2 > 3 * sum(rewards[:2]) / 2, rewards


def test_reference_model_only_with_beta(load, monkeypatch):
    loads = []
    real = models.load_model

    def counting(model, path=None, trainable=True):
        loads.append(trainable)
        return real(model, path, trainable)

    monkeypatch.setattr(models, "load_model", counting)
    train_grpo(load("grpo_tiny.yaml", DIGITS, "train.max_steps=1", *SMALL, out="a"))
    assert loads == [True]  # β = 0 loads no reference
    loads.clear()
    out = train_grpo(load("grpo_tiny.yaml", DIGITS, "train.max_steps=2", "grpo.beta=0.04",
                          "optim.lr=1e-2", *SMALL, out="b"))
    assert sorted(loads) == [False, True]  # the policy and one frozen reference
    first, second = read_metrics(out)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # the policy starts at the reference
    assert second["kl"] > 0


def test_num_iterations_reuses_the_batch_with_old_logprobs(load):
    out = train_grpo(load("grpo_tiny.yaml", DIGITS, "train.max_steps=2", "grpo.num_iterations=2",
                          "optim.lr=5e-2", "grpo.epsilon=0.01", *SMALL))
    first, second = read_metrics(out)
    # same generation batch: same rewards; the second step's ratios have moved off 1
    assert first["reward"] == second["reward"] and first["gen_s"] == second["gen_s"]
    assert first["clip_ratio/region"] == 0.0 and second["clip_ratio/region"] > 0.0


def test_none_rewards_are_left_out(load):
    out = train_grpo(load("grpo_tiny.yaml", "train.max_steps=1", *SMALL,
                          "grpo.rewards=[grpo_rewards:digit_fraction, "
                          "grpo_rewards:not_applicable]"))
    [row] = read_metrics(out)
    assert "rewards/grpo_rewards:not_applicable/mean" not in row
    assert row["reward"] == pytest.approx(row["rewards/grpo_rewards:digit_fraction/mean"])


def test_sigterm_checkpoints_and_resume_reproduces_the_run(load):
    rewards = "grpo.rewards=[grpo_rewards:digit_fraction, {{name: 'grpo_rewards:sigterm_at', " \
              "kwargs: {{call: {}}}}}]"
    args = ("train.max_steps=4", "optim.lr=1e-2", "grpo.beta=0.04", "grpo.num_iterations=2",
            *SMALL)
    grpo_rewards.CALLS["count"] = 0
    full = train_grpo(load("grpo_tiny.yaml", rewards.format(0), *args, out="full"))
    # SIGTERM arrives while scoring round 1 (steps 1-2): the round finishes, checkpoint-2 is
    # written, training stops; resuming restores weights, optimizer, RNG and data position.
    grpo_rewards.CALLS["count"] = 0
    config = load("grpo_tiny.yaml", rewards.format(1), *args, out="cut")
    with pytest.raises(TrainingInterrupted) as e:
        train_grpo(config)
    assert e.value.signum == signal.SIGTERM and e.value.checkpoint.endswith("checkpoint-2")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    cut = train_grpo(config, resume="latest")
    assert curve(cut) == curve(full)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pad_rollout_layout():
    batch = pad_rollout([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


def test_an_offloaded_reference_gives_the_same_run_and_is_not_kept(load, monkeypatch):
    """`model.reference_offload`: the same losses, KL and weights as a resident reference; on
    the CPU the reference is read in for each round's pass and dropped after it."""
    args = ("train.max_steps=3", "grpo.beta=0.1", "optim.lr=1e-2", *SMALL)
    resident = train_grpo(load("grpo_tiny.yaml", DIGITS, *args, out="resident"))
    passes, real = [], models.OffloadedReference.resident

    def counted(self, generate=False):
        passes.append(self.model is None)  # nothing held between passes
        return real(self, generate)

    monkeypatch.setattr(models.OffloadedReference, "resident", counted)
    offloaded = train_grpo(load("grpo_tiny.yaml", DIGITS, *args,
                                "model.reference_offload=true", out="offloaded"))
    assert passes == [True] * 3  # one pass per round
    a, b = curve(resident), curve(offloaded)
    assert [r["kl"] for r in a] == pytest.approx([r["kl"] for r in b], abs=1e-7)
    assert a[-1]["kl"] > 0 and [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b],
                                                                      abs=1e-7)
    wa, wb = load_file(resident / "model.safetensors"), load_file(offloaded / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)


def test_an_offloaded_reference_moves_in_for_a_pass_and_back(tiny_model):
    """On an accelerator (`meta` stands in) the weights wait in host memory and are on the
    device only inside `resident()`; the small buffers stay there."""
    from trainers.config import ModelConfig

    ref = models.OffloadedReference(ModelConfig(path=str(tiny_model), reference_offload=True),
                                    torch.device("meta"))
    host = dict(ref.model.named_parameters())
    assert {p.device.type for p in ref.model.parameters()} == {"cpu"}
    assert {b.device.type for b in ref.model.buffers()} <= {"meta"}
    with models.resident(ref) as model:
        assert model is ref.model
        assert {p.device.type for p in model.parameters()} == {"meta"}
    assert all(p is host[name] for name, p in ref.model.named_parameters())
    assert ref.model.lm_head.weight is ref.model.model.embed_tokens.weight  # still tied
    with models.resident(None) as nothing:  # anything else is itself
        assert nothing is None


@pytest.mark.parametrize("tied, dtype", [(True, "float32"), (False, "float32"),
                                         (True, "bfloat16")])
def test_an_offloaded_cpu_reference_streams_its_vocabulary_matrices(tiny_model, tmp_path, tied,
                                                                    dtype):
    """On the CPU the reference's embedding and LM head stay in the file (`StreamedVocabulary`):
    the same log-probs to the bit as the whole model loaded by transformers, for a batch on the
    plain path too (a streamed head always runs chunked); tied, or untied in shards; in the
    file's fp32 or read into bf16."""
    from transformers import AutoModelForCausalLM

    from trainers.config import ModelConfig
    from trainers.logprobs import token_logprobs

    path = tiny_model
    if not tied:
        torch.manual_seed(0)
        untied = AutoModelForCausalLM.from_pretrained(tiny_model, tie_word_embeddings=False)
        untied.save_pretrained(path := tmp_path / "untied", max_shard_size="20KB")
        assert len(list(path.glob("*.safetensors"))) > 1
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ref = models.OffloadedReference(ModelConfig(path=str(path), reference_offload=True,
                                                dtype=dtype), "cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, whole.config.vocab_size, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    with models.resident(ref) as model:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert emb.weight.device.type == "meta" and head.weight.device.type == "meta"
        assert (emb.weight is head.weight) == tied
        assert {p.device.type for n, p in model.named_parameters()
                if p is not emb.weight and p is not head.weight} == {"cpu"}
        with torch.no_grad():
            for start, chunk in ((4, 5), (11, None)):  # chunked; 3 tokens: the plain path
                got = token_logprobs(model, ids, attention, start=start, chunk_size=chunk)
                want = token_logprobs(whole, ids, attention, start=start, chunk_size=chunk)
                assert torch.equal(got, want) if chunk else \
                    torch.allclose(got, want, atol=1e-6 if dtype == "float32" else 2e-2, rtol=0)
    assert ref.model is None
