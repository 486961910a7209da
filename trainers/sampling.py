"""Preference pairs from a policy: on-policy / hybrid pairs (WPO) and RSO rejection sampling.

Both commands sample completions of each prompt from a local policy (`backend: hf`:
`generation.sample`, KV-cache `generate` with explicit sampling knobs; `backend: vllm`: a vLLM
engine with the same knobs and stop tokens, trainers/vllm_engine.py), score them with a
reward, and write JSONL rows `{prompt, chosen, rejected, chosen_reward, rejected_reward, ...}`
that `train wpo` reads.

- `sample pairs` (WPO, https://arxiv.org/abs/2406.11827): K samples per prompt; in the
  "hybrid" mode the row's existing (off-policy) answers join the candidates. chosen = the
  highest reward, rejected = the lowest (or a random other candidate).
- `sample rso` (RSO, https://arxiv.org/abs/2309.06657, Algorithm 1): N candidates per prompt,
  K accepted by statistical rejection sampling towards π_r ∝ π_sft·exp(r/β), then paired
  ("first_round": K/2 disjoint random pairs; "tournament": K−1 matches).

A reward is a rule callable `(prompts, completions, **columns) -> list[float | None]` (the GRPO
reward functions: a built-in or module:function), a local sequence-classification reward model
(one logit per text), or a generative pairwise judge (`train judge`) scoring P̄(candidate ≻
anchor) against the row's reference (`reward.anchor_field`) or the policy's greedy response
(RSO's pairwise ranker against a baseline response). The selection maths (`rejection_sample`,
`pair_*`, `best_and_worst`) are pure functions of the rewards and a `random.Random`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import DataConfig, ModelConfig, VLLMConfig, load_config, require
from .errors import TrainerConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Selection maths

def rejection_sample(rewards: Sequence[float], num_samples: int, beta: float,
                     rng: random.Random) -> list[int]:
    """Indices of `num_samples` candidates accepted without replacement, in acceptance order.

    RSO Algorithm 1: while fewer than K are accepted, r_max = the highest reward among the
    candidates not yet accepted; visit those candidates in order and accept each with
    probability exp((r − r_max)/β), stopping as soon as K are accepted; accepted ones leave
    the pool. The best remaining candidate is always accepted, so every round makes progress.
    """
    if not 0 < num_samples <= len(rewards):
        raise ValueError(f"cannot accept {num_samples} of {len(rewards)} candidates")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < num_samples:
        taken = rso_round(rewards, remaining, beta, rng, num_samples - len(accepted))
        accepted += taken
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rso_round(rewards: Sequence[float], remaining: Sequence[int], beta: float,
              rng: random.Random, room: int) -> list[int]:
    """One pass of RSO's loop over the `remaining` candidates: accept each with probability
    exp((r − r_max)/β), r_max the best remaining reward; stop after `room` acceptances."""
    r_max = max(rewards[i] for i in remaining)
    taken: list[int] = []
    for i in remaining:
        if rng.random() < math.exp((rewards[i] - r_max) / beta):
            taken.append(i)
            if len(taken) == room:
                break
    return taken


def _ordered(a: int, b: int, rewards: Sequence[float]) -> tuple[int, int] | None:
    """(winner, loser) by reward; None on a tie (no preference to learn from)."""
    if rewards[a] == rewards[b]:
        return None
    return (a, b) if rewards[a] > rewards[b] else (b, a)


def pair_first_round(indices: Sequence[int], rewards: Sequence[float], rng: random.Random
                     ) -> list[tuple[int, int]]:
    """RSO "first-round" pairing: shuffle, K/2 disjoint pairs, each as (chosen, rejected).
    Tied pairs are dropped; with an odd K the last sample is left out."""
    order = list(indices)
    rng.shuffle(order)
    pairs = [_ordered(order[k], order[k + 1], rewards) for k in range(0, len(order) - 1, 2)]
    return [p for p in pairs if p is not None]


def pair_tournament(indices: Sequence[int], rewards: Sequence[float], rng: random.Random
                    ) -> list[tuple[int, int]]:
    """RSO "tournament" pairing: random knock-out rounds, each match a (chosen, rejected) pair,
    K−1 matches in all (an odd one out gets a bye). Tied matches advance the first sample and
    are not emitted."""
    alive = list(indices)
    rng.shuffle(alive)
    pairs: list[tuple[int, int]] = []
    while len(alive) > 1:
        winners = []
        for k in range(0, len(alive) - 1, 2):
            match = _ordered(alive[k], alive[k + 1], rewards)
            if match is not None:
                pairs.append(match)
            winners.append(match[0] if match else alive[k])
        if len(alive) % 2:
            winners.append(alive[-1])
        alive = winners
    return pairs


def best_and_worst(rewards: Sequence[float], rejected: Literal["lowest", "random"],
                   rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected) indices: the highest reward, and the lowest or a random candidate with
    a lower reward; None when every candidate has the same reward."""
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    lower = [i for i in range(len(rewards)) if rewards[i] < rewards[best]]
    if not lower:
        return None
    if rejected == "lowest":
        return best, min(lower, key=lambda i: rewards[i])
    return best, rng.choice(lower)


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class RewardConfig:
    function: str | None = None  # built-in (exact_answer, format) or module:function
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # local sequence-classification reward model (one logit)
    # a generative pairwise judge (`train judge`): reward P̄(candidate ≻ anchor)
    judge: str | None = None
    anchor: Literal["reference", "greedy"] = "reference"  # judge: the row's field, or the
    anchor_field: str = "answer"  # policy's greedy response (RSO's baseline response)
    batch_size: int = 8  # texts per reward-model forward (judge: inputs per forward)
    max_length: int = 1024  # reward-model tokens; longer texts keep their last tokens

    def __post_init__(self):
        require(sum(x is not None for x in (self.function, self.model, self.judge)) == 1,
                "function", "give exactly one of reward.function (a rule), reward.model (a "
                "local sequence-classification model) and reward.judge (a `train judge` folder)")
        require(self.batch_size > 0 and self.max_length > 0, "batch_size", "expected > 0")


@dataclass(frozen=True)
class GenerationParams:
    num_samples: int = 4  # completions per prompt (pairs: K; rso: N candidates, paper 64)
    max_prompt_length: int = 512
    max_completion_length: int = 256
    temperature: float = 1.0  # RSO paper: 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off (RSO paper: 40)
    generation_batch_size: int | None = None  # sequences per generate (or engine) call; null: 64

    def __post_init__(self):
        require(self.num_samples >= 1, "num_samples", "expected >= 1")
        for name in ("max_prompt_length", "max_completion_length"):
            require(getattr(self, name) > 0, name, "expected > 0")
        require(self.temperature > 0, "temperature", "expected > 0")
        require(0 < self.top_p <= 1, "top_p", "expected in (0, 1]")
        require(self.top_k >= 0, "top_k", "expected >= 0 (0: off)")
        require(self.generation_batch_size is None or self.generation_batch_size > 0,
                "generation_batch_size", "expected > 0 or null")


@dataclass(frozen=True)
class PairsParams:
    mode: Literal["on_policy", "hybrid"] = "on_policy"  # hybrid: + the row's own answers
    off_policy_fields: tuple[str, ...] = ("chosen", "rejected")  # hybrid: answer fields
    rejected: Literal["lowest", "random"] = "lowest"

    def __post_init__(self):
        require(self.mode == "on_policy" or bool(self.off_policy_fields), "off_policy_fields",
                "hybrid mode needs at least one field holding an existing answer")


@dataclass(frozen=True)
class RSOParams:
    num_accepted: int = 8  # K accepted of generation.num_samples candidates
    beta: float = 0.5  # temperature of the target π_sft·exp(r/β)
    pairing: Literal["first_round", "tournament"] = "first_round"

    def __post_init__(self):
        require(self.num_accepted >= 2, "num_accepted", "expected >= 2 (pairs need two)")
        require(self.beta > 0, "beta", "expected > 0")


@dataclass(frozen=True)
class SamplePairsConfig:
    model: ModelConfig  # the policy that samples
    data: DataConfig
    reward: RewardConfig
    output: str  # JSONL file written
    generation: GenerationParams = field(default_factory=GenerationParams)
    pairs: PairsParams = field(default_factory=PairsParams)
    seed: int = 0
    overwrite: bool = False
    backend: Literal["hf", "vllm"] = "hf"  # what samples the candidates
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # the engine of backend: vllm

    def __post_init__(self):
        require(self.pairs.mode == "hybrid" or self.generation.num_samples >= 2,
                "generation.num_samples", "on-policy pairs need >= 2 samples per prompt")


@dataclass(frozen=True)
class SampleRSOConfig:
    model: ModelConfig  # the SFT policy that proposes candidates
    data: DataConfig
    reward: RewardConfig
    output: str
    generation: GenerationParams = field(default_factory=lambda: GenerationParams(num_samples=64))
    rso: RSOParams = field(default_factory=RSOParams)
    seed: int = 0
    overwrite: bool = False
    backend: Literal["hf", "vllm"] = "hf"  # what samples the candidates
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # the engine of backend: vllm

    def __post_init__(self):
        require(self.rso.num_accepted <= self.generation.num_samples, "rso.num_accepted",
                f"expected <= generation.num_samples ({self.generation.num_samples})")


def load_sample_config(cls, path: str | Path, overrides=()):
    """`load_config` plus the paths only sampling has (`output`, `reward.model`,
    `reward.judge`), made absolute relative to the config file."""
    from mergekit_rl.hub import local_path

    config = load_config(cls, path, overrides)
    base = Path(path).resolve().parent

    def resolved(spec: str | None) -> str | None:
        found = None if spec is None else local_path(spec, base)
        return spec if found is None else str(found.resolve())

    return dataclasses.replace(
        config, output=str((base / Path(config.output).expanduser()).resolve()),
        reward=dataclasses.replace(config.reward, model=resolved(config.reward.model),
                                   judge=resolved(config.reward.judge)))


# ---------------------------------------------------------------------------------------------
# Rewards

class RewardModelScorer:
    """Scores (prompt, completion) texts with a local sequence-classification model: the chat
    template of the reward model's tokenizer when it has one, its single logit as the reward."""

    def __init__(self, cfg: RewardConfig, chat: bool, device):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(cfg.model)
        if not path.is_dir():
            raise TrainerConfigError(f"reward.model: {path} is not a local model folder")
        self.cfg, self.device, self.torch = cfg, device, torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise TrainerConfigError(f"reward.model: {path} has {self.model.config.num_labels} "
                                     "labels; a reward model has one (num_labels: 1)")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.chat = chat and self.tokenizer.chat_template is not None

    def text(self, prompt, completion: str) -> str:
        from .data import as_messages

        if self.chat:
            messages = as_messages(prompt, "user") + [{"role": "assistant",
                                                       "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_text = prompt if isinstance(prompt, str) else \
            "\n".join(m["content"] for m in prompt)
        return prompt_text + completion

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with self.torch.no_grad():
            for k in range(0, len(texts), self.cfg.batch_size):
                enc = self.tokenizer(texts[k:k + self.cfg.batch_size], padding=True,
                                     truncation=True, max_length=self.cfg.max_length,
                                     add_special_tokens=False, return_tensors="pt")
                logits = self.model(**enc.to(self.device)).logits  # [b, 1]
                scores += logits[:, 0].float().tolist()
        return scores


GREEDY_ANCHOR = "__greedy_anchor__"  # the column that holds the policy's greedy responses


def make_reward(cfg: RewardConfig, chat: bool, device):
    """The configured reward as a callable `(prompts, completions, **columns) -> list`."""
    if cfg.model is not None:
        return RewardModelScorer(cfg, chat, device)
    if cfg.judge is not None:
        from .judging import JudgeReward

        anchor = cfg.anchor_field if cfg.anchor == "reference" else GREEDY_ANCHOR
        return JudgeReward(cfg.judge, anchor, cfg.batch_size, field="reward.judge")
    from .rewards import resolve_reward

    try:
        return resolve_reward(cfg.function, cfg.kwargs)
    except ValueError as e:
        raise TrainerConfigError(f"reward.function: {e}") from None


def score(reward, prompts: list, completions: list[str], columns: dict[str, list]
          ) -> list[float | None]:
    """Call the reward and check what it returns; None marks a candidate it does not score."""
    from .rewards import check_rewards

    return check_rewards(reward(prompts, completions, **columns), len(completions), "reward")


# ---------------------------------------------------------------------------------------------
# Commands

@dataclass
class Candidate:
    text: str
    source: str  # "policy" or the field an off-policy answer came from
    reward: float | None = None


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise TrainerConfigError(f"output: {path} exists; set overwrite: true or choose another "
                                 "file")
    if path.suffix != ".jsonl":
        raise TrainerConfigError(f"output: {path} should be a .jsonl file")


def _generate_and_score(config, select) -> Path:
    """Shared loop: sample `generation.num_samples` completions per prompt, add off-policy
    candidates (hybrid), score, let `select(candidates, rng)` pick (chosen, rejected) index
    pairs, write JSONL. Returns the output path."""
    import torch

    from . import models, runtime
    from .data import (
        answer_text,
        load_rows,
        prompt_value,
        render_generation_prompt,
        require_field,
    )
    from .generation import check_backend, make_sampler, saved_generation_config, stop_token_ids
    from .models import check_model_path

    data, gen = config.data, config.generation
    out = Path(config.output)
    _check_output(out, config.overwrite)
    check_model_path(config.model.path, "model.path")
    check_backend(config, gen, "generation")
    hybrid = getattr(config, "pairs", None) is not None and config.pairs.mode == "hybrid"
    extra = config.pairs.off_policy_fields if hybrid else ()
    rows = load_rows(data, (() if data.prompt_template else (data.prompt_field,)) + extra)
    judged = config.reward.judge is not None
    if judged and config.reward.anchor == "reference":
        require_field(rows, config.reward.anchor_field, data.path, "reward.anchor_field",
                      "the field holding the response to judge against, or reward.anchor: "
                      "greedy")
    tokenizer = runtime.load_tokenizer(config.model)
    if data.chat and tokenizer.chat_template is None:
        raise TrainerConfigError("data.chat: the tokenizer has no chat template; set false")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward = make_reward(config.reward, data.chat, device)
    prompts = [prompt_value(row, data) for row in rows]
    prompt_ids = [tokenizer(render_generation_prompt(tokenizer, p, data),
                            add_special_tokens=False)["input_ids"][-gen.max_prompt_length:]
                  for p in prompts]

    sampler = make_sampler(config, tokenizer.pad_token_id,
                           gen.max_prompt_length + gen.max_completion_length, config.seed)
    if sampler.name == "hf":
        model = models.load_model(config.model, trainable=False).to(device)
        eos_ids = stop_token_ids(tokenizer, model)
    else:  # the engine holds the weights: no second copy, only the generation config
        model = None
        eos_ids = stop_token_ids(tokenizer, saved_generation_config(config.model))
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    chunk = gen.generation_batch_size or 64
    per_call = max(1, chunk // gen.num_samples)  # prompts per generate round
    params = dataclasses.replace(gen, generation_batch_size=chunk)
    counts = {"prompts": len(rows), "pairs": 0, "no_pair": 0, "unscored": 0}
    t0 = time.perf_counter()
    tmp = out.with_suffix(".jsonl.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f, contextlib.closing(sampler):
        for start in range(0, len(rows), per_call):
            block = list(range(start, min(start + per_call, len(rows))))
            repeated = [j for j in block for _ in range(gen.num_samples)]
            completions = sampler.sample([prompt_ids[j] for j in repeated], params, eos_ids,
                                         policy=model).tokens
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            candidates = {j: [Candidate(t, "policy") for t in
                              texts[n * gen.num_samples:(n + 1) * gen.num_samples]]
                          for n, j in enumerate(block)}
            for j in block:
                candidates[j] += [Candidate(answer_text(rows[j][name]), name) for name in extra]
            owners = [j for j in block for _ in candidates[j]]
            flat = [c for j in block for c in candidates[j]]
            keys = sorted({k for j in block for k in rows[j]} - {data.prompt_field})
            columns = {k: [rows[j].get(k) for j in owners] for k in keys}
            if judged and config.reward.anchor == "greedy":  # RSO's baseline response
                anchors = sampler.greedy([prompt_ids[j] for j in block],
                                         gen.max_completion_length, eos_ids, policy=model)
                texts_of = dict(zip(block, tokenizer.batch_decode(anchors,
                                                                  skip_special_tokens=True)))
                columns[GREEDY_ANCHOR] = [texts_of[j] for j in owners]
            for c, r in zip(flat, score(reward, [prompts[j] for j in owners],
                                        [c.text for c in flat], columns)):
                c.reward = r
            for j in block:
                scored = [c for c in candidates[j] if c.reward is not None]
                counts["unscored"] += len(candidates[j]) - len(scored)
                chosen_pairs = select([c.reward for c in scored], rng) if len(scored) > 1 else []
                if not chosen_pairs:
                    counts["no_pair"] += 1
                passthrough = {k: v for k, v in rows[j].items() if k != data.prompt_field}
                for win, lose in chosen_pairs:
                    f.write(json.dumps({
                        **passthrough, "prompt": prompts[j], "chosen": scored[win].text,
                        "rejected": scored[lose].text, "chosen_reward": scored[win].reward,
                        "rejected_reward": scored[lose].reward, "chosen_source": scored[win].source,
                        "rejected_source": scored[lose].source}, ensure_ascii=False) + "\n")
                    counts["pairs"] += 1
            log.info("%d/%d prompts, %d pairs (%.1f s)", block[-1] + 1, len(rows),
                     counts["pairs"], time.perf_counter() - t0)
    tmp.replace(out)
    if counts["no_pair"]:
        log.warning("%d of %d prompts gave no pair (every candidate scored the same, or fewer "
                    "than two were scored)", counts["no_pair"], len(rows))
    if counts["unscored"]:
        log.warning("%d candidates got no reward (None) and were left out", counts["unscored"])
    log.info("%d pairs written to %s", counts["pairs"], out)
    return out


def sample_pairs(config: SamplePairsConfig) -> Path:
    """On-policy or hybrid pairs (WPO): chosen = best-scored candidate, rejected = the lowest
    (or a random lower one). Writes `config.output`; returns its path."""
    def select(rewards, rng):
        pair = best_and_worst(rewards, config.pairs.rejected, rng)
        return [pair] if pair else []

    return _generate_and_score(config, select)


def sample_rso(config: SampleRSOConfig) -> Path:
    """RSO: accept `rso.num_accepted` of `generation.num_samples` candidates by rejection
    sampling at temperature `rso.beta`, then pair them. Writes `config.output`."""
    params = config.rso
    pairing = pair_first_round if params.pairing == "first_round" else pair_tournament

    def select(rewards, rng):
        k = min(params.num_accepted, len(rewards))
        return pairing(rejection_sample(rewards, k, params.beta, rng), rewards, rng)

    return _generate_and_score(config, select)
