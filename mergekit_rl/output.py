"""Atomic output folders: results appear whole under their final name or not at all.

Work happens in a hidden temporary sibling (same filesystem, so the final rename is atomic);
a failure or interrupt removes it; an existing output is replaced only with `overwrite` and only
after the new one is complete. Outputs that would overlap an input are refused up front.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse an output that exists (without overwrite) or overlaps an input folder."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        src_dir = src if src.is_dir() else src.parent
        if out == src_dir or src_dir in out.parents or out in src_dir.parents:
            raise OutputError(f"output {out} overlaps input {src_dir}; choose a folder outside "
                              "every input")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder; remove it first")
    if not out.parent.exists():
        raise OutputError(f"output parent folder {out.parent} does not exist; create it first")
    return out


def _remove_stale(out: Path) -> None:
    """Remove temporaries left by killed runs for the same output (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the block finishes without error."""
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
