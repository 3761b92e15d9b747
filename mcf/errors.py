"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input: a bad flag, config key, path or value.

    The CLI prints ``mcf: error: <message>`` and exits with status 2; library callers get an
    ordinary exception they can catch.
    """


class ConfigError(UserError, ValueError):
    """An invalid configuration key or value."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or of an unknown layout."""


class DataError(UserError):
    """A data source that is missing, empty, or too corrupt to train on."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that holds something other than weights: loading it could run code."""


class StorageError(UserError):
    """A file or folder that cannot be written: no space left, no permission, a file where a folder should be."""


class RunLockedError(UserError):
    """The output folder is in use by another run (its lock is held and alive)."""


class TrackingError(UserError):
    """An experiment tracker (MLflow) that cannot be reached or used at the start of a run."""
