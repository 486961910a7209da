"""Compiled kernels: C loops for reductions that torch has no single pass for.

`pair_sums` is `compare`'s reduction of a block (⟨a,b⟩, ‖a‖², ‖b‖², the sign counts), one pass
over bfloat16 or float32 entries where torch took about eight (widen, a Gram product, four for
the signs). Its source, `_pair_sums.c`, ships with the package and is built on first use with
the machine's C compiler (`$CC`, else Python's, else `cc`), with AVX2 and a portable version
chosen at run time on x86-64 Linux. The library is cached by a hash of the source, the compiler
and the flags in `$MERGEKIT_RL_CACHE/kernels/` (default `~/.cache/mergekit_rl`), written to a
temporary file and renamed, so processes building at once each get a whole one (a build takes
about half a second). No compiler, a failed build or `MERGEKIT_RL_NATIVE=0`: `available()` is
False and callers take their torch path (the same values within float32 rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from . import cache_root

SOURCE = Path(__file__).with_name("_pair_sums.c")
FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared")
BUILD_TIMEOUT_S = 120
_TYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}

_lock = threading.Lock()
_state: dict = {}  # "lib" → the loaded library or None, "why" → why not


def compiler() -> list[str] | None:
    """The C compiler's command: $CC when set, else the one Python was built with, else cc;
    None when it is not on PATH."""
    specs = [os.environ["CC"]] if os.environ.get("CC") else \
        [sysconfig.get_config_var("CC") or "", "cc"]
    for spec in specs:
        cmd = shlex.split(spec)
        if cmd and shutil.which(cmd[0]):
            return cmd
    return None


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("MERGEKIT_RL_NATIVE", "").strip().lower() in ("0", "false", "no", "off"):
        return None, "MERGEKIT_RL_NATIVE=0"
    cc = compiler()
    if cc is None:
        return None, "no C compiler on PATH (set CC)"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, *(a.encode() for a in (*cc, *FLAGS)),
                                     platform.machine().encode(), sys.platform.encode()]))
    lib = cache_root() / "kernels" / f"pair_sums-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=".build-", suffix=".so")
            os.close(fd)
            try:
                done = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                                      text=True, timeout=BUILD_TIMEOUT_S, check=False)
                if done.returncode:
                    return None, f"{' '.join(cc)} failed: {done.stderr.strip()[-300:]}"
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"cannot build {lib}: {e}"
    try:
        loaded = ctypes.CDLL(str(lib))
    except OSError as e:
        return None, f"cannot load {lib}: {e}"
    for kind in _TYPES.values():
        fn = getattr(loaded, f"mkrl_pair_sums_{kind}")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p]
    return loaded, ""


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _build()
        return _state["lib"]


def available() -> bool:
    """Whether the compiled kernels can be used (built or loaded now, once per process)."""
    return _library() is not None


def why_not() -> str:
    """Why `available()` is False ("" when it is True)."""
    _library()
    return _state["why"]


def reset() -> None:
    """Forget the loaded library, so the next call builds or loads it again (tests)."""
    with _lock:
        _state.clear()


def native_dtype(dtype: torch.dtype) -> bool:
    return dtype in _TYPES


def pair_sums(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None = None
              ) -> tuple[float, float, float, int, int]:
    """(⟨x,y⟩, ‖x‖², ‖y‖², #same sign, #opposite sign) of x = a − base and y = b − base (or of
    a and b), entries where x or y is zero counting for neither: contiguous CPU tensors of one
    dtype (bfloat16 or float32) and size. The call lets go of the GIL, so threads run it side
    by side. Requires `available()`."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the compiled kernels are not available: {why_not()}")
    inputs = (a, b) if base is None else (a, b, base)
    for t in inputs:
        if (t.dtype != a.dtype or t.numel() != a.numel() or t.device.type != "cpu"
                or not t.is_contiguous()):
            raise ValueError("pair_sums takes contiguous CPU tensors of one dtype and size")
    fn = getattr(lib, f"mkrl_pair_sums_{_TYPES[a.dtype]}")
    out = (ctypes.c_double * 5)()
    fn(a.data_ptr(), b.data_ptr(), None if base is None else base.data_ptr(), a.numel(), out)
    return out[0], out[1], out[2], int(out[3]), int(out[4])
