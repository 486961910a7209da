"""The tokenised dataset, cached by what it depends on: the tokenizer (vocabulary, special
tokens, chat template), the data (its fingerprint) and the config fields that shape the tokens.

A rerun, another output folder, and every process of a data-parallel run read the same file:
the main process tokenises and writes it (atomically), the others wait for it and read it.
Files live in `$MERGEKIT_RL_CACHE/tokenized/` (default `~/.cache/mergekit_rl`); they are plain
JSON, safe to delete. `data.cache: false` switches the cache off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from mergekit_rl import cache_root

log = logging.getLogger(__name__)

VERSION = 1  # bump when the tokenisation code changes what it produces


def cache_dir() -> Path:
    return cache_root() / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in the tokenizer that can change token ids or templates."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template,
                              tokenizer.special_tokens_map, tokenizer.padding_side],
                             default=str, sort_keys=True).encode())
    return digest.hexdigest()


def cached(kind: str, parts: dict, build: Callable[[], list], item_type, accelerator=None,
           enabled: bool = True) -> list:
    """`build()` (a list of dataclass instances of `item_type`), or its cached copy keyed by
    `kind` and `parts` (fingerprints and config values, JSON-able)."""
    key = hashlib.sha256(json.dumps({"version": VERSION, "kind": kind, **parts},
                                    sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / f"{kind}-{key[:32]}.json"
    first = accelerator.main_process_first() if accelerator is not None and enabled else \
        contextlib.nullcontext()
    with first:
        if enabled and path.is_file():
            try:
                items = [item_type(**d) for d in json.loads(path.read_text())]
                log.debug("tokenised %s data read from the cache %s", kind, path)
                return items
            except (OSError, ValueError, TypeError) as e:  # a damaged file: rebuild it
                log.warning("ignoring the unreadable cache file %s (%s)", path, e)
        items = build()
        main = accelerator is None or accelerator.is_main_process
        if enabled and main:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps([dataclasses.asdict(x) for x in items],
                                          separators=(",", ":")))
                tmp.replace(path)
            except OSError as e:  # a read-only or full cache folder only costs the reuse
                log.warning("could not write the tokenised-data cache %s (%s)", path, e)
    return items
