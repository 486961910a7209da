"""Supervised fine-tuning on completions, with optional C-RLFT conditioning.

Standard causal-LM SFT: cross-entropy on completion (assistant) tokens only; prompt tokens,
role headers and padding are masked. C-RLFT (OpenChat, https://arxiv.org/abs/2309.11235): each
row carries a source class, written into the role prefix (`"GPT4 user"` / `"GPT4 assistant"`)
or as a system message, and a per-class weight; the loss is the weighted token cross-entropy
divided by the sum of weights in the global batch (`losses.sft_loss`).

    mergekit-rl train sft manifests/train/sft_gsm8k_qwen2.5_1.5b.yaml
    torchrun --nproc_per_node 2 -m trainers train sft CONFIG.yaml      # data-parallel, same maths
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import runtime
from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, require, to_dict
from .data import (
    as_messages,
    epoch_order,
    load_splits,
    prompt_value,
    split_conversation,
    step_pieces,
    tokenize_segments,
)
from .errors import TrainerConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CRLFTConfig:
    class_weights: dict[str, float]  # source class -> weight (OpenChat: expert 1.0, other 0.1)
    source_field: str = "source"
    condition: Literal["role", "system"] = "role"  # where the class is written
    role_format: str = "{source} {role}"  # condition: role -> "GPT4 user", "GPT4 assistant"
    system_format: str = "{source}"  # condition: system -> a system message

    def __post_init__(self):
        require(bool(self.class_weights), "class_weights", "expected at least one class")
        for name, w in self.class_weights.items():
            require(w >= 0, f"class_weights.{name}", f"expected a weight >= 0, got {w}")
        require(any(w > 0 for w in self.class_weights.values()), "class_weights",
                "every weight is 0: nothing would be learned")


@dataclass(frozen=True)
class SFTParams:
    max_length: int = 1024  # prompt + completion tokens; longer rows are cut on the right
    crlft: CRLFTConfig | None = None
    # each micro-batch as one row without padding, attention kept inside each example (the
    # loss is the same; only the padding's compute and memory go)
    packing: bool = False

    def __post_init__(self):
        require(self.max_length > 1, "max_length", "expected > 1")


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTParams = field(default_factory=SFTParams)

    def __post_init__(self):
        self.train.check_micro_batch()
        if self.sft.crlft is not None:
            require(self.data.chat, "data.chat", "C-RLFT conditions the chat roles; set true")


@dataclass
class Example:
    ids: list[int]
    weights: list[float]  # per token: class weight on trained tokens, 0 elsewhere


# ---------------------------------------------------------------------------------------------
# Data

def condition(messages: list[dict], source: str, crlft: CRLFTConfig) -> list[dict]:
    """Write the source class into the conversation (C-RLFT's class-conditioned prompt)."""
    if crlft.condition == "system":
        text = crlft.system_format.format(source=source)
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": f"{text}\n{messages[0]['content']}"}] + messages[1:]
        return [{"role": "system", "content": text}] + messages
    return [{**m, "role": crlft.role_format.format(source=source, role=m["role"])}
            if m["role"] in ("user", "assistant") else m for m in messages]


def check_role_template(tokenizer, crlft: CRLFTConfig) -> None:
    """Fail early when the chat template would drop or rename conditioned roles."""
    role = crlft.role_format.format(source="probe-class", role="user")
    text = tokenizer.apply_chat_template([{"role": role, "content": "x"}], tokenize=False)
    if role not in text:
        raise TrainerConfigError(f"sft.crlft.condition: the tokenizer's chat template does not "
                                 f"write custom roles such as {role!r}; use condition: system")


def build_examples(rows: list[dict], tokenizer, config: SFTConfig) -> list[Example]:
    """Tokenise rows into ids and per-token weights; errors name the row."""
    data, crlft, max_length = config.data, config.sft.crlft, config.sft.max_length
    if data.chat and tokenizer.chat_template is None:
        raise TrainerConfigError("data.chat: the tokenizer has no chat template; set "
                                 "data.chat: false for plain-text prompt + completion")
    if crlft is not None and crlft.condition == "role":
        check_role_template(tokenizer, crlft)

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)

    examples, skipped = [], 0
    for i, row in enumerate(rows):
        weight = 1.0
        if data.messages_field:
            messages = as_messages(row[data.messages_field], "user", data.system_prompt)
            first_trained = 0
        else:
            prompt = as_messages(prompt_value(row, data), "user", data.system_prompt)
            messages = prompt + as_messages(row[data.completion_field], "assistant")
            first_trained = len(prompt)
        is_assistant = [m["role"] == "assistant" for m in messages]
        if crlft is not None:
            source = row.get(crlft.source_field)
            if source not in crlft.class_weights:
                raise TrainerConfigError(
                    f"data row {i}: source class {source!r} (field {crlft.source_field!r}) is not "
                    f"in sft.crlft.class_weights ({', '.join(crlft.class_weights)})")
            weight = crlft.class_weights[source]
            conditioned = condition(messages, source, crlft)
            shift = len(conditioned) - len(messages)  # a system message may have been added
            messages, first_trained = conditioned, first_trained + shift
            is_assistant = [False] * shift + is_assistant
        if data.chat:
            def trained(j, m, first=first_trained, is_assistant=is_assistant):
                return j >= first and is_assistant[j]
            try:
                segments = split_conversation(render, messages, trained)
            except TrainerConfigError as e:
                raise TrainerConfigError(f"data row {i}: {e}") from None
        else:
            prompt_text = "\n".join(m["content"] for m in messages[:first_trained])
            completion = "".join(m["content"] for m in messages[first_trained:])
            segments = [(prompt_text, False), (completion + tokenizer.eos_token, True)]
        ids, mask = tokenize_segments(tokenizer, segments, max_length)
        if not any(mask):
            skipped += 1
            continue
        examples.append(Example(ids, [weight if m else 0.0 for m in mask]))
    if skipped:
        log.warning("%d of %d rows have no completion token within sft.max_length %d; skipped",
                    skipped, len(rows), max_length)
    return examples


def collate(examples: list[Example], pad_id: int, device, pack: bool = False
            ) -> dict[str, torch.Tensor]:
    """A micro-batch: right-padded rows, or with `pack` one row of the examples end to end
    whose positions restart at each example (no attention mask: transformers then keeps
    attention inside each example).

    -> input_ids, attention_mask (None when packed), position_ids (packed), weights: [b, T];
    plus host-side `start` (first trained column) and `tokens` (real tokens)
    """
    # a C-RLFT class may weigh 0: such rows start nothing
    firsts = [next((i for i, w in enumerate(e.weights) if w > 0), 10 ** 9) for e in examples]
    tokens = sum(len(e.ids) for e in examples)
    if pack:
        ids = torch.tensor([t for e in examples for t in e.ids]).view(1, -1)
        weights = torch.tensor([w for e in examples for w in e.weights],
                               dtype=torch.float32).view(1, -1)
        positions = torch.tensor([p for e in examples for p in range(len(e.ids))]).view(1, -1)
        offsets = [0]
        for e in examples[:-1]:
            offsets.append(offsets[-1] + len(e.ids))
        return {"input_ids": ids.to(device), "attention_mask": None,
                "position_ids": positions.to(device), "weights": weights.to(device),
                "start": min(min(o + f for o, f in zip(offsets, firsts)), ids.shape[1]),
                "tokens": tokens}
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    weights = torch.zeros((len(examples), length), dtype=torch.float32)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        attention[row, :n] = 1
        weights[row, :n] = torch.tensor(e.weights)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device),
            "position_ids": None, "weights": weights.to(device), "start": min(*firsts, length),
            "tokens": tokens}


def micro_batch_loss(model, mb: dict, total_weight: torch.Tensor,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Σ w·(−log π) of a micro-batch over the global batch's Σ w (the C-RLFT normaliser).
    Tensor code only: no host syncs, nothing made on the CPU."""
    from .logprobs import token_logprobs
    from .losses.policy import sft_loss

    weights = mb["weights"]
    logps = token_logprobs(model, mb["input_ids"], mb["attention_mask"], weights > 0,
                           start=mb["start"], position_ids=mb["position_ids"],
                           chunk_size=chunk_size)  # [b, T]
    return sft_loss(logps, weights, total_weight)


def padding_report(examples: list[Example], order: list[int], micro: int) -> str:
    """How much of the padded micro-batches packing saves (over one epoch's order)."""
    padded = real = 0
    for k in range(0, len(order) - micro + 1, micro):
        lengths = [len(examples[j].ids) for j in order[k:k + micro]]
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    saved = 1 - real / padded if padded else 0.0
    return (f"sft.packing: micro-batches hold {real:,} tokens instead of {padded:,} padded "
            f"ones over an epoch ({saved:.0%} of the padding-inclusive tokens saved)")


def evaluate(run, examples: list[Example]) -> dict:
    """Held-out weighted cross-entropy Σ w·CE / Σ w (each process its share, unpacked)."""
    share, real = run.my_share(len(examples))
    sums = torch.zeros(2, device=run.device)
    micro = run.train.micro_batch_size
    with torch.no_grad():
        for k in range(0, len(share), micro):
            part = [examples[j] for j in share[k:k + micro]]
            mb = collate(part, run.tokenizer.pad_token_id, run.device)
            keep = torch.tensor([[float(k + r < real)] for r in range(len(part))],
                                device=run.device)  # the share's padding entries count 0
            mb["weights"] = mb["weights"] * keep
            loss = micro_batch_loss(run.model, mb, torch.ones((), device=run.device),
                                    run.config.model.lm_head_chunk_size)
            sums += torch.stack([loss, mb["weights"].sum()])
    total = run.reduce_sum(sums).tolist()
    return {"loss": total[0] / max(total[1], 1e-12)}


# ---------------------------------------------------------------------------------------------
# Training

def train_sft(config: SFTConfig, resume: str | None = None) -> Path:
    """Run SFT as configured; return the output folder (final model, tokenizer, config).

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from .datacache import cached, tokenizer_fingerprint
    from .scaffold import Run

    train, data, params = config.train, config.data, config.sft
    run = Run(config, "sft", resume)
    if data.messages_field:
        required = (data.messages_field,)
    elif data.prompt_template:
        required = (data.completion_field,)
    else:
        required = (data.prompt_field, data.completion_field)
    rows, held_out = load_splits(data, required, train.seed)
    fingerprint = {"tokenizer": tokenizer_fingerprint(run.tokenizer), "data": to_dict(data),
                   "sft": to_dict(params)}

    def tokenised(part, name):
        return cached("sft", {**fingerprint, "rows": part.fingerprint, "part": name},
                      lambda: build_examples(part, run.tokenizer, config), Example,
                      run.accelerator, data.cache)

    examples = tokenised(rows, "train")
    eval_examples = tokenised(held_out, "eval") if held_out is not None else None
    steps_per_epoch = len(examples) // train.batch_size
    if steps_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {train.batch_size} is more than the "
                                 f"{len(examples)} usable rows")
    longest = max(len(e.ids) for e in examples)
    run.start(runtime.total_steps(train, steps_per_epoch),
              lambda step: {"epoch": step / steps_per_epoch, "rows_seen": step * train.batch_size},
              plan={"lines": [f"{len(examples):,} training rows ({steps_per_epoch} steps per "
                              f"epoch), up to {longest} tokens each"
                              + (f"; {len(eval_examples):,} held out" if eval_examples else "")],
                    "sequence_length": longest, "hint": "sft.max_length"})

    pad_id = run.tokenizer.pad_token_id
    lengths = [len(e.ids) for e in examples]
    chunk = config.model.lm_head_chunk_size
    if params.packing:
        log.info(padding_report(examples, epoch_order(len(examples), 0, train.seed,
                                                      data.shuffle), train.micro_batch_size))
    orders: dict[int, list[int]] = {}
    metrics: dict = {}
    with run.signals():
        while run.step < run.max_steps:
            t0 = time.perf_counter()
            pieces = step_pieces(len(examples), run.step, steps_per_epoch, train, data.shuffle,
                                 run.rank, run.world, orders, lengths)
            micro = [collate([examples[j] for j in piece], pad_id, run.device, params.packing)
                     for piece in pieces]
            counts = run.reduce_sum(torch.stack([
                sum(mb["weights"].sum() for mb in micro),
                torch.tensor(float(sum(mb["tokens"] for mb in micro)), device=run.device)]))
            loss_sum = torch.zeros((), device=run.device)
            for k, mb in enumerate(micro):
                with run.accumulate(last=k == len(micro) - 1):
                    loss = micro_batch_loss(run.model, mb, counts[0], chunk)
                    run.backward(loss)
                loss_sum += loss.detach()
            loss_value = run.reduce_sum(loss_sum)
            grad_norm, lr = run.update(loss_value)

            seconds = time.perf_counter() - t0
            total_weight, tokens = counts.tolist()
            metrics = {"loss": float(loss_value), "lr": lr, "grad_norm": grad_norm,
                       "weight_sum": total_weight, "tokens": tokens,
                       "tokens_per_s": tokens / seconds, "step_s": seconds,
                       "epoch": run.step / steps_per_epoch}
            if eval_examples is not None:
                metrics |= run.evaluate(lambda: evaluate(run, eval_examples))
            run.log(metrics)
            run.checkpoint_or_stop(metrics)
    return run.finish(metrics)


if __name__ == "__main__":  # the entry point of earlier versions: say where it went
    raise SystemExit("python -m trainers.sft is now: python -m trainers train sft CONFIG")
