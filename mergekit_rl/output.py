"""Atomic output folders: results appear whole under their final name or not at all.

Work happens in a hidden temporary sibling `.OUT.tmp-PID-ID` (same filesystem, so publishing
it is a rename). The run holds an advisory lock (`flock`) on that folder for as long as it
lives, so the kernel says which leftovers belong to a dead run, whatever its PID became.

- A failure, Ctrl-C or SIGTERM removes the temporary folder. SIGKILL cannot be caught: it
  leaves an unlocked `.OUT.tmp-*`, which the next run for OUT removes (`clean_leftovers`).
- `--overwrite`: the old output stays whole under its name until the new one is complete; then
  the two are swapped in one step (`renameat2(RENAME_EXCHANGE)`) and the old one, now under the
  temporary name, is removed with SIGINT/SIGTERM held back. Where the filesystem cannot swap,
  the old output is first renamed to `.OUT.old-PID-ID` (locked); a run killed between the two
  renames leaves OUT missing and that folder whole, and the next run puts it back.
- Writing errors (disk full, read-only, no permission) become one line naming OUT and the cause.
- Outputs that would overlap an input are refused up front.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import Interrupted, OutputError

log = logging.getLogger(__name__)

# Errors that only writing produces: whatever file they name, they are about the output.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
# Errors that are about the output when they name a file inside it.
OUTPUT_ERRNOS = WRITE_ERRNOS | {errno.EACCES, errno.EPERM, errno.EIO, errno.ENAMETOOLONG}
SPACE_MARGIN = 1 << 20  # side files, card, provenance


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse an output that exists (without overwrite), overlaps an input folder or cannot be
    written; clean what killed runs left for it first. Returns the absolute path."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        src_dir = src if src.is_dir() else src.parent
        if out == src_dir or src_dir in out.parents or out in src_dir.parents:
            raise OutputError(f"output {out} overlaps input {src_dir}; choose a folder outside "
                              "every input")
    if not out.parent.is_dir():
        raise OutputError(f"output parent folder {out.parent} does not exist; create it first")
    _check_writable(out)
    clean_leftovers(out)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder; remove it first")
    return out


def _check_writable(out: Path) -> None:
    parent = out.parent
    if os.access(parent, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    cause = "read-only file system" if read_only else "permission denied"
    raise OutputError(f"cannot write output {out}: {parent} is not writable ({cause}); choose "
                      "another folder with -o")


def check_space(out: Path, nbytes: int) -> None:
    """Refuse before reading anything when the output's filesystem cannot hold `nbytes`."""
    free = shutil.disk_usage(out.parent).free
    if free < nbytes + SPACE_MARGIN:
        raise OutputError(f"cannot write output {out}: it needs {_size(nbytes)} but its file "
                          f"system has {_size(free)} free; free some space or choose another "
                          "folder with -o")


def _size(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


# ---- locks and leftovers ---------------------------------------------------------------------

def _lock(folder: Path) -> int | None:
    """An fd holding an exclusive flock on `folder`; None when another process holds it.
    Raises OSError when the folder is gone."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # no flock on this filesystem: decide by the PID in the name
        os.close(fd)
        return -1
    return fd


def _pid_alive(name: str) -> bool:
    try:
        pid = int(name.rsplit("-", 2)[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _claim(folder: Path) -> int | None:
    """Lock a leftover when no live run owns it; None when one does (or it vanished)."""
    try:
        fd = _lock(folder)
    except OSError:
        return None
    if fd == -1:
        return None if _pid_alive(folder.name) else -1
    return fd


def _release(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def clean_leftovers(out: Path) -> None:
    """Remove what killed runs left beside `out` (unlocked `.OUT.tmp-*`); put back an old output
    that a run killed in the middle of replacing it left as `.OUT.old-*` while OUT is missing."""
    out = Path(out)
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        fd = _claim(old)
        if fd is None:
            continue
        try:
            if not os.path.lexists(out):
                os.rename(old, out)
                log.warning("restored %s from %s (a run was killed while replacing it)", out,
                            old.name)
            else:
                _remove_tree(old)
                log.warning("removed %s, left by a run that was killed", old)
        finally:
            _release(fd)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        fd = _claim(tmp)
        if fd is None:
            continue
        try:
            _remove_tree(tmp)
            log.warning("removed %s, left by a run that was killed", tmp)
        finally:
            _release(fd)


def _remove_tree(path: Path) -> None:
    with _signals_held():
        shutil.rmtree(path, ignore_errors=True)


# ---- signals -----------------------------------------------------------------------------------

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of acting on them (the list says which came), so a short
    critical step (swapping folders, removing one) is never cut in half."""
    got: list[int] = []
    if not _in_main_thread():
        yield got
        return
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: set outside Python, leave it alone
            previous[signum] = signal.signal(signum, lambda s, _frame: got.append(s))
    try:
        yield got
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM (`kill PID`, a scheduler's stop) raises Interrupted like Ctrl-C raises
    KeyboardInterrupt, so the temporary folder is removed instead of left behind."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, _frame):
        raise Interrupted("terminated (SIGTERM): no output was written", signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---- the atomic folder -------------------------------------------------------------------------

def _make_temporary(out: Path) -> tuple[Path, int | None]:
    while True:
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot write output {out}: {e.strerror} ({out.parent}); choose "
                              "another folder with -o") from None
        try:
            fd = _lock(tmp)
        except OSError:
            continue  # a cleaner removed it before we locked it: take another name
        if fd is not None:
            return tmp, (fd if fd >= 0 else None)


def output_error(e: OSError, out: Path, tmp: Path) -> OutputError | None:
    """The one-line error for an OSError raised while writing into `tmp` (for `out`), or None
    when it is not about the output (an input's error keeps its own message)."""
    names = [Path(os.fsdecode(f)) for f in (e.filename, e.filename2) if f is not None]
    inside = [p for p in names if p == tmp or tmp in p.parents]
    if e.errno not in WRITE_ERRNOS and not (inside and e.errno in OUTPUT_ERRNOS):
        return None
    what = f" ({inside[0].relative_to(tmp)})" if inside and inside[0] != tmp else ""
    cause = e.strerror or os.strerror(e.errno)
    return OutputError(f"cannot write output {out}{what}: {cause}; nothing was written (free "
                       "space, or choose another folder with -o)")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Put the complete `tmp` at `out`; an existing `out` stays whole until then, and is
    removed afterwards."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        _remove_tree(tmp)  # now the old output
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = _lock(out)  # locked, so no other run takes it for a leftover meanwhile
    try:
        os.rename(out, old)
        os.rename(tmp, out)
        _remove_tree(old)
    finally:
        _release(fd)


@contextlib.contextmanager
def atomic_folder(out: Path, nbytes: int = 0) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the block finishes without error.

    `nbytes` is what the block will write (checked against the free space first). OSErrors of
    writing become `OutputError`s naming `out`; anything that escapes removes the folder.
    """
    out = Path(out)
    clean_leftovers(out)
    check_space(out, nbytes)
    tmp, fd = _make_temporary(out)
    try:
        with _terminate_raises():
            try:
                yield tmp
            except OSError as e:
                error = output_error(e, out, tmp)
                if error is None:
                    raise
                raise error from None
        with _signals_held() as got:
            _publish(tmp, out)
        if got:
            raise Interrupted(f"stopped after {out} was written (it is complete)", got[0])
    except BaseException:
        if os.path.lexists(tmp):
            _remove_tree(tmp)
        raise
    finally:
        _release(fd)
