"""Exceptions for mistakes a user can fix.

Every error here is printed by the command-line front ends as a single line
(no traceback), so its message must name the offending input, its value and
what would be accepted instead.
"""

from __future__ import annotations

from typing import Iterator


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


class ArtifactError(SfMlflowError, ValueError):
    """A file a run logged (or a model file passed in) is missing, truncated or not ours.

    ``path`` is the local file that was read, when there is one, and ``problem`` what was
    wrong with it in a few words; the command line uses them to name the run and artifact
    the file was downloaded from (:func:`sf_mlflow.tracking.lineage.explain_artifact_error`).
    """

    def __init__(self, message: str, path=None, problem: str | None = None):
        super().__init__(message)
        self.path = path
        self.problem = problem


class StoreError(SfMlflowError, RuntimeError):
    """The MLflow tracking store cannot be used: locked by another writer, read-only, full."""


class ModelFileError(ArtifactError, ModelError):
    """A model or checkpoint file cannot be loaded (a :class:`ModelError` too, as before)."""


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first.

    Libraries wrap one underlying failure (a refused connection, a locked database) in their
    own exceptions, often only as text, so what a failure is must be read from every link.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
