"""`backend: vllm` against HF `generate` (`make test-vllm`, in .venv-vllm with the vLLM CPU build).

The model is a tiny tied fp32 Qwen2 with head_dim 64 (the CPU attention rejects the other tiny
models' head sizes), SFT-trained on the shipped arithmetic rows (100 steps: it then writes
"33 + 4 = 46\n#### 46" and stops) so that greedy choices are mostly clear. Tokens are compared only where the HF logit margin between the two best tokens is clear,
up to the first near-tie. One engine serves the whole session (a start costs 5-30 s here):
`use_engine` hands it to the code under test in place of a fresh one, loaded with the weights
of the config's model, as a fresh engine would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed; `make test-vllm` runs these in "
                                   ".venv-vllm")

from click.testing import CliRunner  # noqa: E402
from helpers import snapshot  # noqa: E402

from trainers import generation  # noqa: E402
from trainers.cli import train  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.grpo import GRPOConfig, train_grpo  # noqa: E402
from trainers.logprobs import token_logprobs  # noqa: E402
from trainers.metrics import read_metrics  # noqa: E402
from trainers.rollout import load_prompts  # noqa: E402

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"
MARGIN = 1e-3  # logit gap below which fp32 kernels may order two tokens differently
MAX_NEW = 24
GRPO = ("grpo.rewards=[grpo_rewards:digit_fraction]", "optim.lr=3e-2", "train.batch_size=64",
        "train.micro_batch_size=32", "grpo.max_completion_length=8", "train.max_steps=6",
        "train.progress_bar=false", "train.report_to=[none]")


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory, tokenizer_dir) -> Path:
    from reasoning_demo.tiny import build_model
    from trainers.sft import SFTConfig, train_sft

    root = tmp_path_factory.mktemp("vllm_model")
    base = build_model(root / "base", hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=1, num_kv_heads=1, tied=True, seed=0,
                       tokenizer_dir=tokenizer_dir)
    return train_sft(load_config(SFTConfig, MANIFESTS / "sft_tiny.yaml", [
        f"model.path={base}", f"train.output_dir={root / 'sft'}", "train.save_steps=null",
        "train.max_steps=100", "optim.lr=5e-3", "train.progress_bar=false",
        "train.report_to=[none]"]))


def grpo_config(model: Path, out: Path, *overrides: str) -> GRPOConfig:
    return load_config(GRPOConfig, MANIFESTS / "grpo_tiny.yaml", [
        f"model.path={model}", f"train.output_dir={out}", *overrides])


@pytest.fixture(scope="session")
def engine(sft_model, tmp_path_factory):
    """The session's one sampler, made by the real `make_sampler` from a GRPO config."""
    config = grpo_config(sft_model, tmp_path_factory.mktemp("unused"), "backend=vllm",
                         "vllm.enforce_eager=true", "vllm.max_model_len=128",
                         f"vllm.kv_cache_memory_bytes={64 * 2**20}")
    sampler = generation.make_sampler(config, 0, 128, seed=0)
    assert isinstance(sampler, generation.VLLMSampler)
    close, sampler.close = sampler.close, lambda: None  # the code under test may not close it
    yield sampler
    close()


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reset(engine, model) -> None:
    """The engine as it would start from `model`'s folder: its weights, nothing synced yet."""
    engine.engine.sync(model, step=-1)
    engine.engine.synced = None


def provider(engine):
    """A `make_sampler` that hands out the session's engine, reset to the config's model."""
    def shared(config, pad_id, max_model_len, seed):
        assert config.backend == "vllm"
        from trainers.vllm_engine import check_vllm

        check_vllm(config.model, config.vllm)
        reset(engine, load(config.model.path))
        return engine

    return shared


@pytest.fixture
def use_engine(engine, monkeypatch):
    monkeypatch.setattr(generation, "make_sampler", provider(engine))
    return engine


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def prompts(sft_model, tokenizer_dir) -> list[list[int]]:
    from trainers.runtime import load_tokenizer

    config = grpo_config(sft_model, Path("unused"))
    train, _ = load_prompts(config.data, config.grpo.max_prompt_length,
                            load_tokenizer(config.model), config.train.seed)
    return train.ids[:16]


def margins(model, prompt: list[int], completion: list[int]) -> list[float]:
    """Top-1 minus top-2 logit at each completion position, teacher-forced."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # [C, V]
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def assert_same_where_clear(model, prompts, expected, got, stops) -> None:
    """`got` equals `expected` (HF's greedy) up to the first position with a near-tie; most
    positions must be comparable, or the test would prove nothing."""
    compared = total = 0
    for prompt, e, g in zip(prompts, expected, got):
        # margins of each emitted token and of the stop decision after the last one
        m = margins(model, prompt, e + ([min(stops)] if stops and len(e) < MAX_NEW else []))
        clear = next((i for i, v in enumerate(m) if v < MARGIN), len(m))
        assert g[:clear] == e[:clear], (prompt, e, g, m)
        if clear == len(m):
            assert g == e
        compared, total = compared + min(clear, len(e)), total + len(e)
    assert compared >= 0.8 * total, (compared, total)


# ---------------------------------------------------------------------------------------------

def test_greedy_matches_hf(engine, sft_model, prompts):
    model = load(sft_model)
    stops = generation.stop_token_ids(load_tokenizer(sft_model), model)
    reset(engine, model)
    expected = generation.HFSampler(0).greedy(prompts, MAX_NEW, stops, policy=model)
    got = engine.greedy(prompts, MAX_NEW, stops)
    assert_same_where_clear(model, prompts, expected, got, stops)
    assert any(len(e) < MAX_NEW for e in expected)  # some stop before the limit
    # no stop tokens: both run to the limit (the engine must not stop at the config's eos)
    expected = generation.HFSampler(0).greedy(prompts, MAX_NEW, set(), policy=model)
    got = engine.greedy(prompts, MAX_NEW, set())
    assert all(len(g) == MAX_NEW for g in got)
    assert_same_where_clear(model, prompts, expected, got, set())


def test_sampling_keeps_the_stops_length_and_knobs_of_the_hf_path(engine, sft_model, prompts):
    from trainers.grpo import GRPOParams
    from trainers.rollout import pad_rollout

    model = load(sft_model)
    reset(engine, model)
    greedy = engine.greedy(prompts, 6, set())
    common = max(range(3, 300), key=lambda t: sum(g.count(t) for g in greedy))
    eos = load_tokenizer(sft_model).eos_token_id
    stops = {common}
    params = GRPOParams(rewards=("format",), max_completion_length=10, temperature=0.7)
    repeated = [p for p in prompts for _ in range(4)]
    out = engine.sample(repeated, params, stops, logprobs=True)
    ended = [bool(c) and c[-1] in stops for c in out.tokens]
    for c, e in zip(out.tokens, ended):
        assert len(c) <= 10 and not set(c[:-1]) & stops  # nothing after the first stop
        assert e or len(c) == 10  # a completion ends at a stop token or at the length limit
    assert any(ended) and not all(ended)
    # no stops and a flat distribution: the engine samples on past the config's eos
    hot = GRPOParams(rewards=("format",), max_completion_length=16, temperature=2.0)
    wild = engine.sample(repeated * 2, hot, set()).tokens
    assert all(len(c) == 16 for c in wild) and any(eos in c for c in wild)
    assert [len(v) for v in out.logprobs] == [len(c) for c in out.tokens]
    # the engine sampled from the policy's distribution at this temperature
    batch = pad_rollout(repeated, out.tokens, 0, "cpu", out.logprobs)
    with torch.no_grad():
        policy = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                batch["completion_mask"], temperature=0.7)
    mask = batch["completion_mask"]
    gap = generation.logprob_gap(policy, batch["engine_logps"], mask) / mask.sum()
    assert gap < 1e-3, gap
    # top-k 1 and a tiny top-p leave one candidate: the greedy tokens
    stops = generation.stop_token_ids(load_tokenizer(sft_model), model)
    first = engine.greedy(prompts, 10, stops)
    for knobs in ({"top_k": 1}, {"top_p": 1e-6}):
        narrow = GRPOParams(rewards=("format",), max_completion_length=10, **knobs)
        sampled = engine.sample(prompts, narrow, stops).tokens
        assert [c[:-1] if c and c[-1] in stops else c for c in sampled] == first


@pytest.fixture(scope="module")
def grpo_runs(sft_model, tmp_path_factory, engine):
    """The same GRPO run with each backend (6 steps, checkpoints at every step with vllm)."""
    root = tmp_path_factory.mktemp("grpo")
    hf = train_grpo(grpo_config(sft_model, root / "hf", *GRPO, "train.save_steps=null"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "make_sampler", provider(engine))
        vllm = train_grpo(grpo_config(sft_model, root / "vllm", *GRPO, "backend=vllm",
                                      "train.save_steps=1", "train.save_total_limit=null"))
    return {"hf": hf, "vllm": vllm}


def test_grpo_with_vllm_loads_the_policy_into_the_engine_at_each_step(grpo_runs, engine,
                                                                      sft_model, prompts):
    rows = read_metrics(grpo_runs["vllm"])
    # each round was sampled by an engine holding that round's policy: the policy's own
    # log-probs of the sampled tokens agree with the engine's
    gaps = [row["sampling/logp_abs_diff"] for row in rows]
    assert all(g < 1e-3 for g in gaps), gaps
    # the last sync was at the start of the last round: the weights after step 5
    after5 = load(grpo_runs["vllm"] / "checkpoint-5")
    stops = generation.stop_token_ids(load_tokenizer(sft_model), after5)
    expected = generation.HFSampler(0).greedy(prompts, MAX_NEW, stops, policy=after5)
    assert expected != generation.HFSampler(0).greedy(prompts, MAX_NEW, stops,
                                                      policy=load(sft_model))  # it moved
    assert_same_where_clear(after5, prompts, expected, engine.greedy(prompts, MAX_NEW, stops),
                            stops)


def test_grpo_learns_with_vllm_as_with_hf(grpo_runs):
    for backend, out in grpo_runs.items():
        rows = read_metrics(out)
        rewards = [row["reward"] for row in rows]
        # digits from about 0.4 of the characters to nearly all (6 steps, hf: 0.39 -> 1.0)
        assert (sum(rewards[-2:]) - sum(rewards[:2])) / 2 > 0.2, (backend, rewards)
        losses = [row["loss"] for row in rows]
        # dapo at ratio 1: −Σ A·|o| / Σ|o|, a token-weighted mean of group-normalised
        # advantages: small, though not zero when lengths differ within a group
        assert all(abs(v) < 1.0 for v in losses), (backend, losses)
    assert "sampling/logp_abs_diff" not in read_metrics(grpo_runs["hf"])[0]


def test_a_lora_policy_is_synced_as_its_merged_weights(engine, sft_model, prompts):
    peft = pytest.importorskip("peft", reason="peft is not installed")

    model = load(sft_model)
    stops = generation.stop_token_ids(load_tokenizer(sft_model), model)
    before = generation.HFSampler(0).greedy(prompts, MAX_NEW, stops, policy=model)
    policy = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                        target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    expected = generation.HFSampler(0).greedy(prompts, MAX_NEW, stops, policy=policy)
    assert expected != before  # the adapters change the greedy output
    got = engine.greedy(prompts, MAX_NEW, stops, policy=policy, step=1)
    merged = policy.merge_and_unload()  # peft's merge, only to read margins from
    assert_same_where_clear(merged, prompts, expected, got, stops)


def test_train_pairwise_samples_with_vllm(use_engine, sft_model, digit_judge, tmp_path):
    from trainers.pairwise import PairwiseConfig, train_pairwise

    out = train_pairwise(load_config(PairwiseConfig, MANIFESTS / "pairwise_tiny.yaml", [
        f"model.path={sft_model}", f"pairwise.judge={digit_judge}", f"train.output_dir={tmp_path}",
        "backend=vllm", "train.max_steps=2", "train.save_steps=null", "train.progress_bar=false",
        "train.report_to=[none]", "pairwise.max_completion_length=8", "pairwise.beta=0.04"]))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # the engine held each round's policy: its log-probs of the samples are the policy's
    assert all(r["sampling/logp_abs_diff"] < 1e-3 for r in rows), rows
    assert all(0 <= r["reward"] <= 1 and r["sync_s"] >= 0 for r in rows)


@pytest.mark.parametrize("kind", ["pairs", "rso"])
def test_the_samplers_run_on_vllm(kind, use_engine, sft_model, tmp_path):
    from trainers.sampling import (
        SamplePairsConfig,
        SampleRSOConfig,
        load_sample_config,
        sample_pairs,
        sample_rso,
    )

    cls, run = (SamplePairsConfig, sample_pairs) if kind == "pairs" else \
        (SampleRSOConfig, sample_rso)
    out = tmp_path / f"{kind}.jsonl"
    config = load_sample_config(cls, MANIFESTS / f"sample_{kind}_tiny.yaml", [
        f"model.path={sft_model}", f"output={out}", "data.max_examples=6", "backend=vllm",
        "reward.function=grpo_rewards:digit_fraction", "generation.max_completion_length=8"])
    assert run(config) == out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert any(r["chosen_source"] == "policy" or r["rejected_source"] == "policy" for r in rows)


def _refused(model: Path, tmp_path: Path, *parts: str, sets: tuple[str, ...] = ()) -> None:
    before, out = snapshot(model), tmp_path / "run"
    result = CliRunner().invoke(train, [
        "grpo", str(MANIFESTS / "grpo_tiny.yaml"), "--set", f"model.path={model}",
        "--set", f"train.output_dir={out}", "--set", "backend=vllm",
        *(x for s in sets for x in ("--set", s))])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert all(p in result.output for p in parts), result.output
    assert not out.exists() and snapshot(model) == before


def test_models_vllm_cannot_run_are_refused_in_one_line(tiny_model, sft_model, tmp_path):
    # the shared tiny model: hidden 32 over 4 heads
    _refused(tiny_model, tmp_path, "has head_dim 8", "CPU attention", "set backend: hf")
    odd = tmp_path / "odd"
    shutil.copytree(sft_model, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config,
                                                 "architectures": ["NotAModelForCausalLM"]}))
    _refused(odd, tmp_path, "has no implementation of NotAModelForCausalLM", "model_impl")
    _refused(sft_model, tmp_path, "grpo.temperature: 2.5 is above 2, the most vLLM samples at",
             sets=("grpo.temperature=2.5",))


def test_two_processes_each_run_their_own_engine(sft_model, tmp_path):
    """torchrun, 2 ranks: each starts an engine on vLLM's external launcher, samples its own
    prompts from its own synced copy, and the run ends with its final save (vLLM's shutdown
    would destroy the process group that save needs)."""
    out = tmp_path / "two"
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
               "2", "-m", "trainers", "train", "grpo", str(MANIFESTS / "grpo_tiny.yaml"), "-q"]
    for item in (f"model.path={sft_model}", f"train.output_dir={out}", "backend=vllm",
                 "vllm.enforce_eager=true", f"vllm.kv_cache_memory_bytes={64 * 2**20}",
                 "train.max_steps=2", "train.save_steps=null", "optim.lr=3e-2"):
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and (out / "model.safetensors").is_file()
    assert all(r["sampling/logp_abs_diff"] < 1e-3 for r in rows), rows
