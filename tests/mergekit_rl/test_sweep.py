"""The in-memory α sweep: each α's model equals `add --alpha α`'s output bit for bit, the target is
restored bit for bit, and `mergekit-rl sweep` through lm-eval (α = 0 scores as the target does,
--save-best writes add's output); bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import cli, load_state, one_line_error, snapshot
from word_task import QUESTIONS, write_task

from mergekit_rl.inmemory import VectorInMemory, sweep
from mergekit_rl.job import Options
from mergekit_rl.vectors import apply
from reasoning_demo.tiny import build_model, finetune_copy

VARIANTS = ["qwen2_tied_fp32", "qwen2_untied_bf16_sharded", "llama_untied_fp32_sharded"]




def in_memory_states(target, vector, alphas, options=Options()):
    """{α: the model's tensors at α} from the sweep, and the model after it."""
    from transformers import AutoModelForCausalLM

    states = {}
    with VectorInMemory(str(target), str(vector), options) as applied:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=applied.load_dtype)
        applied.attach(model)

        def capture(alpha):
            states[alpha] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        sweep(applied, alphas, capture)
    return states, model


def assert_same(state: dict, reference: dict) -> None:
    for name, tensor in reference.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name  # bit for bit (same dtype, same values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_alpha_equals_add_and_the_target_is_restored(tmp_path, tiny_models, variant):
    m = tiny_models[variant]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    alphas = (1.0, -0.5, 1.5, 0.0)
    for a in alphas:
        cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / f"add{a}", "--alpha", a, "-q")
    before = snapshot(m["instruct"])
    states, model = in_memory_states(m["instruct"], tmp_path / "vec", alphas)
    for a in alphas:
        assert_same(states[a], load_state(tmp_path / f"add{a}"))
    target = load_state(m["instruct"])
    assert_same(model.state_dict(), target)  # restored bit for bit
    if variant == "qwen2_tied_fp32":  # the shared matrix changed once, under both names
        assert "lm_head.weight" not in target
        assert torch.equal(states[1.5]["lm_head.weight"], states[1.5]["model.embed_tokens.weight"])
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert snapshot(m["instruct"]) == before


def test_mask_and_row_blocks_as_add(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    options = Options(include=("mlp", "embed"), exclude=("layers\\.0\\.",), block_bytes=1024)
    apply(str(m["instruct"]), str(tmp_path / "vec"), tmp_path / "add", 0.7, options)
    states, _ = in_memory_states(m["instruct"], tmp_path / "vec", (0.7,), options)
    added, target = load_state(tmp_path / "add"), load_state(m["instruct"])
    assert_same(states[0.7], added)
    assert torch.equal(states[0.7]["model.layers.0.mlp.up_proj.weight"],
                       target["model.layers.0.mlp.up_proj.weight"])  # masked out: the target's
    assert not torch.equal(states[0.7]["model.layers.1.mlp.up_proj.weight"],
                           target["model.layers.1.mlp.up_proj.weight"])


def test_vocabulary_rows_as_add(tmp_path, tiny_models, tokenizer_dir):
    # a target with 8 more vocabulary rows than the vector: the common rows change, the rest stay
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    rows = load_state(m["base"])["model.embed_tokens.weight"].shape[0]
    target = build_model(tmp_path / "target", tied=True, vocab_size=rows + 8, seed=4,
                         tokenizer_dir=tokenizer_dir)
    options = Options(allow_vocab_mismatch=True, block_bytes=2048)
    apply(str(target), str(tmp_path / "vec"), tmp_path / "add", 1.0, options)
    states, model = in_memory_states(target, tmp_path / "vec", (1.0,), options)
    added = load_state(tmp_path / "add")
    assert_same(states[1.0], added)
    emb = states[1.0]["model.embed_tokens.weight"]
    assert torch.equal(emb[rows:], load_state(target)["model.embed_tokens.weight"][rows:])
    assert_same(model.state_dict(), load_state(target))


def test_the_target_is_restored_after_an_error(tmp_path, tiny_models):
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")

    def fail(alpha):
        raise KeyboardInterrupt

    from transformers import AutoModelForCausalLM

    with VectorInMemory(str(m["instruct"]), str(tmp_path / "vec")) as applied:
        model = AutoModelForCausalLM.from_pretrained(m["instruct"], dtype=applied.load_dtype)
        applied.attach(model)
        with pytest.raises(KeyboardInterrupt):
            sweep(applied, (2.0,), fail)
        assert_same(model.state_dict(), load_state(m["instruct"]))


# ---- `mergekit-rl sweep` through lm-eval

@pytest.fixture(scope="module")
def word_vector(word_model, tmp_path_factory):
    """A vector that fits the word model: a noisy sibling minus the model."""
    root = tmp_path_factory.mktemp("word_vector")
    sibling = finetune_copy(word_model, root / "sibling", seed=5, scale=0.05)
    cli("extract", sibling, word_model, "-o", root / "vec", "-q")
    return root / "vec"


def test_sweep_command(word_model, word_vector, half_right, offline, tmp_path):
    tasks, right = half_right
    before = snapshot(word_model), snapshot(word_vector)
    run = tmp_path / "run"
    run.mkdir()
    r = cli("sweep", word_model, word_vector, "--alphas", "-1,0,1", "--tasks",
            "tiny_word_problems", "--include-path", tasks, "-o", run / "out", "--save-best",
            run / "best", "--device", "cpu")
    assert "alpha 0: tiny_word_problems exact_match" in r.output and "best alpha" in r.output
    rec = json.loads((run / "out" / "sweep.json").read_text())
    assert [p["alpha"] for p in rec["points"]] == [-1.0, 0.0, 1.0]
    values = {p["alpha"]: p["results"][0]["value"] for p in rec["points"]}
    assert values[0.0] == right / len(QUESTIONS)  # α = 0: the target's own score
    assert rec["selected_by"] == {"task": "tiny_word_problems", "metric": "exact_match",
                                  "filter": "strict-match", "higher_is_better": True}
    best = max(values, key=lambda a: (values[a], -list(values).index(a)))
    assert rec["best"]["alpha"] == best and rec["best"]["value"] == values[best]
    assert (run / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --save-best is add's output at the best α, with the results in its card
    cli("add", word_model, word_vector, "-o", tmp_path / "add", "--alpha", best, "-q")
    assert_same(load_state(run / "best"), load_state(tmp_path / "add"))
    assert "model-index" in (run / "best" / "README.md").read_text()
    assert sorted(p.name for p in run.iterdir()) == ["best", "out"]  # no other checkpoint
    assert (snapshot(word_model), snapshot(word_vector)) == before


# ---- bad input: one line, before any model loads, nothing written


def test_alphas_that_do_not_parse(word_model, word_vector, tmp_path, no_model_load):
    for text, word in (("1,x", "'x' is not a number"), ("0,nan", "not finite"),
                       ("1,1", "appears twice"), ("", "'' is not a number")):
        r = cli("sweep", word_model, word_vector, "--alphas", text, "--tasks", "t",
                "-o", tmp_path / "out", ok=False)
        one_line_error(r, "--alphas", word)
    assert not (tmp_path / "out").exists()


def test_vector_that_does_not_fit(word_model, tiny_models, half_right, offline, tmp_path,
                                  no_model_load):
    tasks, _ = half_right
    m = tiny_models["llama_untied_fp32_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    before = snapshot(word_model)
    r = cli("sweep", word_model, tmp_path / "vec", "--tasks", "tiny_word_problems",
            "--include-path", tasks, "-o", tmp_path / "out", "-q", ok=False)
    one_line_error(r, "cannot apply vector", "missing: model.layers.0.self_attn.k_proj.bias")
    assert not (tmp_path / "out").exists() and snapshot(word_model) == before


def test_unknown_task_and_missing_dependencies(word_model, word_vector, tmp_path, no_builtin_tasks,
                                         no_model_load, monkeypatch):
    tasks = write_task(tmp_path / "tasks", ["1"] * len(QUESTIONS))
    r = cli("sweep", word_model, word_vector, "--tasks", "tiny_word_problems,gsm8kk",
            "--include-path", tasks, "-o", tmp_path / "out", ok=False)
    one_line_error(r, "unknown lm-eval task 'gsm8kk'")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    r = cli("sweep", word_model, word_vector, "--tasks", "gsm8k", "-o", tmp_path / "out",
            ok=False)
    one_line_error(r, "lm-evaluation-harness is not installed", "pip install 'mergekit-rl[eval]'")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = cli("sweep", word_model, word_vector, "--tasks", "gsm8k", "-o", tmp_path / "out",
            ok=False)
    one_line_error(r, "matplotlib", "pip install 'mergekit-rl[eval]'")
    assert not (tmp_path / "out").exists()


def test_existing_save_best_is_refused_first(word_model, word_vector, tmp_path, no_model_load):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "keep.txt").write_text("x")
    r = cli("sweep", word_model, word_vector, "--tasks", "gsm8k", "-o", tmp_path / "out",
            "--save-best", tmp_path / "best", ok=False)
    one_line_error(r, "already exists", "--overwrite")
    assert (tmp_path / "best" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "out").exists()
