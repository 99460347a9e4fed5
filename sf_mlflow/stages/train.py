"""The train stage: fit PNMF (Gaussian or MGGP-SVGP prior) on a preprocess run's data."""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from sf_mlflow.analysis.summary import gp_facts
from sf_mlflow.config import Config
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.data.io import PreprocessedData
from sf_mlflow.errors import ArtifactError, ConfigError, RunLookupError
from sf_mlflow.models.device import resolve_device
from sf_mlflow.models.distributed import Communicator
from sf_mlflow.models.pnmf import PNMF, ConvergenceWarning, NonFiniteELBOError
from sf_mlflow.models.persistence import checked_checkpoint
from sf_mlflow.constraints import parse_duration
from sf_mlflow.models.settings import ModelParams, TrainingParams
from sf_mlflow.models.stopping import describe_stop
from sf_mlflow.stages._checks import (
    check_num_inducing,
    check_output_dir,
    check_registration,
    check_training_spots,
)
from sf_mlflow.stages._common import (
    base_tags,
    finished,
    load_preprocessed,
    model_kind,
    open_run,
    resolve_upstream,
    run_name,
    say,
    staging_dir,
)
from sf_mlflow.stages._signals import StopRequests
from sf_mlflow.tracking import (
    TAG_CONVERGED,
    TAG_DIVERGED,
    TAG_INTERRUPTED,
    TAG_MODEL,
    TAG_RESUMED_FROM,
    TAG_REUSABLE,
    TAG_UPSTREAM,
    StageRun,
    download_artifacts,
    get_stage_run,
)

STAGE = "train"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"

OnIteration = Callable[[PNMF, int, float], "bool | None"]


def build_model(config: Config) -> PNMF:
    """The estimator the config describes (hyperparameters only; nothing is fitted).

    The config's model and training sections share their fields with the estimator's
    settings (:mod:`sf_mlflow.models.settings`), so every field is passed by name.
    """
    m, t = config.model, config.training
    params = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelParams)}
    params.update({f.name: getattr(t, f.name) for f in dataclasses.fields(TrainingParams)})
    params["log_every"] = 1 if t.verbose else t.log_every
    return PNMF(prior=m.spatial_prior() if m.spatial else "gaussian", random_state=config.seed,
                verbose=True, **params)


def training_inputs(config: Config, pre: PreprocessedData):
    """Counts, coordinates and groups of the training (not held-out) spots."""
    data = pre.training_spots()
    groups = None
    if config.model.spatial and config.model.groups and config.model.spatial_components != 0:
        if data.groups is None:
            raise ConfigError(
                f"{config.source}: model.groups is true but dataset '{config.dataset}' has no "
                "group labels; set model.groups: false, or name the group column in data.group_key")
        groups = data.groups
    return data, groups


def load_checkpoint(run, tmp: Path) -> dict:
    """The checkpoint an interrupted train run logged."""
    try:
        path = download_artifacts(run.info.run_id, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}",
                                  tmp / "checkpoint")
    except ArtifactError as err:
        if "is missing from" not in str(err):
            raise  # a damaged checkpoint: the artifact error names the run and what to do
        raise RunLookupError(_no_checkpoint(run)) from None
    except Exception as err:  # the artifact store's own error type differs by backend
        raise RunLookupError(f"{_no_checkpoint(run)}: {err}") from None
    return PNMF.load_checkpoint(path)


def _no_checkpoint(run) -> str:
    """Why a train run has no checkpoint to resume from."""
    head = (f"train run {run.info.run_id} ({run.info.status}) has no {CHECKPOINT_DIR}/"
            f"{CHECKPOINT_FILE} artifact to resume from")
    if run.data.tags.get(TAG_INTERRUPTED) == "true":
        return (f"{head} (it was interrupted and logged one, which has since been deleted "
                "from its artifacts); train again without --resume-from")
    return f"{head} (it was not stopped by SIGINT/SIGTERM during the fit)"


def log_checkpoint(run, model: PNMF) -> None:
    """Log the model's resumable training state as ``checkpoint/checkpoint.pt``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        model.save_checkpoint(path)
        run.log_artifact(path, CHECKPOINT_DIR)


def validation_inputs(config: Config, pre: PreprocessedData, model: PNMF):
    """``(Y, coordinates, groups)`` of the held-out spots for early stopping, or None.

    Only models with the SVGP prior (a hybrid's too) are scored on held-out spots during
    the fit (from factors predicted at their coordinates), and only when
    ``training.validation_every > 0`` and the preprocess run held spots out.
    """
    held = pre.heldout_spots()
    if held is None or not config.model.spatial or config.training.validation_every == 0:
        return None
    groups = held.groups if config.model.groups else None
    return held.counts, held.coordinates, groups


def resume_hint(config: Config, run_id: str) -> str:
    """The command that continues run ``run_id`` from its checkpoint (torchrun for a
    distributed fit; with one process it may continue either way)."""
    if config.training.distributed:
        return (f"  torchrun --nproc-per-node K -m sf_mlflow.cli train -c <same config> "
                f"--set training.distributed=true --resume-from {run_id}")
    return (f"  mlflow run . -e train --env-manager local -P config=<same config> "
            f"-P resume_from={run_id}")


def save_checkpoint_and_stop(run, model: PNMF, config: Config) -> None:
    """Log the training state of an interrupted fit, then end the run as KILLED."""
    log_checkpoint(run, model)
    run.log_metrics({"interrupted_at_iteration": model.n_iter_})
    # The status alone cannot say it: under `mlflow run`, MLflow's launcher overwrites our
    # KILLED with FAILED after the process exits (its _maybe_set_run_terminated compares
    # the status string with integer codes), so the tag is what marks a resumable run.
    run.set_tags({TAG_INTERRUPTED: "true"})
    kept = f" (kept in {run.journal.folder} until synced)" if run.journal is not None else ""
    say(STAGE, f"interrupted at iteration {model.n_iter_}; checkpoint logged{kept}. Continue "
               "with\n" + resume_hint(config, run.run_id))
    raise KeyboardInterrupt


# ---- the steps of run_train ---------------------------------------------------------------------

def resumed_run(resume_from: str, preprocess_run_id: str | None):
    """The interrupted train run to continue, and the ID of the preprocess run it read.

    A ``preprocess_run_id`` given as well must be that run's.
    """
    resumed = get_stage_run(resume_from, STAGE, statuses=("KILLED", "FAILED"))
    upstream_id = resumed.data.tags.get(TAG_UPSTREAM)
    if preprocess_run_id and preprocess_run_id != upstream_id:
        raise ConfigError(
            f"preprocess_run_id {preprocess_run_id} differs from the preprocess run "
            f"{upstream_id} of the run to resume ({resume_from}); "
            "leave preprocess_run_id empty when resuming")
    return resumed, upstream_id


def read_inputs(upstream_id: str, resumed) -> tuple[PreprocessedData, dict | None]:
    """The preprocess run's data, and the checkpoint of the run to resume (if any)."""
    with tempfile.TemporaryDirectory() as tmp:
        pre = load_preprocessed(upstream_id, tmp)
        checkpoint = load_checkpoint(resumed, Path(tmp)) if resumed is not None else None
    return pre, checkpoint


def replay_history(run: StageRun, checkpoint: dict, resume_from: str) -> None:
    """Log the ELBO curve of the resumed run up to its checkpoint, so the new run's is whole."""
    done = checkpoint["trainer"]["history"].tolist()
    say(STAGE, f"resuming run {resume_from} from iteration {len(done)}")
    run.log_metric_history("elbo", done, range(1, len(done) + 1))


def fit(run: StageRun, config: Config, model: PNMF, pre: PreprocessedData, data: SpatialCounts,
        groups, *, checkpoint: dict | None, on_iteration: OnIteration | None) -> None:
    """Fit the model, streaming the ELBO to the run as the step metric ``elbo``.

    ``on_iteration(model, iteration, elbo)`` runs after every iteration; returning True
    stops the fit. SIGINT/SIGTERM stop it too (at once during initialisation or a slow step,
    else after the iteration): the checkpoint of the last whole iteration is logged and
    :class:`KeyboardInterrupt` raised. A non-finite ELBO logs the checkpoint, tags the run
    diverged and re-raises. Convergence warnings become progress lines.
    """
    elbo_stream = run.metric_stream("elbo", flush_every=100)
    with StopRequests() as stop:
        def callback(state) -> bool | None:
            elbo_stream.append(state.iteration, state.elbo)
            if stop.requested:
                return True
            if on_iteration is None:
                return None
            return on_iteration(model, state.iteration, state.elbo)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                model.fit(data.counts, coordinates=data.coordinates, groups=groups,
                          callback=callback, resume=checkpoint,
                          validation=validation_inputs(config, pre, model))
            except NonFiniteELBOError as err:
                elbo_stream.flush()
                log_divergence(run, model, err, config)
                raise
            except KeyboardInterrupt:
                # a first signal cut a slow step short; the model holds the iteration before
                # it, which the checkpoint below keeps (a second signal: out at once)
                if stop.aborted or getattr(model, "stop_reason_", None) != "interrupted":
                    raise
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            say(STAGE, f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if stop.requested:
        with run.without_waiting():     # a server that is away: kept locally, no wait
            elbo_stream.flush()
            save_checkpoint_and_stop(run, model, config)
    elbo_stream.flush()


def log_divergence(run: StageRun, model: PNMF, err: NonFiniteELBOError, config: Config) -> None:
    """Log the checkpoint of a fit whose ELBO became non-finite and mark the run not reusable."""
    log_checkpoint(run, model)
    run.set_tags({TAG_DIVERGED: "true", TAG_CONVERGED: "false", TAG_REUSABLE: "false"})
    smaller = (" --set training.learning_rate=<smaller>" if config.training.distributed
               else " -P training.learning_rate=<smaller>")
    say(STAGE, f"{err}. Its checkpoint is logged; continue with\n"
               + resume_hint(config, run.run_id) + smaller)


def tag_fit(run: StageRun, model: PNMF) -> None:
    """Tags ``sf.converged`` (and not reusable if stopped early), the held-out deviance curve."""
    if model.stopped_early_:
        # stopped by on_iteration (e.g. a pruned tuning trial): not a finished fit
        run.set_tags({TAG_REUSABLE: "false"})
    run.set_tags({TAG_CONVERGED: str(bool(model.converged_)).lower(),
                  "sf.stop_reason": str(model.stop_reason_)})
    if model.early_stopped_at_ is not None:
        run.set_tags({"sf.early_stopped_at": str(model.early_stopped_at_),
                      "sf.kept_iteration": str(model.kept_iteration_)})
    if len(model.validation_history_):
        run.log_metric_history("heldout_deviance", model.validation_history_[:, 1],
                               model.validation_history_[:, 0].astype(int))


def summarize(model: PNMF, data: SpatialCounts, pre: PreprocessedData,
              upstream_id: str) -> dict[str, Any]:
    """The fit's facts for ``training.json`` (the numeric ones are also logged as metrics)."""
    return {
        "final_elbo": float(np.asarray(model.elbo_history_, dtype=float)[-1]),
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "stop_reason": str(model.stop_reason_),
        "training_time_s": float(model.fit_time_),
        "iterations_per_s": float(model.n_iter_ / max(model.fit_time_, 1e-9)),
        "n_train_spots": int(data.n_spots),
        "n_heldout_spots": int(pre.heldout.sum()),
        "n_genes": int(data.n_genes),
        "batch_size": int(model.batch_size_ or data.n_spots),
        "device": str(model.device_),
        "preprocess_run_id": upstream_id,
        **gp_facts(model),
        **start_facts(model),
    }


def start_facts(model: PNMF) -> dict[str, Any]:
    """How a spatial fit started and stopped (:mod:`sf_mlflow.models.start`): PNMF's held-out
    deviance, the start's (iteration 0 of the held-out curve), the nugget the start chose
    (``nugget_<l>`` per spatial factor and their mean), how M was chosen, and where early
    stopping stopped and which iteration it kept."""
    report = getattr(model, "start_report_", None) or {}
    facts: dict[str, Any] = {k: report[k] for k in ("pnmf_heldout_deviance", "pnmf_iterations",
                                                   "start_seconds", "num_inducing_rule",
                                                   "batch_size_rule", "curvature_fraction")
                             if k in report}
    if "nugget" in report:   # the start's spot-level variance per spatial factor
        nugget = [float(v) for v in np.atleast_1d(report["nugget"])]
        facts.update({f"nugget_{l}": v for l, v in enumerate(nugget)})
        facts["nugget"] = float(np.mean(nugget))
    vh = model.validation_history_
    if len(vh) and vh[0, 0] == 0:
        facts["init_heldout_deviance"] = float(vh[0, 1])
    if len(vh):
        facts["best_heldout_deviance"] = float(vh[:, 1].min())
    if model.stop_reason_ == "time_budget":
        facts["time_budget_s"] = parse_duration(model.time_budget)
    if model.early_stopped_at_ is not None:
        facts["early_stopped_at"] = int(model.early_stopped_at_)
        facts["kept_iteration"] = int(model.kept_iteration_)
    return facts


def log_results(run: StageRun, config: Config, model: PNMF, summary: dict[str, Any],
                register: Callable[[Path], None] | None = None) -> None:
    """Log ``model.pth``, ``elbo_history.csv``, ``training.json``, ``config.yaml`` and metrics.

    ``register(<path of model.pth>)`` runs inside the staging folder, so a registration
    that fails leaves no output folder that looks complete (and the run ends FAILED).
    """
    history = np.asarray(model.elbo_history_, dtype=float)
    with staging_dir(config, STAGE, run.run_id) as out:
        model.save(out / "model.pth")
        with open(out / "elbo_history.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["iteration", "elbo"])
            w.writerows((i, repr(float(v))) for i, v in enumerate(history, start=1))
        (out / "training.json").write_text(json.dumps(summary, indent=2))
        (out / "config.yaml").write_text(config.to_yaml())
        run.log_artifacts(out)
        if register is not None:
            register(out / "model.pth")
    run.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
    stop = describe_stop(summary["stop_reason"], summary.get("early_stopped_at"),
                         summary.get("kept_iteration")) or \
        f"converged={summary['converged']}, {summary['stop_reason']}"
    say(STAGE, f"final ELBO {summary['final_elbo']:.6g} after {summary['n_iter']} iterations "
               f"({summary['training_time_s']:.1f} s, {stop})")
    if "pnmf_heldout_deviance" in summary and "best_heldout_deviance" in summary:
        say(STAGE, f"held-out deviance: PNMF start {summary['pnmf_heldout_deviance']:.6g}, "
                   f"spatial start {summary.get('init_heldout_deviance', float('nan')):.6g}, "
                   f"best {summary['best_heldout_deviance']:.6g}")


def register(run: StageRun, config: Config, pre: PreprocessedData, data: SpatialCounts,
             upstream_id: str, name: str, alias: str, model_path: Path) -> None:
    """Register the logged model as a new version of the pyfunc model ``name``, with ``alias``."""
    from sf_mlflow.tracking.registry import register_fitted_model

    alias = alias or "latest"
    version = register_fitted_model(
        run.run_id, model_path, pre.metadata, name=name, alias=alias,
        model_kind=model_kind(config), neighbours=config.analysis.moran_k,
        preprocess_run_id=upstream_id, train_coordinates=data.coordinates)
    say(STAGE, f"registered model {name!r} version {version}; load it with "
               f"mlflow.pyfunc.load_model('models:/{name}@{alias}')")


def check_before_fit(config: Config, upstream_id: str, data: SpatialCounts, groups,
                     register_as: str | None, register_alias: str,
                     checkpoint: dict | None = None) -> None:
    """What would fail only after the fit, refused before the run is opened.

    A registered-model name MLflow refuses, an output folder that cannot be written, a
    checkpoint of other settings or data, fewer training spots than the analysis needs,
    more inducing points than spot locations.
    """
    check_registration(register_as, register_alias)
    check_output_dir(config)
    if checkpoint is not None:    # a resume with other settings: refused before a run opens
        checked_checkpoint(build_model(config), checkpoint, data.n_spots, data.n_genes)
    check_training_spots(config, data.n_spots, upstream_id)
    check_num_inducing(config, data.coordinates, groups)


# ---- data-parallel fits (training.distributed, under torchrun) ----------------------------------

def process_group(config: Config) -> Communicator | None:
    """This process's place in a distributed fit (None without ``training.distributed``).

    Raises ConfigError, before any run is made, when the process was not started by torchrun.
    """
    if not config.training.distributed:
        return None
    return Communicator.join(resolve_device(config.training.device))


def train_worker(config: Config, comm: Communicator, resume_from: str | None) -> str:
    """A rank > 0 of a distributed train stage: the fit on its share of each batch, nothing else.

    It reads the same inputs as rank 0 (the preprocess run rank 0 resolved, sent over; the
    checkpoint of ``resume_from``) but opens no run and writes no outputs, artifacts or
    registry entries: rank 0 does all of that. Returns "" (no run of its own).
    """
    upstream_id = comm.broadcast()
    if upstream_id is None:   # rank 0 could not resolve its inputs and reports why
        return ""
    resumed = get_stage_run(resume_from, STAGE, statuses=("KILLED", "FAILED")) if resume_from else None
    pre, checkpoint = read_inputs(upstream_id, resumed)
    data, groups = training_inputs(config, pre)
    model = build_model(config)
    model.verbose = False
    with StopRequests() as stop, warnings.catch_warnings():   # torchrun passes signals on
        warnings.simplefilter("ignore", ConvergenceWarning)      # rank 0 reports them
        model.fit(data.counts, coordinates=data.coordinates, groups=groups,
                  callback=lambda state: stop.requested or None, resume=checkpoint,
                  validation=validation_inputs(config, pre, model))
    comm.leave()
    return ""


class TrainInputs(NamedTuple):
    """What rank 0 of a train stage read and checked before opening its run."""

    resumed: Any
    upstream_id: str
    pre: PreprocessedData
    checkpoint: dict | None
    data: SpatialCounts
    groups: Any


def resolve_inputs(config: Config, comm: Communicator | None, preprocess_run_id: str | None,
                   resume_from: str | None, register_as: str | None,
                   register_alias: str) -> TrainInputs:
    """The run to resume, the preprocess run and its data, checked by :func:`check_before_fit`.

    In a distributed fit the preprocess run's ID is then sent to the other ranks, or None
    when anything failed, so that those ranks end quietly instead of waiting for a fit
    that never starts.
    """
    try:
        resumed = None
        if resume_from:
            resumed, preprocess_run_id = resumed_run(resume_from, preprocess_run_id)
        upstream_id = resolve_upstream(
            config, "preprocess", preprocess_run_id, by=STAGE,
            advice=(f"Resume with the config run {resume_from} was made with" if resume_from
                    else None)).info.run_id
        pre, checkpoint = read_inputs(upstream_id, resumed)
        data, groups = training_inputs(config, pre)
        check_before_fit(config, upstream_id, data, groups, register_as, register_alias,
                         checkpoint)
    except BaseException:
        if comm is not None:
            comm.broadcast(None)
        raise
    if comm is not None:
        comm.broadcast(upstream_id)
    return TrainInputs(resumed, upstream_id, pre, checkpoint, data, groups)


# ---- the stage ----------------------------------------------------------------------------------

def run_train(config: Config, preprocess_run_id: str | None = None, *,
              parent_run_id: str | None = None, on_iteration: OnIteration | None = None,
              resume_from: str | None = None, register_as: str | None = None,
              register_alias: str = "latest") -> str:
    """Fit the configured model on a preprocess run's training spots and log everything.

    Logs the resolved config as params, the ELBO curve as the step metric ``elbo``,
    final ELBO, time and convergence as metrics, and ``model.pth``,
    ``elbo_history.csv``, ``training.json`` and ``config.yaml`` as artifacts.
    Returns the run ID.

    ``parent_run_id`` makes the run a child (nested) run of that run.
    ``on_iteration(model, iteration, elbo)`` is called after every iteration with the
    live model (usable for predictions); returning True stops training early.

    SIGINT or SIGTERM during the fit stops it after the current iteration, logs
    ``checkpoint/checkpoint.pt`` and ends the run KILLED (:class:`KeyboardInterrupt`
    is raised). ``resume_from=<that run's ID>`` continues from the checkpoint in a new
    run and reaches the result of an uninterrupted fit with the same seed.

    ``register_as=<name>`` also logs the fitted model as an MLflow pyfunc model and
    registers it as a new version of ``<name>`` with alias ``register_alias`` (see
    :mod:`sf_mlflow.tracking.registry`); the run is tagged ``sf.registered_model`` and
    ``sf.registered_model_version``.

    Before any run is opened, a ``preprocess_run_id`` must name a run of this config's data
    set and preprocessing settings, and :func:`check_before_fit` refuses what would fail
    only after the fit; a registration that fails ends the run FAILED with no output folder.

    With ``training.distributed: true`` the process must be a torchrun worker (else
    ConfigError); rank 0 does all of the above, the other ranks only fit their share of
    every batch (:func:`train_worker`) and return "".
    """
    comm = process_group(config)
    if comm is not None and comm.rank > 0:
        return train_worker(config, comm, resume_from)
    resumed, upstream_id, pre, checkpoint, data, groups = resolve_inputs(
        config, comm, preprocess_run_id, resume_from, register_as, register_alias)
    kind = model_kind(config)
    params = {**config.flat(), "upstream.preprocess_run_id": upstream_id}
    tags = {**base_tags(config, STAGE), TAG_UPSTREAM: upstream_id, TAG_MODEL: kind}
    if config.model.spatial_components is not None:
        tags["sf.spatial_components"] = str(config.model.spatial_components)
    if resume_from:
        tags[TAG_RESUMED_FROM] = resume_from
    description = (f"Train {kind.upper()} with L={config.model.n_components} on preprocess run "
                   f"{upstream_id} ({config.dataset})")
    with open_run(config, STAGE, params=params, tags=tags, run_name=run_name(config),
                  description=description, parent_run_id=parent_run_id) as run:
        model = build_model(config)
        if checkpoint is not None:
            replay_history(run, checkpoint, resume_from)
        say(STAGE, f"fitting on {data.n_spots:,} spots x {data.n_genes:,} genes")
        fit(run, config, model, pre, data, groups, checkpoint=checkpoint,
            on_iteration=on_iteration)
        if comm is not None:
            comm.leave()   # the other ranks are done
        tag_fit(run, model)
        log_results(run, config, model, summarize(model, data, pre, upstream_id), register=(
            (lambda path: register(run, config, pre, data, upstream_id, register_as,
                                   register_alias, path)) if register_as else None))
    return finished(STAGE, run)
