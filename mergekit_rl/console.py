"""What every `mergekit-rl` command line shares: one-line logging, the one error policy, and the
console group that composes the commands of the tool, the trainers and the experiment.

The CLIs (`mergekit_rl.cli`, `trainers.cli`, `reasoning_demo.cli`) are the only code that prints
or exits, and all of them turn errors into exit codes here, by one rule: a user mistake (an
error type of ours, or an operating-system error about a path: missing, not allowed, read-only,
disk full) becomes one line and exit 1; Ctrl-C and SIGTERM exit 128 + the signal number; any
other exception is a bug and keeps its traceback.

Composition: the tool's library code imports neither the trainers nor the experiment. Their
command groups are entry points (`[project.entry-points."mergekit_rl.commands"]` in
pyproject.toml) that `PluginGroup` lists by name and imports only when one is run or its help
is shown, so `mergekit-rl add ...` never imports the training stack, and installing the tool
without the trainers simply leaves their commands out.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import shlex
import signal
import sys
from collections.abc import Iterator

import click

from .errors import Interrupted, MergekitRLError

ENTRY_POINTS = "mergekit_rl.commands"

# Operating-system errors that describe the user's files or disk, not our code.
USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                         errno.EDQUOT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EIO,
                         errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EXDEV, errno.EFBIG})


class OneLine(logging.Formatter):
    """`warning: message`: log records as the one-line messages users read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup_logging(name: str, quiet: bool, verbose: bool = False, default=logging.WARNING,
                  main_process: bool = True) -> None:
    """Send logger `name` to stderr as one-line messages: errors only with `quiet`, debug with
    `verbose`, warnings and errors on processes other than the main one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    level = logging.DEBUG if verbose else default
    logger.setLevel(logging.ERROR if quiet else level if main_process else logging.WARNING)
    logger.propagate = False


def tune_malloc() -> None:
    """Keep freed tensor blocks in the heap for reuse (glibc): without this every block is a
    fresh mmap whose pages fault in again, which cost more than the arithmetic. Process-wide,
    so only the CLI (which owns the process) does it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: do not hand the heap top back
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    except (OSError, AttributeError):
        pass  # not glibc: defaults are fine, only slower


def tool_logging(quiet: bool, verbose: bool = False) -> None:
    """The weight commands' process set-up: the allocator tuned, `mergekit_rl` logging."""
    import gc

    tune_malloc()
    # The ~1M objects torch creates at import live as long as the process: out of the garbage
    # collector's sight, its full passes (during a run and at exit) stop re-scanning them.
    gc.freeze()
    setup_logging("mergekit_rl", quiet, verbose)


def command_line() -> str:
    """The invoked command in canonical form (arguments, then options that differ from their
    defaults), for provenance and model cards."""
    ctx = click.get_current_context()
    words = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif value not in (param.default, None, ()) and not (param.is_flag and not value):
            flag = max(param.opts, key=len)
            values = value if param.multiple else [value]
            for v in values:
                words += [flag] if param.is_flag else [flag, str(v)]
    return shlex.join(words)


def one_line(error: BaseException) -> str | None:
    """The message of a user mistake, or None when `error` is a bug (it keeps its traceback)."""
    if isinstance(error, MergekitRLError):
        return str(error)
    if isinstance(error, OSError) and error.errno in USER_ERRNOS:
        cause = error.strerror or str(error)
        if error.filename is None:
            return cause
        where = error.filename if error.filename2 is None else \
            f"{error.filename} -> {error.filename2}"
        return f"{where}: {cause}"
    return None


@contextlib.contextmanager
def user_errors(interrupted: str = "no output was written", where: str | None = None,
                sections: tuple[str, ...] = ()) -> Iterator[None]:
    """The one error policy of every command (see the module docstring).

    `interrupted` is what Ctrl-C leaves behind. A message that starts with one of `sections`
    (a config's top-level keys, e.g. `train.batch_size: ...`) is prefixed with `where` (the
    config file) unless it already names it.
    """
    try:
        yield
    except Interrupted as e:
        click.echo(f"interrupted: {e}", err=True)
        sys.exit(128 + int(e.signum))
    except KeyboardInterrupt:
        click.echo(f"interrupted: {interrupted}", err=True)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        message = one_line(e)
        if message is None:
            raise
        head = message.split(".")[0].split(":")[0]
        if where and str(where) not in message and head in sections:
            message = f"{where}: {message}"
        raise click.ClickException(message) from None


def errors_to_exit(fn=None, **policy):
    """`user_errors` as a decorator for a click command's callback."""
    if fn is None:
        return functools.partial(errors_to_exit, **policy)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with user_errors(**policy):
            return fn(*args, **kwargs)

    return wrapper


class PluginGroup(click.Group):
    """A click group whose commands besides its own come from the `mergekit_rl.commands` entry
    points, imported only when a command is looked up (run, or listed in `--help`)."""

    def _plugins(self) -> dict:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in (plugins := self._plugins()):
            command = plugins[name].load()
            self.add_command(command, name)
        return command
