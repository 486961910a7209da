"""WPO: Weighted Preference Optimization (Zhou et al. 2024, https://arxiv.org/abs/2406.11827).

A pairwise preference trainer for the DPO family (`losses.preference.pair_loss`: sigmoid/cDPO,
robust, IPO, hinge (RSO/SLiC), CoPG) whose per-pair loss is multiplied by the detached WPO
weight `w(x,y_w)·w(x,y_l)` (`losses.preference.sequence_weight`), so that off-policy pairs count
as much as the current policy would have produced them. Weighting works with every loss: the weight
multiplies a new tensor, never the loss in place.

Rows hold `prompt`, `chosen`, `rejected` (strings or chat messages; a chosen/rejected
conversation carries its own prompt). The reference model is the starting model; its
log-probabilities are computed once, by the policy before its first update, and cached in
`output_dir/ref_logps.pt` (`wpo.precompute_ref`), so no reference copy is ever loaded.

    mergekit-rl train wpo manifests/train/wpo_tiny.yaml
    torchrun --nproc_per_node 2 -m trainers train wpo CONFIG.yaml      # data-parallel, same maths
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import models, runtime
from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, require
from .data import (
    as_messages,
    load_splits,
    prompt_value,
    split_conversation,
    step_pieces,
    tokenize_segments,
)
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

REF_CACHE = "ref_logps.pt"


@dataclass(frozen=True)
class WPOParams:
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge", "copg"] = "sigmoid"
    beta: float = 0.1  # β (RSO's γ for hinge/sigmoid-norm); WPO paper: 0.01
    label_smoothing: float = 0.0  # ε of cDPO (sigmoid) and robust DPO
    weighting: bool = True  # multiply each pair's loss by its WPO weight
    weight_alignment: Literal["sampled", "greedy", "none"] = "sampled"  # official code: sampled
    weight_clamp: float | None = 1.0  # official code: 1; null: unclamped (TRL >= 0.29)
    reference_free: bool = False  # ρ = log π (no reference model): SLiC with loss_type hinge
    precompute_ref: bool = True  # reference log-probs once, cached; false: keep the model loaded
    sft_weight: float = 0.0  # λ of an NLL term on the chosen answer (SLiC regulariser / RPO)
    sft_length_normalize: bool = True  # NLL per token (RPO); false: per sequence (SLiC)
    max_length: int = 1024  # prompt + completion tokens; completions are cut on the right
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    chosen_reward_field: str = "chosen_reward"  # copg: scalar reward of each answer
    rejected_reward_field: str = "rejected_reward"

    def __post_init__(self):
        require(self.beta > 0, "beta", f"expected > 0, got {self.beta}")
        limit = 0.5 if self.loss_type == "robust" else 1.0
        require(0 <= self.label_smoothing < limit, "label_smoothing",
                f"expected in [0, {limit}) for loss_type {self.loss_type}")
        require(self.weight_clamp is None or self.weight_clamp > 0, "weight_clamp",
                "expected > 0 or null (unclamped)")
        require(self.sft_weight >= 0, "sft_weight", "expected >= 0")
        require(self.max_length > 1, "max_length", "expected > 1")
        require(0 < self.max_prompt_length < self.max_length, "max_prompt_length",
                f"expected between 1 and max_length - 1 ({self.max_length - 1})")


@dataclass(frozen=True)
class WPOConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig  # batch_size and micro_batch_size count pairs (2 sequences each)
    wpo: WPOParams = field(default_factory=WPOParams)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # WPO paper

    def __post_init__(self):
        require(self.data.messages_field is None, "data.messages_field",
                "not used by preference data; give prompt/chosen/rejected fields")


@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]
    chosen_mask: list[bool]  # trained (assistant) tokens of the chosen completion
    rejected: list[int]
    rejected_mask: list[bool]
    chosen_reward: float = 0.0  # copg only
    rejected_reward: float = 0.0


# ---------------------------------------------------------------------------------------------
# Data

def _split_prompt(value, name: str, i: int):
    """(prompt or None, completion messages): a conversation carries its own prompt."""
    if isinstance(value, list) and value and value[0].get("role") != "assistant":
        if value[-1].get("role") != "assistant":
            raise TrainerConfigError(f"data row {i}: {name} conversation does not end with an "
                                     "assistant message")
        return value[:-1], value[-1:]
    if isinstance(value, (str, list)):
        return None, as_messages(value, "assistant")
    raise TrainerConfigError(f"data row {i}: {name} is {type(value).__name__}; expected a "
                             "string or a list of chat messages")


def build_pairs(rows: list[dict], tokenizer, config: WPOConfig) -> list[PairExample]:
    """Tokenise (prompt, chosen, rejected) rows; prompts cut on the left, completions on the
    right; errors name the row."""
    data, params = config.data, config.wpo
    if data.chat and tokenizer.chat_template is None:
        raise TrainerConfigError("data.chat: the tokenizer has no chat template; set "
                                 "data.chat: false for plain-text prompt + completion")

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)

    def encode(prompt: list[dict], completion: list[dict], i: int):
        if data.chat:
            try:
                segments = split_conversation(
                    render, prompt + completion,
                    lambda j, m: j >= len(prompt) and m["role"] == "assistant")
            except TrainerConfigError as e:
                raise TrainerConfigError(f"data row {i}: {e}") from None
        else:
            segments = [("\n".join(m["content"] for m in prompt), False),
                        ("".join(m["content"] for m in completion) + tokenizer.eos_token, True)]
        prompt_text = segments[0][0] if not segments[0][1] else ""
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]) \
            if prompt_text else 0
        ids, mask = tokenize_segments(tokenizer, segments, 10**9)
        return ids[:n_prompt], ids[n_prompt:], mask[n_prompt:]

    examples, skipped = [], 0
    for i, row in enumerate(rows):
        own_c, chosen = _split_prompt(row[params.chosen_field], "chosen", i)
        own_r, rejected = _split_prompt(row[params.rejected_field], "rejected", i)
        if own_c is not None or own_r is not None:
            if own_c != own_r:
                raise TrainerConfigError(f"data row {i}: the chosen and rejected conversations "
                                         "have different prompts")
            prompt = own_c
        elif data.prompt_template is None and row.get(data.prompt_field) is None:
            raise TrainerConfigError(f"data row {i}: no field {data.prompt_field!r} (fields: "
                                     f"{', '.join(row)}); set data.prompt_field")
        else:
            prompt = as_messages(prompt_value(row, data), "user", data.system_prompt)
        prompt_ids, chosen_ids, chosen_mask = encode(prompt, chosen, i)
        prompt_rej, rejected_ids, rejected_mask = encode(prompt, rejected, i)
        assert prompt_rej == prompt_ids  # same messages, same rendering
        prompt_ids = prompt_ids[-params.max_prompt_length:]
        room = params.max_length - len(prompt_ids)
        chosen_ids, chosen_mask = chosen_ids[:room], chosen_mask[:room]
        rejected_ids, rejected_mask = rejected_ids[:room], rejected_mask[:room]
        if not any(chosen_mask) or not any(rejected_mask):
            skipped += 1
            continue
        rewards = (0.0, 0.0)
        if params.loss_type == "copg":
            try:
                rewards = (float(row[params.chosen_reward_field]),
                           float(row[params.rejected_reward_field]))
            except (KeyError, TypeError, ValueError):
                raise TrainerConfigError(
                    f"data row {i}: loss_type copg needs numeric {params.chosen_reward_field!r} "
                    f"and {params.rejected_reward_field!r} (wpo.chosen_reward_field, "
                    "wpo.rejected_reward_field)") from None
        examples.append(PairExample(prompt_ids, chosen_ids, chosen_mask, rejected_ids,
                                    rejected_mask, *rewards))
    if skipped:
        log.warning("%d of %d pairs have no completion token within wpo.max_length %d; skipped",
                    skipped, len(rows), params.max_length)
    return examples


def collate(pairs: list[PairExample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad b pairs into 2b rows, all chosen first: [prompt | completion | pad].

    -> input_ids, attention_mask, completion_mask: [2b, T]; rewards: [2b]
    """
    rows = [(p.prompt, p.chosen, p.chosen_mask) for p in pairs] + \
        [(p.prompt, p.rejected, p.rejected_mask) for p in pairs]
    length = max(len(prompt) + len(c) for prompt, c, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for r, (prompt, c, mask) in enumerate(rows):
        n = len(prompt) + len(c)
        ids[r, :n] = torch.tensor(prompt + c)
        attention[r, :n] = 1
        completion[r, len(prompt):n] = torch.tensor(mask, dtype=torch.long)
    rewards = torch.tensor([p.chosen_reward for p in pairs] + [p.rejected_reward for p in pairs])
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device),
            "completion_mask": completion.to(device), "rewards": rewards.to(device),
            "start": first_completion(pairs)}


# ---------------------------------------------------------------------------------------------
# Forward

def first_completion(pairs: list[PairExample]) -> int:
    """The first column of `collate(pairs)` with a trained token (host-side, for the step
    code; every pair has one, `build_pairs` skips the others)."""
    firsts = [len(p.prompt) + mask.index(True) for p in pairs
              for mask in (p.chosen_mask, p.rejected_mask)]
    return max(1, min(firsts))


def completion_stats(model, batch: dict, alignment: str | None, chunk_size: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token `log π(y_t|x,y_<t)` on completion tokens (0 elsewhere) and, if `alignment` is
    given, the detached WPO normaliser of each position (`logprobs.token_logprobs`, chunked at
    a large vocabulary). -> [B, T] float32, [B, T] float32 | None"""
    from .logprobs import token_logprobs

    out = token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                         batch["completion_mask"], start=batch["start"], alignment=alignment,
                         chunk_size=chunk_size)
    return out if alignment is not None else (out, None)


def _fingerprint(config: WPOConfig, examples: list[PairExample]) -> str:
    """What the cached reference log-probs depend on: the reference model and the tokens."""
    digest = hashlib.sha256()
    model = config.model
    digest.update(json.dumps([model.path, model.revision, model.dtype,
                              config.wpo.max_length]).encode())
    folder = Path(model.path)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    for e in examples:
        digest.update(json.dumps([e.prompt, e.chosen, e.chosen_mask, e.rejected,
                                  e.rejected_mask]).encode())
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(ref_model, examples: list[PairExample], indices: list[int], pad_id: int,
                    micro: int, device, autocast=nullcontext, chunk_size: int | None = None
                    ) -> torch.Tensor:
    """Summed reference log-probs of `examples[indices]` -> [len(indices), 2] (chosen, rejected)."""
    out = torch.zeros(len(indices), 2, device=device)
    for k in range(0, len(indices), micro):
        part = [examples[j] for j in indices[k:k + micro]]
        with autocast():
            logps, _ = completion_stats(ref_model, collate(part, pad_id, device), None,
                                        chunk_size)
        out[k:k + len(part)] = logps.sum(-1).view(2, -1).T  # [b, 2]
    return out


def precompute_reference(run, config: WPOConfig, sets: dict[str, list[PairExample]]
                         ) -> dict[str, torch.Tensor]:
    """{name: [N, 2] reference log-probs} of every pair of each set, from
    `output_dir/ref_logps.pt` when its fingerprint matches, else computed (each process a
    share) by the policy before its first update, which is the reference (no second copy)."""
    from accelerate.utils import gather

    cache = Path(config.train.output_dir) / REF_CACHE
    key = _fingerprint(config, [e for part in sets.values() for e in part])
    if cache.is_file():
        saved = torch.load(cache)
        if saved.get("fingerprint") == key:
            log.info("reference log-probs read from %s", cache)
            return saved["logps"]
        log.info("%s is for other data or another reference model; recomputing", cache)
    t0 = time.perf_counter()
    ref = run.model if run.step == 0 else run.load_reference()  # resumed: the policy moved
    out = {}
    with models.resident(ref) as ref:
        for name, examples in sets.items():
            share, real = run.my_share(len(examples))
            local = reference_logps(ref, examples, share, run.tokenizer.pad_token_id,
                                    config.train.micro_batch_size, run.device, run.autocast,
                                    config.model.lm_head_chunk_size)
            local[real:] = float("nan")
            out[name] = gather(local).cpu()[:len(examples)]  # process order = index order
    if run.accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"fingerprint": key, "logps": out}, tmp)
        tmp.rename(cache)
        log.info("reference log-probs of %d pairs computed in %.1f s, cached in %s",
                 sum(len(v) for v in sets.values()), time.perf_counter() - t0, cache)
    run.accelerator.wait_for_everyone()
    return out


# ---------------------------------------------------------------------------------------------
# Training

def pair_losses(model, config: WPOConfig, mb: dict, ref: torch.Tensor, alignment: str | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses of a micro-batch (weighted, plus the optional NLL term) summed over the
    global batch size, and the metric sums [9]: loss share, implicit rewards
    chosen/rejected, margin, accuracy, WPO weight, policy log-probs chosen/rejected,
    completion tokens. `ref`: [2, b] reference log-probs. Tensor code only: no host syncs,
    nothing made on the CPU."""
    from .losses import preference

    params, b = config.wpo, ref.shape[1]
    logps, norms = completion_stats(model, mb, alignment, config.model.lm_head_chunk_size)
    mask = mb["completion_mask"]
    policy = logps.sum(-1).view(2, b)  # [2, b]: chosen, rejected
    lengths = mask.sum(-1).to(torch.float32).view(2, b)
    rewards = mb["rewards"].view(2, b)
    losses = preference.pair_loss(
        policy[0], policy[1], ref[0], ref[1], loss_type=params.loss_type, beta=params.beta,
        label_smoothing=params.label_smoothing, chosen_lengths=lengths[0],
        rejected_lengths=lengths[1], chosen_rewards=rewards[0], rejected_rewards=rewards[1])
    weight = torch.ones(b, device=logps.device)
    if params.weighting:
        seq_w = preference.sequence_weight(logps, norms, mask).view(2, b)
        weight = preference.combine_weights(seq_w[0], seq_w[1], params.weight_clamp)
        losses = losses * weight  # not in place: hinge's relu keeps its grad
    if params.sft_weight:
        losses = losses + params.sft_weight * preference.nll_loss(
            policy[0], lengths[0] if params.sft_length_normalize else None)
    loss = losses.sum() / config.train.batch_size  # mean over the global batch
    chosen_r, rejected_r = preference.implicit_rewards(policy[0], policy[1], ref[0], ref[1],
                                                       params.beta)
    sums = torch.stack([
        loss.detach(), chosen_r.sum(), rejected_r.sum(), (chosen_r - rejected_r).sum(),
        (chosen_r > rejected_r).float().sum(), weight.sum(), policy[0].detach().sum(),
        policy[1].detach().sum(), lengths.sum()])
    return loss, sums


def reference_of(run, config: WPOConfig, examples, indices, cache, ref_model) -> torch.Tensor:
    """[2, b] reference log-probs of `examples[indices]`."""
    if config.wpo.reference_free:
        return torch.zeros(2, len(indices), device=run.device)
    if cache is not None:
        return cache[indices].T.to(run.device)
    with models.resident(ref_model) as model:  # an offloaded one: for this micro-batch
        return reference_logps(model, examples, indices, run.tokenizer.pad_token_id,
                               len(indices), run.device, run.autocast,
                               config.model.lm_head_chunk_size).T


def evaluate(run, config: WPOConfig, examples, cache, ref_model, alignment) -> dict:
    """Held-out loss (as trained: weighted, mean per pair) and reward accuracy."""
    share, real = run.my_share(len(examples))
    micro = config.train.micro_batch_size
    sums = torch.zeros(3, device=run.device)
    with torch.no_grad():
        for k in range(0, len(share), micro):
            indices = share[k:k + micro]
            keep = min(len(indices), max(0, real - k))  # the share's padding counts 0
            mb = collate([examples[j] for j in indices], run.tokenizer.pad_token_id, run.device)
            ref = reference_of(run, config, examples, indices, cache, ref_model)
            loss, m = pair_losses(run.model, config, mb, ref, alignment)
            scale = keep / len(indices)
            sums += torch.stack([loss * config.train.batch_size * scale, m[4] * scale,
                                 torch.tensor(float(keep), device=run.device)])
    total = run.reduce_sum(sums).tolist()
    return {"loss": total[0] / max(total[2], 1.0), "rewards/accuracies":
            total[1] / max(total[2], 1.0)}


def train_wpo(config: WPOConfig, resume: str | None = None) -> Path:
    """Run WPO as configured; return the output folder (final model, tokenizer, config).

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from .config import to_dict
    from .datacache import cached, tokenizer_fingerprint
    from .scaffold import Run

    train, params = config.train, config.wpo
    run = Run(config, "wpo", resume)

    # Everything that can fail on user input happens before the model loads.
    rows, held_out = load_splits(config.data, (params.chosen_field, params.rejected_field),
                                 train.seed)
    key = {"tokenizer": tokenizer_fingerprint(run.tokenizer), "data": to_dict(config.data),
           "wpo": to_dict(params)}

    def tokenised(part, name):
        return cached("wpo", {**key, "rows": part.fingerprint, "part": name},
                      lambda: build_pairs(part, run.tokenizer, config), PairExample,
                      run.accelerator, config.data.cache)

    examples = tokenised(rows, "train")
    eval_examples = tokenised(held_out, "eval") if held_out is not None else None
    steps_per_epoch = len(examples) // train.batch_size
    if steps_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {train.batch_size} pairs is more than the "
                                 f"{len(examples)} usable pairs")
    pad_id = run.tokenizer.pad_token_id
    longest = max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in examples)
    run.start(runtime.total_steps(train, steps_per_epoch),
              lambda step: {"epoch": step / steps_per_epoch, "pairs_seen": step * train.batch_size},
              plan={"unit": "pairs",
                    "lines": [f"{len(examples):,} pairs ({steps_per_epoch} steps per epoch), "
                              f"each micro-batch of pairs is 2x as many sequences of up to "
                              f"{longest} tokens"
                              + (f"; {len(eval_examples):,} held out" if eval_examples else "")],
                    "sequence_length": longest, "sequences_per_micro": 2 * train.micro_batch_size,
                    "reference": not params.reference_free and not params.precompute_ref,
                    "hint": "wpo.max_length"})

    cache = eval_cache = ref_model = None
    if not params.reference_free:
        if params.precompute_ref:
            sets = {"train": examples, **({"eval": eval_examples} if eval_examples else {})}
            logps = precompute_reference(run, config, sets)
            cache, eval_cache = logps["train"], logps.get("eval")
        else:
            ref_model = run.load_reference()

    alignment = params.weight_alignment if params.weighting else None
    lengths = [len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in examples]
    orders: dict[int, list[int]] = {}
    metrics: dict = {}
    with run.signals():
        while run.step < run.max_steps:
            t0 = time.perf_counter()
            pieces = step_pieces(len(examples), run.step, steps_per_epoch, train,
                                 config.data.shuffle, run.rank, run.world, orders, lengths)
            sums = torch.zeros(9, device=run.device)
            for k, indices in enumerate(pieces):
                mb = collate([examples[j] for j in indices], pad_id, run.device)
                ref = reference_of(run, config, examples, indices, cache, ref_model)
                with run.accumulate(last=k == len(pieces) - 1):
                    loss, piece_sums = pair_losses(run.model, config, mb, ref, alignment)
                    run.backward(loss)
                sums += piece_sums
            sums = run.reduce_sum(sums).tolist()
            loss_value, n = sums[0], train.batch_size
            grad_norm, lr = run.update(loss_value)

            seconds = time.perf_counter() - t0
            metrics = {"loss": loss_value, "rewards/chosen": sums[1] / n,
                       "rewards/rejected": sums[2] / n, "rewards/margins": sums[3] / n,
                       "rewards/accuracies": sums[4] / n, "wpo_weight": sums[5] / n,
                       "logps/chosen": sums[6] / n, "logps/rejected": sums[7] / n,
                       "lr": lr, "grad_norm": grad_norm, "tokens": sums[8],
                       "tokens_per_s": sums[8] / seconds, "step_s": seconds,
                       "epoch": run.step / steps_per_epoch}
            if eval_examples is not None:
                metrics |= run.evaluate(lambda: evaluate(run, config, eval_examples, eval_cache,
                                                         ref_model, alignment))
            run.log(metrics)
            run.checkpoint_or_stop(metrics)
    return run.finish(metrics)


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    raise SystemExit("python -m trainers.wpo is now: python -m trainers train wpo CONFIG")
