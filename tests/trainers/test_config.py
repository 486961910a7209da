"""Config loading: every shipped YAML parses; errors name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.config import load_config
from trainers.errors import TrainerConfigError
from trainers.grpo import GRPOConfig
from trainers.judge import JudgeConfig
from trainers.pairwise import PairwiseConfig
from trainers.sampling import SamplePairsConfig, SampleRSOConfig, load_sample_config
from trainers.sft import SFTConfig
from trainers.wpo import WPOConfig

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"
SHIPPED = sorted(MANIFESTS.glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"sft_gsm8k_qwen2.5_1.5b.yaml", "grpo_gsm8k_qwen2.5_1.5b.yaml", "sft_tiny.yaml",
            "grpo_tiny.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.name.startswith("sample_"):
        cls = SamplePairsConfig if path.name.startswith("sample_pairs") else SampleRSOConfig
        config = load_sample_config(cls, path)
        assert Path(config.output).is_absolute()
    else:
        cls = {"grpo": GRPOConfig, "wpo": WPOConfig, "judge": JudgeConfig,
               "pairwise": PairwiseConfig}.get(path.name.split("_")[0], SFTConfig)
        config = load_config(cls, path)
        assert Path(config.train.output_dir).is_absolute()
        if cls is PairwiseConfig:  # a section's own path field, relative to the config file
            assert config.pairwise.judge == str((MANIFESTS / "../../demo_out/train/judge_tiny")
                                                .resolve())
    data = Path(config.data.path)
    if data.is_relative_to(MANIFESTS):  # data that ships with the repo (others are made by runs)
        assert data.is_file()


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = """
model: {path: ./m}
data: {path: d.jsonl}
train: {output_dir: out, batch_size: 4}
"""


def test_paths_relative_to_config_and_overrides(tmp_path):
    config = load_config(SFTConfig, write(tmp_path, MINIMAL),
                         ["optim.lr=2e-5", "sft.max_length=77", "optim.betas=[0.9, 0.95]"])
    assert config.model.path == str(tmp_path / "m")
    assert config.data.path == str(tmp_path / "d.jsonl")
    assert config.train.output_dir == str(tmp_path / "out")
    assert config.optim.lr == 2e-5 and config.sft.max_length == 77
    assert config.optim.betas == (0.9, 0.95)
    hub = load_config(SFTConfig, write(tmp_path, MINIMAL), ["model.path=Qwen/Qwen2.5-1.5B"])
    assert hub.model.path == "Qwen/Qwen2.5-1.5B"  # a Hub id stays an id


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("optim.lrr=1", "optim.lrr: unknown field; did you mean 'lr'?"),
    ("train.batch_size=0", "train.batch_size: expected a positive number"),
    ("train.micro_batch_size=3", "train.micro_batch_size: batch_size 4 is not a multiple"),
    ("sft.crlft.class_weights={a: -1}", "sft.crlft.class_weights.a: expected a weight >= 0"),
    ("train.mixed_precision=fp8", "train.mixed_precision: expected one of auto, no, bf16, fp16"),
    ("train.report_to=[tensorbord]", "train.report_to: unknown tracker 'tensorbord'"),
    ("data.chat=yes please", "data.chat: expected true or false"),
])
def test_errors_name_the_set_or_the_file_and_field(tmp_path, override, message):
    # A value given with --set is reported against that --set (the file is not at fault) ...
    path = write(tmp_path, MINIMAL)
    with pytest.raises(TrainerConfigError) as e:
        load_config(SFTConfig, path, [override])
    field, _, reason = message.partition(": ")
    key = override.partition("=")[0]
    named = "" if field == key else f"{field}: "  # a field inside the mapping that was set
    assert str(e.value).startswith(f"--set {override}: {named}{reason}")
    # ... and the same value written in the file is reported against the file and the field.
    import yaml

    from mergekit_rl.overrides import apply_override

    raw = apply_override(yaml.safe_load(MINIMAL), override)
    in_file = write(tmp_path, yaml.safe_dump(raw))
    with pytest.raises(TrainerConfigError) as e:
        load_config(SFTConfig, in_file)
    assert str(e.value).startswith(f"{in_file}: {field}: {reason}")


def test_set_numbers_are_yaml_1_2_and_set_paths_are_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load_config(SFTConfig, write(tmp_path, MINIMAL + "optim: {lr: 1e-6}\n"),
                         ["optim.weight_decay=1e-1", "model.path=./here",
                          "train.output_dir=runs/x"])
    assert config.optim.lr == 1e-6 and config.optim.weight_decay == 0.1
    assert config.model.path == str(tmp_path / "elsewhere" / "here")
    assert config.train.output_dir == str(tmp_path / "elsewhere" / "runs" / "x")
    assert config.data.path == str(tmp_path / "d.jsonl")  # the file's paths: the file's folder


def test_yaml_errors_give_the_line(tmp_path):
    path = write(tmp_path, MINIMAL + "optim:\n  lr: 1\n   betas: x\n")
    with pytest.raises(TrainerConfigError) as e:
        load_config(SFTConfig, path)
    assert str(e.value).startswith(f"{path}:7:") and "invalid YAML" in str(e.value)


def test_missing_required_field_and_bad_yaml(tmp_path):
    with pytest.raises(TrainerConfigError, match="train.batch_size: required field is missing"):
        load_config(SFTConfig, write(tmp_path, MINIMAL.replace(", batch_size: 4", "")))
    with pytest.raises(TrainerConfigError, match="invalid YAML"):
        load_config(SFTConfig, write(tmp_path, "model: [unclosed"))
    with pytest.raises(TrainerConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


GRPO = MINIMAL.replace("batch_size: 4", "batch_size: 12") + """
grpo:
  num_generations: 8
  rewards: [exact_answer, {name: format, weight: 0.1}]
"""


def test_grpo_batch_rule_says_what_to_change(tmp_path):
    with pytest.raises(TrainerConfigError) as e:
        load_config(GRPOConfig, write(tmp_path, GRPO))
    text = str(e.value)
    assert "train.batch_size: 12 completions per step is not a multiple of " \
           "grpo.num_generations 8" in text
    assert "set train.batch_size to 8 or 16" in text
    assert "grpo.num_generations to a divisor of 12 such as 4, 6, 12" in text
    config = load_config(GRPOConfig, write(tmp_path, GRPO), ["train.batch_size=16"])
    assert [(r.name, r.weight) for r in config.grpo.rewards] == [("exact_answer", 1.0),
                                                                  ("format", 0.1)]
    assert config.optim.lr == 1e-6  # GRPO's default
    with pytest.raises(TrainerConfigError, match="train.batch_size: 2 prompts per step"):
        config.split(world=4)
    assert config.split(world=2) == 1


def test_grpo_checks(tmp_path):
    path = write(tmp_path, GRPO)
    for override, message in [("grpo.num_generations=1", "num_generations=1: expected >= 2"),
                              ("grpo.loss_type=ppo", "loss_type=ppo: expected one of grpo"),
                              ("grpo.rewards=[]", r"rewards=\[\]: expected at least one")]:
        with pytest.raises(TrainerConfigError, match=message):
            load_config(GRPOConfig, path, ["train.batch_size=16", override])
    with pytest.raises(TrainerConfigError, match="save_steps=3: expected a multiple of"):
        load_config(GRPOConfig, path, ["train.batch_size=16", "grpo.num_iterations=2",
                                       "train.save_steps=3"])


ACCELERATE = Path(__file__).resolve().parents[2] / "manifests" / "accelerate"


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                        ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_are_valid_and_leave_the_batch_to_the_trainer(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    assert config.mixed_precision == "no"  # train.mixed_precision decides
    ds = config.deepspeed_config or {}
    # what the trainer owns and would refuse to be overridden on
    assert not {"gradient_accumulation_steps", "gradient_clipping",
                "deepspeed_config_file"} & set(ds)
    if name.startswith("zero"):
        assert ds["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*1.5b.yaml")), ids=lambda p: p.name)
def test_the_shipped_recipes_train_fp32_weights_and_say_they_need_datasets(path):
    cls = {"grpo": GRPOConfig, "wpo": WPOConfig}.get(path.name.split("_")[0], SFTConfig)
    config = load_config(cls, path)
    assert config.model.dtype == "float32" and config.train.mixed_precision == "auto"
    assert config.train.eval_steps and config.data.has_eval
    assert "mergekit-rl[data]" in path.read_text()  # Hub datasets are the [data] extra
