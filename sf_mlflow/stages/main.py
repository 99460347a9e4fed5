"""The ``main`` pipeline: preprocess -> train -> analyze -> figures under one parent run.

Each stage runs as a child run of the ``main`` run (tag ``mlflow.parentRunId``) and
hands its run ID to the next. A stage is reused instead of rerun when a FINISHED run
of it exists that computed the same thing: the same stage hash (the config sections
the stage depends on, see :data:`~sf_mlflow.stages._common.STAGE_SECTIONS`), the same
upstream run and the same code version (package version plus a hash of its source,
so uncommitted edits count and documentation-only commits do not). ``force=True``
reruns every stage.

A train run that SIGINT/SIGTERM stopped with a checkpoint (tag ``sf.interrupted``), of
the same stage hash, preprocess run and code version, and with no finished run of the
same thing after it, is not started over: ``main`` resumes it from its checkpoint (the
new run is tagged ``sf.resumed_from``). Runs left RUNNING by a dead process (SIGKILL)
are ended FAILED first (:mod:`sf_mlflow.tracking.liveness`).

A config with ``models:`` (:mod:`sf_mlflow.config_models`) preprocesses once, trains
and analyzes every listed model on that preprocess run (each with its own effective
config, so its runs are the ones a one-model config with the same settings makes and
reuses), then draws the comparison figures of all of them in one figures run.

The parent run records the chain of run IDs (tags ``sf.chain.<stage>_run_id``, and
``sf.chain.<model>.<stage>_run_id`` for each model's train and analyze runs), which
stages were reused (tags ``sf.reused.<stage>``), the headline metrics of the chain
(``<model>.<metric>`` with several models) and ``report.html``: one self-contained
page with every model's numbers and figures (:mod:`sf_mlflow.report`).
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from sf_mlflow.config import Config
from sf_mlflow.provenance import code_version
from sf_mlflow.report import Figure, ModelResult, write_report
from sf_mlflow.stages._common import (
    base_tags,
    model_kind,
    open_run,
    setting,
    run_name,
    say,
    single_process,
    stage_hash,
    staging_dir,
)
from sf_mlflow.stages.analyze import run_analyze
from sf_mlflow.stages.figures import run_figures
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages.train import run_train
from sf_mlflow.tracking import (
    TAG_MODEL,
    StageRun,
    add_headline_metrics,
    describe_run,
    download_artifacts,
    find_reusable_run,
    run_metrics,
    ui_command,
)
from sf_mlflow.tracking.claims import stage_claim
from sf_mlflow.tracking.lineage import find_interrupted_run
from sf_mlflow.tracking.liveness import sweep_dead_runs

STAGE = "main"

#: Per-model metrics of a multi-model ``main`` added to the experiment's headline view.
_VIEW_METRICS = ("heldout_deviance_mean", "moran_i_mean", "final_elbo")

#: Metrics of the child runs copied onto the parent run (stage -> metric keys).
HEADLINE_METRICS = {
    "train": ("final_elbo", "n_iter", "training_time_s"),
    "analyze": ("moran_i_mean", "heldout_deviance", "heldout_deviance_mean",
                "train_deviance_mean", "reconstruction_error"),
}


@dataclass
class StageOutcome:
    """One link of the chain: which run holds a stage's result, and whether it was reused.

    ``model`` names the model of a train or analyze run when the config lists several.
    """

    stage: str
    run_id: str
    reused: bool
    model: str | None = None

    @property
    def key(self) -> str:
        """``<stage>`` or ``<model>.<stage>``: the suffix of the parent's chain tags."""
        return f"{self.model}.{self.stage}" if self.model else self.stage


def main_run_name(config: Config) -> str:
    """``main/<dataset>/<model>/L<L>[/M<M>/l<lengthscale>]``, or ``main/<dataset>/<a>+<b>...``."""
    if config.models:
        return f"main/{config.dataset}/" + "+".join(config.models)
    return f"main/{config.dataset}/" + run_name(config).split("/", 1)[1]


def _used(metrics: Mapping[str, float], key: str, configured) -> str:
    """The value a fit used (its train metric), else the configured one."""
    if key == "lengthscale":
        per = sorted(v for k, v in metrics.items() if k.startswith("lengthscale_")
                     and k[len("lengthscale_"):].isdigit())
        if len(per) > 1 and f"{per[0]:.3g}" != f"{per[-1]:.3g}":
            return f"lengthscales {per[0]:.3g}-{per[-1]:.3g} (one per factor)"
        if per:
            return f"lengthscale {per[0]:.3g}"
        if "lengthscale" in metrics:
            return f"lengthscale {metrics['lengthscale']:.3g}"
        return f"lengthscale {setting(configured)}"
    return f"{metrics[key]:.0f}" if key in metrics else setting(configured)


def describe_model(config: Config, metrics: Mapping[str, float] | None = None) -> str:
    """The model of a config in words, e.g. ``MGGP-SVGP prior (with groups), M=412,
    lengthscales 8.1-20.4 (one per factor), L=5``: with a fit's ``metrics``, the values
    it used (``auto`` resolved), else the configured ones."""
    m, metrics = config.model, metrics or {}
    if not m.spatial:
        return f"Gaussian prior (non-spatial PNMF), L={m.n_components}"
    groups = "MGGP-SVGP prior (with groups)" if m.groups else "SVGP prior (without groups)"
    text = (f"{groups}, M={_used(metrics, 'num_inducing', m.num_inducing)}, "
            f"{_used(metrics, 'lengthscale', m.lengthscale)}, L={m.n_components}")
    if m.spatial_components is None:
        return text
    return (f"hybrid (NSFH): {m.spatial_components} spatial factors with the {text}, "
            f"{m.n_components - m.spatial_components} non-spatial with the Gaussian prior")


#: The stage that runs on each stage's result in a chain (for reuse: see find_reusable_run).
_NEXT = {"preprocess": "train", "train": "analyze"}


def _reuse_or_run(stage: str, config: Config, upstream: str | None, force: bool,
                  launch: Callable[[], str], holder: str, model: str | None = None,
                  resume: Callable[[str], str] | None = None) -> StageOutcome:
    """Reuse a finished run of the stage, else resume an interrupted one (with ``resume``),
    else ``launch`` a new one, holding the stage's claim for the ``main`` run ``holder``
    (:mod:`sf_mlflow.tracking.claims`): a stage another live ``main`` computes is waited for
    and reused."""
    label = f"{stage} of {model}" if model else stage
    if force:
        say(STAGE, f"{label}: running (force)")
        return StageOutcome(stage, launch(), False, model)
    found = _reusable(stage, config, upstream, label, model)
    if found is not None:
        return found
    # another main may be computing this very stage: wait for it rather than compute it twice
    with stage_claim(stage, stage_hash(config, stage), code_version(), upstream, holder,
                     say=lambda line: say(STAGE, f"{label}: {line}")) as waited:
        found = _reusable(stage, config, upstream, label, model) if waited else None
        if found is not None:
            return found
        stopped = (find_interrupted_run(stage, stage_hash(config, stage), code_version(),
                                        upstream) if resume is not None and upstream else None)
        if stopped is not None:
            at = stopped.data.metrics.get("interrupted_at_iteration")
            say(STAGE, f"{label}: resuming the interrupted run {stopped.info.run_id} "
                       f"({stopped.info.run_name}, {stopped.info.status}) from its checkpoint"
                       + (f" at iteration {at:.0f}" if at is not None else ""))
            return StageOutcome(stage, resume(stopped.info.run_id), False, model)
        say(STAGE, f"{label}: running")
        return StageOutcome(stage, launch(), False, model)


def _reusable(stage: str, config: Config, upstream: str | None, label: str,
              model: str | None) -> StageOutcome | None:
    """The finished run of the stage to reuse (said so), or None."""
    found = find_reusable_run(stage, stage_hash(config, stage), code_version(), upstream,
                              downstream=_NEXT.get(stage))
    if found is None:
        return None
    say(STAGE, f"{label}: reusing {describe_run(found)}")
    return StageOutcome(stage, found.info.run_id, True, model)


def _fit_models(models: dict[str, Config], pre_id: str, pid: str, force: bool,
                named: bool) -> dict[str, tuple[StageOutcome, StageOutcome]]:
    """Train and analyze every model on the preprocess run ``pre_id`` (or reuse them)."""
    out = {}
    for name, cfg in models.items():
        label = name if named else None
        train = _reuse_or_run("train", cfg, pre_id, force, holder=pid, model=label, launch=(
            lambda cfg=cfg: run_train(cfg, pre_id, parent_run_id=pid)), resume=(
            lambda old, cfg=cfg: run_train(cfg, pre_id, parent_run_id=pid, resume_from=old)))
        analyze = _reuse_or_run("analyze", cfg, train.run_id, force, holder=pid, model=label,
                                launch=(lambda cfg=cfg, tid=train.run_id:
                                        run_analyze(cfg, tid, parent_run_id=pid)))
        out[name] = (train, analyze)
    return out


def _headline(fitted: dict[str, tuple[StageOutcome, StageOutcome]], named: bool
              ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The parent's metrics, and every model's train and analyze metrics (for the report)."""
    per_model: dict[str, dict[str, float]] = {}
    headline: dict[str, float] = {}
    for name, outcomes in fitted.items():
        got: dict[str, float] = {}
        for o in outcomes:
            got.update(run_metrics(o.run_id))
        per_model[name] = got
        keys = [k for o in outcomes for k in HEADLINE_METRICS[o.stage] if k in got]
        headline.update({(f"{name}.{k}" if named else k): got[k] for k in keys})
    return headline, per_model


#: What each figure shows, by its file name (figures.py makes them).
CAPTIONS = {
    "factors_spatial": "The factors on the tissue, in descending Moran's I order (held-out "
                       "spots: predicted from their positions)",
    "scales_spatial": "Posterior standard deviation of each log-factor (the uncertainty of "
                      "the maps above)",
    "elbo_curve": "Training: the ELBO and the held-out deviance per iteration, with the "
                  "iteration the fit kept",
    "top_genes": "The genes with the largest loadings on each factor",
    "factors_with_genes": "Each factor beside the counts of its top gene",
    "gene_enrichment": "Gene enrichment: log fold change of each cell type's refitted "
                       "loadings against the shared ones",
    "groupwise_factors": "The factors as the GP predicts them for each cell type",
    "cell_types": "Where the cell types are on the tissue",
    "compare_moran_i": "Moran's I of each model's factors (one dot a factor; nothing pairs "
                       "the factors of different models)",
    "compare_factors": "The factors of each model paired with their best-correlated "
                       "counterpart in the other (r on the training spots)",
}


def caption(figure: Path) -> str:
    """A figure's caption from its path under ``figures/`` (per-group ones name the group)."""
    if figure.parent.name == "enrichment_by_group":
        return f"Gene enrichment in cell type {figure.stem}, factor by factor"
    return CAPTIONS.get(figure.stem, figure.stem.replace("_", " ").capitalize())


def _figures_by_model(figures_run_id: str, analyses: dict[str, str], tmp: Path
                      ) -> tuple[dict[str, list[Figure]], list[Figure]]:
    """The figures run's PNGs: each model's (by its analyze run ID in the folder name;
    with one model all of them) and the comparison figures (the rest)."""
    root = download_artifacts(figures_run_id, "", tmp)
    listed = root / "figures.json"
    if listed.is_file():
        paths = [root / p for p in json.loads(listed.read_text()) if p.endswith(".png")]
    else:
        paths = sorted((root / "figures").rglob("*.png"))
    per: dict[str, list[Figure]] = {name: [] for name in analyses}
    comparison: list[Figure] = []
    for path in paths:
        rel = path.relative_to(root / "figures")
        owner = None
        if len(analyses) == 1:
            owner = next(iter(analyses))
        elif len(rel.parts) > 1:
            owner = next((n for n, aid in analyses.items() if aid[:8] in rel.parts[0]), None)
        inner = Path(*rel.parts[1:]) if owner and len(analyses) > 1 else rel
        (per[owner] if owner else comparison).append(Figure(path, caption(inner)))
    return per, comparison


def _per_spot(analyze_id: str, tmp: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """An analyze run's per-spot held-out deviance (N_heldout,) and its factors at the
    training spots (N_train, L), for the report's intervals and duplicate flags; None
    for what a run made by an older version lacks."""
    from sf_mlflow.errors import ArtifactError

    out: list[np.ndarray | None] = []
    for name in ("heldout_deviance.npy", "factors.npy", "spots.csv"):
        try:
            path = download_artifacts(analyze_id, name, tmp)
        except ArtifactError:
            out.append(None)
            continue
        out.append(np.load(path) if name.endswith(".npy") else path)
    held, factors, spots = out
    if factors is not None and spots is not None:
        with open(spots, newline="") as fh:
            training = np.array([r["heldout"] == "0" for r in csv.DictReader(fh)])
        factors = factors[training] if training.size == len(factors) else None
    return held, factors


def _write_outputs(config: Config, parent: StageRun, chain: list[StageOutcome],
                   models: dict[str, Config],
                   fitted: dict[str, tuple[StageOutcome, StageOutcome]],
                   headline: dict[str, float], per_model: dict[str, dict[str, float]]) -> Path:
    """``chain.json`` and ``report.html``, kept under ``<output_dir>/main/<run id>`` and logged."""
    figures = chain[-1]
    with tempfile.TemporaryDirectory() as tmp, \
            staging_dir(config, STAGE, parent.run_id) as out:
        per, comparison = _figures_by_model(
            figures.run_id, {n: analyze.run_id for n, (_, analyze) in fitted.items()}, Path(tmp))
        results = []
        for name, cfg in models.items():
            got = per_model[name]
            held, factors = _per_spot(fitted[name][1].run_id, Path(tmp) / name)
            results.append(ModelResult(
                name=name, description=describe_model(cfg, got), metrics=got,
                run_ids={o.stage: o.run_id for o in fitted[name]}, figures=per[name],
                converged=bool(got["converged"]) if "converged" in got else None,
                heldout_deviance=held, factors=factors))
        (out / "chain.json").write_text(json.dumps(
            {"chain": [asdict(o) for o in chain], "metrics": headline}, indent=2))
        write_report(out / "report.html", f"{config.name}: {', '.join(models)} on "
                     f"{config.dataset}", results, comparison=comparison,
                     intro=f"Config {config.source or '<in memory>'}; main run {parent.run_id}.",
                     footer={"main run": parent.run_id, "code version": code_version(),
                             **{f"{o.key} run": o.run_id for o in chain}})
        parent.log_artifacts(out)
    return Path(config.output_dir).resolve() / STAGE / parent.run_id / "report.html"


def _announce(parent: StageRun, report: Path, chain: list[StageOutcome]) -> None:
    """The chain, where the report is, and how to open the MLflow UI on this run."""
    reused = [o.key for o in chain if o.reused]
    say(STAGE, "chain " + " -> ".join(f"{o.key} {o.run_id[:8]}" for o in chain)
               + (f" (reused: {', '.join(reused)})" if reused else ""))
    info = parent.info
    say(STAGE, f"report: {report}")
    say(STAGE, f"        (also the artifact report.html of run {parent.run_id}, "
               f"{info.artifact_uri}/report.html)")
    command, url = ui_command(info.experiment_id, parent.run_id)
    say(STAGE, f"open the MLflow UI: {command}" + (f"\n        then {url}" if url else ""))


def run_main(config: Config, force: bool = False) -> str:
    """Run or reuse the stages as children of one ``main`` run; return its run ID.

    With ``models:`` in the config: one preprocess run, a train and an analyze run per
    model, one figures run comparing them, and ``report.html`` on the parent run.
    """
    single_process(config, STAGE)
    named = bool(config.models)
    models = config.model_configs() or {model_kind(config): config}
    kind = "+".join(models) if named else model_kind(config)
    params = {**config.flat(), "force": bool(force)}
    if named:
        params["models"] = ",".join(models)
        params.update({f"models.{n}.{s}.{k}": v for n, sections in config.models.items()
                       for s, kv in sections.items() for k, v in kv.items()})
    what = (f"{kind.upper()} with L={config.model.n_components}" if not named else
            "the models " + ", ".join(f"{n} ({describe_model(c)})" for n, c in models.items()))
    description = (f"Pipeline preprocess -> train -> analyze -> figures of {what} on "
                   f"{config.dataset} (config {config.source or '<in memory>'})")
    with open_run(config, STAGE, params=params, tags={**base_tags(config), TAG_MODEL: kind},
                  run_name=main_run_name(config), description=description) as parent:
        pid = parent.run_id
        sweep_dead_runs([parent.info.experiment_id])
        pre = _reuse_or_run("preprocess", config, None, force,
                            lambda: run_preprocess(config, parent_run_id=pid), holder=pid)
        fitted = _fit_models(models, pre.run_id, pid, force, named)
        ids = [a.run_id for _, a in fitted.values()]
        labels = {a.run_id: name for name, (_, a) in fitted.items()} if len(fitted) > 1 else None
        figures = _reuse_or_run("figures", config, ",".join(ids), force,
                                lambda: run_figures(config, ids, parent_run_id=pid, labels=labels),
                                holder=pid)
        chain = [pre, *(o for pair in fitted.values() for o in pair), figures]
        parent.set_tags({f"sf.chain.{o.key}_run_id": o.run_id for o in chain})
        parent.set_tags({f"sf.reused.{o.key}": str(o.reused).lower() for o in chain})
        headline, per_model = _headline(fitted, named)
        headline["stages_reused"] = float(sum(o.reused for o in chain))
        parent.log_metrics(headline)
        if named:   # the view's fixed columns are empty for <model>.<metric>: add those
            add_headline_metrics(parent.info.experiment_id,
                                 [k for k in headline if "." in k and k.endswith(_VIEW_METRICS)])
        report = _write_outputs(config, parent, chain, models, fitted, headline, per_model)
        _announce(parent, report, chain)
    say(STAGE, f"finished run {pid}")
    return pid
