"""Merge manifests: our schema, or a mergekit config accepted as is (detected by `merge_method`).

Everything is validated before any tensor is opened. Errors name the manifest file, the key path
and what was expected; unknown keys are errors; relative paths resolve against the manifest's
folder. Our schema (see manifests/*.yaml):

    output: {path: ./out, dtype: auto|float32|bfloat16|float16, max_shard_size: 5GB}
    target: MODEL                      # or `base:`; the model the terms are added to
    method: task_arithmetic | ties | dare_linear | dare_ties | breadcrumbs[_ties] | linear
    parameters: {lambda: 1.0, normalize: false, density: 1.0, seed: 0, gamma: 0.01}
    terms:
      - {vector: VECTOR_DIR, weight: 1.0}
      - {plus: GRPO, minus: SFT, weight: 1.0, density: 0.5}   # delta computed on the fly
      - {model: OTHER, weight: 0.5}                           # delta = OTHER − target
    include: [REGEX], exclude: [REGEX]  # the mask m
    tokenizer_source: target | MODEL
    push: {repo_id: org/name, private: true}

A parameter (weight, density, lambda, ...) is a number, a list of numbers interpolated across
layers (mergekit's gradient: layer i of L sits at t = i/(L−1); embeddings at 0, the final norm
and lm_head at 1), or a list of `{match: REGEX, value: ...}` / `{filter: SUBSTRING, value: ...}`
of which the first that matches the tensor name applies.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .hub import join_local, local_path
from .overrides import apply_override, override_for, override_message, read_yaml
from .plan import parse_dtype

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "linear", "slerp", "model_stock")
MERGEKIT_METHODS = METHODS
# Methods on the models themselves (no deltas), and how many models besides the target.
MODEL_METHODS = {"linear": 1, "slerp": 1, "model_stock": 2}
GLOBAL_PARAMS = ("lambda", "normalize", "density", "seed", "gamma", "weight", "rescale",
                 "epsilon", "t", "filter_wise")
TERM_PARAMS = ("weight", "density", "gamma", "epsilon")
# mergekit parameters that change nothing here: accepted with an info line.
NO_OP_PARAMS = {
    "int8_mask": "mergekit keeps the TIES sign mask as int8 to save memory; the result is the "
                 "same, and mergekit-rl's masks are booleans already",
}
# Keys whose values are inputs: a `--set` value resolves against the working directory.
INPUT_KEYS = ("target", "base", "base_model", "tokenizer_source", "terms.*.vector",
              "terms.*.plus", "terms.*.minus", "terms.*.model", "models.*.model")
OUTPUT_KEYS = ("output.path",)
KEYWORDS = ("target", "base", "union")  # tokenizer_source values that are not paths


class FieldConfigError(ConfigError):
    """A manifest value is wrong; `key` is its dotted path (`terms.0.weight`), `reason` why."""

    def __init__(self, message: str, key: str, reason: str):
        super().__init__(message)
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Cond:
    value: Any
    match: str | None = None    # regex (re.search)
    filter: str | None = None   # mergekit: substring, or None / "*" for every tensor

    def applies(self, name: str) -> bool:
        if self.match is not None:
            return re.search(self.match, name) is not None
        return self.filter in (None, "*") or self.filter in name


def evaluate(setting: Any, name: str, t: float) -> Any:
    """Value of a parameter setting for tensor `name` at layer position t ∈ [0, 1]; None when
    no condition applies (the caller then falls back to the next level)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], Cond):
        for cond in setting:
            if cond.applies(name):
                return evaluate(cond.value, name, t)
        return None
    if isinstance(setting, list):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


@dataclass(frozen=True)
class Term:
    kind: str                    # "vector" | "pair" | "model"
    inputs: tuple[str, ...]      # vector: (V,); pair: (plus, minus); model: (M,)
    params: dict = field(default_factory=dict)  # weight/density/gamma settings


@dataclass(frozen=True)
class Manifest:
    source: Path | None
    target: str
    method: str
    terms: tuple[Term, ...]
    params: dict
    out_path: Path | None = None
    out_dtype: str = "auto"
    max_shard_size: str = "5GB"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    tokenizer_source: str | None = None
    push: dict | None = None
    style: str = "mergekit_rl"   # or "mergekit"
    notes: tuple[str, ...] = ()  # what was accepted and ignored (info lines)
    layer_range: tuple[int, int] | None = None  # mergekit `slices`: must span every layer

    def term_param(self, term: Term, key: str, name: str, t: float, default: Any) -> Any:
        """Term-level setting, then the global one, then the default (mergekit's order)."""
        for setting in (term.params.get(key), self.params.get(key)):
            if setting is not None:
                value = evaluate(setting, name, t)
                if value is not None:
                    return value
        return default

    def global_param(self, key: str, name: str, t: float, default: Any) -> Any:
        setting = self.params.get(key)
        value = evaluate(setting, name, t) if setting is not None else None
        return default if value is None else value


class _Checker:
    """Validation with errors that name the file, the key path and what was expected."""

    def __init__(self, source: Path | None):
        self.source = source
        self.folder = source.parent if source else Path.cwd()
        self.notes: list[str] = []
        self.mergekit = False

    def fail(self, path: str, msg: str):
        where = f"{self.source}: " if self.source else ""
        raise FieldConfigError(f"{where}{path}: {msg}", path, msg)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key),
                          f"unknown key; expected one of {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(path or "manifest", f"missing required key {key!r}")
        return value

    def model_ref(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, "expected a model folder or Hub id (org/name[@revision])")
        local = local_path(value, self.folder)
        return value if local is None else str(local.resolve())

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"expected a number, got {value!r}")
        return float(value)

    def setting(self, value: Any, path: str, kind: str = "number") -> Any:
        """A scalar, a gradient list, or a list of {match|filter, value} conditions."""
        check = (lambda v, p: self.number(v, p)) if kind == "number" else self.boolean
        if isinstance(value, list):
            if not value:
                self.fail(path, "expected a non-empty list")
            if all(isinstance(v, dict) for v in value):
                conds = []
                for i, c in enumerate(value):
                    p = f"{path}[{i}]"
                    self.mapping(c, p, ("match", "filter", "value"), ("value",))
                    if "match" in c:
                        try:
                            re.compile(c["match"])
                        except re.error as e:
                            self.fail(f"{p}.match", f"invalid regular expression ({e})")
                    conds.append(Cond(self.setting(c["value"], f"{p}.value", kind),
                                      c.get("match"), c.get("filter")))
                return conds
            return [check(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return check(value, path)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {value!r}")
        return value

    def params(self, raw: Any, path: str, allowed: tuple[str, ...]) -> dict:
        out = {}
        if path == "parameters":  # mergekit's global no-ops
            allowed = allowed + tuple(NO_OP_PARAMS)
        for key, value in self.mapping(raw or {}, path, allowed).items():
            if key in NO_OP_PARAMS and path == "parameters":
                self.boolean(value, f"{path}.{key}")
                where = f"{self.source}: " if self.source else ""
                self.notes.append(f"{where}{path}.{key}: {value} accepted and ignored "
                                  f"({NO_OP_PARAMS[key]})")
            elif key == "rescale" and value in ("l1", "density"):
                out[key] = value  # DARE: mergekit's L1-preserving factor or the paper's 1/p
            elif key in ("normalize", "rescale", "filter_wise"):
                out[key] = self.setting(value, f"{path}.{key}", "bool")
            elif key == "seed":
                if not isinstance(value, int) or isinstance(value, bool):
                    self.fail(f"{path}.seed", "expected an integer")
                out[key] = value
            else:
                out[key] = self.setting(value, f"{path}.{key}")
        return out

    def regexes(self, value: Any, path: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            self.fail(path, "expected a regex or a list of regexes")
        for i, r in enumerate(items):
            try:
                re.compile(r)
            except re.error as e:
                self.fail(f"{path}[{i}]", f"invalid regular expression ({e})")
        return tuple(items)

    def dtype(self, value: Any, path: str) -> str:
        try:
            parse_dtype(str(value))
        except ConfigError:
            self.fail(path, f"expected auto, float32, bfloat16 or float16, got {value!r}")
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(value, value)


def load(path: str | Path, overrides: list[str] = ()) -> Manifest:
    """Read, override (`key.path=value`) and validate a manifest file. A value given with
    `--set` that names an input or the output resolves against the working directory (as `-o`
    does); paths in the file resolve against the file's folder. An error about a value that an
    override set is reported against that `--set`."""
    path = Path(path)
    raw = read_yaml(path, "manifest")
    for item in overrides:
        raw = apply_override(raw, item, path, resolve=_command_line_path)
    try:
        return from_dict(raw, path)
    except FieldConfigError as e:
        item = override_for(e.key, overrides)
        if item is None:
            raise
        raise ConfigError(override_message(item, e.key, e.reason)) from None


def _command_line_path(key: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if any(fnmatch.fnmatchcase(key, k) for k in OUTPUT_KEYS):
        return str(join_local(value).resolve())
    if any(fnmatch.fnmatchcase(key, k) for k in INPUT_KEYS) and value not in KEYWORDS:
        local = local_path(value)
        return value if local is None else str(local.resolve())
    return value


def from_dict(raw: Any, source: Path | None = None) -> Manifest:
    c = _Checker(source)
    if not isinstance(raw, dict):
        c.fail("manifest", "expected a YAML mapping at the top level")
    if "merge_method" in raw:
        return _from_mergekit(raw, c)
    return _from_ours(raw, c)


def _from_ours(raw: dict, c: _Checker) -> Manifest:
    c.mapping(raw, "", ("output", "target", "base", "method", "parameters", "terms", "include",
                        "exclude", "tokenizer_source", "push"), ("terms",))
    if ("target" in raw) == ("base" in raw):
        c.fail("target", "give exactly one of `target` or `base`")
    target_key = "target" if "target" in raw else "base"
    target = c.model_ref(raw[target_key], target_key)
    method = raw.get("method", "task_arithmetic")
    if method not in METHODS:
        c.fail("method", f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    out = c.mapping(raw.get("output", {}), "output", ("path", "dtype", "max_shard_size"))
    out_path = None
    if "path" in out:
        if not isinstance(out["path"], str):
            c.fail("output.path", "expected a folder path")
        out_path = join_local(out["path"], c.folder).resolve()
    terms = []
    if not isinstance(raw["terms"], list) or not raw["terms"]:
        c.fail("terms", "expected a non-empty list of terms")
    for i, t in enumerate(raw["terms"]):
        p = f"terms[{i}]"
        c.mapping(t, p, ("vector", "plus", "minus", "model") + TERM_PARAMS)
        kinds = [k for k in ("vector", "model") if k in t] + (["pair"] if "plus" in t or
                                                                "minus" in t else [])
        if len(kinds) != 1:
            c.fail(p, "give exactly one of `vector`, `model`, or `plus` with `minus`")
        if kinds[0] == "pair":
            if "plus" not in t or "minus" not in t:
                c.fail(p, "a pair needs both `plus` and `minus`")
            inputs = (c.model_ref(t["plus"], f"{p}.plus"), c.model_ref(t["minus"], f"{p}.minus"))
        else:
            inputs = (c.model_ref(t[kinds[0]], f"{p}.{kinds[0]}"),)
        params = c.params({k: v for k, v in t.items() if k in TERM_PARAMS}, p, TERM_PARAMS)
        if method in MODEL_METHODS and kinds[0] != "model":
            c.fail(p, f"the {method} method combines models: give `model:` terms")
        terms.append(Term(kinds[0], inputs, params))
    params = c.params(raw.get("parameters"), "parameters", GLOBAL_PARAMS)
    _check_model_method(c, method, terms, params)
    push = raw.get("push")
    if push is not None:
        c.mapping(push, "push", ("repo_id", "private", "revision"), ("repo_id",))
    tok = raw.get("tokenizer_source")
    return Manifest(
        source=c.source, target=target, method=method, terms=tuple(terms), params=params,
        out_path=out_path, out_dtype=c.dtype(out.get("dtype", "auto"), "output.dtype"),
        max_shard_size=str(out.get("max_shard_size", "5GB")),
        include=c.regexes(raw.get("include", []), "include"),
        exclude=c.regexes(raw.get("exclude", []), "exclude"),
        tokenizer_source=None if tok in (None, "target", "base") else c.model_ref(
            tok, "tokenizer_source"),
        push=push, notes=tuple(c.notes))


MERGEKIT_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
                 "out_dtype", "tokenizer_source", "name")
MERGEKIT_UNSUPPORTED = ("modules", "tokenizer", "chat_template")


def _check_model_method(c: _Checker, method: str, terms: list, params: dict) -> None:
    """slerp takes one model besides the target and needs t; model_stock two or more."""
    if method not in ("slerp", "model_stock"):
        return
    need = MODEL_METHODS[method]
    if (method == "slerp" and len(terms) != 1) or len(terms) < need:
        c.fail("models" if c.mergekit else "terms",
               f"{method} needs {'exactly one model' if method == 'slerp' else 'two or more'}"
               " besides the base")
    if method == "slerp" and "t" not in params:
        c.fail("parameters.t", "slerp needs t (0 = the base, 1 = the other model): a number, "
               "a layer gradient or a list of filters")


def _from_slices(raw: dict, c: _Checker) -> tuple[list, tuple[int, int]]:
    """mergekit's `slices` for the common case, one slice whose sources all span the same
    layers: the same as `models:`. The layer range is checked against the models later."""
    slices = raw["slices"]
    if not isinstance(slices, list) or len(slices) != 1:
        c.fail("slices", "only one slice over every layer is supported (layer stacking and "
                         "passthrough merges are not); or use `models:`")
    c.mapping(slices[0], "slices[0]", ("sources",), ("sources",))
    sources = slices[0]["sources"]
    if not isinstance(sources, list) or not sources:
        c.fail("slices[0].sources", "expected a non-empty list of {model, layer_range}")
    ranges = set()
    for i, src in enumerate(sources):
        p = f"slices[0].sources[{i}]"
        c.mapping(src, p, ("model", "layer_range", "parameters"), ("model", "layer_range"))
        lr = src["layer_range"]
        if (not isinstance(lr, list) or len(lr) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in lr) or lr[0] >= lr[1]):
            c.fail(f"{p}.layer_range", "expected [first, end) layer indices, e.g. [0, 28]")
        ranges.add(tuple(lr))
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        c.fail("slices[0].sources", "every source must span the same layers from 0 (layer "
                                    "ranges that differ are frankenmerges, not supported)")
    models = [{k: v for k, v in src.items() if k != "layer_range"} for src in sources]
    return models, next(iter(ranges))


def _from_mergekit(raw: dict, c: _Checker) -> Manifest:
    for key in raw:
        if key in MERGEKIT_UNSUPPORTED:
            c.fail(key, "this mergekit feature is not supported by mergekit-rl; use `models:`")
    c.mergekit = True
    c.mapping(raw, "", MERGEKIT_KEYS, ("merge_method",))
    if ("models" in raw) == ("slices" in raw):
        c.fail("models", "give exactly one of `models` or `slices`")
    layer_range = None
    if "slices" in raw:
        raw = dict(raw)
        raw["models"], layer_range = _from_slices(raw, c)
    method = raw["merge_method"]
    if method not in MERGEKIT_METHODS:
        c.fail("merge_method", f"{method!r} is not supported; supported: "
                               f"{', '.join(MERGEKIT_METHODS)}")
    base = raw.get("base_model")
    if method != "linear" and not base:
        c.fail("base_model", f"{method} needs a base_model")
    base_ref = c.model_ref(base, "base_model") if base else None
    if not isinstance(raw["models"], list) or not raw["models"]:
        c.fail("models", "expected a non-empty list of {model, parameters}")
    terms = []
    for i, m in enumerate(raw["models"]):
        p = f"models[{i}]"
        c.mapping(m, p, ("model", "parameters"), ("model",))
        ref = c.model_ref(m["model"], f"{p}.model")
        params = c.params(m.get("parameters"), f"{p}.parameters", TERM_PARAMS)
        if method != "linear" and ref == base_ref:
            continue  # mergekit: the base model contributes no delta
        if ("weight" not in params and "weight" not in (raw.get("parameters") or {})
                and method not in ("slerp", "model_stock")):
            c.fail(f"{p}.parameters.weight", "missing; mergekit requires a weight per model")
        terms.append(Term("model", (ref,), params))
    if method == "linear" and base_ref is None:
        base_ref = terms[0].inputs[0]  # layout and side files come from the first model
    for key in ("dtype", "out_dtype"):
        if key in raw and raw[key] is not None:
            c.dtype(raw[key], key)
    # mergekit writes out_dtype, else dtype, else what the inputs are; we always compute in fp32.
    out_dtype = raw.get("out_dtype") or raw.get("dtype") or "auto"
    tok = raw.get("tokenizer_source")
    if tok == "union":
        c.fail("tokenizer_source", "'union' is not supported; use 'base' or a model")
    params = c.params(raw.get("parameters"), "parameters", GLOBAL_PARAMS)
    _check_model_method(c, method, terms, params)
    return Manifest(
        source=c.source, target=base_ref, method=method, terms=tuple(terms), params=params,
        out_dtype=c.dtype(out_dtype, "out_dtype"),
        tokenizer_source=None if tok in (None, "base") else c.model_ref(tok, "tokenizer_source"),
        style="mergekit", notes=tuple(c.notes), layer_range=layer_range)


def to_dict(m: Manifest) -> dict:
    """The resolved manifest in our schema (written to the output as merge.yaml)."""

    def plain(v):
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, Cond):
            d = {"match": v.match} if v.match is not None else {"filter": v.filter}
            return {**d, "value": plain(v.value)}
        return v

    terms = []
    for t in m.terms:
        d = ({"vector": t.inputs[0]} if t.kind == "vector" else {"model": t.inputs[0]}
             if t.kind == "model" else {"plus": t.inputs[0], "minus": t.inputs[1]})
        d.update({k: plain(v) for k, v in t.params.items()})
        terms.append(d)
    output = {"dtype": m.out_dtype, "max_shard_size": m.max_shard_size}
    if m.out_path:
        output = {"path": str(m.out_path), **output}
    out = {"output": output,
           "target": m.target, "method": m.method,
           "parameters": {k: plain(v) for k, v in m.params.items()}, "terms": terms}
    if m.include:
        out["include"] = list(m.include)
    if m.exclude:
        out["exclude"] = list(m.exclude)
    if m.tokenizer_source:
        out["tokenizer_source"] = m.tokenizer_source
    if m.push:
        out["push"] = m.push
    return out
