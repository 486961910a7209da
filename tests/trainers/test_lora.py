"""LoRA through peft in every trainer: the output is a PEFT adapter folder that peft loads, the
merged weights equal peft's own `merge_and_unload`, the reference is the policy with adapters
off (no second copy), resume reproduces the run, and bad LoRA configs fail before the model
loads."""

from __future__ import annotations

import ast
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainers import checkpointing, models
from trainers.errors import TrainingInterrupted
from trainers.metrics import read_metrics
from trainers.sft import train_sft

peft = pytest.importorskip("peft")

LORA = "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj], merge: true}"
TIMING = ("tokens_per_s", "step_s", "gen_s")
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"


def curve(out) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]


def test_sft_writes_an_adapter_folder_and_merged_weights_equal_to_peft(load, tiny_model):
    from peft import PeftModel

    before = load_file(tiny_model / "model.safetensors")
    out = train_sft(load("sft_tiny.yaml", LORA, "train.max_steps=3", "optim.lr=1e-2"))
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter, not a copy of the base
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # peft's own reading of the folder, merged by peft
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference = PeftModel.from_pretrained(base, out).merge_and_unload()
    merged = load_file(out / "merged" / "model.safetensors")
    for name, value in reference.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: saved once, as the embedding
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0, msg=name)
    changed = [k for k in before if not torch.equal(before[k], merged[k])]
    assert changed and all(any(t in k for t in ("q_proj", "v_proj", "down_proj"))
                           for k in changed)
    assert load_file(tiny_model / "model.safetensors").keys() == before.keys()
    assert "library_name: peft" in (out / "README.md").read_text()


def test_grpo_reference_is_the_policy_with_adapters_off(load, monkeypatch):
    from trainers.grpo import train_grpo

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model",
                        lambda m, path=None, trainable=True: loads.append(trainable) or
                        real(m, path, trainable))
    out = train_grpo(load("grpo_tiny.yaml", LORA, "train.max_steps=2", "grpo.beta=0.04",
                          "optim.lr=5e-2", "grpo.rewards=[grpo_rewards:digit_fraction]",
                          "grpo.max_completion_length=8", "train.save_steps=null"))
    assert loads == [True]  # one model in memory: no reference copy
    first, second = read_metrics(out)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0: the policy is the base
    assert second["kl"] > 0  # adapters on moved the policy off the reference (adapters off)


def test_wpo_with_lora_and_resume_reproduces_the_run(tiny_model, tmp_path, monkeypatch):
    from trainers.config import load_config
    from trainers.wpo import WPOConfig, train_wpo

    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()[:8]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["question"], "chosen": r["answer"],
                                         "rejected": r["answer"][:-1] + "7"}) + "\n"
                             for r in rows))

    def config(out):
        return load_config(WPOConfig, MANIFESTS / "wpo_tiny.yaml", [
            f"model.path={tiny_model}", f"data.path={pairs}", f"train.output_dir={tmp_path / out}",
            "train.progress_bar=false", "train.batch_size=4", "train.micro_batch_size=2",
            "train.max_steps=4", "train.save_steps=null", "optim.lr=1e-2", LORA])

    full = train_wpo(config("full"))
    calls = {"n": 0}

    def fake_requested(self, accelerator):
        calls["n"] += 1
        return signal.SIGTERM if calls["n"] == 2 else 0

    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        patch.setattr(checkpointing.StopSignal, "requested", fake_requested)
        train_wpo(config("cut"))
    assert (tmp_path / "cut" / "checkpoint-2" / "adapter_config.json").is_file()
    cut = train_wpo(config("cut"), resume="latest")
    assert curve(cut) == curve(full)
    a, b = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert curve(full)[-1]["rewards/margins"] > 0


def _cli(tiny_model, tmp_path, *overrides):
    from trainers.cli import train

    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["sft", str(MANIFESTS / "sft_tiny.yaml"), "-q",
                                        "--set", f"model.path={tiny_model}",
                                        "--set", f"train.output_dir={out}",
                                        *[x for o in overrides for x in ("--set", o)]])
    return result, out


def test_target_modules_that_match_nothing_fail_before_the_model_loads(tiny_model, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    before = load_file(tiny_model / "model.safetensors")
    result, out = _cli(tiny_model, tmp_path, "model.lora={target_modules: [q_proj, qv_proj]}")
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and "model.lora.target_modules: 'qv_proj' matches " \
        "no module" in result.output and "q_proj" in result.output
    assert not out.exists()
    after = load_file(tiny_model / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_without_peft_is_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    result, out = _cli(tiny_model, tmp_path, "model.lora={r: 8}")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "model.lora: LoRA needs peft" in result.output and "mergekit-rl[peft]" in result.output
    assert not out.exists()


def test_peft_is_imported_only_where_lora_is_used():
    """Every `import peft` of the trainers sits inside a function of trainers/models.py."""
    root = Path(__file__).resolve().parents[2] / "trainers"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "peft" or n.startswith("peft.") for n in names):
                assert path.name == "models.py" and id(node) not in top, path
