"""WPO: Weighted Preference Optimization (Zhou et al. 2024, https://arxiv.org/abs/2406.11827).

A pairwise preference trainer for the DPO family (`losses.preference.pair_loss`: sigmoid/cDPO,
robust, IPO, hinge (RSO/SLiC), CoPG) whose per-pair loss is multiplied by the detached WPO
weight `w(x,y_w)·w(x,y_l)` (`losses.preference.sequence_weight`), so that off-policy pairs count
as much as the current policy would have produced them. Weighting works with every loss: the weight
multiplies a new tensor, never the loss in place.

Rows hold `prompt`, `chosen`, `rejected` (strings or chat messages; a chosen/rejected
conversation carries its own prompt). The reference model is the starting model; its
log-probabilities are computed once, before training, and cached in
`output_dir/ref_logps.pt` (`wpo.precompute_ref`), so it is not kept in memory.

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

from . import runtime
from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, require
from .data import (
    as_messages,
    load_rows,
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
            "completion_mask": completion.to(device), "rewards": rewards.to(device)}


# ---------------------------------------------------------------------------------------------
# Forward

def completion_stats(model, batch: dict, alignment: str | None) -> tuple[torch.Tensor,
                                                                        torch.Tensor | None]:
    """Per-token `log π(y_t|x,y_<t)` on completion tokens (0 elsewhere) and, if `alignment` is
    given, the detached WPO normaliser of each position (`preference.alignment_norm`).

    Like `logprobs.token_logprobs`, only completion positions go through the LM head and the
    float32 softmax is taken a row block at a time. -> [B, T] float32, [B, T] float32 | None
    """
    from .logprobs import ROW_BLOCK, position_ids_from_mask, selective_log_softmax
    from .losses.preference import alignment_norm

    ids, attention, completion = batch["input_ids"], batch["attention_mask"], \
        batch["completion_mask"]
    rows, length = ids.shape
    columns = completion.bool().any(0).nonzero()
    start = max(int(columns[0]) if len(columns) else length, 1)
    logps = torch.zeros(rows, length, dtype=torch.float32, device=ids.device)
    norms = torch.zeros_like(logps) if alignment else None
    if start >= length:
        return logps, norms
    logits = model(input_ids=ids, attention_mask=attention,
                   position_ids=position_ids_from_mask(attention),
                   logits_to_keep=length - start + 1, use_cache=False).logits[:, :-1]
    logps[:, start:] = selective_log_softmax(logits, ids[:, start:])
    if norms is not None:
        with torch.no_grad():
            for b in range(0, rows, ROW_BLOCK):
                norms[b:b + ROW_BLOCK, start:] = alignment_norm(logits[b:b + ROW_BLOCK].detach(),
                                                               alignment)
    return logps * completion.to(logps.dtype), norms


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
                    micro: int, device, autocast=nullcontext) -> torch.Tensor:
    """Summed reference log-probs of `examples[indices]` -> [len(indices), 2] (chosen, rejected)."""
    out = torch.zeros(len(indices), 2)
    for k in range(0, len(indices), micro):
        part = [examples[j] for j in indices[k:k + micro]]
        with autocast():
            logps, _ = completion_stats(ref_model, collate(part, pad_id, device), None)
        sums = logps.sum(-1).cpu().view(2, -1)  # [2, b]
        out[k:k + len(part)] = sums.T
    return out


def precompute_reference(config: WPOConfig, examples: list[PairExample], accelerator,
                         pad_id: int) -> torch.Tensor:
    """[N, 2] reference log-probs of every pair, from `output_dir/ref_logps.pt` when its
    fingerprint matches, else computed (each process a slice) and written there."""
    from accelerate.utils import gather

    cache = Path(config.train.output_dir) / REF_CACHE
    key = _fingerprint(config, examples)
    if cache.is_file():
        saved = torch.load(cache)
        if saved.get("fingerprint") == key:
            log.info("reference log-probs read from %s", cache)
            return saved["logps"]
        log.info("%s is for other data or another reference model; recomputing", cache)
    t0 = time.perf_counter()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = -(-len(examples) // world)
    mine = list(range(rank * per_process, min((rank + 1) * per_process, len(examples))))
    ref = runtime.load_model(config.model, trainable=False).to(accelerator.device)
    local = torch.full((per_process, 2), float("nan"))
    local[:len(mine)] = reference_logps(ref, examples, mine, pad_id,
                                        config.train.micro_batch_size, accelerator.device,
                                        accelerator.autocast)
    del ref
    logps = gather(local.to(accelerator.device)).cpu()[:len(examples)]  # process order
    if accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"fingerprint": key, "logps": logps}, tmp)
        tmp.rename(cache)
        log.info("reference log-probs of %d pairs computed in %.1f s, cached in %s",
                 len(examples), time.perf_counter() - t0, cache)
    accelerator.wait_for_everyone()
    return logps


# ---------------------------------------------------------------------------------------------
# Training

def pair_losses(run, config: WPOConfig, mb: dict, ref: torch.Tensor, alignment: str | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses of a micro-batch (weighted, plus the optional NLL term) and the metric
    sums [9]: loss share, implicit rewards chosen/rejected, margin, accuracy, WPO weight,
    policy log-probs chosen/rejected, completion tokens. `ref`: [2, b] reference log-probs."""
    from .losses import preference

    params, b = config.wpo, ref.shape[1]
    logps, norms = completion_stats(run.model, mb, alignment)  # [2b, T] x 2
    mask = mb["completion_mask"]
    policy = logps.sum(-1).view(2, b)  # [2, b]: chosen, rejected
    lengths = mask.sum(-1).to(torch.float32).view(2, b)
    rewards = mb["rewards"].view(2, b)
    losses = preference.pair_loss(
        policy[0], policy[1], ref[0], ref[1], loss_type=params.loss_type, beta=params.beta,
        label_smoothing=params.label_smoothing, chosen_lengths=lengths[0],
        rejected_lengths=lengths[1], chosen_rewards=rewards[0], rejected_rewards=rewards[1])
    weight = torch.ones(b, device=run.device)
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


def train_wpo(config: WPOConfig, resume: str | None = None) -> Path:
    """Run WPO as configured; return the output folder (final model, tokenizer, config).

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from .scaffold import Run

    train, params = config.train, config.wpo
    run = Run(config, "wpo", resume)
    train.accumulation_steps(run.world)

    # Everything that can fail on user input happens before the model loads.
    rows = load_rows(config.data, (params.chosen_field, params.rejected_field))
    examples = build_pairs(rows, run.tokenizer, config)
    steps_per_epoch = len(examples) // train.batch_size
    if steps_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {train.batch_size} pairs is more than the "
                                 f"{len(examples)} usable pairs")
    pad_id = run.tokenizer.pad_token_id

    ref_cache = ref_model = None
    if not params.reference_free:
        if params.precompute_ref:
            ref_cache = precompute_reference(config, examples, run.accelerator, pad_id)
        else:
            ref_model = run.load_reference()
    run.start(runtime.total_steps(train, steps_per_epoch),
              lambda step: {"epoch": step / steps_per_epoch, "pairs_seen": step * train.batch_size})

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
                if params.reference_free:
                    ref = torch.zeros(2, len(indices), device=run.device)
                elif ref_cache is not None:
                    ref = ref_cache[indices].T.to(run.device)  # [2, b]
                else:
                    ref = reference_logps(ref_model, examples, indices, pad_id, len(indices),
                                          run.device, run.accelerator.autocast).T.to(run.device)
                with run.accumulate(last=k == len(pieces) - 1):
                    loss, piece_sums = pair_losses(run, config, mb, ref, alignment)
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
            run.log(metrics)
            run.checkpoint_or_stop(metrics)
    return run.finish(metrics)


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    raise SystemExit("python -m trainers.wpo is now: python -m trainers train wpo CONFIG")
