"""Exception types the trainers raise for things a user can fix.

The CLI turns each into a one-line message and an exit code; library code never prints.
"""

from __future__ import annotations


class TrainerError(Exception):
    """Base class of the trainers' own errors."""


class TrainerConfigError(TrainerError, ValueError):
    """A config file, a `--set` override or the data it points to is invalid.

    The message names the file, the field (dotted path) and what was expected.
    """


class NonFiniteLossError(TrainerError):
    """The loss or the gradient norm became NaN or Inf; the message names the step."""


class TrainingInterrupted(TrainerError):
    """SIGINT/SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, message: str, signum: int, checkpoint: str):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
