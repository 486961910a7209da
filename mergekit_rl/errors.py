"""Exception types for user mistakes.

Library code raises these with a message that names the file, tensor or field and the remedy;
only the CLI turns them into one-line messages and exit codes.
"""


class MergekitRLError(Exception):
    """Base class: a problem the user can fix (bad input, mismatch, existing output)."""


class CheckpointError(MergekitRLError):
    """A checkpoint folder or file is missing, unreadable, corrupt or inconsistent."""


class MismatchError(MergekitRLError):
    """Two checkpoints do not line up (names, shapes, dtype kinds, vocabulary)."""


class OutputError(MergekitRLError):
    """The output location is not allowed (exists, inside an input, ...)."""


class NonFiniteError(MergekitRLError):
    """Arithmetic produced NaN or Inf in an output tensor."""


class ConfigError(MergekitRLError):
    """A manifest or config file is invalid."""


class HubError(MergekitRLError):
    """The Hugging Face Hub could not give what was asked for."""


class DependencyError(MergekitRLError):
    """An optional dependency is missing; the message says what to install."""


class Interrupted(MergekitRLError):
    """SIGINT/SIGTERM stopped a command after it saved what it could; exit code 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
