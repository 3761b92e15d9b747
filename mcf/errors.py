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
