"""`mergekit-rl eval` through lm-evaluation-harness on a local task, offline; the card's
`model-index` (checked with huggingface_hub's parser); `push --eval`; bad input."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from importlib import metadata

import pytest
from helpers import cli, one_line_error, snapshot
from hub_server import FakeHub, configure_hf_client, front_matter
from word_task import QUESTIONS, write_task

from mergekit_rl import hub as hub_mod

TOKEN = "hf_secret_token_for_tests_123"







def test_eval_scores_the_models_own_greedy_answers(word_model, half_right, offline, tmp_path):
    tasks, right = half_right
    before = snapshot(word_model)
    r = cli("eval", word_model, "--tasks", "tiny_word_problems", "--include-path", tasks,
            "-o", tmp_path / "out", "--device", "cpu", "-q")
    assert "|tiny_word_problems|" in r.output and "exact_match" in r.output  # lm-eval's table
    rec = json.loads((tmp_path / "out" / "eval.json").read_text())
    (row,) = rec["results"]
    n = len(QUESTIONS)
    assert right == n // 2
    assert row["task"] == "tiny_word_problems" and row["metric"] == "exact_match"
    assert row["filter"] == "strict-match" and row["n"] == n
    assert row["value"] == right / n
    # lm-eval's stderr of a mean: the sample standard deviation over sqrt(n)
    scores = [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    assert math.isclose(row["stderr"], statistics.stdev(scores) / math.sqrt(n), rel_tol=1e-9)
    assert rec["lm_eval_version"] == metadata.version("lm_eval")
    assert len(row["config_hash"]) == 16 and row["dataset"]["path"] == "json"
    assert snapshot(word_model) == before  # MODEL is only read


def test_config_hash_follows_the_task_config(word_model, half_right, offline, tmp_path):
    tasks, _ = half_right
    cli("eval", word_model, "--tasks", "tiny_word_problems", "--include-path", tasks,
        "-o", tmp_path / "a", "--limit", "4", "-q")
    yaml_file = tasks / "tiny_word_problems.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("max_gen_toks: 12", "max_gen_toks: 11"))
    cli("eval", word_model, "--tasks", "tiny_word_problems", "--include-path", tasks,
        "-o", tmp_path / "b", "--limit", "4", "-q")
    a, b = (json.loads((tmp_path / d / "eval.json").read_text())["results"][0]
            for d in ("a", "b"))
    assert a["n"] == b["n"] == 4
    assert a["config_hash"] != b["config_hash"]


def _model_index(text: str):
    """(front matter, model name, EvalResults) of a card, by huggingface_hub's own parsers."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    meta = front_matter(text)
    name, results = model_index_to_eval_results(meta["model-index"])
    card = ModelCard(text)  # the card class reads model-index as the Hub does
    assert card.data.eval_results == results and card.data.model_name == name
    return meta, name, results


def test_update_card_adds_model_index_and_replaces_it(word_model, half_right, offline, tmp_path):
    tasks, right = half_right
    model = tmp_path / "model"
    shutil.copytree(word_model, model)
    (model / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mine\n---\n\n# Mine\n")
    weights = {k: v for k, v in snapshot(model).items() if k != "README.md"}
    for _ in range(2):  # a second run replaces the result instead of adding one
        cli("eval", model, "--tasks", "tiny_word_problems", "--include-path", tasks,
            "--update-card", "-q")
    meta, name, results = _model_index((model / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["mine"]  # the rest is kept
    assert name == "model"
    (res,) = results
    assert res.task_type == "text-generation" and res.task_name == "tiny_word_problems"
    assert res.metric_type == "exact_match" and res.metric_config == "strict-match"
    assert res.metric_value == right / len(QUESTIONS) and res.dataset_split == "test"
    assert res.source_name == "lm-evaluation-harness"
    assert "# Mine" in (model / "README.md").read_text()
    assert {k: v for k, v in snapshot(model).items() if k != "README.md"} == weights


@pytest.fixture
def fake(monkeypatch, tmp_path):
    with FakeHub(token=TOKEN) as server:
        configure_hf_client(monkeypatch, server.endpoint, home=tmp_path / "hf_home", token=TOKEN)
        monkeypatch.setattr(hub_mod, "RETRY_DELAYS", (0.0, 0.0, 0.0))
        yield server


def test_push_eval_puts_results_on_the_uploaded_card_only(fake, tmp_path, tiny_models):
    m = tiny_models["qwen2_tied_fp32"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "merged", "-q")
    record = {"results": [
        {"task": "gsm8k", "metric": "exact_match", "filter": "strict-match", "value": 0.25,
         "stderr": 0.01, "n": 1319, "num_fewshot": 5,
         "dataset": {"path": "gsm8k", "name": "main", "split": "test"}},
        {"task": "gsm8k", "metric": "exact_match", "filter": "flexible-extract", "value": 0.3,
         "stderr": 0.01, "n": 1319, "num_fewshot": 5,
         "dataset": {"path": "gsm8k", "name": "main", "split": "test"}}]}
    (tmp_path / "eval.json").write_text(json.dumps(record))
    before = snapshot(tmp_path / "merged")
    cli("push", tmp_path / "merged", "org/merged", "--eval", tmp_path / "eval.json")
    files = fake.repos["model/org/merged"].files
    assert "model.safetensors" in files and "config.json" in files
    meta, name, results = _model_index(files["README.md"].decode())
    assert name == "merged" and "mergekit-rl" in meta["tags"]  # our card, plus the results
    assert [(r.metric_config, r.metric_value) for r in results] == [
        ("strict-match", 0.25), ("flexible-extract", 0.3)]
    assert results[0].dataset_args == {"num_few_shot": 5}
    assert snapshot(tmp_path / "merged") == before  # the local folder is unchanged


def test_eval_of_a_hub_id(fake, word_model, half_right, datasets_offline, tmp_path):
    tasks, right = half_right
    shutil.copytree(word_model, tmp_path / "model")
    cli("push", tmp_path / "model", "org/word-model")
    r = cli("eval", "org/word-model", "--tasks", "tiny_word_problems", "--include-path", tasks,
            "-o", tmp_path / "out", "-q")
    assert "|tiny_word_problems|" in r.output
    rec = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert rec["results"][0]["value"] == right / len(QUESTIONS)
    assert rec["model"] == "org/word-model" and rec["source"]["repo_id"] == "org/word-model"
    assert len(rec["source"]["commit"]) == 40


# ---- bad input: one line, nothing written, inputs unchanged, no model loaded

def test_unknown_task(word_model, tmp_path, no_builtin_tasks, no_model_load, offline):
    before = snapshot(word_model)
    r = cli("eval", word_model, "--tasks", "tiny_word_problemz", "-o", tmp_path / "out",
            "--include-path", write_task(tmp_path / "tasks", ["1"] * len(QUESTIONS)), ok=False)
    one_line_error(r, "'tiny_word_problemz'", "did you mean tiny_word_problems",
                   "--include-path")
    assert not (tmp_path / "out").exists() and snapshot(word_model) == before


def test_lm_eval_not_installed(word_model, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    r = cli("eval", word_model, "--tasks", "gsm8k", "-o", tmp_path / "out", ok=False)
    one_line_error(r, "lm-evaluation-harness is not installed", "pip install 'mergekit-rl[eval]'")
    assert not (tmp_path / "out").exists()


def test_network_dataset_while_offline(word_model, tmp_path, offline, no_model_load):
    tasks = write_task(tmp_path / "tasks", ["1"] * len(QUESTIONS), name="hub_task",
                       dataset_path="someorg/some-dataset-not-cached")
    r = cli("eval", word_model, "--tasks", "hub_task", "--include-path", tasks,
            "-o", tmp_path / "out", ok=False)
    one_line_error(r, "task hub_task", "someorg/some-dataset-not-cached", "HF_HUB_OFFLINE",
                   "dataset_path: json")
    assert not (tmp_path / "out").exists()


def test_update_card_needs_a_local_folder(tmp_path, no_model_load):
    r = cli("eval", "org/model", "--tasks", "gsm8k", "--update-card", ok=False)
    one_line_error(r, "--update-card", "org/model", "push FOLDER REPO --eval")


def test_push_eval_with_a_bad_file(tmp_path, tiny_models):
    (tmp_path / "eval.json").write_text('{"not": "ours"}')
    r = cli("push", tiny_models["qwen2_tied_fp32"]["base"], "org/x", "--eval",
            tmp_path / "eval.json", ok=False)
    one_line_error(r, "eval.json", "results")
