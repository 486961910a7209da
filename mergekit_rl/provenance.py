"""Provenance records (`provenance.json`) and model cards (`README.md`) for every output.

A record says what was computed from what: the formula, each input (path, or Hub repo id with
the commit it resolved to), per-file fingerprints, dtypes, the mask, the tool version and the
command. Tokens never reach a record: only paths, ids and revisions are written.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

import torch
import yaml

from .checkpoint import Checkpoint
from .hub import Source, lfs_sha256

RECORD_NAME = "provenance.json"


def tool_version() -> str:
    try:
        return metadata.version("mergekit-rl")
    except metadata.PackageNotFoundError:
        return "unknown"


def input_record(role: str, source: Source, ckpt: Checkpoint, full_hash: bool) -> dict:
    files = ckpt.fingerprints(full_hash=full_hash)
    for rec, file in zip(files, ckpt.files):
        sha = lfs_sha256(file) if source.repo_id else None
        if sha:
            rec["sha256"] = sha
    return {"role": role, **source.record(), "files": files,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values()}),
            "tensors": len(ckpt.tensors)}


def build_record(kind: str, formula: str, inputs: list[dict], *, command: str,
                 out_dtype: str, selection: dict, notes: list[str], extra: dict | None = None
                 ) -> dict:
    return {
        "kind": kind,  # "vector" or "model"
        "formula": formula,
        "inputs": inputs,
        "out_dtype": out_dtype,
        "selection": selection,
        "notes": notes,
        **(extra or {}),
        "tool": {"name": "mergekit-rl", "version": tool_version(), "torch": torch.__version__,
                 "python": platform.python_version()},
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_record(folder: Path) -> dict:
    p = Path(folder) / RECORD_NAME
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}


def write_record(folder: Path, record: dict) -> None:
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _input_line(rec: dict) -> str:
    where = (f"`{rec['repo_id']}` @ `{rec.get('commit') or rec.get('revision')}`"
             if rec.get("repo_id") else f"`{rec['path']}`")
    hashes = ", ".join(
        f"{f['file']} {'sha256' if 'sha256' in f else 'sampled sha256'} "
        f"`{(f.get('sha256') or f.get('sample_sha256', ''))[:12]}`" for f in rec.get("files", []))
    return f"- **{rec['role']}**: {where}" + (f" ({hashes})" if hashes else "")


def card_license(folder: Path) -> str | None:
    """The `license` in a model folder's README front matter, when it has one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def write_card(folder: Path, record: dict, tags: list[str], license: str | None = None) -> None:
    """A model card with Hub front matter, the recipe and how to use the result."""
    # The Hub's own front-matter rendering; `huggingface_hub.ModelCard` would import the whole
    # Hub client for a text write (0.25-0.4 s, a sixth of a 1.9 GB `add`).
    from huggingface_hub.repocard_data import ModelCardData

    hub_ids = list(dict.fromkeys(r["repo_id"] for r in record["inputs"] if r.get("repo_id")))
    data = ModelCardData(library_name="transformers", tags=["mergekit-rl", *tags],
                         base_model=hub_ids or None, license=license,
                         base_model_relation="merge" if record["kind"] == "model" and hub_ids
                         else None)
    title = "Task vector" if record["kind"] == "vector" else "Merged model"
    lines = [f"# {title} made with mergekit-rl", "",
             f"Formula: `{record['formula']}` (fp32 arithmetic, written as "
             f"{record['out_dtype']}).", "", "## Inputs", ""]
    lines += [_input_line(r) for r in record["inputs"]]
    if record["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    lines += ["", "## Recipe", "", "```", record["command"], "```", ""]
    if record["kind"] == "vector":
        lines += ["## Usage", "", "This folder is a task vector, not a model. Apply it to a "
                  "model with the same architecture, tensor names and tokenizer:", "", "```",
                  "mergekit-rl add TARGET_MODEL THIS_VECTOR -o OUT --alpha 1.0", "```", ""]
    else:
        lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, "
                  "AutoTokenizer", "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)", "```", ""]
    lines += ["Provenance (file fingerprints, tool version): `provenance.json`.", ""]
    with open(folder / "README.md", "w", encoding="utf-8", newline="") as f:  # as ModelCard.save
        f.write(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
