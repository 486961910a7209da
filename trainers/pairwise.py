"""`train pairwise`: the policy step of Pairwise-RL (Xu et al. 2025,
https://arxiv.org/abs/2504.04950): maximise the probability that a sampled response beats its
anchor, as judged by a generative pairwise judge (`train judge`).

One round: G samples of each prompt (the group-sampling round of `rollout.py`: `generate`,
`rollout_pieces`), reward r = P̄(y ≻ a(x)) from the judge (both orders, symmetrised:
`judging.Judge.preference`), then `num_iterations` optimizer steps of GRPO's clipped-ratio
loss with per-token k3 KL (`rollout.optimise`). The anchor a(x) is

- `reference`: the row's reference response (`pairwise.anchor_field`), the paper's choice;
- `greedy`: the starting policy's greedy response, computed once and cached in
  `output_dir/greedy_anchors.json`;
- `group`: a random member of the prompt's group (BRPO, https://arxiv.org/abs/2506.00103).

Advantages: `anchor` (A = r − ½: the anchor is the baseline; no group statistics) or `group`
(GRPO's normalisation over the G samples). `critic: true` adds a learned V(x, a, y_<t)
(`trainers.critic`) and per-token GAE advantages, the PPO form; it needs `advantage: anchor`.

The paper publishes no equations: this design is **ours**, reconstructed from the abstract and
the work it cites (SPEC §2); the paper's value function and any normalisation may differ.

    mergekit-rl train pairwise manifests/train/pairwise_tiny.yaml
    torchrun --nproc_per_node 2 -m trainers train pairwise CONFIG.yaml
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import models
from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, VLLMConfig, require
from .errors import TrainerConfigError, TrainingInterrupted

log = logging.getLogger(__name__)

GREEDY_CACHE = "greedy_anchors.json"


@dataclass(frozen=True)
class PairwiseParams:
    judge: str = field(metadata={"path": True})  # a `train judge` output folder (or Hub id)
    anchor: Literal["reference", "greedy", "group"] = "reference"
    anchor_field: str = "answer"  # reference: the row's field holding the reference response
    advantage: Literal["anchor", "group"] = "anchor"  # r − ½, or GRPO's group normalisation
    critic: bool = False  # PPO form: a value model V(x, a, y_<t) and GAE
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE λ
    critic_lr: float | None = None  # null: optim.lr
    num_generations: int = 8  # G samples per prompt
    max_prompt_length: int = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    generation_batch_size: int | None = None  # sequences per generate call; null: all at once
    judge_batch_size: int = 16  # judge inputs per forward (each comparison is two)
    beta: float = 0.0  # k3 KL coefficient; 0 loads no reference model
    epsilon: float = 0.2  # ε_low
    epsilon_high: float | None = None  # null: = epsilon
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    num_iterations: int = 1  # optimizer steps per generation round
    # prompt: each sample draws from its own generator seeded by (train.seed, round, prompt,
    # sample), independent of the processes and batching (as GRPO); global: one RNG stream
    sample_seeding: Literal["prompt", "global"] = "prompt"

    def __post_init__(self):
        require(bool(self.judge), "judge", "expected the folder of a `train judge` run")
        require(self.num_generations >= 2, "num_generations",
                "expected >= 2 (G samples of each prompt are judged and compared)")
        require(not (self.critic and self.advantage == "group"), "critic",
                "a critic's GAE advantages replace the group normalisation; set "
                "pairwise.advantage: anchor with critic: true, or critic: false")
        require(self.judge_batch_size > 0, "judge_batch_size", "expected > 0")
        require(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma",
                "expected 0 < gamma <= 1 and 0 <= lam <= 1")
        require(self.critic_lr is None or self.critic_lr > 0, "critic_lr", "expected > 0 or null")
        from .rollout import check_rollout_params

        check_rollout_params(self)


@dataclass(frozen=True)
class PairwiseConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig  # train.batch_size counts completions: prompts per step x G
    pairwise: PairwiseParams
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    backend: Literal["hf", "vllm"] = "hf"  # what samples the policy's completions (as GRPO)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # the engine of backend: vllm

    def __post_init__(self):
        from .rollout import check_group_batch, check_iterations

        check_group_batch(self.train, self.pairwise.num_generations, "pairwise")
        check_iterations(self.train, self.pairwise.num_iterations, "pairwise")


# ---------------------------------------------------------------------------------------------
# Anchors

def reference_anchors(config: PairwiseConfig, rows: list[dict]) -> list[str]:
    """Each row's reference response; a row without one is an error that names the field."""
    from .data import answer_text, require_field

    name = config.pairwise.anchor_field
    require_field(rows, name, config.data.path, "pairwise.anchor_field",
                  "the field holding the reference response, or pairwise.anchor: greedy")
    return [answer_text(row[name]) for row in rows]


def greedy_anchors(run, config: PairwiseConfig, prompt_ids: list[list[int]], starting
                   ) -> list[str]:
    """The starting policy's greedy response to every prompt, computed once (each process a
    slice) and cached in output_dir with a fingerprint of the model and the prompts."""
    from accelerate.utils import gather_object

    from .generation import greedy, stop_token_ids

    params = config.pairwise
    cache = Path(config.train.output_dir) / GREEDY_CACHE
    key = _fingerprint(config, prompt_ids)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("fingerprint") == key:
            log.info("greedy anchors read from %s", cache)
            return saved["anchors"]
    t0 = time.perf_counter()
    per = -(-len(prompt_ids) // run.world)
    mine = prompt_ids[run.rank * per:(run.rank + 1) * per]
    stops = stop_token_ids(run.tokenizer, starting)
    tokens = greedy(starting, mine, params.max_completion_length, run.tokenizer.pad_token_id,
                    stops) if mine else []
    anchors = gather_object(run.tokenizer.batch_decode(tokens, skip_special_tokens=True))
    if run.accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": key, "anchors": anchors}))
        tmp.replace(cache)
        log.info("greedy anchors of %d prompts computed in %.1f s, cached in %s", len(anchors),
                 time.perf_counter() - t0, cache)
    run.accelerator.wait_for_everyone()
    return anchors


def _fingerprint(config: PairwiseConfig, prompt_ids: list[list[int]]) -> str:
    """What greedy anchors depend on: the starting model's files, the prompts, the length."""
    digest = hashlib.sha256(json.dumps([config.model.path, config.model.revision,
                                        config.pairwise.max_completion_length]).encode())
    folder = Path(config.model.path)
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    digest.update(json.dumps(prompt_ids).encode())
    return digest.hexdigest()


def group_anchor_members(mine: list[int], group: int, seed: int, round_: int) -> list[int]:
    """For each group of this process's completions, the member that is the anchor: drawn
    from (seed, round, prompt), so it does not depend on the number of processes."""
    return [random.Random(f"{seed}/{round_}/{mine[k]}").randrange(group)
            for k in range(0, len(mine), group)]


# ---------------------------------------------------------------------------------------------
# One round's rewards

def judge_round(run, judge, questions: list[str], texts: list[str], anchors: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """P̄(y ≻ anchor) and |p(y≻a) + p(a≻y) − 1| of this process's completions, gathered over
    the global batch (process order). A completion equal to its anchor gets ½ exactly."""
    from accelerate.utils import gather

    from .losses.pairwise import position_consistency, symmetrised

    p_ya, p_ay = judge.compare(questions, texts, anchors)
    rewards = symmetrised(p_ya, p_ay)
    same = torch.tensor([y == a for y, a in zip(texts, anchors)])
    rewards[same] = 0.5
    local = torch.stack([rewards, position_consistency(p_ya, p_ay)], dim=1).to(run.device)
    both = gather(local).cpu()  # [B, 2]
    return both[:, 0], both[:, 1]


def round_metrics(rewards: torch.Tensor, consistency: torch.Tensor, group: int) -> dict:
    from .losses.policy import nanstd

    stds = nanstd(rewards.view(-1, group), dim=1)
    return {"reward": float(rewards.mean()), "reward_std": float(nanstd(rewards)),
            "win_rate": float(((rewards > 0.5).float() + 0.5 * (rewards == 0.5).float()).mean()),
            "judge/position_consistency": float(consistency.mean()),
            "frac_reward_zero_std": float((torch.nan_to_num(stds) < 1e-8).float().mean())}


# ---------------------------------------------------------------------------------------------
# Training

def train_pairwise(config: PairwiseConfig, resume: str | None = None) -> Path:
    """Run Pairwise-RL's policy step as configured; return the output folder.

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from transformers import AutoTokenizer

    from . import rollout
    from .generation import HFSampler, check_backend, make_sampler, stop_token_ids
    from .judging import Judge, check_judge_folder, check_tokenizer, question_text, stored_format
    from .losses.pairwise import anchor_advantages
    from .losses.policy import group_advantages
    from .scaffold import Run

    train, params = config.train, config.pairwise
    group, mu = params.num_generations, params.num_iterations
    check_backend(config, params, "pairwise")  # vLLM missing or unable to run the model
    run = Run(config, "pairwise", resume)
    rollout.prompts_per_process(train, group, run.world, "pairwise")

    # Everything that can fail on user input happens before a model loads.
    check_judge_folder(params.judge, "pairwise.judge")
    fmt = stored_format(params.judge)
    check_tokenizer(AutoTokenizer.from_pretrained(params.judge), fmt, "pairwise.judge")
    prompts, _ = rollout.load_prompts(config.data, params.max_prompt_length, run.tokenizer,
                                      train.seed, run.accelerator, "pairwise")
    anchors = reference_anchors(config, prompts.rows) if params.anchor == "reference" else None
    questions = [question_text(v) for v in prompts.values]
    prompts_per_step = train.batch_size // group
    rounds_per_epoch = len(prompts.rows) // prompts_per_step
    if rounds_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {prompts_per_step} prompts per step is more "
                                 f"than the {len(prompts.rows)} rows")
    max_steps = train.max_steps or math.ceil(train.epochs * rounds_per_epoch) * mu

    ref = run.load_reference() if params.beta > 0 or params.anchor == "greedy" else None
    if params.anchor == "greedy":
        with models.resident(ref, generate=True) as reference:
            anchors = greedy_anchors(run, config, prompts.ids, reference)
    ref = ref if params.beta > 0 else None
    # loaded before the RNG is seeded or restored, so a resumed run samples as the first did
    judge = Judge.load(params.judge, run.device, config.model.dtype, params.judge_batch_size,
                       fmt, "pairwise.judge")
    # the engine starts before run.start() (vLLM seeds the RNGs the run then sets or restores)
    sampler = HFSampler(run.tokenizer.pad_token_id) if run.dry_run else \
        make_sampler(config, run.tokenizer.pad_token_id,
                     params.max_prompt_length + params.max_completion_length, train.seed)
    run.start(max_steps, lambda step: {"round": step // mu,
                                       "prompts_seen": step // mu * prompts_per_step})
    stops = stop_token_ids(run.tokenizer, run.policy)
    critic = None
    if params.critic:
        from .critic import Critic, critic_prefix

        # its head's initialisation must not draw from the (restored) sampling RNG
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            critic = Critic(run, config)
        limit = params.max_prompt_length + params.max_completion_length

    metrics: dict = {}
    orders: dict[int, list[int]] = {}
    micro, chunk = train.micro_batch_size, config.model.lm_head_chunk_size
    with run.signals(), contextlib.closing(sampler):
        while run.step < run.max_steps:
            # ---- generation round: this process's prompts, G samples each, judged ----------
            t0 = time.perf_counter()
            round_ = run.step // mu
            mine = rollout.round_prompts(run, train, config.data, len(prompts.rows), group,
                                         round_, orders)
            seeds = rollout.round_seeds(params, train.seed, round_, mine, group)
            completions, texts, gen_seconds, engine = rollout.generate(
                run, params, prompts, mine, stops, seeds, sampler)
            if params.anchor == "group":
                members = group_anchor_members(mine, group, train.seed, round_)
                against = [texts[k - k % group + members[k // group]] for k in range(len(mine))]
            else:
                against = [anchors[j] for j in mine]
            t1 = time.perf_counter()
            rewards, consistency = judge_round(run, judge, [questions[j] for j in mine], texts,
                                               against)
            judge_seconds = time.perf_counter() - t1
            advantages = anchor_advantages(rewards) if params.advantage == "anchor" else \
                group_advantages(rewards, group, "group")
            here = slice(run.rank * len(mine), (run.rank + 1) * len(mine))
            lengths, num_tokens = rollout.length_metrics(run, completions, stops)
            info = {**round_metrics(rewards, consistency, group), **lengths,
                    "gen_s": gen_seconds, "judge_s": judge_seconds}
            if sampler.name == "vllm":
                info["sync_s"] = sampler.sync_s
            pieces = rollout.rollout_pieces(run, prompts, mine, completions, micro, engine,
                                         advantages=advantages[here], rewards=rewards[here])
            rollout.old_and_reference_logps(run, pieces, ref, params.temperature, mu, chunk)
            if critic is not None:
                prefixes = [critic_prefix(run.tokenizer, config.data, prompts.values[j], a, limit)
                            for j, a in zip(mine, against)]
                critic.attach(pieces, prefixes, completions, micro, num_tokens)
            # ---- μ optimizer steps on this batch ------------------------------------------
            metrics = rollout.optimise(run, params, pieces, num_tokens, train.batch_size, info, t0,
                                    companion=critic, chunk_size=chunk)
            checkpoint_or_stop(run, critic, metrics)
    return run.finish(metrics)


def checkpoint_or_stop(run, critic, metrics: dict) -> None:
    """The scaffold's checkpoint (and stop on a signal), with the critic's state beside it."""
    save_steps = run.config.train.save_steps
    try:
        run.checkpoint_or_stop(metrics)
    except TrainingInterrupted:
        if critic is not None:
            critic.save(run.step, run.config.train.save_total_limit)
        raise
    if critic is not None and save_steps is not None and run.step % save_steps == 0:
        critic.save(run.step, run.config.train.save_total_limit)


if __name__ == "__main__":
    raise SystemExit("run it as: mergekit-rl train pairwise CONFIG (or python -m trainers ...)")
