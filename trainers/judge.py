"""`train judge`: a generative pairwise judge, the reward model of Pairwise-RL
(Xu et al. 2025, https://arxiv.org/abs/2504.04950).

The judge reads a question and two responses (the template of `trainers.judging`) and answers
with one token whether the first is better. Every preference pair is shown in both orders in
the same micro-batch (position-swap augmentation), labelled Yes for (chosen, rejected) and No
for (rejected, chosen); the loss is `losses.pairwise.judge_loss` (`two_way` over the two label
tokens, or GenRM's `full_vocab` cross-entropy), with an optional consistency penalty. Held-out
pairs give the pairwise accuracy of the symmetrised judgment and the position consistency
mean |p(a≻b) + p(b≻a) − 1|, logged every `judge.eval_steps`, at the end, and written to
`judge_eval.json`.

The paper's prompt and loss are not public: this design is **ours**, reconstructed from the
abstract and the work it cites (GenRM, arXiv 2408.15240; RLHFlow pair-pm); see
`trainers.losses.pairwise` for where it may differ.

Rows: `prompt`, `chosen`, `rejected` (strings or chat messages), as `train wpo` reads them and
`sample pairs` writes them. `train.batch_size` and `micro_batch_size` count pairs (two
sequences each).

    mergekit-rl train judge manifests/train/judge_tiny.yaml
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from . import runtime
from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, require
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

EVAL_FILE = "judge_eval.json"


@dataclass(frozen=True)
class JudgeParams:
    labels: tuple[str, str] = ("Yes", "No")  # single tokens: "A is better" / "B is better"
    rules: str | None = None  # optional principles shown after the question
    max_question_length: int = 256  # tokens; a longer question keeps its last tokens
    max_response_length: int = 256  # tokens per response; a longer one keeps its first
    loss: Literal["two_way", "full_vocab"] = "two_way"
    consistency_weight: float = 0.0  # λ·(p(w≻l) + p(l≻w) − 1)²
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    eval_size: int = 64  # pairs held out of the data for evaluation (0: none)
    eval_path: str | None = field(default=None, metadata={"path": True})  # or a file of pairs
    eval_steps: int | None = None  # evaluate every this many steps (and always at the end)
    eval_batch_size: int = 16  # sequences per evaluation forward

    def __post_init__(self):
        require(len(self.labels) == 2 and self.labels[0] != self.labels[1], "labels",
                "expected two different labels, e.g. [Yes, No]")
        require(self.max_question_length > 0 and self.max_response_length > 0,
                "max_response_length", "expected > 0")
        require(self.consistency_weight >= 0, "consistency_weight", "expected >= 0")
        require(self.eval_size >= 0, "eval_size", "expected >= 0")
        require(self.eval_steps is None or self.eval_steps > 0, "eval_steps", "expected > 0")
        require(self.eval_batch_size > 0, "eval_batch_size", "expected > 0")


@dataclass(frozen=True)
class JudgeConfig:
    model: ModelConfig
    data: DataConfig  # data.chat: render the judge's question through the chat template
    train: TrainConfig  # batch_size and micro_batch_size count pairs (2 sequences each)
    judge: JudgeParams = field(default_factory=JudgeParams)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))

    def __post_init__(self):
        require(self.data.messages_field is None, "data.messages_field",
                "not used by preference data; give prompt/chosen/rejected fields")
        self.train.check_micro_batch()

    def format(self):
        from .judging import JudgeFormat

        return JudgeFormat.of({**{k: getattr(self.judge, k) for k in
                                  ("labels", "rules", "max_question_length",
                                   "max_response_length")}, "chat": self.data.chat})


@dataclass
class EncodedPair:
    chosen_first: list[int]  # judge input with A = chosen: the answer is Yes
    rejected_first: list[int]  # A = rejected: the answer is No


# ---------------------------------------------------------------------------------------------
# Data

def pair_texts(rows: list[dict], data: DataConfig, params: JudgeParams, source: str
               ) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected) texts of preference rows; a chosen conversation may carry
    its own prompt. Errors name the row and the field to set."""
    from .data import answer_text, prompt_value
    from .judging import question_text

    out = []
    for i, row in enumerate(rows):
        chosen, rejected = row[params.chosen_field], row[params.rejected_field]
        if isinstance(chosen, list) and chosen and chosen[0].get("role") != "assistant":
            question = question_text(chosen[:-1])  # the conversation's own prompt
        elif data.prompt_template is None and row.get(data.prompt_field) is None:
            raise TrainerConfigError(f"data: {source} row {i} has no field "
                                     f"{data.prompt_field!r} (fields: {', '.join(row)}); set "
                                     "data.prompt_field")
        else:
            question = question_text(prompt_value(row, data))
        out.append((question, answer_text(chosen), answer_text(rejected)))
    return out


def load_pairs(config: JudgeConfig, tokenizer) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(training pairs, held-out pairs), encoded both ways; checked before any model loads."""
    from .data import epoch_order, load_rows
    from .judging import encode

    params, data = config.judge, config.data
    fmt = config.format()
    if fmt.chat and tokenizer.chat_template is None:
        raise TrainerConfigError("data.chat: the tokenizer has no chat template; set "
                                 "data.chat: false to ask the judge in plain text")
    needed = (params.chosen_field, params.rejected_field)
    texts = pair_texts(load_rows(data, needed), data, params, data.path)
    if params.eval_path is not None:
        eval_data = replace(data, path=params.eval_path, max_examples=None)
        held = pair_texts(load_rows(eval_data, needed), eval_data, params, params.eval_path)
    else:
        if params.eval_size >= len(texts):
            raise TrainerConfigError(f"judge.eval_size: {params.eval_size} held-out pairs leave "
                                     f"none of the {len(texts)} to train on; lower it")
        order = epoch_order(len(texts), -1, config.train.seed, True)  # fixed by the seed
        held = [texts[i] for i in order[len(texts) - params.eval_size:]]
        texts = [texts[i] for i in sorted(order[:len(texts) - params.eval_size])]

    def encoded(items):
        return [EncodedPair(encode(tokenizer, fmt, q, win, lose), encode(tokenizer, fmt, q, lose,
                                                                         win))
                for q, win, lose in items]

    return encoded(texts), encoded(held)


# ---------------------------------------------------------------------------------------------
# Forward and evaluation

def pair_logits(model, pairs: list[EncodedPair], pad_id: int, device) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Next-token logits after both orders of each pair, in one forward: ([b, V], [b, V])."""
    from .judging import next_token_logits

    logits = next_token_logits(model, [p.chosen_first for p in pairs] +
                               [p.rejected_first for p in pairs], pad_id, device)
    return logits[:len(pairs)], logits[len(pairs):]


def pair_sums(logits_wl: torch.Tensor, logits_lw: torch.Tensor, yes: int, no: int
              ) -> torch.Tensor:
    """[4] sums over pairs: accuracy of P̄, position consistency, order-wise accuracy, count."""
    from .losses.pairwise import pairwise_accuracy, position_consistency, preference_probability

    with torch.no_grad():
        p_wl = preference_probability(logits_wl[:, yes], logits_wl[:, no])
        p_lw = preference_probability(logits_lw[:, yes], logits_lw[:, no])
        order = 0.5 * ((p_wl > 0.5).float() + (p_lw < 0.5).float())
        return torch.stack([pairwise_accuracy(p_wl, p_lw).sum(),
                            position_consistency(p_wl, p_lw).sum(), order.sum(),
                            torch.tensor(float(len(p_wl)), device=p_wl.device)])


def evaluate(run, pairs: list[EncodedPair], yes: int, no: int, batch: int) -> dict:
    """Held-out pairwise accuracy of P̄ (ties count ½), position consistency and the accuracy
    of each order alone; every process judges its share, the sums are reduced."""
    if not pairs:
        return {}
    per = -(-len(pairs) // run.world)
    mine = pairs[run.rank * per:(run.rank + 1) * per]
    sums = torch.zeros(4, device=run.device)
    step = max(1, batch // 2)
    with torch.no_grad(), run.accelerator.autocast():
        for k in range(0, len(mine), step):
            wl, lw = pair_logits(run.policy, mine[k:k + step], run.tokenizer.pad_token_id,
                                 run.device)
            sums += pair_sums(wl.float(), lw.float(), yes, no)
    accuracy, consistency, order, n = run.reduce_sum(sums).tolist()
    return {"eval/accuracy": accuracy / n, "eval/position_consistency": consistency / n,
            "eval/order_accuracy": order / n, "eval/pairs": int(n)}


# ---------------------------------------------------------------------------------------------
# Training

def train_judge(config: JudgeConfig, resume: str | None = None) -> Path:
    """Train the judge as configured; return the output folder (model, tokenizer, config,
    `judge_eval.json`, a card that says what the judge judges and how).

    `resume`: None (fresh run), "latest" (newest checkpoint in output_dir) or a checkpoint path.
    """
    from .data import step_pieces
    from .judging import label_ids
    from .losses.pairwise import judge_loss
    from .scaffold import Run

    train, params = config.train, config.judge
    run = Run(config, "judge", resume)
    train.accumulation_steps(run.world)

    # Everything that can fail on user input happens before the model loads.
    yes, no = label_ids(run.tokenizer, params.labels, "judge.labels")
    pairs, held = load_pairs(config, run.tokenizer)
    steps_per_epoch = len(pairs) // train.batch_size
    if steps_per_epoch == 0:
        raise TrainerConfigError(f"train.batch_size: {train.batch_size} pairs is more than the "
                                 f"{len(pairs)} training pairs")
    pad_id = run.tokenizer.pad_token_id
    run.start(runtime.total_steps(train, steps_per_epoch),
              lambda step: {"epoch": step / steps_per_epoch, "pairs_seen": step * train.batch_size})

    lengths = [max(len(p.chosen_first), len(p.rejected_first)) for p in pairs]
    orders: dict[int, list[int]] = {}
    metrics: dict = {}
    with run.signals():
        while run.step < run.max_steps:
            t0 = time.perf_counter()
            pieces = step_pieces(len(pairs), run.step, steps_per_epoch, train,
                                 config.data.shuffle, run.rank, run.world, orders, lengths)
            sums = torch.zeros(5, device=run.device)  # loss, accuracy, consistency, order, n
            for k, indices in enumerate(pieces):
                with run.accumulate(last=k == len(pieces) - 1):
                    with run.accelerator.autocast():
                        wl, lw = pair_logits(run.model, [pairs[j] for j in indices], pad_id,
                                             run.device)
                    per_pair = judge_loss(wl, lw, yes, no, params.loss, params.consistency_weight)
                    loss = per_pair.sum() / train.batch_size  # mean over the global batch
                    run.backward(loss)
                sums += torch.cat([loss.detach().view(1), pair_sums(wl, lw, yes, no)])
            loss_value, accuracy, consistency, order, n = run.reduce_sum(sums).tolist()
            grad_norm, lr = run.update(loss_value)
            seconds = time.perf_counter() - t0
            metrics = {"loss": loss_value, "accuracy": accuracy / n,
                       "position_consistency": consistency / n, "order_accuracy": order / n,
                       "lr": lr, "grad_norm": grad_norm, "step_s": seconds,
                       "epoch": run.step / steps_per_epoch}
            due = params.eval_steps is not None and run.step % params.eval_steps == 0
            if due or run.step == run.max_steps:
                metrics.update(evaluate(run, held, yes, no, params.eval_batch_size))
            run.log(metrics)
            run.checkpoint_or_stop(metrics)
    if not metrics:  # resumed from the last checkpoint: nothing was trained, still evaluate
        metrics = evaluate(run, held, yes, no, params.eval_batch_size)
    results = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if results:
        log.info("held-out pairwise accuracy %.3f, position consistency %.3f (%d pairs)",
                 results["eval/accuracy"], results["eval/position_consistency"],
                 results["eval/pairs"])
    out = run.finish(metrics)
    if results and run.accelerator.is_main_process:
        (out / EVAL_FILE).write_text(json.dumps({"step": run.step, **results}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    raise SystemExit("run it as: mergekit-rl train judge CONFIG (or python -m trainers ...)")
