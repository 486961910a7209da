"""GRPO: Group Relative Policy Optimization (DeepSeekMath, https://arxiv.org/abs/2402.03300).

One round: take B/G prompts, sample G completions of each (`backend: hf`: the policy's `generate`
with KV cache and left-padded prompts; `backend: vllm`: a colocated vLLM engine that gets the
policy's weights at each new round, trainers/vllm_engine.py), score them with the reward
functions, turn the rewards into group-relative advantages (`losses.group_advantages`), then
take `num_iterations` optimizer steps on that batch with the clipped-ratio loss plus β·KL_k3 to
the frozen starting model (`losses.grpo_token_loss`). β = 0 loads no reference model.

    mergekit-rl train grpo manifests/train/grpo_gsm8k_qwen2.5_1.5b.yaml
    torchrun --nproc_per_node 2 -m trainers train grpo CONFIG.yaml
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, VLLMConfig, require
from .errors import TrainerConfigError
from .rollout import (
    Prompts,
    check_group_batch,
    check_iterations,
    check_rollout_params,
    generate,
    length_metrics,
    load_prompts,
    old_and_reference_logps,
    optimise,
    prompts_per_process,
    rollout_pieces,
    round_prompts,
    round_seeds,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardSpec:
    SHORTHAND: ClassVar[str] = "name"  # a bare string in YAML is the name
    name: str  # built-in (exact_answer, format) or module:function
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound with functools.partial


@dataclass(frozen=True)
class GRPOParams:
    rewards: tuple[RewardSpec, ...]
    num_generations: int = 8  # G completions per prompt
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # sequences per generate call; null: all at once (vllm schedules its own batches)
    generation_batch_size: int | None = None
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    epsilon: float = 0.2  # ε_low
    epsilon_high: float | None = None  # null: = epsilon (DAPO: 0.28)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    num_iterations: int = 1  # optimizer steps per generation round (μ)
    # prompt: each completion draws from its own generator, seeded by (train.seed, round,
    # prompt, sample), so samples do not depend on the number of processes or on batching;
    # global: one RNG stream per process (TRL's way)
    sample_seeding: Literal["prompt", "global"] = "prompt"

    def __post_init__(self):
        require(len(self.rewards) > 0, "rewards", "expected at least one reward function")
        require(self.num_generations >= 2, "num_generations",
                "expected >= 2: advantages compare completions of the same prompt")
        check_rollout_params(self)


@dataclass(frozen=True)
class GRPOConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig  # train.batch_size counts completions: prompts per step x G
    grpo: GRPOParams
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    backend: Literal["hf", "vllm"] = "hf"  # what samples the completions
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # the engine of backend: vllm

    def __post_init__(self):
        check_group_batch(self.train, self.grpo.num_generations, "grpo")
        check_iterations(self.train, self.grpo.num_iterations, "grpo")

    def split(self, world: int) -> int:
        """Prompts per process per round; each process generates whole groups."""
        return prompts_per_process(self.train, self.grpo.num_generations, world, "grpo")


# ---------------------------------------------------------------------------------------------
# Rollouts


def score(reward_fns: list, specs: tuple[RewardSpec, ...], prompts: list, completions: list[str],
          columns: dict[str, list]) -> torch.Tensor:
    """[N, F] rewards, NaN where a function gave no reward (None or NaN)."""
    from .rewards import check_rewards

    out = torch.full((len(completions), len(reward_fns)), math.nan)
    for j, (fn, spec) in enumerate(zip(reward_fns, specs)):
        values = check_rewards(fn(prompts, completions, **columns), len(completions),
                               f"grpo.rewards.{j} ({spec.name})")
        for i, v in enumerate(values):
            if v is not None:
                out[i, j] = v
    return out


def reward_metrics(rewards: torch.Tensor, total: torch.Tensor, specs, group: int) -> dict:
    """Means/stds over the global batch, per function and of the weighted sum."""
    from .losses.policy import nanstd

    metrics = {"reward": float(torch.nanmean(total)), "reward_std": float(nanstd(total))}
    for j, spec in enumerate(specs):
        column = rewards[:, j]
        if torch.isnan(column).all():
            continue
        metrics[f"rewards/{spec.name}/mean"] = float(torch.nanmean(column))
        metrics[f"rewards/{spec.name}/std"] = float(nanstd(column))
    stds = nanstd(total.view(-1, group), dim=1)
    metrics["frac_reward_zero_std"] = float((torch.nan_to_num(stds) < 1e-8).float().mean())
    return metrics


# ---------------------------------------------------------------------------------------------
# Training


def weighted_total(rewards: torch.Tensor, specs) -> torch.Tensor:
    """[N, F] rewards -> [N] weighted sum; NaN where no function gave a reward."""
    weights = torch.tensor([s.weight for s in specs])
    total = (rewards * weights).nansum(dim=1)
    total[torch.isnan(rewards).all(dim=1)] = math.nan  # no reward applied: no signal
    return total


def columns_of(prompts: Prompts, indices: list[int], prompt_field: str) -> dict[str, list]:
    keys = sorted({k for j in indices for k in prompts.rows[j]} - {prompt_field})
    return {k: [prompts.rows[j].get(k) for j in indices] for k in keys}


def rollout(run, config: GRPOConfig, prompts: Prompts, mine: list[int], reward_fns: list,
            stops: set[int], seeds: list[int] | None, sampler=None
            ) -> tuple[list[dict], dict, float]:
    """Sample this process's completions (each prompt index in `mine` once per completion),
    score them, and give group-relative advantages over the global batch.

    -> (micro-batches with advantages, round metrics, completion tokens of the global batch)
    """
    from accelerate.utils import gather

    from .losses.policy import group_advantages

    params, data = config.grpo, config.data
    completions, texts, gen_seconds, engine = generate(run, params, prompts, mine, stops, seeds,
                                                       sampler)
    local = score(reward_fns, params.rewards, [prompts.values[j] for j in mine], texts,
                  columns_of(prompts, mine, data.prompt_field))
    rewards = gather(local.to(run.device)).cpu()  # [B, F], in process order
    total = weighted_total(rewards, params.rewards)
    advantages = group_advantages(total, params.num_generations, params.scale_rewards)
    advantages = advantages[run.rank * len(mine):(run.rank + 1) * len(mine)]
    lengths, num_tokens = length_metrics(run, completions, stops)
    metrics = {**reward_metrics(rewards, total, params.rewards, params.num_generations),
               **lengths, "gen_s": gen_seconds}
    if sampler is not None and sampler.name == "vllm":
        metrics["sync_s"] = sampler.sync_s
    pieces = rollout_pieces(run, prompts, mine, completions, config.train.micro_batch_size,
                            engine, advantages=advantages)
    return pieces, metrics, num_tokens


def evaluate(run, config: GRPOConfig, prompts: Prompts, reward_fns: list, stops: set[int]
             ) -> dict:
    """Mean weighted reward of the greedy completion of each held-out prompt."""
    from .generation import greedy

    params = config.grpo
    share, real = run.my_share(len(prompts.ids))
    with run.generation() as policy:
        completions = greedy(policy, [prompts.ids[j] for j in share],
                             params.max_completion_length, run.tokenizer.pad_token_id, stops,
                             params.generation_batch_size or 256, synced_gpus=run.synced)
    texts = run.tokenizer.batch_decode(completions[:real], skip_special_tokens=True)
    mine = share[:real]
    total = weighted_total(score(reward_fns, params.rewards, [prompts.values[j] for j in mine],
                                 texts, columns_of(prompts, mine, config.data.prompt_field)),
                           params.rewards)
    sums = torch.tensor([float(torch.nansum(total)), float((~torch.isnan(total)).sum())])
    sums = run.reduce_sum(sums.to(run.device)).tolist()
    return {"reward": sums[0] / max(sums[1], 1.0)}


def train_grpo(config: GRPOConfig, resume: str | None = None) -> Path:
    """Run GRPO as configured; return the output folder (final model, tokenizer, config).

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from .generation import HFSampler, check_backend, make_sampler, stop_token_ids
    from .rewards import resolve_reward
    from .scaffold import Run

    train, params = config.train, config.grpo
    group, mu = params.num_generations, params.num_iterations
    check_backend(config, params, "grpo")  # vLLM missing or unable to run the model: one line
    run = Run(config, "grpo", resume)
    local_prompts = config.split(run.world)

    # Everything that can fail on user input happens before the model loads.
    reward_fns = []
    for j, spec in enumerate(params.rewards):
        try:
            reward_fns.append(resolve_reward(spec.name, spec.kwargs))
        except ValueError as e:  # a factory's kwargs error names its kwarg
            where = f"grpo.rewards.{j}." + ("" if str(e).startswith("kwargs.") else "name: ")
            raise TrainerConfigError(f"{where}{e}") from None
    prompts, held_out = load_prompts(config.data, params.max_prompt_length, run.tokenizer,
                                     train.seed, run.accelerator, "grpo")
    prompts_per_step = train.batch_size // group
    rounds_per_epoch = len(prompts.rows) // prompts_per_step
    if rounds_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {prompts_per_step} prompts per step is more "
                                 f"than the {len(prompts.rows)} rows")
    max_steps = train.max_steps or math.ceil(train.epochs * rounds_per_epoch) * mu
    longest = max(len(p) for p in prompts.ids)
    # the engine starts before run.start(): vLLM seeds the process's RNGs, which the run's own
    # seed (or a resumed run's saved RNG state) then overrides; a dry run starts none
    sampler = HFSampler(run.tokenizer.pad_token_id) if run.dry_run else \
        make_sampler(config, run.tokenizer.pad_token_id,
                     params.max_prompt_length + params.max_completion_length, train.seed)
    run.start(max_steps, lambda step: {"round": step // mu,
                                       "prompts_seen": step // mu * prompts_per_step},
              plan={"unit": "completions",
                    "lines": [f"{prompts_per_step} prompts x G {group} = {train.batch_size} "
                              f"completions per round ({local_prompts} prompts, "
                              f"{local_prompts * group} completions per process, generated "
                              f"{params.generation_batch_size or local_prompts * group} "
                              f"sequences at a time), {mu} step(s) per round; "
                              f"{len(prompts.rows):,} prompts"
                              + (f", {len(held_out.rows):,} held out" if held_out else "")],
                    "sequence_length": longest + params.max_completion_length,
                    "reference": params.beta > 0,
                    "hint": "grpo.generation_batch_size, grpo.max_completion_length"})
    ref = run.load_reference() if params.beta > 0 else None
    stops = stop_token_ids(run.tokenizer, run.policy)
    chunk = config.model.lm_head_chunk_size

    metrics: dict = {}
    orders: dict[int, list[int]] = {}
    with run.signals(), closing(sampler):  # the engine's memory is freed before the final save
        while run.step < run.max_steps:
            # ---- generation round: this process's prompts, G completions each --------------
            t0 = time.perf_counter()
            round_index = run.step // mu
            mine = round_prompts(run, train, config.data, len(prompts.rows), group, round_index,
                                 orders)
            seeds = round_seeds(params, train.seed, round_index, mine, group)
            pieces, round_metrics, num_tokens = rollout(run, config, prompts, mine, reward_fns,
                                                        stops, seeds, sampler)
            old_and_reference_logps(run, pieces, ref, params.temperature, mu, chunk)
            # ---- μ optimizer steps on this batch ------------------------------------------
            held = (lambda: evaluate(run, config, held_out, reward_fns, stops)) \
                if held_out is not None else None
            metrics = optimise(run, params, pieces, num_tokens, train.batch_size, round_metrics,
                               t0, chunk_size=chunk, evaluate=held)
            run.checkpoint_or_stop(metrics)  # between rounds
    return run.finish(metrics)


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    raise SystemExit("python -m trainers.grpo is now: python -m trainers train grpo CONFIG")
