"""Provenance records (`provenance.json`) and model cards (`README.md`) for every output.

A record says what was computed from what: the formula, each input (path, or Hub repo id with
the commit it resolved to), per-file fingerprints, dtypes, the mask, the tool version and the
command. Tokens never reach a record: only paths, ids and revisions are written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
import yaml

from .checkpoint import Checkpoint
from .hub import Source, lfs_sha256
from .tokenizer_id import fingerprint

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
    out = {"role": role, **source.record(), "files": files,
           "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values()}),
           "tensors": len(ckpt.tensors)}
    lineage = hub_lineage(source)
    if lineage:
        out["lineage"] = lineage
    tokenizer = fingerprint(source.path)
    if tokenizer:
        out["tokenizer"] = tokenizer
    return out


_CACHE_FOLDER = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(?:/|$)")


def hub_lineage(source: Source | str | Path) -> list[str]:
    """The Hub ids a local input descends from, as a card's `base_model` names them: the repo
    itself for a Hub input or a folder of a huggingface_hub cache
    (`models--org--name/snapshots/<commit>`); else the `base_model` of its card (our trainers'
    outputs, any Hub model); else the lineage its provenance records (our vectors, merges)."""
    if isinstance(source, Source):
        if source.repo_id:
            return [source.repo_id]
        path = source.path
    else:
        path = Path(source)
    m = _CACHE_FOLDER.search(Path(path).expanduser().resolve().as_posix())
    if m:
        return [f"{m.group(1)}/{m.group(2)}"]
    meta = _front_matter(Path(path))
    base = meta.get("base_model")
    if base:
        return [str(b) for b in (base if isinstance(base, list) else [base])]
    found: list[str] = []
    for rec in read_record(Path(path)).get("inputs", []):
        found += [rec["repo_id"]] if rec.get("repo_id") else rec.get("lineage", [])
    return list(dict.fromkeys(found))


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


def _hash_kind(f: dict) -> str:
    return "sha256" if "sha256" in f else "sampled sha256" if "sample_sha256" in f \
        else "header sha256"


def _input_line(rec: dict) -> str:
    if rec.get("repo_id"):
        where = f"`{rec['repo_id']}` @ `{rec.get('commit') or rec.get('revision')}`"
    else:
        where = f"`{rec['path']}`"
        if rec.get("lineage"):
            where += f" (from {', '.join(f'`{x}`' for x in rec['lineage'])})"
    hashes = ", ".join(
        f"{f['file']} {_hash_kind(f)} "
        f"`{(f.get('sha256') or f.get('sample_sha256') or f.get('header_sha256', ''))[:12]}`"
        for f in rec.get("files", []))
    return f"- **{rec['role']}**: {where}" + (f" ({hashes})" if hashes else "")


def _front_matter(folder: Path) -> dict:
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def card_license(folder: Path) -> str | None:
    """The `license` in a model folder's README front matter, when it has one."""
    value = _front_matter(folder).get("license")
    return str(value) if value else None


def write_card(folder: Path, record: dict, tags: list[str], license: str | None = None,
               repo_id: str | None = None, local_paths: bool = True) -> None:
    """A model card with Hub front matter (base_model from the inputs' Hub lineage), the
    recipe and how to use the result; `repo_id` names the result in the usage snippet (a
    push), and without `local_paths` inputs and the command show folder names only."""
    # The Hub's own front-matter rendering; `huggingface_hub.ModelCard` would import the whole
    # Hub client for a text write (0.25-0.4 s, a sixth of a 1.9 GB `add`).
    from huggingface_hub.repocard_data import ModelCardData

    if not local_paths:
        record = public_record(record)
    hub_ids = list(dict.fromkeys(x for r in record["inputs"] for x in (
        [r["repo_id"]] if r.get("repo_id") else r.get("lineage", []))))
    lowrank = record.get("format") == "peft-lora"
    data = ModelCardData(library_name="peft" if lowrank else "transformers",
                         tags=["mergekit-rl", *tags], base_model=hub_ids or None,
                         license=license, base_model_relation="merge"
                         if record["kind"] == "model" and hub_ids else None)
    title = ("Low-rank task vector" if lowrank else "Task vector") if record["kind"] == "vector" \
        else "Merged model"
    lines = [f"# {title} made with mergekit-rl", "",
             f"Formula: `{record['formula']}` (fp32 arithmetic, written as "
             f"{record['out_dtype']}).", "", "## Inputs", ""]
    lines += [_input_line(r) for r in record["inputs"]]
    if record["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    if lowrank:
        lines += _lowrank_lines(record["lowrank"])
    lines += ["", "## Recipe", "", "```", record["command"], "```", ""]
    me = repo_id or "THIS_FOLDER"
    base = hub_ids[0] if hub_ids else "BASE_MODEL"
    if lowrank:
        lines += ["## Usage", "", "A LoRA adapter for peft (the factored tensors), or a vector "
                  "for mergekit-rl (all of it, including the dense deltas in "
                  "`mergekit_rl_dense.safetensors` that peft ignores):", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f'model = AutoModelForCausalLM.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(model, "{me}").merge_and_unload()', "```",
                  "", "```", f"mergekit-rl add TARGET_MODEL {me} -o OUT --alpha 1.0", "```", ""]
    elif record["kind"] == "vector":
        lines += ["## Usage", "", "This folder is a task vector, not a model. Apply it to a "
                  "model with the same architecture, tensor names and tokenizer:", "", "```",
                  f"mergekit-rl add TARGET_MODEL {me} -o OUT --alpha 1.0", "```", ""]
    else:
        name = f'"{repo_id}"' if repo_id else "PATH_OR_REPO"
        lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, "
                  "AutoTokenizer", f"model = AutoModelForCausalLM.from_pretrained({name})",
                  f"tokenizer = AutoTokenizer.from_pretrained({name})", "```", ""]
    lines += ["Provenance (file fingerprints, tool version): `provenance.json`.", ""]
    with open(folder / "README.md", "w", encoding="utf-8", newline="") as f:  # as ModelCard.save
        f.write(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ---- evaluation results in the card (`eval --update-card`, `push --eval`, `sweep --save-best`)

LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def eval_results(record: dict) -> list:
    """An `eval.json` record as huggingface_hub `EvalResult`s (the Hub's `model-index`)."""
    from huggingface_hub import EvalResult

    results = []
    for row in record["results"]:
        dataset = row.get("dataset") or {}
        shots = row.get("num_fewshot")
        results.append(EvalResult(
            task_type="text-generation", task_name=row["task"],
            dataset_type=dataset.get("path") or row["task"], dataset_name=row["task"],
            dataset_config=dataset.get("name"), dataset_split=dataset.get("split"),
            dataset_args={"num_few_shot": shots} if shots is not None else None,
            metric_type=row["metric"], metric_value=row["value"],
            metric_name=row["metric"] + (f" ({row['filter']})" if row.get("filter") else ""),
            metric_config=row.get("filter"), source_name="lm-evaluation-harness",
            source_url=LM_EVAL_URL))
    return results


def card_with_eval(text: str | None, record: dict, model_name: str) -> str:
    """Card text with `record`'s results in its `model-index` front matter: a result for the
    same task, dataset, metric and filter replaces the old one; the rest of the card stays."""
    from huggingface_hub import ModelCard

    text = text or f"# {model_name}\n"
    card = ModelCard(text if text.startswith("---") else f"---\n{{}}\n---\n{text}")
    new = eval_results(record)
    kept = [r for r in card.data.eval_results or []
            if not any(r.is_equal_except_value(n) for n in new)]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or model_name
    return str(card)


def update_card_file(folder: Path, record: dict) -> Path:
    """Add `record`'s results to FOLDER/README.md (created if missing), replaced atomically."""
    import os

    readme = Path(folder) / "README.md"
    text = readme.read_text() if readme.is_file() else None
    new = card_with_eval(text, record, Path(folder).resolve().name)
    tmp = readme.with_name(f".README.md.tmp-{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, readme)
    return readme


def _lowrank_lines(summary: dict) -> list[str]:
    how = f"rank {summary['rank']}" if summary.get("rank") else \
        f"the smallest rank keeping {summary['energy']:.4g} of each tensor's energy"
    lines = ["", "## Low rank", "",
             f"Each 2-D delta is a truncated SVD ({how}; SVD `{summary['svd']}`, seed "
             f"{summary['seed']}). Size {summary['bytes'] / 1e6:.3g} MB against "
             f"{summary['dense_bytes'] / 1e6:.3g} MB dense ({summary['ratio']:.1%}).", "",
             "| group | tensors | rank | energy kept |", "|---|---|---|---|"]
    for g in summary["layers"]:
        rank = str(g["min_rank"]) if g["min_rank"] == g["max_rank"] else \
            f"{g['min_rank']}–{g['max_rank']}"
        lines.append(f"| {g['group']} | {g['tensors']} | {rank} | {g['energy']:.4f} |")
    return lines


def public_command(command: str) -> str:
    """The command with local paths shortened to their last component (for publishing)."""
    from .hub import local_path

    words = []
    for word in shlex.split(command):
        path = local_path(word) if "/" in word and not word.startswith("-") else None
        words.append(path.name if path is not None else word)
    return shlex.join(words)


def public_record(record: dict) -> dict:
    """The record with local input paths shortened to folder names (for publishing)."""
    out = json.loads(json.dumps(record))
    for rec in out.get("inputs", []):
        if "path" in rec:
            full, rec["path"] = rec["path"], Path(rec["path"]).name
            out["notes"] = [n.replace(full, rec["path"]) for n in out.get("notes", [])]
    out["command"] = public_command(out.get("command", ""))
    return out


@contextlib.contextmanager
def staged_for_push(folder: Path, repo_id: str, local_paths: bool = False):
    """The folder as it is published: a sibling of links to its files whose card names the
    repo in its usage and, unless `local_paths`, whose card and provenance show folder names
    instead of absolute paths. A folder without our provenance record is pushed as it is."""
    folder = Path(folder)
    record = read_record(folder)
    if not record.get("inputs") or not folder.is_dir():
        yield folder
        return
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.push-", dir=folder.parent))
    try:
        for root, _, names in os.walk(folder):
            rel = Path(root).relative_to(folder)
            (stage / rel).mkdir(parents=True, exist_ok=True)
            for name in names:
                if rel == Path(".") and name in ("README.md", RECORD_NAME):
                    continue
                os.symlink(Path(root, name).resolve(), stage / rel / name)
        shown = record if local_paths else public_record(record)
        write_record(stage, shown)
        tags = [t for t in _front_matter(folder).get("tags", []) if t != "mergekit-rl"]
        write_card(stage, shown, tags, card_license(folder), repo_id=repo_id,
                   local_paths=True)
        _keep_eval_results(folder / "README.md", stage / "README.md")
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _keep_eval_results(local: Path, published: Path) -> None:
    """Evaluation results a local card holds (`eval --update-card`) stay on the published one."""
    from huggingface_hub import ModelCard

    if not local.is_file():
        return
    results = ModelCard(local.read_text()).data.eval_results
    if not results:
        return
    card = ModelCard(published.read_text())
    card.data.eval_results = results
    card.data.model_name = card.data.model_name or ModelCard(local.read_text()).data.model_name \
        or local.parent.name
    card.save(published)
