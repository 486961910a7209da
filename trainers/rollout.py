"""The group-sampling round GRPO and `train pairwise` share: the batch rule, the prompts,
which prompts a process takes in a round and the seeds of their samples, sampling them (hf or
vLLM, `generation.make_sampler`), the padded micro-batches, and the optimisation round — μ
optimizer steps of the clipped-ratio loss with k3 KL (`losses.grpo_token_loss`) over those
micro-batches, with an optional companion network (the critic of `train pairwise`) trained in
the same backward. What a trainer adds is its reward and its advantages.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .config import DataConfig, TrainConfig, require
from .data import epoch_order, load_splits, prompt_value, render_generation_prompt
from .errors import TrainerConfigError

log = logging.getLogger(__name__)


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


def completion_logps(run, net, piece: dict, temperature: float, grad: bool,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probs of a rollout piece's completion tokens under `net`. -> [b, T]"""
    from .logprobs import token_logprobs

    with nullcontext() if grad else torch.no_grad(), run.autocast():
        return token_logprobs(net, piece["input_ids"], piece["attention_mask"],
                              piece["completion_mask"], temperature, start=piece["start"],
                              chunk_size=chunk_size)


def old_and_reference_logps(run, pieces: list[dict], ref, temperature: float,
                            num_iterations: int, chunk_size: int | None = None) -> None:
    """Set each piece's `old` (π_old, needed only when the batch is reused: μ > 1; else
    logp.detach() is it) and `ref` (the reference's log-probs, None without a reference). An
    offloaded reference is on the device for this pass only (`models.resident`)."""
    from .models import resident

    with resident(ref) as reference:
        for piece in pieces:
            piece["old"] = completion_logps(run, run.model, piece, temperature, False,
                                            chunk_size) if num_iterations > 1 else None
            piece["ref"] = completion_logps(run, reference, piece, temperature, False,
                                            chunk_size) if reference is not None else None


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


def piece_loss(model, piece: dict, params, *, temperature: float,
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
