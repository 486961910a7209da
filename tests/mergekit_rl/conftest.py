"""Fixtures for the lm-eval tests (`tests/word_task.py` holds the task): the trained tiny model,
a task folder where the model gets half the items right, an offline environment (no Hub, no
network) and lm-eval without its built-in tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from word_task import greedy_answers, train_word_model, write_task


@pytest.fixture(scope="session")
def word_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny model that answers QUESTIONS in the `#### N` format (read-only by contract)."""
    return train_word_model(tmp_path_factory.mktemp("word_model") / "model", tokenizer_dir)


@pytest.fixture(scope="session")
def word_answers(word_model) -> list[str]:
    """The model's greedy answers to QUESTIONS, computed without lm-eval."""
    answers = greedy_answers(word_model)
    assert all(a is not None for a in answers), answers  # the model learnt the format
    return answers


@pytest.fixture
def datasets_offline(monkeypatch, tmp_path):
    """HF_DATASETS_OFFLINE=1 (also for modules imported before the test), the datasets cache in
    tmp_path, one torch thread, no lm-eval environment report."""
    import datasets.config
    import lm_eval.evaluator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    # lm-eval's environment report (torch's collect_env: 2 s of subprocesses per evaluation)
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch, datasets_offline):
    """`datasets_offline` plus HF_HUB_OFFLINE=1: no Hub, no network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


@pytest.fixture
def half_right(word_answers, tmp_path) -> tuple[Path, int]:
    """(a task folder, the number of items the model gets right): every other reference is the
    model's own greedy answer, the others a different number."""
    answers = word_answers
    refs = [a if i % 2 == 0 else str(int(a) + 1) for i, a in enumerate(answers)]
    return write_task(tmp_path / "tasks", refs), sum(r == a for r, a in zip(refs, answers))


@pytest.fixture
def no_builtin_tasks(monkeypatch):
    """lm-eval without its ~15,000 built-in task YAMLs (indexing them takes 20-30 s)."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager

    def manager(*args, include_defaults=True, **kwargs):
        return real(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly (a traceback, not exit 1) if a bad-input case gets as far as loading."""
    from mergekit_rl import evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluation, "load_model", refuse)
