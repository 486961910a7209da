"""Exception types the trainers raise for things a user can fix.

They are the tool's `MergekitRLError`s, so every command line turns them into a one-line message
and an exit code by the same policy (`mergekit_rl.console.user_errors`); library code never
prints.
"""

from __future__ import annotations

from mergekit_rl.errors import Interrupted, MergekitRLError


class TrainerError(MergekitRLError):
    """Base class of the trainers' own errors."""


class TrainerConfigError(TrainerError, ValueError):
    """A config file, a `--set` override or the data it points to is invalid.

    The message names the file, the field (dotted path) and what was expected.
    """


class NonFiniteLossError(TrainerError):
    """The loss or the gradient norm became NaN or Inf; the message names the step."""


class TrainingInterrupted(TrainerError, Interrupted):
    """SIGINT/SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, message: str, signum: int, checkpoint: str):
        Interrupted.__init__(self, message, signum)
        self.checkpoint = checkpoint


class OutOfMemory(TrainerError):
    """The accelerator ran out of memory in a step; the message names the step, the micro-batch
    size and what to lower."""
