"""Low-rank vectors: a task vector stored as truncated SVDs in PEFT's LoRA adapter format.

`extract FT BASE --rank R` (or `--energy E`) and `compress VECTOR` stream the deltas one tensor
at a time (read in blocks of rows into one float32 buffer, truncated on the device, written at
once), so memory is one tensor and its factors whatever the model size. The folder:

    adapter_config.json            peft's LoRA config: r, lora_alpha = r (scaling 1), per-module
                                   rank_pattern / alpha_pattern when ranks differ, target_modules
    adapter_model.safetensors      base_model.model.<module>.lora_A.weight [r, in] / lora_B [out, r]
                                   (embeddings: lora_embedding_A [r, vocab] / _B [dim, r])
    mergekit_rl_dense.safetensors  dense deltas of what is not factored (norms, biases; tensors
                                   where a factorisation would not be smaller): peft ignores it,
                                   `mergekit-rl add` applies it
    config.json, provenance.json, README.md

`PeftModel.from_pretrained(base, FOLDER)` loads the factors; `adapter.Adapter` reads the whole.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import engine, provenance
from .adapter import ADAPTER_WEIGHTS, DENSE_NAME, PEFT_PREFIX
from .checkpoint import ADAPTER_CONFIG, SequentialWriter, copy_side_files
from .errors import ConfigError, MismatchError
from .inspection import group_of
from .maths import lowrank as svd
from .maths.merge_methods import tensor_seed
from .output import atomic_folder
from .plan import EMBED_SUFFIXES, Item, Plan

log = logging.getLogger(__name__)

# GPT-2-style models keep Linear weights as Conv1D [in, out]; writing them needs
# fan_in_fan_out, which we do not produce (reading such adapters is supported).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")


@dataclass(frozen=True)
class LowRank:
    """How to truncate: a fixed `rank` or the `energy` (fraction of ‖Δ‖_F²) kept per tensor."""

    rank: int | None = None
    energy: float | None = None
    svd: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.rank is not None and self.energy is not None:
            raise ConfigError("--rank and --energy: give one of them, not both")
        if self.rank is None and self.energy is None:
            raise ConfigError("give --rank R or --energy E for a low-rank vector")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank {self.rank}: must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ConfigError(f"--energy {self.energy}: must be in (0, 1], e.g. 0.99")
        if self.svd not in svd.METHODS:
            raise ConfigError(f"--svd {self.svd!r}: expected one of {', '.join(svd.METHODS)}")


def _factored(item: Item) -> bool:
    return len(item.shape) == 2 and item.name.endswith(".weight") and min(item.shape) > 0


def _keys(item: Item) -> tuple[str, str]:
    """(A key, B key) of the factors peft loads for this tensor."""
    module = PEFT_PREFIX + item.name.removesuffix(".weight")
    if item.name.endswith(EMBED_SUFFIXES):
        return module + ".lora_embedding_A", module + ".lora_embedding_B"
    return module + ".lora_A.weight", module + ".lora_B.weight"


def _check(plan: Plan, spec: LowRank, config: dict) -> None:
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        raise ConfigError(f"a {config['model_type']} model keeps its linear weights as Conv1D "
                          "[in, out]; low-rank vectors are not written for it: drop --rank/"
                          "--energy for a dense vector")
    for item in plan.items:
        if item.common_rows is not None:
            raise MismatchError(f"{item.name}: the vector covers the common {item.common_rows} "
                                "rows only, which peft cannot load on the base; drop "
                                "--allow-vocab-mismatch or --rank/--energy")
    factored = [i for i in plan.items if _factored(i)]
    narrow = min(factored, key=lambda i: min(i.shape), default=None)
    if spec.rank is not None and narrow is not None and spec.rank > min(narrow.shape):
        raise ConfigError(f"--rank {spec.rank} is larger than the smaller side of "
                          f"{narrow.name} {list(narrow.shape)}; use --rank {min(narrow.shape)} "
                          "or less, --exclude that tensor, or --energy")


def write_lowrank(sources: dict, inputs: dict, plan: Plan, fn: engine.ComputeFn, out: Path,
                  options, spec: LowRank, formula: str, side_from: Path) -> object:
    """Stream the plan's deltas (`fn` computes one into an fp32 buffer) into a low-rank vector
    folder at `out` (atomic). Returns a `job.Result`."""
    from .job import Result

    config = _read_config(side_from)
    _check(plan, spec, config)
    for note in plan.notes:
        log.warning(note)
    device = engine.resolve_device(options.device)
    dtype = options.out_dtype or torch.float32
    items = [i for i in plan.items if not i.is_copy]
    start = time.perf_counter()
    bounds, dense_bounds = [], []
    for item in items:
        if _factored(item):
            r = spec.rank or min(item.shape)
            a, b = _keys(item)
            emb = item.name.endswith(EMBED_SUFFIXES)
            m, n = item.shape
            bounds += [(a, dtype, (r, m if emb else n)), (b, dtype, (n if emb else m, r))]
        dense_bounds.append((item.name, dtype, item.shape))
    stats: dict[str, dict] = {}
    with atomic_folder(out) as tmp:
        factors = SequentialWriter(tmp / ADAPTER_WEIGHTS, bounds, {"mergekit_rl": "vector"})
        dense = SequentialWriter(tmp / DENSE_NAME, dense_bounds, {"mergekit_rl": "vector"})
        try:
            for item in items:
                delta = _delta(item, inputs, fn, device)
                stats[item.name] = _store(item, delta, spec, dtype, factors, dense)
                del delta
            size = factors.finish() + dense.finish()
        finally:
            factors.close()
            dense.close()
        ranks = {i.name: stats[i.name]["rank"] for i in items if stats[i.name]["stored"] == "lora"}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(
            adapter_config(ranks, spec, config, sources.get("base")), indent=2) + "\n")
        copy_side_files(side_from, tmp, names=("config.json",))
        dense_bytes = sum(math.prod(i.shape) * dtype.itemsize for i in items)
        summary = {"rank": spec.rank, "energy": spec.energy, "svd": spec.svd, "seed": spec.seed,
                   "bytes": size, "dense_bytes": dense_bytes, "ratio": size / max(dense_bytes, 1),
                   "tensors": stats, "layers": layer_summary(stats)}
        zero = [n for n, s in stats.items() if s["stored"] == "none"]
        record = provenance.build_record(
            "vector", formula,
            [provenance.input_record(role, sources[role], inputs[role], options.full_hash)
             for role in sources],
            command=options.command, out_dtype=str(dtype).removeprefix("torch."),
            selection={"include": list(options.include), "exclude": list(options.exclude)},
            notes=plan.notes, extra={"format": "peft-lora", "excluded": plan.excluded + zero,
                                     "lowrank": summary})
        provenance.write_record(tmp, record)
        provenance.write_card(tmp, record, ["task-vector", "lora", "low-rank"],
                              provenance.card_license(side_from))
    return Result(out, len(items), len(items), size, time.perf_counter() - start, str(device),
                  plan.notes)


def _read_config(folder: Path) -> dict:
    p = Path(folder) / "config.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}


def _delta(item: Item, inputs: dict, fn: engine.ComputeFn, device: torch.device
           ) -> torch.Tensor:
    """The item's whole fp32 delta on `device`, computed in blocks of rows."""
    delta = torch.empty(item.shape, dtype=torch.float32, device=device)
    rows = item.shape[0] if item.shape else 1
    row_elems = max(math.prod(item.shape[1:]), 1) if item.shape else 1
    step = max(engine.DEFAULT_BLOCK_BYTES // (4 * row_elems), 1)
    for r0 in range(0, rows, step):
        span = (r0, min(r0 + step, rows)) if item.shape else None
        x = {role: inputs[role].read(name, span).to(device) for role, name in item.sources}
        view = delta[span[0]:span[1]] if span else delta
        result = fn(item, x, view)
        if result is not view:
            view.copy_(result)
    return delta


def _store(item: Item, delta: torch.Tensor, spec: LowRank, dtype: torch.dtype,
           factors: SequentialWriter, dense: SequentialWriter) -> dict:
    """Factor one delta (or keep it dense) and write it; returns its record."""
    a_key, b_key = _keys(item) if _factored(item) else (None, None)
    if not bool(delta.any()):  # unchanged (or not adapted): nothing to store, add reads 0
        dense.skip(item.name)
        if a_key is not None:
            factors.skip(a_key)
            factors.skip(b_key)
        return {"rank": 0, "energy": 1.0, "stored": "none", "shape": list(item.shape)}
    if a_key is not None:
        generator = torch.Generator().manual_seed(tensor_seed(spec.seed, item.name, 0))
        t = svd.truncated_svd(delta, spec.rank, spec.energy, spec.svd, generator)
        m, n = item.shape
        smaller = t.rank * (m + n) < m * n
        if spec.rank is not None or smaller:
            dense.skip(item.name)
            b, a = t.factors()
            if item.name.endswith(EMBED_SUFFIXES):  # peft: Δ = (B_e·A_e)ᵀ
                a, b = b.T, a.T
            factors.write(a_key, a.to(dtype))
            factors.write(b_key, b.to(dtype))
            return {"rank": t.rank, "energy": t.energy, "stored": "lora", "method": t.method,
                    "shape": [m, n], "sumsq": t.total}
        factors.skip(a_key)
        factors.skip(b_key)
        log.info("%s: rank %d for energy %s is not smaller than dense; kept dense",
                 item.name, t.rank, spec.energy)
    dense.write(item.name, delta.to(dtype))
    return {"rank": None, "energy": 1.0, "stored": "dense", "shape": list(item.shape)}


def adapter_config(ranks: dict[str, int], spec: LowRank, config: dict, base_source) -> dict:
    """peft's LoRA config for these factors: lora_alpha = r everywhere, so the scaling is 1."""
    modules = {name.removesuffix(".weight"): r for name, r in ranks.items()}
    r = spec.rank or (max(modules.values()) if modules else 1)
    pattern = {re.escape(m): k for m, k in modules.items() if k != r}
    archs = config.get("architectures") or []
    base = None
    if base_source is not None:
        base = base_source.repo_id or base_source.path.name
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM" if any(
                a.endswith("ForCausalLM") for a in archs) else None,
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base, "revision": getattr(base_source, "commit", None)}


def layer_summary(stats: dict[str, dict]) -> list[dict]:
    """Per layer: tensors factored, rank range and the energy kept (Σ kept / Σ ‖Δ‖²)."""
    groups: dict[str, dict] = {}
    for name, s in stats.items():
        if s["stored"] != "lora":
            continue
        g = groups.setdefault(group_of(name), {"group": group_of(name), "tensors": 0,
                                               "min_rank": s["rank"], "max_rank": s["rank"],
                                               "kept": 0.0, "total": 0.0})
        g["tensors"] += 1
        g["min_rank"], g["max_rank"] = min(g["min_rank"], s["rank"]), max(g["max_rank"],
                                                                          s["rank"])
        g["kept"] += s["energy"] * s["sumsq"]
        g["total"] += s["sumsq"]
    out = []
    for g in groups.values():
        kept, total = g.pop("kept"), g.pop("total")
        out.append({**g, "energy": kept / total if total else 1.0})
    return out
