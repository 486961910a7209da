"""The one reader of PEFT LoRA adapters: the trainers' adapters and our low-rank vectors.

An adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is read as the dense
deltas it applies, tensor by tensor, so that the planner and the engine take it where they take
a vector: `Adapter` has a checkpoint's `tensors`, `read(name, rows)`, `path` and `config()`.

    Linear    Δ = s·B·A            A [r, in], B [out, r]   (fan_in_fan_out: Δ = (s·B·A)ᵀ)
    Embedding Δ = s·(B·A)ᵀ         A [r, vocab], B [dim, r]
    s = α/r, or α/√r with use_rslora (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732);
    r and α per module from rank_pattern / alpha_pattern, matched as peft matches them.

LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685. Besides factors an adapter may carry
full weights. `modules_to_save` replace the target's tensor rather than add to it, so they are
exposed as `full` and the callers decide (an extract subtracts the base; an `add` at α = 1
copies them, as `merge_and_unload` does; anything else is refused). The copies of embedding
layers peft saves with `save_embedding_layers` (`<module>.base_layer.weight`) are the base's own
weight: an extract uses them (peft loads them, so merged − base counts them), `add` and
`merge` apply the LoRA delta alone (a sibling keeps its own embeddings). Our low-rank vectors keep
tensors that are not factored (norms, biases) as dense deltas in `DENSE_NAME`, which peft
ignores and this reader adds. Features that change what a merge means (DoRA, LoRA biases,
trainable tokens, ...) are refused with one line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from .checkpoint import ADAPTER_CONFIG, Checkpoint, TensorInfo
from .errors import CheckpointError, MismatchError

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
DENSE_NAME = "mergekit_rl_dense.safetensors"  # our low-rank vectors' unfactored deltas
PEFT_PREFIX = "base_model.model."
# adapter_config keys whose (truthy) value makes the adapter something other than s·B·A.
UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude per output)",
    "lora_bias": "LoRA biases",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "megatron_config": "Megatron layers",
}
_FACTOR = re.compile(r"^(.*)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key): the first key
    that matches the module name as `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """s = α/r (or α/√r with use_rslora) for one module, α from alpha_pattern or lora_alpha."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return float(alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)


class Factor:
    """One adapted tensor: its factors' keys in the adapter file, layout and scaling."""

    def __init__(self, module: str, a: str, b: str, embedding: bool, transpose: bool,
                 scaling: float, shape: tuple[int, ...]):
        self.module, self.a, self.b = module, a, b
        self.embedding, self.transpose, self.scaling, self.shape = (embedding, transpose,
                                                                    scaling, shape)


class Adapter:
    """A PEFT LoRA adapter (or one of our low-rank vectors) read as dense deltas."""

    def __init__(self, path: Path, config: dict, weights: Checkpoint,
                 dense: Checkpoint | None = None, record: dict | None = None):
        self.path = path
        self.adapter_config = config
        self.record = record or {}
        self.lowrank = self.record.get("kind") == "vector"  # ours: behaves like a vector
        self._weights, self._dense = weights, dense
        _check_supported(path, config)
        self.factors: dict[str, Factor] = {}
        self.full: dict[str, str] = {}  # tensor name → key of a modules_to_save weight
        self.copies: dict[str, str] = {}  # tensor name → key of peft's saved base_layer copy
        self._parse()
        self.tensors: dict[str, TensorInfo] = {}
        self._folded: dict[str, list[Factor]] = {}  # embedding → tied head factors added to it
        file = self.tensors_file = weights.files[0] if weights.files else path / ADAPTER_WEIGHTS
        for name, f in self.factors.items():
            self.tensors[name] = TensorInfo(name, torch.float32, f.shape, file)
        for name, key in self.full.items():
            info = weights.tensors[key]
            self.tensors[name] = TensorInfo(name, info.dtype, info.shape, file)
        for name, info in (dense.tensors.items() if dense else ()):
            if name in self.tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is both factored and in "
                                      f"{DENSE_NAME}; re-create the vector")
            self.tensors[name] = info

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, weights: Checkpoint | None = None) -> Adapter:
        """Open an adapter folder; `weights` replaces reading its safetensors file (a Hub
        adapter known from its header)."""
        path = Path(path)
        config = read_adapter_config(path)
        if weights is None:
            file = path / ADAPTER_WEIGHTS
            if not file.is_file():
                legacy = path / "adapter_model.bin"
                raise CheckpointError(
                    f"{path}: no {ADAPTER_WEIGHTS}" + (" (only the legacy adapter_model.bin; "
                    "re-save it with a recent peft)" if legacy.exists() else ""))
            weights = Checkpoint.open(file)
        dense = Checkpoint.open(path / DENSE_NAME) if (path / DENSE_NAME).is_file() else None
        if any(f.name == DENSE_NAME for f in weights.files):  # a Hub vector read header-only
            dense = weights.file_subset({DENSE_NAME})
            weights = weights.file_subset({f.name for f in weights.files} - {DENSE_NAME})
        record = {}
        if (path / "provenance.json").is_file():
            try:
                record = json.loads((path / "provenance.json").read_text())
            except ValueError:
                record = {}
        return cls(path, config, weights, dense, record)

    def _parse(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for key in self._weights.tensors:
            name = key.removeprefix(PEFT_PREFIX)
            m = _FACTOR.match(name)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = key
            elif name.endswith(".lora_B.bias"):
                raise CheckpointError(f"{self.path}: {key} is a LoRA bias; adapters with "
                                      "lora_bias are not supported (merge them with peft)")
            elif ".lora_" in name:
                raise CheckpointError(f"{self.path}: {key} is not a LoRA factor this tool "
                                      "knows (DoRA or another variant); merge it with peft")
            elif ".base_layer." in name:  # save_embedding_layers: the base's own weight
                self.copies[name.replace(".base_layer.", ".")] = key
            else:  # modules_to_save (and bias: all / lora_only trained biases)
                self.full[name] = key
        fan_in_fan_out = bool(self.adapter_config.get("fan_in_fan_out"))
        for module, keys in pairs.items():
            embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
            a, b = (("lora_embedding_A", "lora_embedding_B") if embedding
                    else ("lora_A.weight", "lora_B.weight"))
            if a not in keys or b not in keys:
                raise CheckpointError(f"{self.path}: module {module} has only one LoRA factor "
                                      f"({', '.join(keys.values())}); the adapter is incomplete")
            sa, sb = self._weights.tensors[keys[a]].shape, self._weights.tensors[keys[b]].shape
            if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
                raise CheckpointError(f"{self.path}: module {module}: factor shapes {list(sa)} "
                                      f"and {list(sb)} do not multiply")
            rank = sa[0]
            if embedding:
                shape = (sa[1], sb[0])
            else:
                shape = (sa[1], sb[0]) if fan_in_fan_out else (sb[0], sa[1])
            self.factors[module + ".weight"] = Factor(
                module, keys[a], keys[b], embedding, fan_in_fan_out and not embedding,
                lora_scaling(self.adapter_config, module, rank), shape)

    def fold_tied_head(self, head: str, embed: str) -> str | None:
        """For a model that ties `head` to `embed`: peft merges both modules' deltas into the
        one shared matrix, so the embedding's delta becomes Δ_embed + Δ_head (a saved copy of
        the head is a copy of that matrix). Returns a note, or None when there is no head."""
        if head not in self.tensors:
            return None
        info = self.tensors.pop(head)
        for kept in (self.full, self.copies):  # the tied copies are one matrix
            if head in kept:
                kept.setdefault(embed, kept.pop(head))
        if head in self.factors:
            self._folded.setdefault(embed, []).append(self.factors.pop(head))
        if embed not in self.tensors:
            dtype = self._weights.tensors[self.full[embed]].dtype if embed in self.full \
                else torch.float32
            self.tensors[embed] = TensorInfo(embed, dtype, info.shape, self.tensors_file)
        return (f"{self.path}: the model ties {head} to {embed}; the adapter's {head} is "
                f"merged into {embed} (the shared matrix), as peft's merge does")

    # ---- reading ---------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, rows: tuple[int, int] | None = None, pin: bool = False
             ) -> torch.Tensor:
        """The tensor's delta (or rows [r0, r1) of it) in float32; for a `full` name the full
        weight (plus the module's delta when it also has factors)."""
        if self._dense is not None and name in self._dense:
            return self._dense.read(name, rows, pin)
        out = self._delta(self.factors[name], rows) if name in self.factors else None
        for f in self._folded.get(name, ()):
            out = self._delta(f, rows) if out is None else out.add_(self._delta(f, rows))
        if name in self.full:
            full = self._weights.read(self.full[name], rows).to(torch.float32)
            return full if out is None else full.add_(out)
        if out is None:
            raise KeyError(name)
        return out

    def read_merged(self, name: str, rows: tuple[int, int] | None = None,
                    pin: bool = False) -> torch.Tensor:
        """What peft's merge leaves in the model for `name`: the saved base_layer copy plus the
        delta where peft saved one, else as `read`."""
        if name not in self.copies or name in self.full:
            return self.read(name, rows, pin)
        copy = self._weights.read(self.copies[name], rows).to(torch.float32)
        return copy.add_(self.read(name, rows)) if name in self.tensors else copy

    def dense_delta(self, name: str) -> torch.Tensor:
        """The whole dense delta of one tensor in float32 (the α sweep applies these)."""
        if name in self.full:
            raise MismatchError(f"{self.path}: {name} is a full weight (modules_to_save), not a "
                                "delta; extract the adapter against its base first")
        return self.read(name)

    def _delta(self, f: Factor, rows: tuple[int, int] | None) -> torch.Tensor:
        a = self._weights.read(f.a).to(torch.float32)
        b = self._weights.read(f.b).to(torch.float32)
        if f.embedding or f.transpose:  # Δ = (B·A)ᵀ: rows of Δ are columns of A
            a = a if rows is None else a[:, rows[0]:rows[1]]
            return (b @ a).T.contiguous() * f.scaling  # the product and order peft uses
        b = b if rows is None else b[rows[0]:rows[1]]
        return (b @ a) * f.scaling

    def config(self) -> dict:
        """The base model's config: ours carry config.json; a peft folder may not."""
        p = self.path / "config.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except ValueError as e:
            raise CheckpointError(f"{p}: invalid JSON ({e})") from None

    def architecture(self) -> str | None:
        """The base model's class: config.json, else peft's auto_mapping, else the config of a
        local base_model_name_or_path."""
        archs = self.config().get("architectures")
        if archs:
            return archs[0]
        mapping = self.adapter_config.get("auto_mapping") or {}
        if mapping.get("base_model_class"):
            return mapping["base_model_class"]
        base = self.adapter_config.get("base_model_name_or_path")
        if base and (Path(base) / "config.json").is_file():
            try:
                return (json.loads((Path(base) / "config.json").read_text())
                        .get("architectures") or [None])[0]
            except ValueError:
                return None
        return None

    # ---- what provenance records -----------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return self._weights.files + (self._dense.files if self._dense else [])

    @property
    def headers(self) -> dict:
        return {**self._weights.headers, **(self._dense.headers if self._dense else {})}

    @property
    def total_bytes(self) -> int:
        return sum(c.total_bytes for c in (self._weights, self._dense) if c is not None)

    def fingerprints(self, full_hash: bool = False) -> list[dict]:
        return [r for c in (self._weights, self._dense) if c is not None
                for r in c.fingerprints(full_hash)]

    def close(self) -> None:
        for c in (self._weights, self._dense):
            if c is not None:
                c.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_adapter_config(path: Path) -> dict:
    p = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG}; is this a PEFT adapter?") from None
    except ValueError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    return config


def _check_supported(path: Path, config: dict) -> None:
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise CheckpointError(f"{path}: a {kind} adapter; only LoRA adapters can be read as "
                              "deltas (merge it with peft's merge_and_unload first)")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {ADAPTER_CONFIG} sets {key} ({what}), which is "
                                  "not a plain s·B·A delta; merge it with peft's "
                                  "merge_and_unload and extract the merged model instead")


def open_input(path: str | Path, weights: Checkpoint | None = None) -> Checkpoint | Adapter:
    """A model, vector or adapter folder opened for reading: adapters as `Adapter`."""
    if (Path(path) / ADAPTER_CONFIG).is_file():  # what folder_kind says first, without reads
        return Adapter.open(path, weights)
    return weights if weights is not None else Checkpoint.open(path)


def iter_deltas(path: str | Path):
    """(name, float32 delta) for every floating tensor of a vector folder, dense or low-rank
    (or a PEFT adapter without full weights), one tensor at a time: for applying a vector in
    memory (θ + α·Δ) the way `add` does on disk. Tensors a low-rank vector leaves out are 0."""
    with open_input(path) as vector:
        for name, info in vector.tensors.items():
            if info.is_float:
                delta = vector.dense_delta(name) if isinstance(vector, Adapter) \
                    else vector.read(name)
                yield name, delta.to(torch.float32)


def covered_only(vector, target: Checkpoint) -> frozenset[str]:
    """The target tensors a vector does not take part in: for an adapter every tensor it does
    not adapt (zero delta); for a dense vector those masked out at extraction."""
    if isinstance(vector, Adapter):
        return frozenset(n for n in target.tensors if n not in vector)
    from .provenance import read_record

    return frozenset(read_record(vector.path).get("excluded", ()))


def check_architecture(adapter: Adapter, model: Checkpoint, role: str) -> None:
    """An adapter applies to a model of its base's architecture only."""
    mine = adapter.architecture()
    theirs = (model.config().get("architectures") or [None])[0]
    if mine and theirs and mine != theirs:
        raise MismatchError(f"{adapter.path}: the adapter's base is a {mine} but the {role} "
                            f"{model.path} is a {theirs}; use a {role} of the adapter's base "
                            "architecture")


class Zeros:
    """An input whose tensors are all zero: the part of a model an adapter leaves alone."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors

    def read(self, name: str, rows: tuple[int, int] | None = None, pin: bool = False
             ) -> torch.Tensor:
        shape = self.tensors[name].shape
        if rows is not None:
            shape = (rows[1] - rows[0],) + tuple(shape[1:])
        return torch.zeros(shape, dtype=torch.float32)


def prepare_adapter(adapter: Adapter, model: Checkpoint, role: str) -> list[str]:
    """Before a PEFT adapter meets `model`: check it belongs to the model's architecture, and
    on a model that ties lm_head to the embeddings fold its lm_head into the shared matrix, as
    peft's merge does. Returns the notes."""
    from .plan import embed_name, is_tied, lm_head_name

    check_architecture(adapter, model, role)
    notes = []
    emb = embed_name(model)
    if is_tied(model) and lm_head_name(model) is None and emb:
        note = adapter.fold_tied_head("lm_head.weight", emb)
        notes += [note] if note else []
    if adapter.copies:
        notes.append(f"{adapter.path} carries peft's copies of {', '.join(sorted(adapter.copies))}"
                     f" (save_embedding_layers); the {role} keeps its own, plus the LoRA delta")
    return notes


class Merged:
    """An adapter's `read_merged` as an input of the engine (role "merged" of an extract)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def read(self, name: str, rows=None, pin: bool = False) -> torch.Tensor:
        return self.adapter.read_merged(name, rows, pin)
