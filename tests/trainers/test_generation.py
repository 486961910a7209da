"""Generation stops at the end of the assistant turn (GRPO and both samplers), and per-prompt
seeded sampling: draws that do not depend on the batch and follow the softmax.

The tiny tokenizer is Qwen2.5's situation: eos is `<|endoftext|>`, the chat template closes a
turn with `<|im_end|>`. A scripted model (a hook on the LM head forces a token sequence)
writes `#### 4<|im_end|>#### 9...`: stopping at the turn's end reads 4; running on reads 9.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning_demo import tasks
from trainers import models
from trainers.generation import sample, stop_token_ids
from trainers.metrics import read_metrics

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"


def script_ids(tokenizer) -> list[int]:
    """`#### 4`, end of turn, then an invented continuation `#### 9` and more."""
    im_end = tokenizer.convert_tokens_to_ids(tasks.IM_END)
    head = tokenizer("#### 4", add_special_tokens=False)["input_ids"]
    tail = tokenizer("#### 9 #### 9 #### 9 #### 9", add_special_tokens=False)["input_ids"]
    return head + [im_end] + tail


def scripted(model, script: list[int]):
    """Make `model` emit `script` token by token after any prompt (logits +1e4 on the next
    scripted token); a prefill forward (more than one input position) restarts the script."""
    state = {"step": 0}

    def restart(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            state["step"] = 0

    def hook(module, args, output):
        token = script[min(state["step"], len(script) - 1)]
        state["step"] += 1
        output = output.clone()
        output[:, -1, token] += 1e4
        return output

    model.register_forward_pre_hook(restart, with_kwargs=True)
    model.get_output_embeddings().register_forward_hook(hook)
    return model


@pytest.fixture
def scripted_loads(monkeypatch, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    script = script_ids(tokenizer)
    real = models.load_model

    def load(model, path=None, trainable=True):
        return scripted(real(model, path, trainable), script)

    monkeypatch.setattr(models, "load_model", load)
    return tokenizer, script


def test_the_stop_tokens_include_the_end_of_turn(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    im_end = tokenizer.convert_tokens_to_ids(tasks.IM_END)
    assert tokenizer.eos_token_id != im_end  # the case this file is about
    assert stop_token_ids(tokenizer, model) == {tokenizer.eos_token_id, im_end}


def test_sample_cuts_at_the_end_of_turn(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    script = script_ids(tokenizer)
    model = scripted(AutoModelForCausalLM.from_pretrained(tiny_model), script)
    params = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, max_completion_length=12,
                             generation_batch_size=None)
    prompt = tokenizer("Question: 2 + 2?", add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tokenizer, model)
    im_end = tokenizer.convert_tokens_to_ids(tasks.IM_END)
    for seeds in (None, [1, 2]):
        got = sample(model, [prompt, prompt], params, tokenizer.pad_token_id, stops, "cpu", seeds)
        assert got == [script[:script.index(im_end) + 1]] * 2
    # with the eos alone it runs on into the invented turn
    ran_on = sample(model, [prompt], params, tokenizer.pad_token_id, {tokenizer.eos_token_id},
                    "cpu")
    assert len(ran_on[0]) == 12


def test_grpo_stops_at_the_end_of_turn_and_rewards_the_first_answer(load, scripted_loads,
                                                                    tmp_path):
    from trainers.grpo import train_grpo

    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} plus {4 - a}?",
                                        "answer": "#### 4"}) + "\n" for a in range(4)))
    out = train_grpo(load("grpo_tiny.yaml", f"data.path={data}", "train.max_steps=1",
                          "train.save_steps=null", "grpo.rewards=[exact_answer]",
                          "grpo.max_completion_length=12", "grpo.num_generations=8"))
    [row] = read_metrics(out)
    head = len(scripted_loads[1][:scripted_loads[1].index(2) + 1])
    assert row["completion_length/max"] == head and row["terminated_fraction"] == 1.0
    assert row["reward"] == 1.0  # the answer before <|im_end|>, not the invented "#### 9"


@pytest.mark.parametrize("kind", ["pairs", "rso"])
def test_samplers_stop_at_the_end_of_turn(kind, scripted_loads, tiny_model, tmp_path,
                                          monkeypatch):
    import trainers.sampling as sampling

    tokenizer, script = scripted_loads
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"What is {a} plus {4 - a}?",
                                        "answer": "#### 4", "wrong": "#### 5"}) + "\n"
                            for a in range(3)))
    overrides = [f"model.path={tiny_model}", f"data.path={rows}",
                 f"output={tmp_path / 'out.jsonl'}", "generation.max_completion_length=12",
                 "data.max_examples=3", "reward.function=exact_answer"]
    if kind == "pairs":  # hybrid: the scripted samples against an off-policy wrong answer
        cls, fn = sampling.SamplePairsConfig, sampling.sample_pairs
        overrides += ["pairs.off_policy_fields=[wrong]", "generation.num_samples=2"]
    else:  # every candidate is the scripted one: score every other one 0 to get pairs
        cls, fn = sampling.SampleRSOConfig, sampling.sample_rso
        overrides += ["generation.num_samples=4", "rso.num_accepted=4"]
        real = sampling.score
        monkeypatch.setattr(sampling, "score", lambda reward, p, c, cols: [
            r if i % 2 == 0 else 0.0 for i, r in enumerate(real(reward, p, c, cols))])
    out = fn(sampling.load_sample_config(cls, MANIFESTS / f"sample_{kind}_tiny.yaml",
                                         overrides))
    head = tokenizer.decode(script[:script.index(2)], skip_special_tokens=True)
    rows_out = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert rows_out
    for row in rows_out:
        for side in ("chosen", "rejected"):
            if row[f"{side}_source"] == "policy":
                assert row[side] == head  # "#### 4", not "#### 4#### 9 ..."
    assert all(row["chosen_reward"] == 1.0 for row in rows_out)


# ---------------------------------------------------------------------------------------------
# Per-prompt seeded sampling

def test_seeded_samples_do_not_depend_on_the_batch(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    params = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, max_completion_length=8,
                             generation_batch_size=None)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("What is 1 plus 2?", "Reverse: a b", "Sort: c a b d e f")]
    stops = stop_token_ids(tokenizer, model)
    together = sample(model, prompts, params, 0, stops, "cpu", seeds=[11, 12, 13])
    alone = [sample(model, [p], params, 0, stops, "cpu", seeds=[s])[0]
             for p, s in zip(prompts, (11, 12, 13))]
    reordered = sample(model, prompts[::-1], params, 0, stops, "cpu", seeds=[13, 12, 11])
    assert together == alone == reordered[::-1]
    assert sample(model, prompts, params, 0, stops, "cpu", seeds=[14, 12, 13])[1:] == \
        together[1:]


def test_seeded_first_tokens_follow_the_tempered_top_k_softmax(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = tokenizer("What is 1 plus 2?", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1] / 0.7
    top = torch.topk(logits, 5)
    probs = torch.softmax(top.values, -1)
    params = SimpleNamespace(temperature=0.7, top_p=1.0, top_k=5, max_completion_length=1,
                             generation_batch_size=None)
    n = 3000
    draws = sample(model, [prompt] * n, params, 0, set(), "cpu", seeds=list(range(n)))
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=logits.shape[0])
    assert set(counts.nonzero()[:, 0].tolist()) <= set(top.indices.tolist())  # top-k only
    for token, p in zip(top.indices.tolist(), probs.tolist()):
        assert abs(counts[token] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3
