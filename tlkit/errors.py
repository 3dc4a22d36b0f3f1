"""Exceptions tlkit raises for problems a user can fix.

Every message names the argument or file at fault and what would fix it. The CLI prints
these without a traceback; anything else is a bug in tlkit.
"""


class TlkitError(Exception):
    """Base class of the errors tlkit raises for bad input or settings."""


class ConfigError(TlkitError, ValueError):
    """A setting is invalid: names the setting and the value received."""


class DataError(TlkitError):
    """A data folder cannot be used for training (missing, empty, one class, ...)."""


class ImageError(TlkitError):
    """One image file cannot be decoded. `path` and `reason` say which and why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ExportError(TlkitError):
    """An export cannot be written or read."""


class WeightsError(TlkitError):
    """Backbone weights cannot be loaded or downloaded."""


class ClusterError(TlkitError):
    """A multi-worker run cannot go on: a worker died, stopped answering, or differs."""
