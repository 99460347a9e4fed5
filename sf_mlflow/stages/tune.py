"""The tune stage: an Optuna study over the spatial model's lengthscale and inducing points
(and a hybrid's number of spatial factors, ``tuning.spatial_components``).

Each trial is a train run (a child of the tune run) with the trial's settings. The
objective is the mean Poisson deviance of the held-out spots, predicted from their
positions alone: the ELBO is not comparable across numbers of inducing points M (its KL
term and its bound both change with M), the held-out deviance is. The deviance is
reported to Optuna every ``tuning.report_every`` iterations, so the pruner can stop a
poor trial early.

Several processes running the same command against the same storage share one study:
``create_study(load_if_exists=True)``, and each worker stops once the study holds
``n_trials`` trials that count (complete, pruned, running or waiting; failed ones do not)
and no trial waits to be run.

A worker killed outright (SIGKILL, a lost machine) cannot tell its trial's end. Each
worker records an Optuna heartbeat for its running trial every
``SF_OPTUNA_HEARTBEAT_INTERVAL`` seconds (default 60); before counting, a worker fails
the trials whose heartbeat is older than ``SF_OPTUNA_GRACE_PERIOD`` seconds (default
four intervals) and Optuna's :class:`~optuna.storages.RetryFailedTrialCallback` queues
each once more (a WAITING copy with the same settings), so a dead worker's trial neither
counts nor is lost. Its train run is ended FAILED by the MLflow lookups
(:mod:`sf_mlflow.tracking.liveness`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sf_mlflow.analysis.summary import heldout_deviance
from sf_mlflow.config import Config, config_from_dict
from sf_mlflow.errors import ConfigError, SfMlflowError
from sf_mlflow.stages._common import (
    base_tags,
    finished,
    load_preprocessed,
    model_kind,
    open_run,
    resolve_upstream,
    say,
    single_process,
    staging_dir,
)
from sf_mlflow.stages._study import make_storage, redact
from sf_mlflow.stages.table import STAGES
from sf_mlflow.tracking import TAG_MODEL, TAG_UPSTREAM, StageRun, alias_run_id, existing_run

STAGE = "tune"

TAG_STUDY = "sf.tune.study"
TAG_TRIAL = "sf.tune.trial_number"
TAG_TRIAL_STATE = "sf.tune.state"
TAG_TUNE_RUN = "sf.tune.run_id"

#: Objective: mean Poisson deviance per held-out count (lower is better).
OBJECTIVE = "heldout_deviance"

#: Trial user attributes written by this stage.
ATTR_TRAIN_RUN = "train_run_id"
ATTR_TUNE_RUN = "tune_run_id"
ATTR_PRUNED_AT = "pruned_at_iteration"
ATTR_SURPLUS = "surplus"


# ---- study set-up -----------------------------------------------------------------------------

def searched_keys(config: Config) -> list[str]:
    """Dotted config keys the study searches, in a fixed order."""
    k = ["model.spatial_components"] if config.tuning.spatial_components.low is not None else []
    return ["model.lengthscale", "model.num_inducing", *k, *config.tuning.search_space]


def default_storage(config: Config) -> str:
    """``sqlite:///<output_dir>/optuna.db`` (absolute, so workers in any folder agree)."""
    path = Path(config.output_dir).resolve() / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def default_study_name(config: Config) -> str:
    """``<name>-<hash>`` of everything but the searched keys and output_dir, plus the search space.

    Workers started with the same config (on any machine) land in the same study;
    changing the data, the fixed settings or the search space starts a new one.
    """
    searched = {*searched_keys(config), "output_dir"}  # output_dir: where, not what
    fixed = {k: v for k, v in config.flat().items() if k not in searched}
    space = {k: v for k, v in config.flat("tuning").items()
             if k.startswith(("tuning.lengthscale.", "tuning.num_inducing.", "tuning.search_space.",
                              "tuning.spatial_components."))}
    payload = json.dumps({"fixed": fixed, "space": space}, sort_keys=True, default=str)
    return f"{config.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def make_pruner(config: Config):
    import optuna

    t = config.tuning
    if t.pruner == "none":
        return optuna.pruners.NopPruner()
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=t.n_startup_trials,
                                           n_warmup_steps=t.n_warmup_steps)
    if t.pruner == "percentile":
        return optuna.pruners.PercentilePruner(t.percentile, n_startup_trials=t.n_startup_trials,
                                               n_warmup_steps=t.n_warmup_steps)
    return optuna.pruners.HyperbandPruner(min_resource=t.report_every,
                                          max_resource=config.training.max_iter)


def make_sampler(config: Config, n_existing: int):
    """A sampler seeded from the tuning seed and the number of trials already in the study.

    Re-made before every trial: one worker alone is reproducible, and workers sharing a
    study do not draw the same random start-up points from identically seeded samplers.
    """
    import optuna

    base = config.tuning.seed if config.tuning.seed is not None else config.seed
    seed = (base * 1_000_003 + n_existing) % (2**32)
    if config.tuning.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def suggest(trial, config: Config) -> dict[str, Any]:
    """The trial's settings as dotted-key overrides."""
    t = config.tuning
    out: dict[str, Any] = {
        "model.lengthscale": trial.suggest_float("model.lengthscale", t.lengthscale.low,
                                                 t.lengthscale.high, log=t.lengthscale.log),
        "model.num_inducing": trial.suggest_int("model.num_inducing", t.num_inducing.low,
                                                t.num_inducing.high, step=t.num_inducing.step,
                                                log=t.num_inducing.log),
    }
    k = t.spatial_components     # the hybrid's K, when its range is set
    if k.low is not None:
        out["model.spatial_components"] = trial.suggest_int("model.spatial_components", k.low, k.high)
    for key, sp in t.search_space.items():
        if sp.type == "categorical":
            out[key] = trial.suggest_categorical(key, list(sp.choices))
        elif sp.type == "int":
            out[key] = trial.suggest_int(key, int(sp.low), int(sp.high),
                                         step=int(sp.step or 1), log=sp.log)
        else:
            out[key] = trial.suggest_float(key, float(sp.low), float(sp.high), step=sp.step,
                                           log=sp.log)
    return out


def _fmt(params: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else
                    f"{k.split('.')[-1]}={v}" for k, v in params.items())


# ---- one trial --------------------------------------------------------------------------------

class _Trial:
    """Runs one Optuna trial as a child train run and reports the held-out deviance."""

    def __init__(self, config: Config, preprocess_run_id: str, parent_run_id: str,
                 train_xy: np.ndarray, heldout, study_name: str):
        self.config, self.pre_id, self.parent = config, preprocess_run_id, parent_run_id
        self.train_xy, self.heldout, self.study_name = train_xy, heldout, study_name

    def run(self, trial) -> tuple[str, float, str | None, int | None]:
        """Train; return (state "complete" | "pruned", value, train run ID, pruned-at iteration)."""
        overrides = suggest(trial, self.config)
        trial.set_user_attr(ATTR_TUNE_RUN, self.parent)
        say(STAGE, f"trial {trial.number}: {_fmt(overrides)}")
        cfg = config_from_dict(self.config.to_dict(), self.config.source or "<config>",
                               overrides=overrides)
        every = self.config.tuning.report_every
        curve: list[tuple[int, float]] = []
        state: dict[str, Any] = {"model": None, "pruned_at": None}

        def on_iteration(model, it: int, elbo: float) -> bool | None:
            state["model"] = model
            if it % every:
                return None
            value = heldout_deviance(model, self.train_xy, self.heldout)["mean"]
            curve.append((it, value))
            trial.report(value, it)
            # at max_iter the fit is over anyway: the trial completes with this value
            if it < cfg.training.max_iter and trial.should_prune():
                state["pruned_at"] = it
                return True
            return None

        run_train = STAGES["train"].load()  # through the table: stages import no other stage
        try:
            train_id = run_train(cfg, self.pre_id, parent_run_id=self.parent,
                                 on_iteration=on_iteration)
        except SfMlflowError as err:
            # e.g. more inducing points than spots: name the trial and its settings
            raise type(err)(f"tuning trial {trial.number} ({_fmt(overrides)}): {err}") from None
        trial.set_user_attr(ATTR_TRAIN_RUN, train_id)
        pruned_at = state["pruned_at"]
        model = state["model"]
        early = None if model is None else getattr(model, "early_stopped_at_", None)
        # the final model's step: its last iteration, or, when early stopping rolled it back
        # (possibly to its start), one past the iteration it stopped at, so that it is still
        # the highest step of the run's `heldout_deviance`
        final_step = None if model is None else (early + 1 if early is not None else int(model.n_iter_))
        if pruned_at is None and model is not None and (not curve or curve[-1][0] != final_step):
            # the final model (converged, rolled back, or max_iter between two reports)
            value = heldout_deviance(model, self.train_xy, self.heldout)["mean"]
            curve.append((final_step, value))
        value = curve[-1][1] if curve else float("nan")
        outcome = "pruned" if pruned_at is not None else "complete"
        run = existing_run(train_id)
        # the curve's last point (the highest step) is the trial's value, so the run's
        # latest `heldout_deviance` is what Optuna got
        run.log_metric_history(OBJECTIVE, [v for _, v in curve], [s for s, _ in curve])
        run.log_metrics({"trial_number": trial.number,
                         **({ATTR_PRUNED_AT: pruned_at} if pruned_at is not None else {})})
        run.log_params({"tune.trial_number": trial.number, "tune.study_name": self.study_name})
        run.set_tags({TAG_TRIAL: trial.number, TAG_TRIAL_STATE: outcome,
                      TAG_STUDY: self.study_name, TAG_TUNE_RUN: self.parent})
        return outcome, value, train_id, pruned_at


# ---- outputs ----------------------------------------------------------------------------------

def write_trials_csv(study, path: Path) -> None:
    """One row per trial: number, state, value, params, train run, worker run, times."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", OBJECTIVE, *keys, "last_reported_iteration",
                    ATTR_PRUNED_AT, ATTR_TRAIN_RUN, ATTR_TUNE_RUN, "datetime_start",
                    "datetime_complete", "duration_s"])
        for t in trials:
            dur = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else "")
            w.writerow([t.number, t.state.name, "" if t.value is None else repr(float(t.value)),
                        *[t.params.get(k, "") for k in keys],
                        max(t.intermediate_values) if t.intermediate_values else "",
                        t.user_attrs.get(ATTR_PRUNED_AT, ""), t.user_attrs.get(ATTR_TRAIN_RUN, ""),
                        t.user_attrs.get(ATTR_TUNE_RUN, ""), t.datetime_start or "",
                        t.datetime_complete or "", dur])


def draw_plots(study, out: Path, seed: int) -> dict[str, str]:
    """``optimization_history.png`` and ``param_importances.png``; returns what was skipped, why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    skipped: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is "experimental"
        if not complete:
            skipped["optimization_history.png"] = "no complete trial yet"
        else:
            ax = optuna.visualization.matplotlib.plot_optimization_history(
                study, target_name="held-out deviance (mean per count)")
            ax.figure.savefig(out / "optimization_history.png", dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
        varied = [k for k in complete[0].params
                  if len({repr(t.params.get(k)) for t in complete}) > 1] if complete else []
        if len(complete) < 2 or not varied:
            skipped["param_importances.png"] = (
                f"needs at least 2 complete trials with different settings "
                f"(the study has {len(complete)} complete)")
        else:
            try:
                ax = optuna.visualization.matplotlib.plot_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                    target_name="held-out deviance")
            except (ValueError, RuntimeError) as err:
                skipped["param_importances.png"] = f"importance evaluation failed: {err}"
            else:
                ax.figure.savefig(out / "param_importances.png", dpi=120, bbox_inches="tight")
                plt.close(ax.figure)
    return skipped


def register_best(train_run_id: str, name: str, alias: str):
    """Register the best trial's model (the registry module is imported only when needed)."""
    from sf_mlflow.tracking.registry import register_train_run

    return register_train_run(train_run_id, name, alias)


# ---- checks and counts ------------------------------------------------------------------------

def _counted(study) -> list:
    """The trials that count toward ``n_trials``, after failing those of dead workers."""
    import optuna
    from optuna.trial import TrialState

    stale = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.number in stale]
    for t in failed:
        say(STAGE, f"trial {t.number}: its worker stopped sending heartbeats (killed?); "
                   "marked FAIL and queued once more")
    return study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))


def _waiting(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def check_tunable(config: Config) -> None:
    """The study searches the spatial model's settings: refuse a non-spatial config."""
    if not config.model.spatial:
        raise ConfigError(
            f"{config.source}: the tune stage searches model.lengthscale and model.num_inducing, "
            "which only the spatial model has; set model.prior: SVGP")


# ---- the steps of run_tune ----------------------------------------------------------------------

@dataclass(frozen=True)
class StudySettings:
    """How many trials, where the study lives, its name, and the model name of the best trial."""

    n_trials: int
    storage_url: str
    study_name: str
    register_as: str


def study_settings(config: Config, n_trials: int | None, storage: str | None,
                   study_name: str | None) -> StudySettings:
    """The arguments given, else the config's ``tuning`` block, else the defaults."""
    t = config.tuning
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"n_trials = {n_trials!r} is out of range: expected a value >= 1")
    return StudySettings(n_trials=int(n_trials or t.n_trials),
                         storage_url=storage or t.storage or default_storage(config),
                         study_name=study_name or t.study_name or default_study_name(config),
                         register_as=t.register_as or f"{config.name}-tuned")


def scoring_inputs(config: Config, upstream_id: str) -> tuple[np.ndarray, Any]:
    """Coordinates of the training spots and the held-out spots that score each trial."""
    pre = load_preprocessed(upstream_id)
    heldout = pre.heldout_spots()
    if heldout is None:
        raise ConfigError(
            f"preprocess run {upstream_id} has no held-out spots, and tuning scores trials by "
            f"their held-out deviance; set preprocessing.holdout_fraction > 0 (e.g. 0.1) in "
            f"{config.source or 'the config'} and run preprocess again")
    return pre.training_spots().coordinates, heldout


def open_study(config: Config, settings: StudySettings):
    """Create the study, or load it when another worker created it already."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = make_storage(settings.storage_url)
    return optuna.create_study(storage=rdb, study_name=settings.study_name, direction="minimize",
                               pruner=make_pruner(config), load_if_exists=True)


def run_trials(study, config: Config, trainer: _Trial, n_trials: int) -> dict[str, int]:
    """Ask, run and tell trials until the study holds ``n_trials`` that count.

    Returns how many trials this worker completed and pruned. A trial that raises is
    told FAIL before the error goes on.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread
    from optuna.trial import TrialState

    mine = {"complete": 0, "pruned": 0}
    while len(_counted(study)) < n_trials or _waiting(study):
        study.sampler = make_sampler(config, len(study.get_trials(deepcopy=False)))
        queued = {x.number for x in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        with warnings.catch_warnings():  # ask/tell with heartbeats is what we mean to do
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        earlier = [x for x in _counted(study) if x.number < trial.number]
        # a queued trial (e.g. the retry of a dead worker's) was counted already
        if trial.number not in queued and len(earlier) >= n_trials:
            # another worker took the last slot between our count and our ask
            trial.set_user_attr(ATTR_SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            break
        try:
            # the heartbeat says this worker is alive (what study.optimize does itself)
            with get_heartbeat_thread(trial._trial_id, study._storage):
                outcome, value, train_id, pruned_at = trainer.run(trial)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        tell(study, trial, outcome, value, train_id, pruned_at)
        mine[outcome] = mine.get(outcome, 0) + 1
    return mine


def tell(study, trial, outcome: str, value: float, train_id: str, pruned_at: int | None) -> None:
    """Report a trial's outcome to the study, and say it."""
    from optuna.trial import TrialState

    if outcome == "pruned":
        trial.set_user_attr(ATTR_PRUNED_AT, pruned_at)
        study.tell(trial, state=TrialState.PRUNED)
        say(STAGE, f"trial {trial.number}: pruned at iteration {pruned_at} "
                   f"(held-out deviance {value:.5g}; run {train_id})")
    elif not math.isfinite(value):
        # a diverged fit (NaN) or a zero rate where counts are positive (inf): the
        # worst possible score, so the sampler steers away from these settings
        study.tell(trial, float("inf"))
        say(STAGE, f"trial {trial.number}: held-out deviance is {value}; scored as inf "
                   f"(run {train_id})")
    else:
        study.tell(trial, value)
        say(STAGE, f"trial {trial.number}: held-out deviance {value:.5g} (run {train_id})")


def study_metrics(study, mine: dict[str, int]) -> tuple[dict[str, float], Any]:
    """Trial counts of the study and of this worker, and the best complete trial (or None)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_state = {s: sum(x.state == s for x in trials) for s in TrialState}
    metrics = {"n_trials_complete": by_state[TrialState.COMPLETE],
               "n_trials_pruned": by_state[TrialState.PRUNED],
               "n_trials_failed": sum(x.state == TrialState.FAIL
                                      and not x.user_attrs.get(ATTR_SURPLUS) for x in trials),
               "n_trials_running": by_state[TrialState.RUNNING],
               "n_trials_this_worker": mine["complete"] + mine["pruned"],
               "n_trials_pruned_this_worker": mine["pruned"]}
    return metrics, best_complete(trials)


def best_complete(trials: list) -> Any:
    """The complete trial of lowest held-out deviance, or None."""
    from optuna.trial import TrialState

    complete = [x for x in trials if x.state == TrialState.COMPLETE]
    return min(complete, key=lambda x: x.value) if complete else None


def log_study(run: StageRun, config: Config, study) -> None:
    """Log ``trials.csv`` and the plots; tag the plots that could not be drawn, and why."""
    with staging_dir(config, STAGE, run.run_id) as out:
        write_trials_csv(study, out / "trials.csv")
        seed = config.tuning.seed if config.tuning.seed is not None else config.seed
        for name, why in draw_plots(study, out, seed).items():
            say(STAGE, f"{name} not drawn: {why}")
            run.set_tags({f"sf.tune.skipped.{name}": why})
        run.log_artifacts(out)


def log_best(run: StageRun, metrics: dict[str, float], best, register_as: str,
             alias: str) -> None:
    """Log the metrics and the best trial's settings; register its model as ``register_as``."""
    if best is None:
        run.log_metrics(metrics)
        say(STAGE, "no complete trial: nothing to register")
        return
    best_train = best.user_attrs[ATTR_TRAIN_RUN]
    metrics.update({"best_heldout_deviance": float(best.value),
                    "best_trial_number": best.number})
    run.log_metrics(metrics)
    run.log_params({**{f"best.{k}": v for k, v in best.params.items()},
                    "best.train_run_id": best_train})
    run.set_tags({"sf.tune.best_train_run_id": best_train})
    say(STAGE, f"best: trial {best.number} ({_fmt(best.params)}) held-out deviance "
               f"{best.value:.5g}, train run {best_train}")


def publish_best(study, register_as: str, alias: str, attempts: int = 5) -> None:
    """Point ``register_as@alias`` at the study's best complete trial, as it is in storage now.

    Workers of one study finish in any order and each registers what it sees as best; a
    worker that read the study before another's last trial completed would otherwise move
    the alias back to a worse trial. So the best is re-read from the storage right before
    each write and checked again after it, until the alias and the best agree.
    """
    for _ in range(attempts):
        best = best_complete(study.get_trials(deepcopy=False))
        if best is None:
            return
        best_train = best.user_attrs[ATTR_TRAIN_RUN]
        if alias_run_id(register_as, alias) == best_train:
            say(STAGE, f"{register_as}@{alias} is train run {best_train} (trial {best.number})")
            return
        version = register_best(best_train, register_as, alias)
        say(STAGE, f"registered {register_as} version {version} with alias {alias!r} "
                   f"(trial {best.number})")
    say(STAGE, f"warning: {register_as}@{alias} kept moving while other workers registered; "
               "it points at the last trial registered")


# ---- the stage ----------------------------------------------------------------------------------

def run_tune(config: Config, preprocess_run_id: str | None = None, n_trials: int | None = None,
             storage: str | None = None, study_name: str | None = None) -> str:
    """Run (or join) an Optuna study of train runs and log its outcome. Returns the run ID.

    ``n_trials``, ``storage`` and ``study_name`` override the config's ``tuning`` block.
    Logs ``trials.csv``, ``optimization_history.png`` and ``param_importances.png``, the
    best trial's settings as ``best.<key>`` params and its held-out deviance as
    ``best_heldout_deviance``, and registers the best trial's model under ``tuning.alias``.
    """
    check_tunable(config)
    single_process(config, STAGE)
    s = study_settings(config, n_trials, storage, study_name)
    upstream_id = resolve_upstream(config, "preprocess", preprocess_run_id, by=STAGE).info.run_id
    train_xy, heldout = scoring_inputs(config, upstream_id)
    study = open_study(config, s)
    params = {**config.flat(), **config.flat("tuning"), "upstream.preprocess_run_id": upstream_id,
              "tune.n_trials": s.n_trials, "tune.storage": redact(s.storage_url),
              "tune.study_name": s.study_name, "tune.register_as": s.register_as}
    tags = {**base_tags(config), TAG_UPSTREAM: upstream_id, TAG_MODEL: model_kind(config),
            TAG_STUDY: s.study_name}
    description = (f"Optuna study {s.study_name}: {s.n_trials} trials over "
                   f"{', '.join(searched_keys(config))}, minimising held-out deviance")
    with open_run(config, STAGE, params=params, tags=tags,
                  run_name=f"tune/{model_kind(config)}/L{config.model.n_components}",
                  description=description) as run:
        say(STAGE, f"study {s.study_name!r} in {redact(s.storage_url)} "
                   f"({len(_counted(study))} of {s.n_trials} trials already there)")
        trainer = _Trial(config, upstream_id, run.run_id, train_xy, heldout, s.study_name)
        mine = run_trials(study, config, trainer, s.n_trials)
        metrics, best = study_metrics(study, mine)
        log_study(run, config, study)
        log_best(run, metrics, best, s.register_as, config.tuning.alias)
        publish_best(study, s.register_as, config.tuning.alias)
        say(STAGE, f"{metrics['n_trials_complete']} complete, {metrics['n_trials_pruned']} "
                   f"pruned in the study; this worker ran {metrics['n_trials_this_worker']}")
    return finished(STAGE, run)
