"""Tokenizer identity from a model folder's files alone (no tokenizer library, no network).

Two models can be combined row for row only when a token id means the same token in both. The
fingerprint is the sha256 of the vocabulary (token → id, and the BPE merges), the added tokens
with their ids, and the sha256 of the chat template. Vectors record their donors' fingerprints
in `provenance.json` (each input's `tokenizer`), so `check` and `add` can compare a vector's
donors with its target without the donors at hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import MismatchError


def _sha(data) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def fingerprint(folder: str | Path) -> dict | None:
    """{vocab_sha256, vocab_size, added_tokens {content: id}, chat_template_sha256} of the
    tokenizer in `folder`, or None when it has no tokenizer files."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    tok, config = _json(folder / "tokenizer.json"), _json(folder / "tokenizer_config.json")
    added: dict[str, int] = {}
    if tok:
        model = tok.get("model") or {}
        vocab = model.get("vocab")
        vocab_sha = _sha({"vocab": vocab, "merges": model.get("merges")})
        size = len(vocab) if isinstance(vocab, (dict, list)) else 0
        added = {t["content"]: t["id"] for t in tok.get("added_tokens") or []
                 if isinstance(t, dict) and "content" in t and "id" in t}
    elif (folder / "tokenizer.model").is_file():
        vocab_sha, size = _sha((folder / "tokenizer.model").read_bytes()), None
    elif (folder / "vocab.json").is_file():
        merges = folder / "merges.txt"
        vocab_sha = _sha((folder / "vocab.json").read_bytes()
                         + (merges.read_bytes() if merges.is_file() else b""))
        size = len(_json(folder / "vocab.json")) or None
    else:
        return None
    for tid, t in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(t, dict) and "content" in t and str(tid).isdigit():
            added.setdefault(t["content"], int(tid))
    added.update({k: v for k, v in _json(folder / "added_tokens.json").items()
                  if isinstance(v, int)})
    template = chat_template(folder, config)
    return {"vocab_sha256": vocab_sha, "vocab_size": size, "added_tokens": added,
            "chat_template_sha256": _sha(template.encode()) if template else None}


def chat_template(folder: Path, config: dict | None = None) -> str | None:
    """The chat template: chat_template.jinja, chat_template.json or tokenizer_config.json's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = _json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = (config if config is not None else
                    _json(folder / "tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):  # named templates
        template = json.dumps(template, sort_keys=True)
    return template if isinstance(template, str) else None


def differences(a: dict | None, b: dict | None) -> tuple[list[str], list[str]]:
    """(problems, warnings) between two fingerprints: a different vocabulary or added tokens
    is a problem (ids mean other tokens); a different chat template a warning."""
    if a is None or b is None:
        return [], []
    problems, warnings = [], []
    if a["vocab_sha256"] != b["vocab_sha256"]:
        problems.append(f"the vocabularies differ ({a.get('vocab_size')} vs "
                        f"{b.get('vocab_size')} tokens, different token → id maps)")
    ta, tb = a.get("added_tokens") or {}, b.get("added_tokens") or {}
    diff = sorted(set(ta.items()) ^ set(tb.items()))
    if diff:
        names = sorted({k for k, _ in diff})
        problems.append(f"added tokens differ: {', '.join(repr(n) for n in names[:6])}"
                        + (f" (+{len(names) - 6} more)" if len(names) > 6 else ""))
    if a.get("chat_template_sha256") != b.get("chat_template_sha256"):
        warnings.append("the chat templates differ (the output keeps the target's)")
    return problems, warnings


def donor_fingerprint(record: dict) -> dict | None:
    """The tokenizer a vector's donors used, from its provenance: the fine-tuned model's (a
    compressed vector's source's), else the base's (an adapter folder has no tokenizer)."""
    found = {r.get("role"): r.get("tokenizer") for r in record.get("inputs", [])}
    return next((found[k] for k in ("finetuned", "vector", "base") if found.get(k)), None)


def check_vector_donors(record: dict, target: Path, allow: bool) -> list[str]:
    """Compare the tokenizer a vector's donors used (its provenance) with the target's: a
    different vocabulary is an error unless `allow` (--allow-vocab-mismatch); returns notes."""
    problems, warnings = differences(donor_fingerprint(record), fingerprint(target))
    if problems and not allow:
        raise MismatchError(f"the vector's donors and the target {target} use different "
                            f"tokenizers: {'; '.join(problems)}; the rows of the embeddings "
                            "mean other tokens (pass --allow-vocab-mismatch if you know better)")
    return [f"tokenizer: {p}" for p in problems + warnings]
