"""Finding and checking upstream runs: the links of the pipeline's run lineage."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sf_mlflow.errors import RunLookupError
from sf_mlflow.tracking.experiments import lookup_experiment_id
from sf_mlflow.tracking.liveness import sweep_dead_runs
from sf_mlflow.tracking.runs import (
    TAG_CODE_VERSION,
    TAG_DIVERGED,
    TAG_INTERRUPTED,
    TAG_REUSABLE,
    TAG_STAGE,
    TAG_STAGE_HASH,
    TAG_UPSTREAM,
    configure_tracking,
)


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def get_stage_run(run_id: str, stage: str, statuses: tuple[str, ...] = ("FINISHED",)):
    """Return the MLflow run ``run_id``, checking it is a run of ``stage`` in one of ``statuses``.

    Raises :class:`RunLookupError` when it does not exist, belongs to another stage or
    has another status (by default: did not finish).
    """
    uri = configure_tracking()
    client = MlflowClient()
    run_id = str(run_id).strip()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        from sf_mlflow.tracking.store import store_failure

        # a locked or unreadable store is not a missing run: say what is wrong with the store
        failure = store_failure(err, uri)
        if failure is not None:
            raise failure from None
        raise RunLookupError(
            f"{stage} run ID {run_id!r} does not exist in the tracking store {uri} "
            f"(check the ID in the MLflow UI, or MLFLOW_TRACKING_URI)") from None
    actual = run.data.tags.get(TAG_STAGE)
    if actual != stage:
        what = (f"{'an' if actual[:1] in 'aeiou' else 'a'} '{actual}' run" if actual else
                "not a run of this pipeline")
        article = "an" if stage[:1] in "aeiou" else "a"
        raise RunLookupError(f"run ID {run_id!r} is {what}, but {article} '{stage}' run ID is "
                             "required here")
    if run.info.status not in statuses:
        raise RunLookupError(f"{stage} run {run_id!r} is {run.info.status}, not "
                             f"{' or '.join(statuses)}; run the {stage} stage again or pass "
                             "another run ID")
    return run


def _swept_experiment(experiment_id: str | None):
    """``(client, experiment ID)`` a lookup searches, its dead runs swept; None without one.

    The experiment is ``experiment_id``, else the one of the stage run open in this
    process; runs left RUNNING there by a dead process are first ended FAILED.
    """
    configure_tracking()
    client = MlflowClient()
    if experiment_id is None:
        experiment_id = lookup_experiment_id()
        if experiment_id is None:
            return None
    sweep_dead_runs([str(experiment_id)], client)
    return client, experiment_id


def find_latest_run(stage: str, tags: dict[str, str], experiment_id: str | None = None,
                    max_results: int = 1):
    """Newest FINISHED run of ``stage`` in one experiment whose tags match, or None.

    ``experiment_id``: the experiment to search; default the experiment of the stage run
    open in this process (:func:`~sf_mlflow.tracking.experiments.lookup_experiment_id`).
    Never searches other experiments: a chain's runs stay in its experiment. Runs of
    that experiment left RUNNING by a dead process are first ended FAILED
    (:func:`~sf_mlflow.tracking.liveness.sweep_dead_runs`), so none is taken for work
    in progress. With ``max_results`` > 1: the newest that many, newest first (a list).
    """
    searched = _swept_experiment(experiment_id)
    if searched is None:
        return None if max_results == 1 else []
    client, experiment_id = searched
    clauses = [f"tags.`{TAG_STAGE}` = {_quote(stage)}", "attributes.status = 'FINISHED'"]
    clauses += [f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
    runs = client.search_runs([str(experiment_id)], " and ".join(clauses),
                              run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=max_results)
    if max_results != 1:
        return list(runs)
    return runs[0] if runs else None


def find_reusable_run(stage: str, stage_hash: str, code_version: str,
                      upstream_run_id: str | None = None, experiment_id: str | None = None,
                      downstream: str | None = None):
    """Newest FINISHED run of ``stage`` that computed the same thing, or None.

    Same thing = the same stage hash (the settings the stage depends on), the same
    upstream run (none for preprocess) and the same code version; runs tagged
    ``sf.reusable = false`` (work that stopped short) never qualify. Only runs of
    ``experiment_id`` (default: the experiment of the stage run open in this process).

    ``downstream``: among equal runs, the newest that already has a finished run of that
    stage on it comes first -- the chain ``main`` built before -- so a newer equal run
    (``train --register-as`` of the same settings, say) does not make ``main`` redo the
    stages after it.
    """
    tags = {TAG_STAGE_HASH: stage_hash, TAG_CODE_VERSION: code_version, TAG_REUSABLE: "true"}
    if upstream_run_id:
        tags[TAG_UPSTREAM] = upstream_run_id
    if downstream is None:
        return find_latest_run(stage, tags, experiment_id)
    runs = find_latest_run(stage, tags, experiment_id, max_results=20)
    for run in runs:
        if find_latest_run(downstream, {TAG_UPSTREAM: run.info.run_id, TAG_REUSABLE: "true",
                                        TAG_CODE_VERSION: code_version}, experiment_id):
            return run
    return runs[0] if runs else None


def find_interrupted_run(stage: str, stage_hash: str, code_version: str, upstream_run_id: str,
                         experiment_id: str | None = None):
    """The newest run of ``stage`` that an interrupt stopped with a checkpoint, or None.

    Same stage hash, upstream run and code version as :func:`find_reusable_run`; tagged
    ``sf.interrupted = true`` (it logged a checkpoint) and not diverged (resuming a
    diverged fit with the same settings would diverge again); KILLED or FAILED (under
    ``mlflow run`` the launcher turns KILLED into FAILED). None when a run of the same
    thing started after it finished: that one is the result.
    """
    searched = _swept_experiment(experiment_id)
    if searched is None:
        return None
    client, experiment_id = searched
    tags = {TAG_STAGE: stage, TAG_STAGE_HASH: stage_hash, TAG_CODE_VERSION: code_version,
            TAG_UPSTREAM: upstream_run_id}
    runs = client.search_runs([str(experiment_id)],
                              " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()),
                              run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=100)
    for run in runs:
        if run.info.status == "FINISHED":
            return None
        if (run.info.status in ("KILLED", "FAILED")
                and run.data.tags.get(TAG_INTERRUPTED) == "true"
                and run.data.tags.get(TAG_DIVERGED) != "true"):
            return run
    return None


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    configure_tracking()
    return dict(MlflowClient().get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps (K,), values (K,))`` of a run's step metric ``key``, by step; empty when
    the run never logged it."""
    configure_tracking()
    history = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    return (np.array([m.step for m in history], dtype=np.int64),
            np.array([m.value for m in history], dtype=np.float64))


def describe_run(run) -> str:
    """``<id> (<name>, finished 2026-11-25 21:03)`` for progress messages."""
    end = run.info.end_time or run.info.start_time
    when = _dt.datetime.fromtimestamp(end / 1000).strftime("%Y-%m-%d %H:%M") if end else "?"
    return f"{run.info.run_id} ({run.info.run_name}, finished {when})"


def download_artifacts(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download one artifact (file or folder; ``""`` = all) of a run into ``dst``; return its path.

    Raises :class:`~sf_mlflow.errors.ArtifactError` naming the run, its stage and the artifact
    when the artifact is missing or a downloaded file is empty or not a valid file of its
    kind (.npz, .pth, .npy, .json), and :class:`~sf_mlflow.errors.StoreError` when the
    tracking store is locked or read-only. Files it downloaded are remembered, so a file
    found damaged later is traced back to its run (:func:`explain_artifact_error`).
    """
    from sf_mlflow.errors import ArtifactError
    from sf_mlflow.tracking.store import store_failure

    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path or None, dst_path=str(dst)))
    except (MlflowException, OSError) as err:
        failure = store_failure(err)
        if failure is not None:
            raise failure from None
        raise _missing_artifact(run_id, artifact_path, err) from None
    _DOWNLOADS[local.resolve()] = (run_id, artifact_path or "")
    for path in ([local] if local.is_file() else sorted(local.rglob("*"))):
        problem = _file_problem(path) if path.is_file() else None
        if problem:
            name = _artifact_name(local, artifact_path, path)
            raise ArtifactError(_damaged(run_id, name, problem), path=path)
    return local


# ---- damaged and missing artifacts ---------------------------------------------------------------

#: Local path of each download of this process -> (run ID, artifact path).
_DOWNLOADS: dict[Path, tuple[str, str]] = {}


def _run_stage(run_id: str) -> tuple[str, object]:
    """The stage tag and artifact URI of a run ("?" and None when the store cannot tell)."""
    try:
        run = MlflowClient().get_run(run_id)
    except Exception:  # the run itself is gone: the message still names its ID
        return "?", None
    return run.data.tags.get(TAG_STAGE, "?"), run.info.artifact_uri


def _rerun_hint(stage: str) -> str:
    if stage == "?":
        return "re-run the stage that logged it"
    return (f"re-run the {stage} stage (mlflow run . -e {stage} --env-manager local "
            "-P config=<your config>)")


def _damaged(run_id: str, name: str, problem: str) -> str:
    stage, _ = _run_stage(run_id)
    return (f"artifact {name} of {stage} run {run_id} is damaged ({problem}); "
            f"{_rerun_hint(stage)}")


def _missing_artifact(run_id: str, artifact_path: str, err: BaseException):
    from sf_mlflow.errors import ArtifactError

    stage, where = _run_stage(run_id)
    name = artifact_path or "(all artifacts)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ArtifactError(f"artifact {name} of {stage} run {run_id} is missing from its artifact "
                         f"store {where} ({first}); {_rerun_hint(stage)}")


def _artifact_name(local: Path, artifact_path: str, path: Path) -> str:
    """The artifact path of ``path``, a file of the download ``local`` of ``artifact_path``."""
    if path == local:
        return artifact_path or path.name
    rel = path.relative_to(local).as_posix()
    return f"{artifact_path.rstrip('/')}/{rel}" if artifact_path else rel


def _file_problem(path: Path) -> str | None:
    """What is wrong with a downloaded file of a kind this package writes, or None."""
    import json
    import zipfile

    import numpy as np

    suffix = path.suffix.lower()
    if suffix not in (".npz", ".pth", ".npy", ".json"):
        return None
    if path.stat().st_size == 0:
        return f"not a valid {suffix} file: the file is empty"
    try:
        if suffix in (".npz", ".pth"):  # zip archives (torch.save's format too): check every CRC
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return None if bad is None else f"not a valid {suffix} file: {bad} fails its CRC check"
        if suffix == ".npy":
            with open(path, "rb") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if major == 1
                        else np.lib.format.read_array_header_2_0)
                read(fh)
            return None
        json.loads(path.read_text())
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, UnicodeDecodeError) as err:
        return f"not a valid {suffix} file: {err}"
    return None


def explain_artifact_error(err) -> str:
    """``err``'s message, naming the run and artifact when its file came from a download."""
    path = getattr(err, "path", None)
    if path is None or err.problem is None:
        return str(err)
    path = Path(path).resolve()
    found = [local for local in _DOWNLOADS if path == local or local in path.parents]
    if not found:
        return str(err)
    local = max(found, key=lambda p: len(p.parts))  # the download that wrote this very file
    run_id, artifact_path = _DOWNLOADS[local]
    return _damaged(run_id, _artifact_name(local, artifact_path, path), err.problem)
