"""The one reader of the YAML files users write (manifests, trainer configs) and the one
`--set key.path=value` override, for the tool and the trainers alike.

PyYAML reads YAML 1.1, where `1e-1` is a string; researchers write YAML 1.2 numbers, so the
loader adds YAML 1.2's float forms. A syntax error is one line with the file, line and column.
An override's value is parsed the same way, and an error about a value that an override set is
reported against that `--set` (`override_for`, `override_message`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) with YAML 1.2's numbers: `1e-1` and `1.0e5` are floats,
    not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str | Path | None = None, error: type = ConfigError) -> Any:
    """YAML text → data; a syntax error is one line with the file, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source or '<text>'}" + (f":{mark.line + 1}:{mark.column + 1}" if mark else "")
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise error(f"{where}: invalid YAML ({problem}" + (f", {context}" if context else "")
                    + ")") from None


def read_yaml(path: Path, what: str, error: type = ConfigError) -> Any:
    """Read a YAML file (`what`: "manifest", "config file") with `parse_yaml`."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; give the {what} file") from None
    return parse_yaml(text, path, error)


def dotted(key: str) -> str:
    """`terms[0].weight` → `terms.0.weight` (the form `--set` uses)."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def override_for(key: str, overrides: list[str]) -> str | None:
    """The `--set` item that set `key` (or a mapping holding it); None when the file did."""
    key = dotted(key)
    for item in reversed(overrides):
        target = item.partition("=")[0]
        if key == target or key.startswith(target + "."):
            return item
    return None


def override_message(item: str, key: str, reason: str) -> str:
    """`--set KEY=VALUE: reason`, naming the field when it lies inside the value that was set."""
    inner = dotted(key) != item.partition("=")[0]
    return f"--set {item}: " + (f"{key}: " if inner else "") + reason


def apply_override(raw: Any, item: str, source: Path | None = None, resolve=None) -> Any:
    """`--set terms.0.weight=0.5`: set a value at a dotted key path of mappings and list
    indices. The value is parsed as YAML with YAML 1.2's numbers (`1e-1` is 0.1); text that is
    not YAML stays a string. Missing or null sections are created. `resolve(key, value)` may
    rewrite the value (command-line paths). The trainers' `--set` uses this too."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        value = yaml.load(text, Loader=_Loader) if text else None  # noqa: S506
    except yaml.YAMLError:
        value = text
    if resolve is not None:
        value = resolve(key, value)
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:i + 1])} is not an index of "
                                  f"a list of {len(node)} in {source}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {item}: {'.'.join(parts[:i])} is not a mapping in "
                              f"{source}")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
    return raw
