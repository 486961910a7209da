"""What a folder is (model, task vector, PEFT adapter) and quantised checkpoints: told from
metadata and headers, refused with one line before any tensor data is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_failed, load_state, snapshot
from safetensors.torch import save_file

from mergekit_rl.checkpoint import Checkpoint, folder_kind, quantization
from mergekit_rl.cli import main


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def test_folder_kind_of_our_outputs_and_of_folders_from_elsewhere(tmp_path, tiny_models):
    m = tiny_models["qwen2_untied_bf16_sharded"]
    cli("extract", m["grpo"], m["sft"], "-o", tmp_path / "vec", "-q")
    cli("add", m["instruct"], tmp_path / "vec", "-o", tmp_path / "model", "-q")
    assert folder_kind(tmp_path / "vec") == "vector"    # our writer's __metadata__
    assert folder_kind(tmp_path / "model") == "model"
    assert folder_kind(m["base"]) == "model"             # save_pretrained: norm weights near 1
    state = load_state(tmp_path / "vec")
    (tmp_path / "plain_vec").mkdir()
    save_file(state, tmp_path / "plain_vec" / "model.safetensors")  # no metadata: norms near 0
    assert folder_kind(tmp_path / "plain_vec") == "vector"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)},
              tmp_path / "adapter" / "adapter_model.safetensors")
    assert folder_kind(tmp_path / "adapter") == "adapter"
    (tmp_path / "no_norms").mkdir()
    save_file({"w": torch.ones(3, 3)}, tmp_path / "no_norms" / "model.safetensors")
    assert folder_kind(tmp_path / "no_norms") is None
    assert folder_kind(tmp_path / "missing") is None
    # Gemma keeps RMSNorm weights as w in x·(1 + w): near 0 in a model, so it cannot be told
    (tmp_path / "gemma").mkdir()
    save_file({"model.norm.weight": torch.full((8,), 0.01)},
              tmp_path / "gemma" / "model.safetensors")
    (tmp_path / "gemma" / "config.json").write_text('{"model_type": "gemma2"}')
    assert folder_kind(tmp_path / "gemma") is None


# ---- quantised checkpoints ---------------------------------------------------------------------

def _fp8_checkpoint(folder, base_state, block: bool, config: dict | None):
    """FP8 weights as DeepSeek-V3 / Qwen3-FP8 ship them: F8_E4M3 matrices with weight_scale_inv
    (one scalar per tensor, or one per 128x128 block)."""
    state = {}
    for k, v in base_state.items():
        if v.dim() == 2 and "embed" not in k:
            scale = v.abs().max() / 448
            state[k] = (v / scale).to(torch.float8_e4m3fn)
            shape = (-(-v.shape[0] // 128), -(-v.shape[1] // 128)) if block else ()
            state[k + "_scale_inv"] = torch.full(shape, float(scale))
        else:
            state[k] = v
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    cfg = {"model_type": "qwen2"}
    if config is not None:
        cfg["quantization_config"] = config
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [128, 128]}


@pytest.mark.parametrize("block, config, needle", [
    (True, FP8_CONFIG, "config.json quantization_config: fp8, weight_block_size [128, 128]"),
    (False, None, "FP8 weights (F8_E4M3, e.g. model.layers.0.mlp.down_proj.weight) with "
                  "weight_scale_inv scales"),
])
def test_fp8_checkpoints_are_refused_before_any_data_is_read(tmp_path, tiny_models, monkeypatch,
                                                            block, config, needle):
    base = load_state(tiny_models["qwen2_tied_fp32"]["base"])
    a = _fp8_checkpoint(tmp_path / "a", base, block, config)
    b = _fp8_checkpoint(tmp_path / "b", base, block, config)  # two identical FP8 checkpoints
    before = {a: snapshot(a), b: snapshot(b)}
    monkeypatch.setattr(Checkpoint, "read", lambda *x, **k: pytest.fail("tensor data was read"))
    r = cli("extract", a, b, "-o", tmp_path / "vec", ok=False)
    assert_failed(r, tmp_path / "vec", before, f"{a}: quantised checkpoint ({needle})",
                  "use the unquantised (BF16) release, or dequantise it first",
                  "FineGrainedFP8Config(dequantize=True)")


@pytest.mark.parametrize("config, tensors, needle", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, {},
     "config.json quantization_config: bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4}, {}, "config.json quantization_config: gptq"),
    ({"quant_method": "awq", "bits": 4}, {}, "config.json quantization_config: awq"),
    (None, {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4, dtype=torch.int8)},
     "8-bit integer weight model.layers.0.mlp.up_proj.weight (I8)"),
    (None, {"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 4, dtype=torch.int32)},
     "quantisation tensor model.layers.0.mlp.up_proj.qweight"),
])
def test_other_quantisation_is_refused_before_any_data_is_read(tmp_path, tiny_models,
                                                              monkeypatch, config, tensors,
                                                              needle):
    m = tiny_models["qwen2_tied_fp32"]
    q = tmp_path / "q"
    shutil.copytree(m["base"], q)
    if config is not None:
        cfg = json.loads((q / "config.json").read_text())
        (q / "config.json").write_text(json.dumps({**cfg, "quantization_config": config}))
    if tensors:
        state = load_state(q)
        state.pop(next(iter(tensors)).replace("qweight", "weight"))  # replaced by its quantised form
        state.update(tensors)
        save_file(state, q / "model.safetensors")
    before = {q: snapshot(q)}
    monkeypatch.setattr(Checkpoint, "read", lambda *x, **k: pytest.fail("tensor data was read"))
    for args in (("extract", q, m["base"]), ("add", q, m["base"])):
        r = cli(*args, "-o", tmp_path / "out", ok=False)
        assert_failed(r, tmp_path / "out", before, f"{q}: quantised checkpoint ({needle}")


def test_plain_checkpoints_are_not_quantised(tiny_models):
    for models in tiny_models.values():
        for path in models.values():
            with Checkpoint.open(path) as ckpt:
                assert quantization(ckpt) is None, path
