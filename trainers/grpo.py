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

import hashlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, VLLMConfig, require
from .data import epoch_order, load_splits, prompt_value, render_generation_prompt
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
    # prompt: each completion draws from its own generator, seeded by (train.seed, round,
    # prompt, sample), so samples do not depend on the number of processes or on batching;
    # global: one RNG stream per process (TRL's way)
    sample_seeding: Literal["prompt", "global"] = "prompt"

    def __post_init__(self):
        require(len(self.rewards) > 0, "rewards", "expected at least one reward function")
        require(self.num_generations >= 2, "num_generations",
                "expected >= 2: advantages compare completions of the same prompt")
        check_rollout_params(self)


def check_rollout_params(params) -> None:
    """The sampling and clipped-loss fields GRPO shares with `train pairwise`."""
    for name in ("max_prompt_length", "max_completion_length", "num_iterations"):
        require(getattr(params, name) > 0, name, "expected > 0")
    require(params.temperature > 0, "temperature", "expected > 0")
    require(0 < params.top_p <= 1, "top_p", "expected in (0, 1]")
    require(params.top_k >= 0, "top_k", "expected >= 0 (0: off)")
    require(params.beta >= 0, "beta", "expected >= 0")
    require(0 <= params.epsilon < 1, "epsilon", "expected in [0, 1)")
    require(params.epsilon_high is None or params.epsilon_high >= 0, "epsilon_high",
            "expected >= 0")
    require(params.generation_batch_size is None or params.generation_batch_size > 0,
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
        check_group_batch(self.train, self.grpo.num_generations, "grpo")
        check_iterations(self.train, self.grpo.num_iterations, "grpo")

    def split(self, world: int) -> int:
        """Prompts per process per round; each process generates whole groups."""
        return prompts_per_process(self.train, self.grpo.num_generations, world, "grpo")


def check_group_batch(train: TrainConfig, group: int, section: str) -> None:
    """The batch rule of group-sampling trainers: `train.batch_size` counts completions, a
    multiple of `{section}.num_generations`; the error says which numbers would do."""
    b = train.batch_size
    if b % group:
        lower, upper = (b // group) * group, (b // group + 1) * group
        divisors = [d for d in range(2, b + 1) if b % d == 0][-3:]
        raise _field("train.batch_size",
                     f"{b} completions per step is not a multiple of {section}.num_generations "
                     f"{group} (each prompt's {group} completions must be in the same batch); "
                     f"set train.batch_size to {' or '.join(str(v) for v in (lower, upper) if v)}"
                     f", or {section}.num_generations to a divisor of {b} such as "
                     f"{', '.join(map(str, divisors))}")
    train.check_micro_batch()


def check_iterations(train: TrainConfig, mu: int, section: str) -> None:
    """Checkpoints and the end fall between generation rounds of μ optimizer steps."""
    require(train.save_steps is None or train.save_steps % mu == 0, "train.save_steps",
            f"expected a multiple of {section}.num_iterations {mu} (checkpoints are taken "
            "between generation rounds)")
    require(train.max_steps is None or train.max_steps % mu == 0, "train.max_steps",
            f"expected a multiple of {section}.num_iterations {mu}")


def prompts_per_process(train: TrainConfig, group: int, world: int, section: str) -> int:
    """Prompts per process per round; each process generates whole groups."""
    prompts = train.batch_size // group
    if prompts % world:
        raise _field("train.batch_size",
                     f"{prompts} prompts per step ({train.batch_size} completions / "
                     f"{section}.num_generations {group}) do not split over {world} processes; "
                     f"use a multiple of {world * group} completions")
    train.accumulation_steps(world)
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
           "completion_mask": completion.to(device), "start": max(width_p, 1)}
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


@dataclass
class PromptIds:
    ids: list[int]


def load_prompts(data: DataConfig, max_prompt_length: int, tokenizer, seed: int,
                 accelerator=None, section: str = "grpo") -> tuple[Prompts, Prompts | None]:
    """The training prompts and the held-out ones (None without data.eval_*), rendered and
    tokenised through the cache; the first tokens of a long prompt are dropped."""
    from .config import to_dict
    from .datacache import cached, tokenizer_fingerprint

    if data.chat and tokenizer.chat_template is None:
        raise TrainerConfigError("data.chat: the tokenizer has no chat template; set false")
    required = () if data.prompt_template else (data.prompt_field,)
    splits = load_splits(data, required, seed)
    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "data": to_dict(data),
           "max_prompt_length": max_prompt_length}

    def encode(values):
        ids = [tokenizer(render_generation_prompt(tokenizer, p, data),
                         add_special_tokens=False)["input_ids"] for p in values]
        cut = sum(len(p) > max_prompt_length for p in ids)
        if cut:
            log.warning("%d prompts are longer than %s.max_prompt_length %d; their first "
                        "tokens are dropped", cut, section, max_prompt_length)
        return [PromptIds(p[-max_prompt_length:]) for p in ids]

    out = []
    for rows in splits:
        if rows is None:
            out.append(None)
            continue
        values = [prompt_value(row, data) for row in rows]
        ids = cached(section, {**key, "rows": rows.fingerprint},
                     lambda values=values: encode(values), PromptIds, accelerator, data.cache)
        out.append(Prompts(rows, values, [p.ids for p in ids]))
    return out[0], out[1]


def sample_seed(seed: int, round_index: int, prompt: int, sample_index: int) -> int:
    """The generator seed of one completion: a hash of where it is in the run."""
    text = f"{seed}:{round_index}:{prompt}:{sample_index}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2 ** 63 - 1)


def weighted_total(rewards: torch.Tensor, specs) -> torch.Tensor:
    """[N, F] rewards -> [N] weighted sum; NaN where no function gave a reward."""
    weights = torch.tensor([s.weight for s in specs])
    total = (rewards * weights).nansum(dim=1)
    total[torch.isnan(rewards).all(dim=1)] = math.nan  # no reward applied: no signal
    return total


def columns_of(prompts: Prompts, indices: list[int], prompt_field: str) -> dict[str, list]:
    keys = sorted({k for j in indices for k in prompts.rows[j]} - {prompt_field})
    return {k: [prompts.rows[j].get(k) for j in indices] for k in keys}


def round_prompts(run, train: TrainConfig, data: DataConfig, n_rows: int, group: int,
                  round_: int, orders: dict[int, list[int]]) -> list[int]:
    """This process's prompt indices of generation round `round_`, each `group` times in a row.
    The order of an epoch depends on (seed, epoch) only; `orders` caches the current one."""
    per_step = train.batch_size // group
    per_epoch = n_rows // per_step
    epoch, offset = divmod(round_, per_epoch)
    if epoch not in orders:
        orders.clear()
        orders[epoch] = epoch_order(n_rows, epoch, train.seed, data.shuffle)
    batch = orders[epoch][offset * per_step:(offset + 1) * per_step]
    local = per_step // run.world
    return [j for j in batch[run.rank * local:(run.rank + 1) * local] for _ in range(group)]


def round_seeds(params, seed: int, round_index: int, mine: list[int], group: int
                ) -> list[int] | None:
    """Per-completion generator seeds of a round (`sample_seeding: prompt`), else None."""
    if params.sample_seeding != "prompt":
        return None
    return [sample_seed(seed, round_index, j, k % group) for k, j in enumerate(mine)]


def generate(run, params, prompts: Prompts, mine: list[int], stops: set[int],
             seeds: list[int] | None = None, sampler=None
             ) -> tuple[list[list[int]], list[str], float, list[list[float]] | None]:
    """One sampled completion per entry of `mine` (token ids cut after the stop token), their
    texts, the seconds generation took, and the engine's log-probs of the sampled tokens (None
    with hf). `params` has the sampling fields of GRPOParams; `seeds`: one generator seed per
    completion (`round_seeds`); `sampler`: `generation.make_sampler`'s (None: hf)."""
    from .generation import HFSampler

    sampler = sampler or HFSampler(run.tokenizer.pad_token_id)
    t0 = time.perf_counter()
    # hf samples from the policy with whole parameters; the vllm engine first loads the
    # policy's weights if they changed since its last round
    with run.generation() if sampler.name == "hf" else nullcontext(run.policy) as policy:
        samples = sampler.sample([prompts.ids[j] for j in mine], params, stops, policy=policy,
                                 step=run.step, logprobs=True, seeds=seeds,
                                 synced_gpus=run.synced, device=run.device)
    seconds = time.perf_counter() - t0
    texts = run.tokenizer.batch_decode(samples.tokens, skip_special_tokens=True)
    return samples.tokens, texts, seconds, samples.logprobs


def length_metrics(run, completions: list[list[int]], stops: set[int]) -> tuple[dict, float]:
    """Completion lengths and the share that ended with a stop token, over the global batch;
    and the global batch's completion token count."""
    from accelerate.utils import gather

    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    ended = torch.tensor([float(bool(c) and c[-1] in stops) for c in completions])
    lengths, ended = gather(lengths.to(run.device)).cpu(), gather(ended.to(run.device)).cpu()
    return {"completion_length/mean": float(lengths.mean()),
            "completion_length/min": float(lengths.min()),
            "completion_length/max": float(lengths.max()),
            "terminated_fraction": float(ended.mean())}, float(lengths.sum())


def rollout_pieces(run, prompts: Prompts, mine: list[int], completions: list[list[int]],
                   micro: int, engine: list[list[float]] | None = None,
                   **per_completion: torch.Tensor) -> list[dict]:
    """Micro-batches of this process's rollout (`pad_rollout`, with the engine's log-probs
    where there are some), each with its slice of every per-completion tensor given
    (advantages, rewards, ...)."""
    pieces = [pad_rollout([prompts.ids[j] for j in mine[k:k + micro]], completions[k:k + micro],
                          run.tokenizer.pad_token_id, run.device,
                          None if engine is None else engine[k:k + micro])
              for k in range(0, len(mine), micro)]
    for k, piece in enumerate(pieces):
        for name, values in per_completion.items():
            piece[name] = values[k * micro:(k + 1) * micro].to(run.device)
    return pieces


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


def completion_logps(run, net, piece: dict, temperature: float, grad: bool,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probs of a rollout piece's completion tokens under `net`. -> [b, T]"""
    from .logprobs import token_logprobs

    with nullcontext() if grad else torch.no_grad(), run.autocast():
        return token_logprobs(net, piece["input_ids"], piece["attention_mask"],
                              piece["completion_mask"], temperature, start=piece["start"],
                              chunk_size=chunk_size)


def policy_loss(run, params, piece: dict, num_pieces: int, num_sequences: int,
                num_tokens: torch.Tensor, chunk_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`piece_loss` under the policy, scaled so that the pieces of all processes add up to the
    global batch's loss; and its metric sums [7]: loss, kl, clip low/high/region (token sums),
    tokens, Σ|log π_old − log π_engine| (0 without engine log-probs). `params` has GRPOParams'
    loss fields; `piece["old"]` is π_old when a batch is reused (μ > 1), else None (π_old = π_θ
    detached)."""
    eps_high = params.epsilon_high if params.epsilon_high is not None else params.epsilon
    loss, m = piece_loss(run.model, piece, params, temperature=params.temperature,
                         eps_high=eps_high, num_sequences=num_sequences, num_tokens=num_tokens,
                         chunk_size=chunk_size)
    # Global normalisers make each piece's share exact. bnpo is per micro-batch by
    # definition: average the pieces (`backward` multiplies by `world`, which 1/world undoes).
    scale = 1 / (num_pieces * run.world) if params.loss_type == "bnpo" else 1.0
    t = m["tokens"]
    sums = torch.stack([loss.detach() * scale, m["kl"] * t, m["clip_low"] * t,
                        m["clip_high"] * t, m["clip_region"] * t, t, m.get("engine_gap", t * 0)])
    return loss * scale, sums


def policy_metrics(sums: list[float]) -> dict:
    """Step metrics from the reduced sums of `policy_loss`."""
    tokens = max(sums[5], 1.0)
    return {"loss": sums[0], "kl": sums[1] / tokens, "clip_ratio/low": sums[2] / tokens,
            "clip_ratio/high": sums[3] / tokens, "clip_ratio/region": sums[4] / tokens}


def engine_metrics(sums: list[float], pieces: list[dict]) -> dict:
    """With a separate inference engine: the mean |log π_old − log π_engine| of the sampled
    tokens (the engine sampled from π_old's weights; its drift makes the batch off-policy)."""
    if pieces[0].get("engine_logps") is None:
        return {}
    return {"sampling/logp_abs_diff": sums[6] / max(sums[5], 1.0)}


def optimise(run, params, pieces: list[dict], num_tokens: float, num_sequences: int,
             round_metrics: dict, t0: float, companion=None, chunk_size: int | None = None,
             evaluate: Callable[[], dict] | None = None) -> dict:
    """`params.num_iterations` optimizer steps on one generation round's pieces; logs each step
    and returns the last step's metrics. π_old (`piece["old"]`) and the reference log-probs
    (`piece["ref"]`) must be set already.

    `companion` trains a second network on the same pieces and steps (the critic of `train
    pairwise`): `accumulate(last)` (its gradient sync), `loss(piece) -> (loss, sums)` added to
    the piece's loss before the one backward, and `update(sums) -> metrics` after the policy's
    step (`sums` reduced over the pieces and processes). `evaluate()` gives the held-out
    metrics (`Run.evaluate` decides at which steps).
    """
    metrics: dict = {}
    total = torch.tensor(float(num_tokens), device=run.device)  # no host sync inside the step
    for _ in range(params.num_iterations):
        sums = torch.zeros(7, device=run.device)
        extra = None
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            with run.accumulate(last), \
                    companion.accumulate(last) if companion else nullcontext():
                loss, piece_sums = policy_loss(run, params, piece, len(pieces), num_sequences,
                                               total, chunk_size)
                if companion is not None:
                    extra_loss, extra_sums = companion.loss(piece)
                    extra = extra_sums if extra is None else extra + extra_sums
                    loss = loss + extra_loss
                run.backward(loss)
            sums += piece_sums
        sums = run.reduce_sum(sums).tolist()
        grad_norm, lr = run.update(sums[0])
        companion_metrics = companion.update(run.reduce_sum(extra).tolist()) if companion else {}
        seconds = time.perf_counter() - t0
        metrics = {**policy_metrics(sums), **engine_metrics(sums, pieces), **round_metrics,
                   **companion_metrics, "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": float(num_tokens) / seconds,
                   "step_s": seconds}
        if evaluate is not None:
            metrics |= run.evaluate(evaluate)
        t0 = time.perf_counter()
        run.log(metrics)
    return metrics


def piece_loss(model, piece: dict, params: GRPOParams, *, temperature: float,
               eps_high: float, num_sequences: int, num_tokens: torch.Tensor,
               chunk_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped-ratio loss of one micro-batch of rollouts (global normalisers), tensor code
    only: no host syncs, nothing made on the CPU."""
    from .generation import logprob_gap
    from .logprobs import token_logprobs
    from .losses.policy import grpo_token_loss

    logp = token_logprobs(model, piece["input_ids"], piece["attention_mask"],
                          piece["completion_mask"], temperature, start=piece["start"],
                          chunk_size=chunk_size)  # [b, T]
    old = piece["old"] if piece.get("old") is not None else logp.detach()
    loss, m = grpo_token_loss(
        logp, old, piece.get("ref"), piece["advantages"], piece["completion_mask"],
        eps_low=params.epsilon, eps_high=eps_high, beta=params.beta,
        aggregation=params.loss_type, max_completion_length=params.max_completion_length,
        num_sequences=num_sequences, num_tokens=num_tokens)
    if piece.get("engine_logps") is not None:  # the engine sampled from π_old's weights
        m["engine_gap"] = logprob_gap(old, piece["engine_logps"], piece["completion_mask"])
    return loss, m


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
            for piece in pieces:
                # π_old is needed only when the batch is reused; otherwise logp.detach() is it.
                piece["old"] = completion_logps(run, run.model, piece, params.temperature,
                                                grad=False, chunk_size=chunk) if mu > 1 else None
                piece["ref"] = completion_logps(run, ref, piece, params.temperature, grad=False,
                                                chunk_size=chunk) if ref is not None else None
            # ---- μ optimizer steps on this batch ------------------------------------------
            held = (lambda: evaluate(run, config, held_out, reward_fns, stops)) \
                if held_out is not None else None
            metrics = optimise(run, params, pieces, num_tokens, train.batch_size, round_metrics,
                               t0, chunk_size=chunk, evaluate=held)
            run.checkpoint_or_stop(metrics)  # between rounds
    return run.finish(metrics)


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    raise SystemExit("python -m trainers.grpo is now: python -m trainers train grpo CONFIG")
