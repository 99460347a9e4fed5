"""One MLflow run per pipeline stage: creation, params, batched metrics, artifacts, status.

:func:`stage_run` is the only way stages talk to MLflow. It attaches to the run
that ``mlflow run`` created (``MLFLOW_RUN_ID``) or creates one in the config's
experiment (see :mod:`sf_mlflow.tracking.experiments`), and it always ends the run: FINISHED on success, KILLED on an
interrupt, FAILED on any error, so no run is ever left RUNNING. Artifacts are
logged by the stage only once its outputs are complete, so a failed run never
presents half-written results.

Interrupts (SIGINT, SIGTERM, SIGHUP) end every open run KILLED and the CLI exits 130
(:mod:`~sf_mlflow.tracking.interrupts`). The fit's
:class:`~sf_mlflow.stages._signals.StopRequests` overrides those handlers while it runs
(stop at the next iteration, log a checkpoint) and restores them.
A tracking server that goes away: :mod:`~sf_mlflow.tracking.outage` and
:mod:`~sf_mlflow.tracking.journal`.
A process killed outright (SIGKILL) cannot end its runs: the heartbeat of
:mod:`sf_mlflow.tracking.liveness` lets the next lookup see that and end them FAILED.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sf_mlflow.provenance import code_version, git_commit
from sf_mlflow.tracking.liveness import liveness_tags, start_heartbeat, stop_heartbeat
from sf_mlflow.tracking.metric_stream import MetricStream, series
from sf_mlflow.tracking.interrupts import (
    note_caught,
    release_interrupted_connections,
    signals_held,
    signals_interrupt,
)
from sf_mlflow.tracking.journal import Journal, end_kept
from sf_mlflow.tracking.outage import (
    ServerAway,
    check_server,
    is_server,
    note_away,
    patiently,
    quick_requests,
    since_text,
    unreachable,
)
from sf_mlflow.tracking.experiments import (
    _ACTIVE,
    TAG_LAUNCHER_RUN,
    TAG_REDIRECTED_EXPERIMENT,
    TAG_REDIRECTED_RUN,
    Launcher,
    describe_experiment,
    experiment_id_for,
    launcher,
    mark_model_training,
)

#: Tag keys written on every stage run.
TAG_STAGE = "sf.stage"
TAG_DATASET = "sf.dataset"
TAG_MODEL = "sf.model"
TAG_CONFIG_HASH = "sf.config_hash"
TAG_PREPROCESS_HASH = "sf.preprocess_hash"
TAG_UPSTREAM = "sf.upstream_run_id"
TAG_STAGE_HASH = "sf.stage_hash"
#: "false" on a run whose work stopped short (e.g. a pruned tuning trial): never reused.
TAG_REUSABLE = "sf.reusable"
TAG_RESUMED_FROM = "sf.resumed_from"
#: "true" on a train run stopped by SIGINT/SIGTERM that logged a checkpoint.
TAG_INTERRUPTED = "sf.interrupted"
#: "true"/"false" on a finished train run: did the fit meet its stopping rule before max_iter.
TAG_CONVERGED = "sf.converged"
#: "true" on a train run whose ELBO became non-finite; it logged the last finite state.
TAG_DIVERGED = "sf.diverged"
TAG_CODE_VERSION = "sf.code_version"
TAG_GIT_COMMIT = "sf.git_commit"

_BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
_PARAM_BATCH = 100  # ... and at most 100 params


_CHECKED_SERVERS: set[str] = set()


def configure_tracking() -> str:
    """Use ``MLFLOW_TRACKING_URI`` when set, else sqlite ``mlflow.db`` in the working directory."""
    # Artifact progress bars would interleave with the stages' own progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if is_server(uri):
        # MLflow's own retries (7, with backoff: minutes) would hold a fit on every write
        # while a server is away; the writes wait for it themselves (tracking.outage)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        if uri not in _CHECKED_SERVERS:
            check_server(uri)
            _CHECKED_SERVERS.add(uri)
    from sf_mlflow.tracking.store import quiet_translated_failures

    # a locked or read-only store is reported in one line (sf_mlflow.tracking.store), not
    # also by MLflow's own ERROR log with a traceback
    quiet_translated_failures()
    _initialise_sqlite_store(uri)
    return uri


@contextlib.contextmanager
def reading_store(tracking_uri: str | None = None) -> Iterator[str]:
    """Read runs from ``tracking_uri`` (else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``)
    inside the block, and never create a store doing so.

    A sqlite store that does not exist is an error naming the file and how to point at the
    right one, not a new empty ``mlflow.db`` in whatever folder the reader happens to be in.
    The previous tracking URI is restored on the way out.
    """
    from sf_mlflow.errors import RunLookupError
    from sf_mlflow.tracking.store import sqlite_path

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri or env_before or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        given = "tracking_uri" if tracking_uri else (
            "MLFLOW_TRACKING_URI" if env_before else "the default store (./mlflow.db)")
        raise RunLookupError(
            f"no tracking store at {path.resolve()} ({given}); point at the store that holds "
            "the runs: --tracking-uri sqlite:////absolute/path/to/mlflow.db (tracking_uri= in "
            "Python) or set MLFLOW_TRACKING_URI")
    uri_before = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
        mlflow.set_tracking_uri(uri_before)


def ui_command(experiment_id: str | None = None,
               run_id: str | None = None) -> tuple[str, str | None]:
    """How to look at the tracking store in use: the command that starts the MLflow UI on
    it (for a tracking server, its address) and the UI's page of a run or experiment."""
    from sf_mlflow.tracking.experiments import ML_VIEW, ui_address, ui_port

    host, server = ui_address()
    page = ""
    if experiment_id:
        page = (f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
                + f"?{ML_VIEW}")
    if server:
        return f"open {host}", (host + "/" + page) if page else None
    uri = mlflow.get_tracking_uri()
    return (f"mlflow ui --backend-store-uri {shlex.quote(uri)} --port {ui_port()}",
            host + "/" + page)


_INITIALISED: set[str] = set()


def _initialise_sqlite_store(uri: str) -> None:
    """Create (or migrate) a sqlite store under a file lock, once per process.

    Two pipelines started at once on a new ``mlflow.db`` would otherwise both run
    MLflow's schema migrations and one of them fail; later writes are serialised by
    sqlite itself. In a folder that cannot be written (a read-only copy of a store) the
    lock file cannot be made either: the store is then only opened, which creates and
    migrates nothing, so reading commands still work and writing ones fail on their first
    write with one line (:func:`~sf_mlflow.tracking.store.store_failure`).
    """
    import fcntl

    from sf_mlflow.errors import StoreError
    from sf_mlflow.tracking.store import check_integrity, sqlite_path, store_failure

    db = sqlite_path(uri)
    if db is None or uri in _INITIALISED:
        return

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".init-lock"), "a")
    except OSError:  # read-only folder or file system
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)
        check_integrity(uri)
    except StoreError:
        raise
    except Exception as err:  # sqlite's, SQLAlchemy's or MLflow's wrapper of the same failure
        failure = store_failure(err, uri)
        if failure is None:
            raise
        raise failure from None
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
    _INITIALISED.add(uri)


def _param_str(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class StageRun:
    """Handle on the MLflow run of one stage; see :func:`stage_run`.

    Every write waits for a tracking server that stopped answering (see
    :mod:`~sf_mlflow.tracking.outage`) instead of failing the stage.
    """

    def __init__(self, client: MlflowClient, run_id: str, stage: str = ""):
        self.client = client
        self.run_id = run_id
        self.stage = stage
        self.uri = mlflow.get_tracking_uri()
        #: Where the run's writes go once its server has been away too long (set by the
        #: stage: ``<output_dir>/<stage>/<run_id>.unsent``); None: such a wait fails it.
        self.spool: Path | None = None
        self.journal: Journal | None = None
        self._hurried = False
        #: Called once the run has ended, whatever its end (e.g. releasing a stage claim).
        self.after_end: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def without_waiting(self) -> Iterator[None]:
        """Writes inside the block do not wait for a server that is away: one quick try,
        then into the journal (for an interrupted stage, whose user wants out now)."""
        self._hurried = True
        try:
            yield
        finally:
            self._hurried = False

    def keep_locally(self, since: float) -> bool:
        """From now on, keep the run's writes in its journal (the server has been away since
        ``since``); False when the run has no folder for one."""
        if self.journal is None and self.spool is not None:
            self.journal = Journal.create(self.spool, run_id=self.run_id, uri=self.uri,
                                          stage=self.stage, since=since)
            self.say(f"tracking server {self.uri} has not answered since {since_text(since)} "
                     f"({time.time() - since:.0f} s); the stage goes on and keeps the run's "
                     f"writes in {self.spool} until it answers")
        return self.journal is not None

    @property
    def info(self):
        return self.client.get_run(self.run_id).info

    def say(self, line: str) -> None:
        print(f"[{self.stage}] {line}" if self.stage else line, flush=True)

    def _write(self, what: str, write, keep: Callable[[Journal], None]) -> None:
        """``write()`` with signals held back, waiting (signals answered) while the server
        is away; once it has been away too long, ``keep(journal)`` instead."""
        def attempt():
            with signals_held():
                write()
        if self.journal is None:
            try:
                if not self._hurried:
                    return patiently(self.uri, attempt, self.say, what)
                with quick_requests():
                    return attempt()
            except ServerAway as away:
                if not self.keep_locally(away.since):
                    raise
            except Exception as err:
                if not (self._hurried and is_server(self.uri) and unreachable(err)
                        and self.keep_locally(note_away(self.uri))):
                    raise
        with signals_held():
            keep(self.journal)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params, skipping keys the run already has.

        ``mlflow run`` logs its ``-P`` values (as given, e.g. ``"2"``) before the stage
        starts; MLflow refuses to re-log a param with another value, and ``"2"`` vs
        ``"2.0"`` is the same setting, so existing keys are kept as they are.
        """
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
        self._write("its params", lambda: [
            self.client.log_batch(self.run_id, params=items[i:i + _PARAM_BATCH])
            for i in range(0, len(items), _PARAM_BATCH)], lambda j: j.params(items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self._write("its tags", lambda: self.client.log_batch(self.run_id, tags=items),
                        lambda j: j.tags(items))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log scalar metrics (non-finite values are skipped: MLflow's UI cannot plot them)."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self._write("its metrics", lambda: self._log_metric_items(items),
                    lambda j: j.metrics(items))

    def log_metric_history(self, key: str, values, steps=None) -> None:
        """Log a whole step series (e.g. the ELBO curve) in batches of 1000."""
        items = series(key, values, steps)
        self._write(f"the {key} curve", lambda: self._log_metric_items(items),
                    lambda j: j.metrics(items))

    def _log_metric_items(self, items: list) -> None:
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH])

    def metric_stream(self, key: str, flush_every: int = 100) -> MetricStream:
        return MetricStream(self, key, flush_every)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._write("its artifacts", lambda: self.client.log_artifacts(
            self.run_id, str(local_dir), artifact_path),
            lambda j: j.artifacts(local_dir, artifact_path))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._write("its artifacts", lambda: self.client.log_artifact(
            self.run_id, str(local_path), artifact_path),
            lambda j: j.artifacts(local_path, artifact_path))


_LAUNCHER_TAG_PREFIXES = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user",
                          "mlflow.docker.")


def _redirect_launcher(client: MlflowClient, launch: Launcher, exp_id: str, run_name: str) -> str:
    """Create the stage run in ``exp_id`` for ``mlflow run``'s run ``launch``; link the two.

    The new run gets the launcher's source/project tags and its ``-P`` params; the launcher
    (left in its experiment: MLflow cannot move a run) is renamed and tagged to point at it.
    """
    outer = client.get_run(launch.run_id)
    run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    tags = {k: v for k, v in outer.data.tags.items() if k.startswith(_LAUNCHER_TAG_PREFIXES)}
    tags[TAG_LAUNCHER_RUN] = launch.run_id
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    params = [Param(k, v) for k, v in outer.data.params.items()]
    for i in range(0, len(params), _PARAM_BATCH):
        client.log_batch(run_id, params=params[i:i + _PARAM_BATCH])
    where = describe_experiment(exp_id)
    client.update_run(launch.run_id, name=f"launcher -> {run_name}")
    client.log_batch(launch.run_id, tags=[
        RunTag(TAG_REDIRECTED_RUN, run_id), RunTag(TAG_REDIRECTED_EXPERIMENT, exp_id),
        RunTag("mlflow.note.content",
               f"`mlflow run` was given no experiment, so it created this run in Default before "
               f"the config could be read. The stage ran as run {run_id} in experiment {where}, "
               "the experiment of the config's name. Pass --experiment-name to choose another.")])
    # Later checks in this process must not take Default as an explicit choice.
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return run_id


def _open(client: MlflowClient, experiment: str, run_name: str, parent_run_id: str | None) -> str:
    """The run a stage logs to: a child of ``parent_run_id``, ``mlflow run``'s run, or a new one."""
    if parent_run_id:
        # A child run lives in its parent's experiment, wherever the parent was put.
        exp_id = client.get_run(parent_run_id).info.experiment_id
        return client.create_run(exp_id, run_name=run_name).info.run_id
    launch = launcher()
    exp_id = experiment_id_for(client, experiment)  # (reads MLFLOW_RUN_ID: before the pop)
    os.environ.pop("MLFLOW_RUN_ID", None)  # stages started from this one create their own runs
    if launch is None:
        return client.create_run(exp_id, run_name=run_name).info.run_id
    if exp_id == client.get_run(launch.run_id).info.experiment_id:
        client.update_run(launch.run_id, name=run_name)
        return launch.run_id
    return _redirect_launcher(client, launch, exp_id, run_name)


def _end(handle: StageRun, status: str, interrupt: BaseException | None = None) -> None:
    """End the run: no more heartbeats, then its terminal status (signals held back, but
    not while waiting for a tracking server that is away). A run whose writes are kept in a
    journal, or whose server is gone for good, ends there: see
    :func:`~sf_mlflow.tracking.journal.end_kept`."""
    client, run_id, uri = handle.client, handle.run_id, handle.uri
    with signals_held():
        stop_heartbeat(run_id)
        if interrupt is not None:
            release_interrupted_connections(client, interrupt)
        if not is_server(uri):
            client.set_terminated(run_id, status)
            return

    def attempt():
        with signals_held():
            client.set_terminated(run_id, status)

    if handle.journal is None and interrupt is None:
        try:
            return patiently(uri, attempt, lambda line: print(line, flush=True),
                             f"the end of run {run_id}")
        except ServerAway as away:
            if not handle.keep_locally(away.since):
                raise
    elif handle.journal is None:    # interrupted: one quick try, no waiting for the server
        try:
            with quick_requests():
                return attempt()
        except Exception as err:
            if not unreachable(err):
                raise
        if not handle.keep_locally(note_away(uri)):
            print(f"the tracking server {uri} does not answer: run {run_id} stays RUNNING "
                  "there until a later lookup finds its heartbeat stale and marks it FAILED",
                  file=sys.stderr, flush=True)
            return
    end_kept(handle.journal, status, client, fail=interrupt is None and status == "FINISHED")


@contextlib.contextmanager
def stage_run(stage: str, *, experiment: str, params: Mapping[str, Any], tags: Mapping[str, Any],
              run_name: str, description: str | None = None,
              parent_run_id: str | None = None) -> Iterator[StageRun]:
    """Run a stage inside one MLflow run and always end that run.

    ``experiment`` is the config's name; the run goes to the experiment chosen by
    :mod:`sf_mlflow.tracking.experiments` (``--experiment-name``, ``MLFLOW_EXPERIMENT_NAME``,
    ``mlflow run``'s explicit experiment, else ``experiment``). Attaches to the run
    ``mlflow run`` created (``MLFLOW_RUN_ID``) when that run is in the chosen experiment,
    else creates one there and links the two; with ``parent_run_id`` creates a child run in
    the parent's experiment, tagged ``mlflow.parentRunId``. Tags every run with the stage,
    the code version and git commit, its host, process and heartbeat
    (:mod:`~sf_mlflow.tracking.liveness`), and its experiment as a model-training experiment.
    SIGINT, SIGTERM and SIGHUP end it KILLED (see the module's docstring).
    """
    configure_tracking()
    client = MlflowClient()
    all_tags = {TAG_STAGE: stage, TAG_CODE_VERSION: code_version(), TAG_GIT_COMMIT: git_commit(),
                **liveness_tags(), **tags}
    if description:
        all_tags["mlflow.note.content"] = description
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with signals_interrupt(), contextlib.ExitStack() as hold:
        # From its creation until it is tagged and watched, and inside the try below that
        # ends it, a run holds signals back: none can leave it half-opened and RUNNING.
        hold.enter_context(signals_held())
        run_id = _open(client, experiment, run_name, parent_run_id)
        handle = StageRun(client, run_id, stage)
        exp_id = None
        try:
            exp_id = client.get_run(run_id).info.experiment_id
            _ACTIVE.append(exp_id)
            handle.set_tags(all_tags)
            start_heartbeat(client, run_id)
            mark_model_training(client, exp_id)
            hold.close()  # a signal that came meanwhile is handled here, in the try
            handle.log_params(params)
            yield handle
        except KeyboardInterrupt as interrupt:
            note_caught()
            _end(handle, "KILLED", interrupt)
            raise
        except BaseException:
            _end(handle, "FAILED")
            raise
        else:
            _end(handle, "FINISHED")
        finally:
            if exp_id is not None:
                _ACTIVE.pop()
            for call in handle.after_end:
                call()
