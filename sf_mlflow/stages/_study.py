"""Optuna storages for the tune stage: database URLs, drivers and trial heartbeats.

A study lives in an RDB storage (sqlite for one machine, PostgreSQL for many). Workers
that start together may race to create its tables, and a worker that dies leaves its
trial RUNNING; the heartbeat and :class:`optuna.storages.RetryFailedTrialCallback` turn
such a trial into FAIL and retry it once.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from typing import Any

from sf_mlflow.errors import ConfigError

__all__ = ["redact", "with_driver", "heartbeat_settings", "make_storage",
           "HEARTBEAT_ENV", "GRACE_ENV"]


def redact(url: str) -> str:
    """A storage URL without its password, for logs and params."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: nothing to hide
        return url


def with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; the dev extras install
    psycopg2 (``psycopg2-binary``), so a bare URL uses it when psycopg 3 is absent.
    """
    import importlib.util

    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            if importlib.util.find_spec("psycopg") is not None:
                return "postgresql+psycopg://" + url[len(bare):]
            if importlib.util.find_spec("psycopg2") is not None:
                return "postgresql+psycopg2://" + url[len(bare):]
            raise ConfigError(f"storage {redact(url)!r} needs a PostgreSQL driver: "
                              "pip install psycopg2-binary (or psycopg[binary])")
    return url


HEARTBEAT_ENV = "SF_OPTUNA_HEARTBEAT_INTERVAL"
GRACE_ENV = "SF_OPTUNA_GRACE_PERIOD"


def heartbeat_settings() -> tuple[int, int]:
    """Seconds between a running trial's heartbeats, and without one before it is failed."""
    def seconds(name: str, default: int) -> int:
        try:
            value = int(float(os.environ.get(name, default)))
        except ValueError:
            return default
        return value if value > 0 else default

    interval = seconds(HEARTBEAT_ENV, 60)
    return interval, seconds(GRACE_ENV, 4 * interval)


def make_storage(url: str):
    """Optuna RDB storage with trial heartbeats; sqlite gets a generous busy timeout for
    concurrent workers."""
    import optuna

    interval, grace = heartbeat_settings()
    url = with_driver(url)
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        kwargs = {"pool_pre_ping": True}
    last = None
    # Workers starting at the same moment may race to create the tables of a fresh
    # database; the loser sees an error from the table creation and simply retries.
    for attempt in range(8):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=interval, grace_period=grace,
                    failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
        except ImportError as err:
            raise ConfigError(f"storage {redact(url)!r} needs a database driver that is not "
                              f"installed: {err}") from None
        except Exception as err:  # sqlalchemy / optuna errors of table creation
            if "Could not parse" in str(err) or "Can't load plugin" in str(err):
                raise ConfigError(f"storage = {redact(url)!r} is not a valid database URL "
                                  "(e.g. sqlite:///optuna.db or "
                                  "postgresql://user@host:5432/db): " + str(err)) from None
            last = err
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise ConfigError(f"cannot open the Optuna storage {redact(url)}: {last}") from None
