"""`mergekit-rl train ...` as users type it: one-line errors, cheap import, `python -m`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainers.cli import sample, train
from trainers.errors import TrainerConfigError

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"


def invoke(*args: str):
    return CliRunner().invoke(train, list(args))


def test_help_lists_the_trainers():
    result = invoke("--help")
    assert result.exit_code == 0 and "sft" in result.output and "grpo" in result.output
    assert "--resume" in invoke("grpo", "--help").output


def test_user_mistakes_are_one_line_errors(tmp_path):
    config = MANIFESTS / "grpo_tiny.yaml"
    result = invoke("grpo", str(config), "--set", "train.batch_size=12")
    assert result.exit_code == 1
    # the value came from --set, so the message names the --set, not the file
    assert result.output.startswith("Error: --set train.batch_size=12: 12 completions")
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    missing = invoke("sft", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 1 and "config file not found" in missing.output
    resume = invoke("sft", str(MANIFESTS / "sft_tiny.yaml"), "--set",
                    f"train.output_dir={tmp_path / 'empty'}", "--resume")
    assert resume.exit_code == 1 and "no checkpoint-N in" in resume.output


def test_a_run_through_the_cli(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = invoke("sft", str(MANIFESTS / "sft_tiny.yaml"), "--set", f"model.path={tiny_model}",
                    "--set", f"train.output_dir={out}", "--set", "train.max_steps=1", "-q")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()


def test_cli_import_is_cheap_and_python_m_works():
    code = "import sys, trainers.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    done = subprocess.run([sys.executable, "-m", "trainers", "train", "grpo", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "Usage: python -m trainers train grpo" in done.stdout
    old = subprocess.run([sys.executable, "-m", "trainers.grpo", "--help"], capture_output=True,
                         text=True)
    assert old.returncode == 1 and "python -m trainers train grpo" in old.stderr


def test_help_examples_work_on_the_shipped_configs():
    import re

    from trainers import registry

    configs = {"sft": "sft_tiny.yaml", "grpo": "grpo_tiny.yaml", "wpo": "wpo_tiny.yaml",
               "pairs": "sample_pairs_tiny.yaml", "rso": "sample_rso_tiny.yaml"}
    groups = {"sft": train, "grpo": train, "wpo": train, "pairs": sample, "rso": sample}
    for kind, name in configs.items():
        text = CliRunner().invoke(groups[kind], [kind, "--help"]).output
        examples = re.findall(r"--set\s+([a-z][\w.]*=\S+?)\s", " ".join(text.split()) + " ")
        assert examples, text
        for example in examples:
            registry.load(kind, MANIFESTS / name, [example])  # raises if the example is wrong
    assert "WPO" in invoke("--help").output
    assert "WPO" in CliRunner().invoke(sample, ["--help"]).output


def test_num_threads_is_applied_before_the_model(tiny_model, tmp_path):
    import torch

    from trainers.config import load_config
    from trainers.scaffold import Run
    from trainers.sft import SFTConfig

    previous = torch.get_num_threads()
    config = load_config(SFTConfig, MANIFESTS / "sft_tiny.yaml", [
        f"model.path={tiny_model}", f"train.output_dir={tmp_path / 'run'}",
        "train.num_threads=1"])
    try:
        torch.set_num_threads(2)
        Run(config, "sft")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(TrainerConfigError, match="num_threads=0: expected a positive number"):
        load_config(SFTConfig, MANIFESTS / "sft_tiny.yaml", ["train.num_threads=0"])


def test_cpu_malloc_tunes_glibc_and_leaves_a_users_tuning_alone(tiny_model, tmp_path,
                                                                monkeypatch):
    import ctypes
    import platform

    import torch

    from trainers import runtime
    from trainers.config import load_config
    from trainers.scaffold import Run
    from trainers.sft import SFTConfig

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    # the real glibc accepts both settings (mallopt returns 0 for a value it refuses)
    if platform.libc_ver()[0] == "glibc":
        assert runtime.set_cpu_malloc("cached") and runtime.set_cpu_malloc("bounded")
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))

    def run(*overrides):
        calls.clear()
        Run(load_config(SFTConfig, MANIFESTS / "sft_tiny.yaml", [
            f"model.path={tiny_model}", f"train.output_dir={tmp_path / 'run'}",
            "train.overwrite_output_dir=true", *overrides]), "sft")
        return dict(calls)

    # <malloc.h>: M_TRIM_THRESHOLD -1, M_TOP_PAD -2, M_MMAP_THRESHOLD -3
    assert run() == {-3: 256 * 1024, -1: 128 * 1024, -2: 128 * 1024}  # glibc's defaults, fixed
    assert run("train.cpu_malloc=cached") == {-3: 32 * 2**20, -1: 2**30, -2: 64 * 2**20}
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")  # the user's own tuning wins
    assert run("train.cpu_malloc=cached") == {}
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert run() == {}
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert not runtime.set_cpu_malloc("cached", torch.device("cuda")) and calls == []
    with pytest.raises(TrainerConfigError, match="cpu_malloc=fast: expected one of bounded, cached"):
        load_config(SFTConfig, MANIFESTS / "sft_tiny.yaml", ["train.cpu_malloc=fast"])
