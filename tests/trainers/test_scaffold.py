"""What the scaffold gives every trainer: held-out evaluation and the best checkpoint,
`--dry-run`, the tokenised-data cache, SFT packing, precision, fp16 overflow steps, and the
launch checks (one line before the model loads)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from trainers import models
from trainers.cli import train
from trainers.metrics import read_metrics
from trainers.sft import train_sft

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"
DIGITS = "grpo.rewards=[grpo_rewards:digit_fraction]"


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


# ---------------------------------------------------------------------------------------------
# Evaluation

def test_eval_loss_is_the_next_steps_training_loss_on_the_same_rows(load, tmp_path):
    """Held-out rows = the training rows, one batch = all of them: the evaluation after step k
    and the training loss of step k+1 see the same weights and the same rows."""
    data = tmp_path / "sixteen.jsonl"
    data.write_text("".join((MANIFESTS / "data" / "tiny_arith.jsonl").read_text()
                            .splitlines(keepends=True)[:16]))
    out = train_sft(load("sft_tiny.yaml", f"data.path={data}", f"data.eval_path={data}",
                         "train.batch_size=16", "train.micro_batch_size=8", "train.max_steps=3",
                         "train.eval_steps=1", "train.save_steps=null"))
    rows = read_metrics(out)
    for before, after in zip(rows, rows[1:]):
        assert before["eval/loss"] == pytest.approx(after["loss"], abs=1e-5)


def test_wpo_eval_loss_is_the_next_steps_training_loss(tiny_model, tmp_path):
    from trainers.config import load_config
    from trainers.wpo import WPOConfig, train_wpo

    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()[:6]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["question"], "chosen": r["answer"],
                                         "rejected": r["answer"][:-1] + "7"}) + "\n"
                             for r in rows))
    out = train_wpo(load_config(WPOConfig, MANIFESTS / "wpo_tiny.yaml", [
        f"model.path={tiny_model}", f"data.path={pairs}", f"data.eval_path={pairs}",
        f"train.output_dir={tmp_path / 'run'}", "train.progress_bar=false",
        "train.batch_size=6", "train.micro_batch_size=3", "train.max_steps=3",
        "train.eval_steps=1", "train.save_steps=null", "optim.lr=1e-2",
        "optim.warmup_ratio=0"]))
    rows = read_metrics(out)
    for before, after in zip(rows, rows[1:]):
        assert before["eval/loss"] == pytest.approx(after["loss"], abs=1e-5)
        assert before["eval/rewards/accuracies"] == pytest.approx(after["rewards/accuracies"])


def test_the_best_checkpoint_is_kept(load, monkeypatch):
    import trainers.sft as sft

    scripted = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(sft, "evaluate", lambda run, examples: {"loss": next(scripted)})
    out = train_sft(load("sft_tiny.yaml", "data.eval_size=16", "train.max_steps=6",
                         "train.eval_steps=2", "train.save_steps=1", "train.save_total_limit=1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best"] == {"metric": "eval/loss", "value": 1.0, "step": 4,
                             "checkpoint": "checkpoint-4"}
    evals = [(r["step"], r["eval/loss"]) for r in read_metrics(out) if "eval/loss" in r]
    assert evals == [(2, 3.0), (4, 1.0), (6, 2.0)]


def test_held_out_rows_are_left_out_of_training(load, monkeypatch):
    import trainers.sft as sft

    seen = []
    real = sft.build_examples
    monkeypatch.setattr(sft, "build_examples",
                        lambda rows, *a: seen.append([r["question"] for r in rows]) or
                        real(rows, *a))
    train_sft(load("sft_tiny.yaml", "data.eval_size=16", "train.max_steps=1",
                   "train.eval_steps=1", "data.cache=false"))
    training, held_out = seen
    rows = [json.loads(line)["question"] for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()]
    drawn = set(torch.randperm(256, generator=torch.Generator().manual_seed(0))[:16].tolist())
    assert held_out == [q for i, q in enumerate(rows) if i in drawn]
    assert training == [q for i, q in enumerate(rows) if i not in drawn]


def test_grpo_eval_reward_is_the_greedy_completions_reward(load, tiny_model):
    import grpo_rewards
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.grpo import train_grpo

    out = train_grpo(load("grpo_tiny.yaml", DIGITS, "train.max_steps=1", "train.eval_steps=1",
                          "data.eval_size=4", "grpo.max_completion_length=6",
                          "train.save_steps=null", "optim.lr=1e-2"))
    [row] = read_metrics(out)
    # by hand: the final model's greedy continuation of each held-out prompt
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    rows = [json.loads(line) for line in
            (MANIFESTS / "data" / "tiny_arith.jsonl").read_text().splitlines()]
    held = sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:4]
                  .tolist())
    texts = []
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for i in held:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": rows[i]["question"]}],
                                               tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)
                                  if new else ids).logits[0, -1].argmax())
                if token in stops:
                    break
                new.append(token)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    want = sum(grpo_rewards.digit_fraction(None, texts)) / 4
    assert row["eval/reward"] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Dry run

def test_dry_run_prints_the_plan_and_loads_no_weights(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["grpo", str(MANIFESTS / "grpo_tiny.yaml"), "--dry-run",
                                        *sets(f"model.path={tiny_model}",
                                              f"train.output_dir={out}", "grpo.beta=0.04")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "grpo dry run (no weights loaded)" in text
    assert "4 prompts x G 8 = 32 completions per round" in text
    assert "per optimizer step: 32 completions = 1 process x 2 micro-batches x 16 completions" \
        in text
    assert "reference copy" in text and "LM-head logits" in text
    assert not out.exists()


def test_dry_run_says_what_a_deferred_head_and_a_streamed_reference_save(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["grpo", str(MANIFESTS / "grpo_tiny.yaml"), "--dry-run",
                                        *sets(f"model.path={tiny_model}",
                                              f"train.output_dir={out}", "grpo.beta=0.04",
                                              "model.lm_head_grad=deferred",
                                              "model.reference_offload=true")])
    assert result.exit_code == 0, result.output
    vocab, hidden = 300, 32  # the tiny model's tied matrix: 38.4 kB of fp32 gradient fewer
    assert f"LM-head gradient: deferred (model.lm_head_grad), formed a block of vocabulary rows " \
        f"at a time at the optimizer step: {vocab * hidden * 4 / 1e6:.1f} MB less" in result.output
    assert "on the CPU its embedding and LM head stay in its files" in result.output


def test_dry_run_counts_lora_parameters_as_peft_does(tiny_model, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    result = CliRunner().invoke(train, ["sft", str(MANIFESTS / "sft_tiny.yaml"), "--dry-run",
                                        *sets(f"model.path={tiny_model}",
                                              f"train.output_dir={tmp_path / 'run'}",
                                              "model.lora={r: 4, target_modules: [q_proj, "
                                              "v_proj]}")])
    assert result.exit_code == 0, result.output
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert f"{trainable / 1e6:.3g} M trainable" in result.output


# ---------------------------------------------------------------------------------------------
# Data

def test_tokenised_data_is_reused_and_rebuilt_when_its_inputs_change(load, monkeypatch,
                                                                     tmp_path):
    import trainers.sft as sft

    monkeypatch.setenv("MERGEKIT_RL_CACHE", str(tmp_path / "cache"))
    builds = []
    real = sft.build_examples
    monkeypatch.setattr(sft, "build_examples",
                        lambda rows, *a: builds.append(len(rows)) or real(rows, *a))
    first = train_sft(load("sft_tiny.yaml", "train.max_steps=1", out="a"))
    second = train_sft(load("sft_tiny.yaml", "train.max_steps=1", out="b"))
    assert builds == [256]  # the second run read the cache
    assert read_metrics(first) == read_metrics(second) or \
        [r["loss"] for r in read_metrics(first)] == [r["loss"] for r in read_metrics(second)]
    train_sft(load("sft_tiny.yaml", "train.max_steps=1", "sft.max_length=48", out="c"))
    train_sft(load("sft_tiny.yaml", "train.max_steps=1", "data.system_prompt=Be brief.",
                   out="d"))
    assert builds == [256, 256, 256]
    assert len(list((tmp_path / "cache" / "tokenized").glob("sft-*.json"))) == 3


def test_packing_gives_the_same_losses_and_says_what_it_saved(load, caplog):
    caplog.set_level(logging.INFO, "trainers")
    plain = train_sft(load("sft_tiny.yaml", "train.max_steps=3", out="plain"))
    packed = train_sft(load("sft_tiny.yaml", "train.max_steps=3", "sft.packing=true",
                            out="packed"))
    for a, b in zip(read_metrics(plain), read_metrics(packed)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
        assert b["tokens"] == a["tokens"]
    assert any("sft.packing: micro-batches hold" in r.message and "saved" in r.message
               for r in caplog.records)
    a, b = load_file(plain / "model.safetensors"), load_file(packed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---------------------------------------------------------------------------------------------
# Precision

def test_auto_precision_is_plain_fp32_on_the_cpu(load):
    from trainers.scaffold import Run

    run = Run(load("sft_tiny.yaml"), "sft")
    assert run.precision == "no" and run.accelerator.mixed_precision == "no"


def test_low_precision_master_weights_warn_unless_opted_in(load, caplog):
    caplog.set_level(logging.WARNING, "trainers")
    train_sft(load("sft_tiny.yaml", "train.max_steps=1", "model.dtype=bfloat16", out="a"))
    assert any("bfloat16 master weights" in r.message and "rounds away" in r.message
               for r in caplog.records)
    caplog.clear()
    train_sft(load("sft_tiny.yaml", "train.max_steps=1", "model.dtype=bfloat16",
                   "model.allow_low_precision_weights=true", out="b"))
    assert not any("master weights" in r.message for r in caplog.records)


def test_fp16_overflow_skips_the_update_and_the_schedule(load, caplog):
    """The scaler path of `Run.update` (a CPU GradScaler stands in for CUDA's)."""
    from trainers.scaffold import Run

    caplog.set_level(logging.WARNING, "trainers")
    run = Run(load("sft_tiny.yaml", "optim.scheduler=linear", "optim.warmup_steps=0"), "sft")
    run.start(4)
    from accelerate.optimizer import patch_optimizer_step

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = run.optimizer  # what AcceleratedOptimizer sets up when it has a scaler
    run.accelerator.scaler = opt.scaler = scaler
    opt._accelerate_step_called = False
    opt._optimizer_original_step_method = opt.optimizer.step
    opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
    weight = run.policy.get_output_embeddings().weight
    before = weight.detach().clone()
    for finite in (False, True):
        with run.accumulate(last=False):
            run.backward(weight.sum() * (1.0 if finite else float("inf")))
        with run.accumulate(last=True):
            run.backward(weight.sum())
        grad_norm, lr = run.update(1.0)
        if not finite:
            assert run.skipped_steps == 1 and torch.equal(weight, before)
            assert run.scheduler.get_last_lr()[0] == lr  # the schedule did not move
            assert scaler.get_scale() == 2.0 ** 7
    assert run.step == 2 and not torch.equal(weight, before)
    assert any("fp16 gradients overflowed" in r.message and "step 1" in r.message
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# What the launcher asks for, checked before the model loads

LAUNCH_CASES = [
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, (),
     "accelerate config gradient_accumulation_steps: 4, but the trainer accumulates"),
    ({"WORLD_SIZE": "3"}, (), "train.batch_size: 8 does not split over 3 processes"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ("train.mixed_precision=no",),
     "train.mixed_precision: no, but the accelerate config asks for bf16"),
    ({}, ("train.mixed_precision=fp16",), "train.mixed_precision: fp16 needs a GPU"),
    ({"ACCELERATE_USE_FSDP": "true"}, (), "accelerate runs FSDP on GPUs only"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, (), "deepspeed is not installed"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_USE_ORIG_PARAMS": "false"},
     ("model.lora={r: 4}",), "fsdp_use_orig_params: false cannot train LoRA"),
    ({}, ("train.eval_steps=5",), "train.eval_steps: there are no held-out rows"),
    ({}, ("model.lora={r: 4}", "model.reference_offload=true"),
     "reference_offload=true: with model.lora the reference is the policy"),
    ({}, ("model.lora={r: 4}", "model.lm_head_grad=deferred"),
     "lm_head_grad=deferred: with model.lora the head is frozen"),
]


@pytest.mark.parametrize("env, overrides, message", LAUNCH_CASES,
                         ids=[m.split(":")[0] for _, _, m in LAUNCH_CASES])
def test_a_launch_the_trainer_cannot_honour_is_one_line(env, overrides, message, tiny_model,
                                                       tmp_path, monkeypatch):
    if "model.lora" in " ".join(overrides):
        pytest.importorskip("peft")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    before = (tiny_model / "model.safetensors").read_bytes()
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["sft", str(MANIFESTS / "sft_tiny.yaml"), "-q",
                                        *sets(f"model.path={tiny_model}",
                                              f"train.output_dir={out}", *overrides)])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not out.exists() and (tiny_model / "model.safetensors").read_bytes() == before


def test_deepspeed_config_sections_the_trainer_owns(tiny_model, tmp_path, monkeypatch):
    from trainers import runtime

    monkeypatch.setattr(runtime, "_installed", lambda names: True)
    for ds, message in (({"optimizer": {"type": "AdamW"}}, "deepspeed config optimizer"),
                        ({"gradient_accumulation_steps": 8},
                         "deepspeed config gradient_accumulation_steps: 8"),
                        ({"train_micro_batch_size_per_gpu": 2},
                         "deepspeed config train_micro_batch_size_per_gpu: 2")):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
        result = CliRunner().invoke(train, ["sft", str(MANIFESTS / "sft_tiny.yaml"), "-q",
                                            *sets(f"model.path={tiny_model}",
                                                  f"train.output_dir={tmp_path / 'run'}")])
        assert result.exit_code == 1 and message in result.output, result.output
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    result = CliRunner().invoke(train, ["sft", str(MANIFESTS / "sft_tiny.yaml"), "-q",
                                        *sets(f"model.path={tiny_model}",
                                              f"train.output_dir={tmp_path / 'run'}")])
    assert result.exit_code == 1 and "zero3_save_16bit_model: false" in result.output


def test_adamw_is_fused_where_torch_has_the_kernel_and_steps_like_the_loop():
    """`optim.fused` null: torch's fused kernel on the CPU (no full-size temporaries in the
    step); its updates equal torch's per-tensor AdamW to rounding; asked for where there is no
    kernel, one line naming the field."""
    from trainers.config import OptimConfig
    from trainers.errors import TrainerConfigError
    from trainers.runtime import make_optimizer

    torch.manual_seed(0)
    nets = [torch.nn.Linear(8, 4) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = make_optimizer(nets[0], OptimConfig(lr=1e-2, weight_decay=0.1))
    loop = make_optimizer(nets[1], OptimConfig(lr=1e-2, weight_decay=0.1, fused=False))
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(3):
        x = torch.randn(5, 8)
        for net, opt in zip(nets, (fused, loop)):
            net(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(TrainerConfigError, match="optim.fused: torch's fused AdamW needs"):
        make_optimizer(torch.nn.Linear(2, 2), OptimConfig(fused=True), torch.device("meta"))
