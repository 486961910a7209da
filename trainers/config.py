"""Trainer configuration: frozen dataclasses read from YAML, with `--set key.path=value` overrides.

Each trainer defines one top-level dataclass made of the shared sections below (`model`, `data`,
`optim`, `train`) plus its own (`sft`, `grpo`, ...). `load_config(SFTConfig, path, overrides)`
reads the file, applies the overrides, checks every value against the dataclass field types and
runs each section's `__post_init__` checks. Every error names the file and the dotted field
(`grpo.epsilon_high`) and says what was expected. Nothing here imports torch.

Relative local paths (`model.path`, `data.path`, `train.output_dir`) are relative to the config
file, as in the merge manifests; `resolve_paths` makes them absolute.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import TrainerConfigError


class FieldError(TrainerConfigError):
    """A value is wrong; `field` is its dotted path relative to the section that raised."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def require(condition: bool, field: str, reason: str) -> None:
    """Raise `FieldError(field, reason)` unless `condition` holds (for `__post_init__` checks)."""
    if not condition:
        raise FieldError(field, reason)


# ---------------------------------------------------------------------------------------------
# Shared sections

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters through peft (https://arxiv.org/abs/2106.09685): ΔW = (alpha/r)·B·A."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # module names (peft's rule: a name or its last components) or "all-linear" (every linear
    # layer but the output head)
    target_modules: tuple[str, ...] = ("all-linear",)
    merge: bool = False  # also write the merged full weights to output_dir/merged

    def __post_init__(self):
        require(self.r > 0, "r", f"expected a positive rank, got {self.r}")
        require(self.alpha > 0, "alpha", "expected > 0")
        require(0 <= self.dropout < 1, "dropout", "expected in [0, 1)")
        require(bool(self.target_modules), "target_modules",
                "expected module names such as [q_proj, v_proj], or [all-linear]")


@dataclass(frozen=True)
class ModelConfig:
    path: str  # local folder or Hub id of the starting checkpoint
    revision: str | None = None
    tokenizer: str | None = None  # default: `path`
    # dtype the weights are stored and updated in (master weights): keep float32 and let
    # train.mixed_precision compute in bf16; bf16/fp16 weights lose small updates
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_low_precision_weights: bool = False  # true: no warning for bf16/fp16 master weights
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flash_attention_2"
    gradient_checkpointing: bool = False
    lora: LoRAConfig | None = None  # train LoRA adapters instead of every weight (needs peft)
    # tokens per LM-head chunk (log-probs without whole [B, T, V] logits); null: automatic
    lm_head_chunk_size: int | None = None
    # keep the frozen reference (GRPO, pairwise, WPO without precompute_ref) off the device
    # between its passes: on an accelerator in host memory, moved in for each pass; on the CPU
    # re-read from `path` for each pass, its embedding and LM head a block of rows at a time.
    # Same log-probs; costs a copy (or a read) per round.
    reference_offload: bool = False
    # the LM head's weight gradient (`trainers/headgrad.py`): dense, a [V, H] buffer filled in
    # backward (the default, fastest); deferred, formed a block of vocabulary rows at a time at
    # the optimizer step and applied there, so no [V, H] gradient ever exists (150 MB at
    # 151,936 x 256 in fp32, 0.9 GB at Qwen2.5-1.5B's; costs one to one and a half more passes
    # over the head per step). One process, no sharding, not with lora or fp16.
    lm_head_grad: Literal["dense", "deferred"] = "dense"

    def __post_init__(self):
        require(bool(self.path), "path", "expected a model folder or Hub id")
        require(self.lm_head_chunk_size is None or self.lm_head_chunk_size > 0,
                "lm_head_chunk_size", "expected > 0 or null")
        require(not (self.reference_offload and self.lora is not None), "reference_offload",
                "with model.lora the reference is the policy with its adapters off (no copy "
                "to offload); remove reference_offload")
        require(not (self.lm_head_grad == "deferred" and self.lora is not None), "lm_head_grad",
                "with model.lora the head is frozen and has no gradient to defer; set "
                "lm_head_grad: dense")


@dataclass(frozen=True)
class DataConfig:
    path: str  # .jsonl / .json / .parquet file, or a `datasets` Hub id such as openai/gsm8k
    name: str | None = None  # `datasets` config name (gsm8k: "main")
    split: str = "train"
    prompt_field: str = "prompt"  # a string, or a list of chat messages
    completion_field: str = "completion"  # SFT: a string, or a list of assistant messages
    # SFT alternative: whole conversations, assistant turns trained
    messages_field: str | None = None
    # str.format over the row, e.g. "{question}\nThink step by step."
    prompt_template: str | None = None
    system_prompt: str | None = None
    chat: bool = True  # apply the tokenizer's chat template (False: plain text, for base models)
    max_examples: int | None = None
    shuffle: bool = True
    # held-out rows for train.eval_steps: another file or Hub dataset, a split of `path`, or
    # the first eval_size rows of `path` (after a seeded shuffle), kept out of training
    eval_path: str | None = None
    eval_split: str | None = None
    eval_size: int | None = None
    cache: bool = True  # reuse tokenised data (MERGEKIT_RL_CACHE, default ~/.cache/mergekit_rl)

    def __post_init__(self):
        require(bool(self.path), "path", "expected a data file or a datasets Hub id")
        require(self.max_examples is None or self.max_examples > 0, "max_examples",
                "expected a positive number or null")
        require(self.eval_size is None or self.eval_size > 0, "eval_size", "expected > 0 or null")
        require(not (self.eval_size and (self.eval_path or self.eval_split)), "eval_size",
                "held-out rows come from eval_path / eval_split or from eval_size, not both")

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_path or self.eval_split or self.eval_size)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # null: no clipping
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    # torch's fused AdamW kernel (one pass, no full-size temporaries in the step); null: fused
    # where torch has it for every trainable weight (CPU and CUDA floats), else the default
    fused: bool | None = None

    def __post_init__(self):
        require(self.lr > 0, "lr", f"expected a positive learning rate, got {self.lr}")
        require(self.warmup_steps >= 0, "warmup_steps", "expected >= 0")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "expected a fraction in [0, 1)")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
                "expected a positive number or null")


TRACKERS = ("auto", "none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml",
            "dvclive", "trackio")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    batch_size: int  # global, per optimizer step: examples (SFT) or completions (GRPO)
    micro_batch_size: int = 1  # sequences per forward/backward on one device
    max_steps: int | None = None  # optimizer steps; null: `epochs` passes over the data
    epochs: float = 1.0
    seed: int = 0
    save_steps: int | None = None  # null: save only at the end (and on SIGINT/SIGTERM)
    save_total_limit: int | None = 2  # checkpoints kept in output_dir; null: all
    max_shard_size: str = "5GB"
    log_steps: int = 1
    # auto: fp32 weights with bf16 autocast on CUDA, plain fp32 elsewhere; fp16 adds a
    # gradient scaler that skips overflowing steps
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_steps: int | None = None  # evaluate on the held-out rows (data.eval_*) every N steps
    metric_for_best: str | None = None  # default: eval/loss (sft, wpo), eval/reward (grpo)
    report_to: tuple[str, ...] = ("auto",)  # accelerate trackers; auto: tensorboard if installed
    progress_bar: bool = True
    overwrite_output_dir: bool = False  # start afresh in a folder that holds an earlier run
    num_threads: int | None = None  # torch.set_num_threads at start; null: torch default
    # glibc's allocator on the CPU (`runtime.set_cpu_malloc`): bounded gives freed blocks over
    # 256 KiB back (lowest peak); cached keeps up to 32 MiB ones for reuse (no page-fault churn:
    # ~1.8x the steps/s of small models; the process keeps its high-water mark)
    cpu_malloc: Literal["bounded", "cached"] = "bounded"
    # SFT / WPO / judge: cut each step's micro-batches from its rows sorted by length (less
    # padding with micro_batch_size < batch_size; the batch and the maths stay the same)
    sort_by_length: bool = False

    def __post_init__(self):
        require(bool(self.output_dir), "output_dir", "expected a folder")
        require(self.batch_size > 0, "batch_size", "expected a positive number")
        require(self.micro_batch_size > 0, "micro_batch_size", "expected a positive number")
        require(self.max_steps is None or self.max_steps > 0, "max_steps", "expected > 0 or null")
        require(self.epochs > 0, "epochs", "expected > 0")
        require(self.save_steps is None or self.save_steps > 0, "save_steps",
                "expected > 0 or null")
        require(self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit",
                "expected > 0 or null")
        require(self.log_steps > 0, "log_steps", "expected > 0")
        require(self.num_threads is None or self.num_threads > 0, "num_threads",
                "expected a positive number or null")
        require(self.eval_steps is None or self.eval_steps > 0, "eval_steps",
                "expected > 0 or null")
        for name in self.report_to:
            require(name in TRACKERS, "report_to", f"unknown tracker {name!r}; expected some of "
                    f"{', '.join(TRACKERS)}")

    def check_micro_batch(self) -> None:
        """Called by the top-level configs after their own batch rules (those say more)."""
        require(self.batch_size % self.micro_batch_size == 0, "train.micro_batch_size",
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; pick a divisor of {self.batch_size}")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per device per optimizer step; the global batch fixes the maths."""
        per_device, rest = divmod(self.batch_size, world_size)
        if rest or per_device % self.micro_batch_size:
            raise FieldError("train.batch_size",
                             f"{self.batch_size} does not split over {world_size} processes in "
                             f"micro-batches of {self.micro_batch_size}; use a multiple of "
                             f"{world_size * self.micro_batch_size}")
        return per_device // self.micro_batch_size


BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class VLLMConfig:
    """The colocated vLLM engine of `backend: vllm` (https://docs.vllm.ai): it runs inside the
    training process and samples what `generate` would; the names are vLLM's own arguments."""

    # share of each GPU's memory for the engine's weights and KV cache (training uses the
    # rest); on the CPU build, the share of RAM unless kv_cache_memory_bytes is set
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None  # null: max_prompt_length + max_completion_length
    enforce_eager: bool = False  # true: no CUDA graphs or compilation (faster start, less memory)
    tensor_parallel_size: int = 1  # GPUs one engine spans (its ranks share one engine)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # null: model.dtype
    kv_cache_memory_bytes: int | None = None  # a fixed KV-cache size instead of the share above
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # more vllm.LLM args

    def __post_init__(self):
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                "expected a fraction in (0, 1]")
        require(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
                "expected > 0 or null")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "expected >= 1")
        require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
                "kv_cache_memory_bytes", "expected > 0 or null")
        taken = sorted(set(self.engine_kwargs) & ENGINE_KWARGS_SET_HERE)
        require(not taken, "engine_kwargs", f"{', '.join(taken)} cannot be set here (the "
                "trainer sets them, or they are fields of this section)")


# vllm.LLM arguments the backend sets itself (trainers/vllm_engine.py) or that are fields above
ENGINE_KWARGS_SET_HERE = frozenset({
    "model", "tokenizer", "revision", "skip_tokenizer_init", "seed", "generation_config",
    "logprobs_mode", "distributed_executor_backend", "gpu_memory_utilization", "max_model_len",
    "enforce_eager", "tensor_parallel_size", "dtype", "kv_cache_memory_bytes"})


# ---------------------------------------------------------------------------------------------
# Loading

def load_config(cls, path: str | Path, overrides: typing.Iterable[str] = ()):
    """Read YAML at `path`, apply `--set key.path=value` overrides, validate into `cls`.

    Paths given with `--set` resolve against the working directory, paths in the file against
    the file's folder; an error about a value an override set is reported against the `--set`."""
    from mergekit_rl.overrides import override_for, override_message, read_yaml

    path = Path(path)
    overrides = list(overrides)
    raw = read_yaml(path, "config file", TrainerConfigError)
    raw = {} if raw is None else raw
    for item in overrides:
        raw = apply_override(raw, item, path)
    try:
        config = from_dict(cls, raw, path)
    except TrainerConfigError as e:
        item = override_for(e.field, overrides) if getattr(e, "field", None) else None
        if item is None:
            raise
        raise TrainerConfigError(override_message(item, e.field, e.reason)) from None
    return resolve_paths(config, path.parent)


# Config keys whose `--set` values are paths: inputs (local folder or Hub id) and outputs.
INPUT_KEYS = ("model.path", "model.tokenizer", "data.path", "reward.model")
OUTPUT_KEYS = ("train.output_dir", "output")


def _command_line_path(key: str, value: Any) -> Any:
    """A path given with `--set` is relative to the working directory, like any command-line
    path (the file's paths are relative to the file)."""
    from mergekit_rl.hub import join_local, local_path

    if not isinstance(value, str) or not value:
        return value
    if key in OUTPUT_KEYS:
        return str(join_local(value).resolve())
    if key in INPUT_KEYS:
        local = local_path(value)
        return value if local is None else str(local.resolve())
    return value


def apply_override(raw: Any, item: str, source: Path | None = None) -> Any:
    """`--set grpo.beta=0.04`: the manifest's dotted-path override, as a TrainerConfigError."""
    from mergekit_rl.errors import ConfigError
    from mergekit_rl.overrides import apply_override as set_value

    try:
        return set_value(raw, item, source, resolve=_command_line_path)
    except ConfigError as e:
        raise TrainerConfigError(str(e)) from None


def _error(source, field: str, reason: str) -> TrainerConfigError:
    """The error for one field: the message names the file; `field`/`reason` let `load_config`
    report it against the `--set` that set the value."""
    where = f"{source}: " if source else ""
    error = TrainerConfigError(f"{where}{field}: {reason}")
    error.field, error.reason = field, reason
    return error


def from_dict(cls, raw: Any, source: Path | str | None = None, prefix: str = ""):
    """Build dataclass `cls` from plain data, checking names and types; errors name the field."""
    if not isinstance(raw, dict):
        raise _error(source, prefix.rstrip(".") or "config",
                     f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(fields)}"
            raise _error(source, f"{prefix}{key}", f"unknown field{hint}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(raw[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = f"{source}: " if source else ""
            raise TrainerConfigError(f"{where}{prefix}{name}: required field is missing")
    try:
        return cls(**values)
    except FieldError as e:
        raise _error(source, f"{prefix}{e.field}", e.reason) from None


def _convert(value: Any, hint: Any, field: str, source) -> Any:
    def fail(expected: str):
        raise _error(source, field, f"expected {expected}, got {value!r}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            fail(" or ".join(_describe(a) for a in args))
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(value, option, field, source)
            except TrainerConfigError:
                if len(options) == 1:
                    raise
        fail(" or ".join(_describe(a) for a in options))
    if dataclasses.is_dataclass(hint):
        shorthand = getattr(hint, "SHORTHAND", None)
        if shorthand and not isinstance(value, dict):
            value = {shorthand: value}
        return from_dict(hint, value, source, field + ".")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            fail("one of " + ", ".join(map(str, args)))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail(_describe(hint))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{field}.{i}", source) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"{len(args)} values")
        return tuple(_convert(v, a, f"{field}.{i}", source) for i, (v, a) in
                     enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return {_convert(k, args[0], field, source): _convert(v, args[1], f"{field}.{k}", source)
                for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1: unquoted Yes/No/on/off are booleans
            fail("a string (YAML reads an unquoted yes, no, on, off, true or false as a "
                 "boolean: quote it)")
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"{field}: unsupported field type {hint!r}")  # a bug in a config class


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, "a mapping" if dataclasses.is_dataclass(hint) else
                                        str(hint))


def to_dict(config) -> dict:
    """Plain data (tuples as lists) for YAML/JSON; inverse of `from_dict`."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def save_config(config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def resolve_paths(config, base: Path):
    """Make local `model.path`, `model.tokenizer`, `data.path`, `train.output_dir` and the
    fields a section marks with `field(metadata={"path": True})` absolute, relative to `base`
    (the config's folder); Hub ids stay as they are (`hub.local_path` is the one rule for
    telling them apart)."""
    from mergekit_rl.hub import join_local, local_path

    base = Path(base).resolve()

    def local(value: str | None) -> str | None:
        path = None if value is None else local_path(value, base)
        return value if path is None else str(path.resolve())

    changes = {}
    if hasattr(config, "model"):
        changes["model"] = dataclasses.replace(config.model, path=local(config.model.path),
                                               tokenizer=local(config.model.tokenizer))
    if hasattr(config, "data"):
        changes["data"] = dataclasses.replace(config.data, path=local(config.data.path),
                                              eval_path=local(config.data.eval_path))
    if hasattr(config, "train"):
        out = str(join_local(config.train.output_dir, base).resolve())
        changes["train"] = dataclasses.replace(config.train, output_dir=out)
    for f in dataclasses.fields(config):  # a trainer's own path fields: metadata {"path": True}
        section = getattr(config, f.name)
        if f.name not in changes and dataclasses.is_dataclass(section):
            paths = {g.name: local(getattr(section, g.name)) for g in dataclasses.fields(section)
                     if g.metadata.get("path")}
            if paths:
                changes[f.name] = dataclasses.replace(section, **paths)
    return dataclasses.replace(config, **changes)
