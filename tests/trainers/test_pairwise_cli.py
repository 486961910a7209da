"""Bad input to `train judge`, `train pairwise` and a judge in `sample pairs`: one line that
names the field and the remedy, exit 1, before any model loads, nothing written, inputs as they
were."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from conftest import MANIFESTS, write_pairs
from helpers import snapshot

from trainers.cli import sample, train


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model's weights start loading."""
    import transformers

    from trainers import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(runtime, "load_model", refuse)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel,
                transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.fixture
def classifier(tiny_model, tmp_path) -> str:
    """A sequence-classification model folder: a reward model, not a generative judge."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    out = tmp_path / "classifier"
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    return str(out)


def run_bad(group, args: list[str], watched: list, out) -> str:
    before = {str(p): snapshot(p) for p in watched}
    result = CliRunner().invoke(group, args)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()
    assert {str(p): snapshot(p) for p in watched} == before
    return result.output


def test_judge_labels_must_be_single_tokens(tiny_model, tmp_path, no_model_loads):
    pairs = write_pairs(tmp_path / "pairs.jsonl", "complete")
    out = tmp_path / "out"
    config = MANIFESTS / "judge_tiny.yaml"
    message = run_bad(train, ["judge", str(config), "--set", f"model.path={tiny_model}",
                              "--set", f"data.path={pairs}", "--set", f"train.output_dir={out}",
                              "--set", "judge.labels=['Yes', 'No']"], [tiny_model], out)
    assert message.startswith(f"Error: {config}: judge.labels: 'Yes' is 2 tokens for this "
                              "tokenizer, but the judge answers with one token; choose labels "
                              "that are single tokens, e.g. [Y, N]")
    # unquoted, YAML reads Yes and No as booleans: say so
    message = run_bad(train, ["judge", str(config), "--set", f"train.output_dir={out}", "--set",
                              "judge.labels=[Yes, No]"], [tiny_model], out)
    assert "judge.labels.0: expected a string (YAML reads an unquoted yes, no" in message


@pytest.mark.parametrize("override, expected", [
    ("pairwise.anchor_field=nope", "pairwise.anchor_field: {data} row 0 has no field 'nope' "
     "(fields: question, answer, source); set pairwise.anchor_field to the field holding the "
     "reference response, or pairwise.anchor: greedy"),
    ("pairwise.judge={classifier}", "pairwise.judge: {classifier} is a "
     "Qwen2ForSequenceClassification, not a causal LM; a generative judge answers with a token"),
    ("pairwise.judge={empty}", "pairwise.judge: {empty} is not a model folder (no config.json)"),
    # a value the config check refuses is reported against the --set item that gave it
    ("pairwise.num_generations=1", "--set: expected >= 2"),
    ("train.batch_size=30", "--set: 30 completions per step is not a multiple of "
     "pairwise.num_generations 8 (each prompt's 8 completions must be in the same batch); set "
     "train.batch_size to 24 or 32"),
    ("pairwise.critic=true", "--set: a critic's GAE advantages replace the group "
     "normalisation; set pairwise.advantage: anchor"),
])
def test_pairwise_bad_input(tiny_model, digit_judge, classifier, tmp_path, no_model_loads,
                            override, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    config = MANIFESTS / "pairwise_tiny.yaml"
    data = MANIFESTS / "data" / "tiny_arith.jsonl"
    args = ["pairwise", str(config), "--set", f"model.path={tiny_model}", "--set",
            f"pairwise.judge={digit_judge}", "--set", f"train.output_dir={out}"]
    if override == "pairwise.critic=true":
        args += ["--set", "pairwise.advantage=group"]
    fill = {"data": data, "classifier": classifier, "empty": empty}
    args += ["--set", override.format(**fill)]
    message = run_bad(train, args, [tiny_model, digit_judge, data.parent], out)
    if expected.startswith("--set: "):
        expected = f"--set {override}: {expected[len('--set: '):]}"
    else:
        expected = f"{config}: {expected.format(**fill)}"
    assert message.startswith(f"Error: {expected}"), message


def test_sample_pairs_with_a_judge_needs_the_anchor_field(tiny_model, digit_judge, tmp_path,
                                                         no_model_loads):
    out = tmp_path / "pairs.jsonl"
    config = MANIFESTS / "sample_pairs_tiny.yaml"
    data = MANIFESTS / "data" / "tiny_arith.jsonl"
    message = run_bad(sample, ["pairs", str(config), "--set", f"model.path={tiny_model}",
                               "--set", f"output={out}", "--set", "reward.function=null",
                               "--set", f"reward.judge={digit_judge}", "--set",
                               "reward.anchor_field=nope"], [tiny_model, digit_judge], out)
    assert message.startswith(f"Error: {config}: reward.anchor_field: {data} row 0 has no field "
                              "'nope'"), message
