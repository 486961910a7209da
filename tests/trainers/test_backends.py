"""`backend: hf | vllm` without an engine: the config section, the one-line refusal when vLLM is
missing, the weights a sync sends (checked against peft's own merge) and the drift diagnostic.
The engine itself is tested in test_vllm_engine.py (`make test-vllm`)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import snapshot

from trainers.cli import sample, train
from trainers.config import load_config
from trainers.errors import TrainerConfigError
from trainers.generation import logprob_gap
from trainers.grpo import GRPOConfig
from trainers.rollout import pad_rollout
from trainers.sampling import SamplePairsConfig, SampleRSOConfig, load_sample_config
from trainers.vllm_engine import policy_weights

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"


def test_backend_is_hf_unless_asked_and_the_vllm_section_parses(tiny_model, tmp_path):
    base = [f"model.path={tiny_model}", f"train.output_dir={tmp_path}"]
    assert load_config(GRPOConfig, MANIFESTS / "grpo_tiny.yaml", base).backend == "hf"
    config = load_config(GRPOConfig, MANIFESTS / "grpo_tiny.yaml", base + [
        "backend=vllm", "vllm.gpu_memory_utilization=0.5", "vllm.max_model_len=96",
        "vllm.enforce_eager=true", "vllm.tensor_parallel_size=2", "vllm.dtype=bfloat16",
        "vllm.engine_kwargs={max_num_seqs: 64}"])
    assert config.backend == "vllm" and config.vllm.max_model_len == 96
    assert config.vllm.engine_kwargs == {"max_num_seqs": 64} and config.vllm.dtype == "bfloat16"
    for cls, name in ((SamplePairsConfig, "sample_pairs_tiny.yaml"),
                      (SampleRSOConfig, "sample_rso_tiny.yaml")):
        sampler = load_sample_config(cls, MANIFESTS / name, ["backend=vllm",
                                                             "vllm.enforce_eager=true"])
        assert sampler.backend == "vllm" and sampler.vllm.enforce_eager


@pytest.mark.parametrize("override, message", [
    # a refused --set value is reported against the --set item
    ("backend=sglang", "--set backend=sglang: expected one of hf, vllm"),
    ("vllm.gpu_memory_utilization=1.5",
     r"--set vllm.gpu_memory_utilization=1.5: expected a fraction"),
    ("vllm.engine_kwargs={seed: 3, max_num_seqs: 8}", "seed cannot be set"),
    ("vllm.tensor_paralel_size=2", "did you mean 'tensor_parallel_size'"),
])
def test_bad_vllm_fields_name_the_field(override, message):
    with pytest.raises(TrainerConfigError, match=message):
        load_config(GRPOConfig, MANIFESTS / "grpo_tiny.yaml", [override])


def _one_line(result, *parts):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    for part in parts:
        assert part in result.output, result.output


def test_vllm_missing_is_one_line_before_anything_is_written(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    before = snapshot(tiny_model)
    out = tmp_path / "run"
    result = CliRunner().invoke(train, [
        "grpo", str(MANIFESTS / "grpo_tiny.yaml"), "--set", f"model.path={tiny_model}",
        "--set", f"train.output_dir={out}", "--set", "backend=vllm"])
    _one_line(result, "backend: vllm needs vLLM, which is not installed", "pip install",
              "set backend: hf")
    assert not out.exists() and snapshot(tiny_model) == before
    pairs = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(sample, [
        "pairs", str(MANIFESTS / "sample_pairs_tiny.yaml"), "--set", f"model.path={tiny_model}",
        "--set", f"output={pairs}", "--set", "backend=vllm"])
    _one_line(result, "backend: vllm needs vLLM")
    assert not pairs.exists() and not pairs.with_suffix(".jsonl.tmp").exists()
    assert snapshot(tiny_model) == before


def test_sync_sends_every_weight_under_its_checkpoint_name(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sent = dict(policy_weights(model))
    # the tied head travels under its own name too: vLLM's layer-wise reload would otherwise
    # leave it stale (test_vllm_engine checks the engine side)
    assert sent.keys() == model.state_dict().keys() and "lm_head.weight" in sent
    assert all(sent[k] is p for k, p in model.named_parameters(remove_duplicate=False))


def test_sync_of_a_lora_policy_sends_peft_merged_weights_and_leaves_it_alone(tiny_model):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    policy = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make the merge a no-op
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sent = {k: v.clone() for k, v in policy_weights(policy)}
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()  # peft's own merge
    assert sent.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(sent[name], value, rtol=0, atol=1e-6, msg=name)
    adapted = "model.layers.0.self_attn.q_proj.weight"
    base = before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (sent[adapted] - base).abs().max() > 1e-3  # the adapter really is in the merge
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the policy is untouched


def test_logprob_gap_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -3.0]])
    engine = torch.tensor([[-1.5, -2.0, -9.0], [0.0, -0.1, -2.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert float(logprob_gap(policy, engine, mask)) == pytest.approx(0.5 + 0.0 + 0.1 + 1.0)


def test_pad_rollout_lays_engine_logprobs_out_like_the_completions():
    batch = pad_rollout([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0, device="cpu",
                        logprobs=[[-0.5], [-0.25, -2.0]])
    assert batch["engine_logps"].tolist() == [[0, 0, 0, -0.5, 0], [0, 0, 0, -0.25, -2.0]]
    assert "engine_logps" not in pad_rollout([[1]], [[2]], pad_id=0, device="cpu")
