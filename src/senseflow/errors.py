"""The errors senseflow explains in one line, and the exit code the command line gives each.

``senseflow`` prints ``error: <message>`` for these (and for any ``ValueError`` or missing file it
meets while reading what the user gave), with the traceback only under ``--debug`` or
``SENSEFLOW_DEBUG=1``. Exit codes: 2 for a bad command line, recipe, file or folder given by the user
(nothing was run), 1 for a failure while running, :data:`PREEMPTED` when a signal stopped training
after it wrote a checkpoint.
"""

from __future__ import annotations

USAGE = 2
RUNTIME = 1
#: ``senseflow train`` stopped by SIGTERM or SIGINT after writing a checkpoint (EX_TEMPFAIL: try again).
PREEMPTED = 75


class SenseflowError(Exception):
    """An error with a message meant for the user; ``exit_code`` is what ``senseflow`` returns."""

    exit_code = RUNTIME


class UsageError(SenseflowError, ValueError):
    """A bad argument, file or folder given on the command line; nothing has been written."""

    exit_code = USAGE


class RunFolderError(UsageError):
    """The run folder holds an earlier run and the command line does not say what to do with it."""


class CheckpointError(SenseflowError):
    """A checkpoint that is incomplete, corrupt or of another kind than expected."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, read-only folder, permission denied)."""


class Preempted(SenseflowError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; ``--resume`` continues it."""

    exit_code = PREEMPTED
