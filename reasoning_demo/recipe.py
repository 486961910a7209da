"""The demo's recipe: every number of the miniature experiment in one frozen dataclass, its
`--quick` variant, and `--set key=value` overrides (errors name the key)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from mergekit_rl.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    threads: int = 1  # tiny matrices: one thread beats two on a shared 2-core machine
    # tasks
    min_steps: int = 1
    max_steps: int = 3
    max_start: int = 30
    max_operand: int = 15
    max_total: int = 50
    bags: bool = False
    flawed_share: float = 0.5  # worked solutions that stop one step short (mixed-quality data)
    min_words: int = 3
    max_words: int = 4
    n_test: int = 1000  # held-out items per task (one accuracy: ±1.5 points standard error)
    # tokenizer and model (Qwen2 architecture, tied embeddings like Qwen2.5-0.5B/1.5B)
    vocab_size: int = 400
    hidden: int = 96
    intermediate: int = 256
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    # pretraining the base on both families (loss on every token)
    pretrain_docs: int = 20000
    pretrain_share: float = 0.5  # word problems' share of the documents
    pretrain_steps: int = 1500
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    # micro-batches cut from each step's rows sorted by length: the same batch and maths, ~20%
    # less padding work (train.sort_by_length)
    pretrain_micro_batch: int = 16
    # the pretraining runs alone (every other stage reads its model), so it takes both cores:
    # 1.3x as fast on a 2-core VM, the same weights bit for bit as one thread (150 steps)
    pretrain_threads: int = 2
    # SFT donor (word problems)
    sft_train: int = 2000
    sft_steps: int = 60
    sft_batch: int = 32
    sft_lr: float = 1e-4
    # GRPO donor (from SFT)
    grpo_steps: int = 120
    grpo_prompts: int = 16
    grpo_group: int = 8
    grpo_temperature: float = 1.0
    grpo_lr: float = 3e-5  # 1e-4 stayed flat, 3e-4 collapsed
    grpo_beta: float = 0.0
    max_new_tokens: int = 40
    # instruct sibling (from the base; optionally keeps some word problems in its mix)
    instruct_train: int = 2000
    instruct_steps: int = 60
    instruct_batch: int = 32
    instruct_lr: float = 1e-4
    instruct_arith_share: float = 0.2
    # vector arithmetic
    alpha: float = 1.0
    # the α sweep, in memory (300 items per task and point: ±2.9 points standard error at most)
    sweep_alphas: str = "-1,-0.5,0,0.5,1,1.5,2"
    sweep_items: int = 300
    # preference pairs and WPO / DPO (from SFT)
    pairs_prompts: int = 512
    pairs_samples: int = 4
    wpo_steps: int = 60
    wpo_batch: int = 16
    wpo_lr: float = 1e-5
    wpo_beta: float = 0.1
    # Pairwise-RL: a generative judge (from SFT, on those pairs) and a donor (from SFT) rewarded
    # by P̄(response ≻ the worked solution), half of which are flawed
    judge_steps: int = 60
    judge_batch: int = 16
    judge_lr: float = 1e-4
    pairwise_steps: int = 40
    pairwise_prompts: int = 8
    pairwise_group: int = 8
    pairwise_lr: float = 3e-5

    def __post_init__(self):
        try:  # the task specs check their own fields: fail here, before any work
            self.arithmetic_spec(), self.instruction_spec()
        except ValueError as e:
            raise ConfigError(f"demo recipe: {e}; fix the --set value") from None
        self.alphas()
        for name in ("sweep_items", "threads", "pretrain_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo recipe: {name} must be at least 1, got "
                                  f"{getattr(self, name)}")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True)
                              .encode()).hexdigest()[:16]

    def alphas(self) -> tuple[float, ...]:
        """The sweep's α values, parsed as `mergekit-rl sweep --alphas` parses them."""
        from mergekit_rl.sweep import parse_alphas

        return parse_alphas(self.sweep_alphas, "demo recipe: sweep_alphas",
                            "--set sweep_alphas=-1,0,1")

    def arithmetic_spec(self):
        from .tasks import ArithmeticSpec

        return ArithmeticSpec(self.min_steps, self.max_steps, self.max_start, self.max_operand,
                              self.max_total, self.bags, self.flawed_share)

    def instruction_spec(self):
        from .tasks import InstructionSpec

        return InstructionSpec(self.min_words, self.max_words)


QUICK = dict(n_test=200, pretrain_docs=3000, pretrain_steps=80, pretrain_batch=32, hidden=64,
             intermediate=128, layers=2, sft_train=400, sft_steps=10, sft_batch=16,
             grpo_steps=4, grpo_prompts=8, grpo_group=4, max_new_tokens=40, instruct_train=400,
             instruct_steps=10, instruct_batch=16, pairs_prompts=32, pairs_samples=4, wpo_steps=4,
             wpo_batch=8, sweep_items=100, judge_steps=4, judge_batch=8, pairwise_steps=2,
             pairwise_prompts=4, pairwise_group=4)


def make_recipe(quick: bool = False, overrides: tuple[str, ...] = ()) -> Recipe:
    """The default (or `--quick`) recipe with `key=value` overrides; errors name the key."""
    values = dict(QUICK) if quick else {}
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"--set {item!r}: expected key=value with key one of "
                              f"{', '.join(fields)}")
        kind = type(fields[key].default)
        try:
            values[key] = (text.strip().lower() in ("1", "true", "yes")) if kind is bool \
                else kind(text)
        except ValueError:
            raise ConfigError(f"--set {key}: {text!r} is not a {kind.__name__}") from None
    return Recipe(**values)
