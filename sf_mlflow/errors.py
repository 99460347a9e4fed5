"""Exceptions for mistakes a user can fix.

Every error here is printed by the command-line front ends as a single line
(no traceback), so its message must name the offending input, its value and
what would be accepted instead.
"""


class SfMlflowError(Exception):
    """Base class of user-facing errors: bad configuration, data or run IDs."""


class ConfigError(SfMlflowError, ValueError):
    """A configuration file or override is invalid."""


class DataError(SfMlflowError, ValueError):
    """Input data are missing, malformed or empty after filtering."""


class RunLookupError(SfMlflowError, LookupError):
    """An upstream MLflow run does not exist or belongs to another stage."""


class ModelError(SfMlflowError, RuntimeError):
    """The model cannot be fitted or evaluated with the given settings."""
