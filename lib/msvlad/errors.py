"""The expected failures: bad input the user can fix, told in one line by the command line.

Every error raised because of a file, a parameter, a folder or a dataset the user gave is an
`InputError` (a ValueError, so callers that catch ValueError keep working). `msvlad.cli` prints
it as `msvlad <command>: error: <file or parameter>: <what is wrong>` and exits with status 2; any
other exception is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """A file, parameter, folder or dataset is wrong; the message starts with what it names."""


class CheckpointError(InputError):
    """A model or checkpoint file is unreadable, corrupt (checksum) or does not fit its config."""


class RunConflictError(InputError):
    """A run folder holds a run made with other parameters (resume refused, nothing touched)."""


class Interrupted(Exception):  # noqa: N818 - a stop the user asked for, not an error
    """SIGTERM or SIGINT stopped a command after it saved its state; exit status 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
