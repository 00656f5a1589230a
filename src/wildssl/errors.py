"""User-facing errors: one line naming what is wrong, where, and what would be right.

The CLI prints ``str(error)`` and exits with status 2; no traceback is shown for these.
"""


class WildsslError(Exception):
    """Base class of every error meant for the user rather than for a developer."""


class DataError(WildsslError):
    """A data source is missing, empty, malformed, or cannot be read."""


class ConfigError(WildsslError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(WildsslError):
    """A checkpoint is missing, corrupt, or does not match the model."""
