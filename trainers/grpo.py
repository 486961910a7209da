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
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, VLLMConfig, require
from .data import epoch_order, load_rows, prompt_value, render_generation_prompt
from .errors import TrainerConfigError

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

    def __post_init__(self):
        require(len(self.rewards) > 0, "rewards", "expected at least one reward function")
        require(self.num_generations >= 2, "num_generations",
                "expected >= 2: advantages compare completions of the same prompt")
        for name in ("max_prompt_length", "max_completion_length", "num_iterations"):
            require(getattr(self, name) > 0, name, "expected > 0")
        require(self.temperature > 0, "temperature", "expected > 0")
        require(0 < self.top_p <= 1, "top_p", "expected in (0, 1]")
        require(self.top_k >= 0, "top_k", "expected >= 0 (0: off)")
        require(self.beta >= 0, "beta", "expected >= 0")
        require(0 <= self.epsilon < 1, "epsilon", "expected in [0, 1)")
        require(self.epsilon_high is None or self.epsilon_high >= 0, "epsilon_high",
                "expected >= 0")
        require(self.generation_batch_size is None or self.generation_batch_size > 0,
                "generation_batch_size", "expected > 0 or null")


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
        g, b = self.grpo.num_generations, self.train.batch_size
        if b % g:
            lower, upper = (b // g) * g, (b // g + 1) * g
            divisors = [d for d in range(2, b + 1) if b % d == 0][-3:]
            raise _field("train.batch_size",
                         f"{b} completions per step is not a multiple of grpo.num_generations "
                         f"{g} (each prompt's {g} completions must be in the same batch); set "
                         f"train.batch_size to {' or '.join(str(v) for v in (lower, upper) if v)}"
                         f", or grpo.num_generations to a divisor of {b} such as "
                         f"{', '.join(map(str, divisors))}")
        self.train.check_micro_batch()
        mu = self.grpo.num_iterations
        require(self.train.save_steps is None or self.train.save_steps % mu == 0,
                "train.save_steps", f"expected a multiple of grpo.num_iterations {mu} "
                "(checkpoints are taken between generation rounds)")
        require(self.train.max_steps is None or self.train.max_steps % mu == 0,
                "train.max_steps", f"expected a multiple of grpo.num_iterations {mu}")

    def split(self, world: int) -> int:
        """Prompts per process per round; each process generates whole groups."""
        prompts = self.train.batch_size // self.grpo.num_generations
        if prompts % world:
            raise _field("train.batch_size",
                         f"{prompts} prompts per step ({self.train.batch_size} completions / "
                         f"{self.grpo.num_generations}) do not split over {world} processes; "
                         f"use a multiple of {world * self.grpo.num_generations} completions")
        self.train.accumulation_steps(world)
        return prompts // world


def _field(name: str, reason: str):
    from .config import FieldError

    return FieldError(name, reason)


# ---------------------------------------------------------------------------------------------
# Rollouts

def pad_rollout(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                device, logprobs: list[list[float]] | None = None) -> dict[str, torch.Tensor]:
    """Left-pad prompts, right-pad completions: [pad.. prompt | completion ..pad].

    -> input_ids, attention_mask, completion_mask: [b, P + C]; with `logprobs` (one per
    completion token) also engine_logps [b, P + C], laid out as `token_logprobs` returns.
    """
    width_p = max(len(p) for p in prompts)
    width_c = max(len(c) for c in completions)
    ids = torch.full((len(prompts), width_p + width_c), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, width_p - len(p):width_p] = torch.tensor(p)
        ids[row, width_p:width_p + len(c)] = torch.tensor(c)
        attention[row, width_p - len(p):width_p + len(c)] = 1
        completion[row, width_p:width_p + len(c)] = 1
    out = {"input_ids": ids.to(device), "attention_mask": attention.to(device),
           "completion_mask": completion.to(device)}
    if logprobs is not None:
        values = torch.zeros(ids.shape, dtype=torch.float32)
        for row, v in enumerate(logprobs):
            values[row, width_p:width_p + len(v)] = torch.tensor(v, dtype=torch.float32)
        out["engine_logps"] = values.to(device)
    return out


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

@dataclass
class Prompts:
    """The dataset's prompts: as the rewards see them, and as token ids (left-truncated)."""

    rows: list[dict]
    values: list  # prompt strings or message lists
    ids: list[list[int]]


def load_prompts(config: GRPOConfig, tokenizer) -> Prompts:
    data, params = config.data, config.grpo
    if data.chat and tokenizer.chat_template is None:
        raise TrainerConfigError("data.chat: the tokenizer has no chat template; set false")
    rows = load_rows(data, () if data.prompt_template else (data.prompt_field,))
    values = [prompt_value(row, data) for row in rows]
    ids = [tokenizer(render_generation_prompt(tokenizer, p, data),
                     add_special_tokens=False)["input_ids"] for p in values]
    cut = sum(len(p) > params.max_prompt_length for p in ids)
    if cut:
        log.warning("%d prompts are longer than grpo.max_prompt_length %d; their first tokens "
                    "are dropped", cut, params.max_prompt_length)
    return Prompts(rows, values, [p[-params.max_prompt_length:] for p in ids])


def rollout(run, config: GRPOConfig, prompts: Prompts, mine: list[int], reward_fns: list,
            stops: set[int], sampler) -> tuple[list[dict], dict, float]:
    """Sample this process's completions (each prompt index in `mine` once per completion),
    score them, and give group-relative advantages over the global batch.

    -> (micro-batches with advantages, round metrics, completion tokens of the global batch)
    """
    from accelerate.utils import gather

    from .losses.policy import group_advantages

    params, data, tokenizer = config.grpo, config.data, run.tokenizer
    t0 = time.perf_counter()
    # the engine of backend vllm first loads the policy's weights if they changed since
    samples = sampler.sample([prompts.ids[j] for j in mine], params, stops, policy=run.policy,
                             step=run.step, logprobs=True)
    completions = samples.tokens
    gen_seconds = time.perf_counter() - t0
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    keys = sorted({k for j in mine for k in prompts.rows[j]} - {data.prompt_field})
    columns = {k: [prompts.rows[j].get(k) for j in mine] for k in keys}
    local = score(reward_fns, params.rewards, [prompts.values[j] for j in mine], texts, columns)
    rewards = gather(local.to(run.device)).cpu()  # [B, F], in process order
    weights = torch.tensor([s.weight for s in params.rewards])
    total = (rewards * weights).nansum(dim=1)
    total[torch.isnan(rewards).all(dim=1)] = math.nan  # no reward applied: no signal
    advantages = group_advantages(total, params.num_generations, params.scale_rewards)
    advantages = advantages[run.rank * len(mine):(run.rank + 1) * len(mine)].to(run.device)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    ended = torch.tensor([float(bool(c) and c[-1] in stops) for c in completions])
    lengths, ended = gather(lengths.to(run.device)).cpu(), gather(ended.to(run.device)).cpu()
    metrics = {**reward_metrics(rewards, total, params.rewards, params.num_generations),
               "completion_length/mean": float(lengths.mean()),
               "completion_length/min": float(lengths.min()),
               "completion_length/max": float(lengths.max()),
               "terminated_fraction": float(ended.mean()), "gen_s": gen_seconds}
    if sampler.name == "vllm":
        metrics["sync_s"] = sampler.sync_s
    micro = config.train.micro_batch_size
    engine = samples.logprobs
    pieces = [pad_rollout([prompts.ids[j] for j in mine[k:k + micro]], completions[k:k + micro],
                          tokenizer.pad_token_id, run.device,
                          None if engine is None else engine[k:k + micro])
              for k in range(0, len(mine), micro)]
    for k, piece in enumerate(pieces):
        piece["advantages"] = advantages[k * micro:(k + 1) * micro]
    return pieces, metrics, float(lengths.sum())


def train_grpo(config: GRPOConfig, resume: str | None = None) -> Path:
    """Run GRPO as configured; return the output folder (final model, tokenizer, config).

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from .generation import check_backend, logprob_gap, make_sampler, stop_token_ids
    from .logprobs import token_logprobs
    from .losses.policy import grpo_token_loss
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
        except ValueError as e:
            raise TrainerConfigError(f"grpo.rewards.{j}.name: {e}") from None
    prompts = load_prompts(config, run.tokenizer)
    prompts_per_step = train.batch_size // group
    rounds_per_epoch = len(prompts.rows) // prompts_per_step
    if rounds_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {prompts_per_step} prompts per step is more "
                                 f"than the {len(prompts.rows)} rows")
    max_steps = train.max_steps or math.ceil(train.epochs * rounds_per_epoch) * mu
    ref = run.load_reference() if params.beta > 0 else None
    # the engine starts before run.start(): vLLM seeds the process's RNGs, which the run's own
    # seed (or a resumed run's saved RNG state) then overrides
    sampler = make_sampler(config, run.tokenizer.pad_token_id,
                           params.max_prompt_length + params.max_completion_length, train.seed)
    run.start(max_steps, lambda step: {"round": step // mu,
                                       "prompts_seen": step // mu * prompts_per_step})
    stops = stop_token_ids(run.tokenizer, run.policy)
    eps_high = params.epsilon_high if params.epsilon_high is not None else params.epsilon

    def logps_of(net, piece, grad: bool) -> torch.Tensor:
        with nullcontext() if grad else torch.no_grad(), run.accelerator.autocast():
            return token_logprobs(net, piece["input_ids"], piece["attention_mask"],
                                  piece["completion_mask"], params.temperature)

    metrics: dict = {}
    orders: dict[int, list[int]] = {}
    with run.signals(), closing(sampler):  # the engine's memory is freed before the final save
        while run.step < run.max_steps:
            # ---- generation round: this process's prompts, G completions each --------------
            t0 = time.perf_counter()
            epoch, offset = divmod(run.step // mu, rounds_per_epoch)
            if epoch not in orders:
                orders = {epoch: epoch_order(len(prompts.rows), epoch, train.seed,
                                             config.data.shuffle)}
            batch = orders[epoch][offset * prompts_per_step:(offset + 1) * prompts_per_step]
            mine = [j for j in batch[run.rank * local_prompts:(run.rank + 1) * local_prompts]
                    for _ in range(group)]  # each prompt G times, consecutive
            pieces, round_metrics, num_tokens = rollout(run, config, prompts, mine, reward_fns,
                                                        stops, sampler)
            for piece in pieces:
                # π_old is needed only when the batch is reused; otherwise logp.detach() is it.
                piece["old"] = logps_of(run.model, piece, grad=False) if mu > 1 else None
                piece["ref"] = logps_of(ref, piece, grad=False) if ref is not None else None

            # ---- μ optimizer steps on this batch ------------------------------------------
            for iteration in range(mu):
                # loss, kl, clip low/high/region, tokens, Σ|log π_old − log π_engine|
                sums = torch.zeros(7, device=run.device)
                for k, piece in enumerate(pieces):
                    with run.accumulate(last=k == len(pieces) - 1):
                        logp = logps_of(run.model, piece, grad=True)  # [b, T]
                        old = piece["old"] if mu > 1 else logp.detach()
                        loss, m = grpo_token_loss(
                            logp, old, piece["ref"],
                            piece["advantages"], piece["completion_mask"],
                            eps_low=params.epsilon, eps_high=eps_high, beta=params.beta,
                            aggregation=params.loss_type,
                            max_completion_length=params.max_completion_length,
                            num_sequences=train.batch_size, num_tokens=num_tokens)
                        # Global normalisers make each piece's share exact. bnpo is per
                        # micro-batch by definition: average the pieces (`backward` multiplies
                        # by `world`, which the 1/world here undoes).
                        scale = 1 / (len(pieces) * run.world) if params.loss_type == "bnpo" \
                            else 1.0
                        run.backward(loss * scale)
                    t = m["tokens"]
                    gap = logprob_gap(old, piece["engine_logps"], piece["completion_mask"]) \
                        if iteration == 0 and "engine_logps" in piece else t * 0
                    sums += torch.stack([loss.detach() * scale, m["kl"] * t, m["clip_low"] * t,
                                         m["clip_high"] * t, m["clip_region"] * t, t, gap])
                sums = run.reduce_sum(sums).tolist()
                loss_value, tokens = sums[0], max(sums[5], 1.0)
                if iteration == 0 and "engine_logps" in pieces[0]:
                    # the engine sampled from the weights of π_old: their distance, per token
                    round_metrics["sampling/logp_abs_diff"] = sums[6] / tokens
                grad_norm, lr = run.update(loss_value)
                seconds = time.perf_counter() - t0
                metrics = {"loss": loss_value, **round_metrics, "kl": sums[1] / tokens,
                           "clip_ratio/low": sums[2] / tokens, "clip_ratio/high": sums[3] / tokens,
                           "clip_ratio/region": sums[4] / tokens, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": num_tokens / seconds, "step_s": seconds}
                t0 = time.perf_counter()
                run.log(metrics)
            run.checkpoint_or_stop(metrics)  # between rounds
    return run.finish(metrics)


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    raise SystemExit("python -m trainers.grpo is now: python -m trainers train grpo CONFIG")
