"""Reading training rows and turning them into token ids with the tokenizer's chat template.

Rows come from a local .jsonl / .json / .parquet file or a `datasets` Hub id (`datasets` is
imported only then). Everything is checked here, before any model is loaded: the file reads,
the fields exist in every row, the template renders.

Chat rendering splits a conversation into masked text (prompts, role headers) and trained text
(assistant contents with their end-of-turn tokens). The split point of an assistant turn is
found by rendering the turn with a sentinel content and cutting at the sentinel, which works for
any template that writes message contents verbatim (ChatML, Llama 3, Qwen2.5, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from .config import DataConfig
from .errors import TrainerConfigError

log = logging.getLogger(__name__)

SENTINEL = "\u2063SPLIT\u2063"  # invisible separator: never in real data

Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------
# Rows

class Rows(list):
    """Rows of a dataset (dicts) with `fingerprint`: a hash of the data they were read from
    (the file's bytes, or the `datasets` fingerprint), for caching what is derived from them."""

    fingerprint: str = ""


def load_rows(cfg: DataConfig, required: tuple[str, ...], field: str = "data.path") -> Rows:
    """Rows of the dataset as dicts; every field in `required` must be present in every row."""
    from mergekit_rl.hub import local_path

    path = local_path(cfg.path)
    rows, fingerprint = _load_hub(cfg) if path is None else _read_file(path)
    if not rows:
        raise TrainerConfigError(f"{field}: {cfg.path} has no rows")
    if cfg.max_examples is not None:
        rows = rows[: cfg.max_examples]
    rows = Rows(rows)
    rows.fingerprint = hashlib.sha256(
        f"{fingerprint}:{cfg.max_examples}:{cfg.split}:{cfg.name}".encode()).hexdigest()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TrainerConfigError(f"data.path: {cfg.path} row {i} is not a mapping")
        missing = [f for f in required if row.get(f) is None]
        if missing:
            raise TrainerConfigError(
                f"data: {cfg.path} row {i} has no field {missing[0]!r} (fields: "
                f"{', '.join(row)}); set data.{_field_option(missing[0], cfg)} to one of them")
    return rows


def _field_option(field: str, cfg: DataConfig) -> str:
    for option in ("prompt_field", "completion_field", "messages_field"):
        if getattr(cfg, option) == field:
            return option
    return "prompt_template"


def load_splits(cfg: DataConfig, required: tuple[str, ...], seed: int
                ) -> tuple[Rows, Rows | None]:
    """(training rows, held-out rows or None): the held-out rows come from `data.eval_path`
    (split `data.eval_split`, default `data.split`), from split `data.eval_split` of
    `data.path`, or are `data.eval_size` rows of `data.path` drawn with `seed` and left out of
    training (the rest keep their order)."""
    import dataclasses

    rows = load_rows(cfg, required)
    if cfg.eval_size:
        if cfg.eval_size >= len(rows):
            raise TrainerConfigError(f"data.eval_size: {cfg.eval_size} held-out rows leave none "
                                     f"of the {len(rows)} rows to train on")
        import torch

        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        held = set(order[:cfg.eval_size].tolist())
        train = Rows(r for i, r in enumerate(rows) if i not in held)
        held_out = Rows(r for i, r in enumerate(rows) if i in held)
        train.fingerprint = held_out.fingerprint = f"{rows.fingerprint}:{seed}:{cfg.eval_size}"
        train.fingerprint += ":train"
        return train, held_out
    if cfg.eval_path or cfg.eval_split:
        other = dataclasses.replace(cfg, path=cfg.eval_path or cfg.path,
                                    split=cfg.eval_split or cfg.split, max_examples=None)
        field = "data.eval_path" if cfg.eval_path else "data.eval_split"
        return rows, load_rows(other, required, field)
    return rows, None


def _read_file(path: Path) -> tuple[list[dict], str]:
    if not path.is_file():
        raise TrainerConfigError(f"data.path: {path} not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return _parse_file(path), digest


def _parse_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TrainerConfigError(f"data.path: reading {path} needs pyarrow "
                                     "(pip install pyarrow) or a .jsonl file") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises many types for a corrupt file
            raise TrainerConfigError(f"data.path: cannot read {path} as Parquet ({e})") from None
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainerConfigError(f"data.path: {path} is not valid JSON ({e})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TrainerConfigError(f"data.path: {path} line {n} is not JSON ({e.msg})") \
                    from None
    return rows


def _load_hub(cfg: DataConfig) -> tuple[list[dict], str]:
    try:
        import datasets
    except ImportError:
        raise TrainerConfigError(
            f"data.path: {cfg.path!r} is neither a local file nor loadable: Hub datasets need "
            "`pip install datasets`; or give a .jsonl/.parquet file") from None
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
    except Exception as e:  # datasets raises many types (network, missing config, ...)
        raise TrainerConfigError(f"data.path: cannot load dataset {cfg.path!r} "
                                 f"(name={cfg.name!r}, split={cfg.split!r}): {e}") from None
    return ds.to_list(), f"{cfg.path}:{getattr(ds, '_fingerprint', '')}"


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Row order of one epoch: a permutation fixed by (seed, epoch), so resuming needs only the
    position, not a sampler state."""
    if not shuffle:
        return list(range(n))
    import torch

    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def step_pieces(n: int, step: int, steps_per_epoch: int, train, shuffle: bool, rank: int,
                world: int, orders: dict[int, list[int]], lengths: list[int] | None = None
                ) -> list[list[int]]:
    """This process's micro-batches of row indices for optimizer step `step`: the step's global
    batch is a fixed slice of the epoch order, this process takes its contiguous share, split
    into `train.micro_batch_size` pieces. `orders` caches the current epoch's order. With
    `train.sort_by_length`, the share is sorted by the rows' `lengths` before it is cut, so
    each piece pads to rows of similar length: the batch, and so the maths, stay the same."""
    epoch, offset = divmod(step, steps_per_epoch)
    if epoch not in orders:
        orders.clear()
        orders[epoch] = epoch_order(n, epoch, train.seed, shuffle)
    batch = orders[epoch][offset * train.batch_size:(offset + 1) * train.batch_size]
    per_device = train.batch_size // world
    mine = batch[rank * per_device:(rank + 1) * per_device]
    if train.sort_by_length and lengths is not None:
        mine = sorted(mine, key=lambda i: -lengths[i])
    return [mine[k:k + train.micro_batch_size]
            for k in range(0, per_device, train.micro_batch_size)]


def require_field(rows: list[dict], name: str, source: str, option: str, remedy: str) -> None:
    """Every row has `name` (not None), else an error naming the row, the option and a remedy."""
    for i, row in enumerate(rows):
        if row.get(name) is None:
            raise TrainerConfigError(f"{option}: {source} row {i} has no field {name!r} (fields: "
                                     f"{', '.join(row)}); set {option} to {remedy}")


# ---------------------------------------------------------------------------------------------
# Prompts and conversations

def prompt_value(row: dict, cfg: DataConfig) -> str | Messages:
    """The prompt as the user wrote it: `prompt_template` filled from the row, or the field."""
    if cfg.prompt_template is not None:
        try:
            return cfg.prompt_template.format(**row)
        except (KeyError, IndexError, ValueError) as e:
            raise TrainerConfigError(f"data.prompt_template: cannot fill from a row with fields "
                                     f"{', '.join(row)} ({e!r})") from None
    return row[cfg.prompt_field]


def as_messages(value: str | Messages, role: str, system_prompt: str | None = None) -> Messages:
    """A string becomes one message with `role`; a message list is copied."""
    messages = [{"role": role, "content": value}] if isinstance(value, str) else \
        [dict(m) for m in value]
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def answer_text(value) -> str:
    """An answer as text: a string, or the content of the last (assistant) message of a list."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def render_generation_prompt(tokenizer, prompt: str | Messages, cfg: DataConfig) -> str:
    """Text the model continues from (GRPO): chat template with the assistant header, or the
    plain prompt when `data.chat` is false."""
    if not cfg.chat:
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    messages = as_messages(prompt, "user", cfg.system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def split_conversation(render: Callable[[Messages], str], messages: Messages,
                       trained: Callable[[int, dict], bool]) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into (text, is_trained) segments.

    For each trained assistant turn i, `render(messages[:i] + [turn with SENTINEL])` gives the text
    before its content (masked), `render(messages[:i+1])` the text through its end-of-turn
    (trained). Each rendering must extend the previous one; templates that rewrite earlier turns
    (e.g. dropping reasoning) cannot be split this way.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if not trained(i, message):
            continue
        probe = render(messages[:i] + [{**message, "content": SENTINEL}])
        if SENTINEL not in probe:
            raise TrainerConfigError(f"chat template drops the {message['role']!r} turn")
        before = probe[: probe.index(SENTINEL)]
        through = render(messages[: i + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise TrainerConfigError("chat template renders earlier turns differently once later "
                                     "turns are added; use single-turn prompt/completion rows")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return [(text, flag) for text, flag in segments if text]


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]], max_length: int
                      ) -> tuple[list[int], list[bool]]:
    """Token ids and a trained-token mask, truncated on the right to `max_length`."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, flag in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [flag] * len(piece)
    if trained:
        trained[0] = False  # the first token has no prediction
    return ids[:max_length], trained[:max_length]
