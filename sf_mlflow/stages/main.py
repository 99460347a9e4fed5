"""The ``main`` pipeline: preprocess -> train -> analyze -> figures under one parent run.

Each stage runs as a child run of the ``main`` run (tag ``mlflow.parentRunId``) and
hands its run ID to the next. A stage is reused instead of rerun when a FINISHED run
of it exists that computed the same thing: the same stage hash (the config sections
the stage depends on, see :data:`~sf_mlflow.stages._common.STAGE_SECTIONS`), the same
upstream run and the same code version (package version plus a hash of its source,
so uncommitted edits count and documentation-only commits do not). ``force=True``
reruns every stage.

The parent run records the chain of run IDs (params ``chain.<stage>_run_id``), which
stages were reused (tags ``sf.reused.<stage>``) and the headline metrics of the
chain, so the MLflow UI's run table compares configurations at a glance.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from sf_mlflow.config import Config
from sf_mlflow.provenance import code_version
from sf_mlflow.stages._common import base_tags, model_kind, open_run, run_name, say, stage_hash
from sf_mlflow.stages.analyze import run_analyze
from sf_mlflow.stages.figures import run_figures
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages.train import run_train
from sf_mlflow.tracking import TAG_MODEL, describe_run, find_reusable_run, run_metrics

STAGE = "main"

#: Metrics of the child runs copied onto the parent run (stage -> metric keys).
HEADLINE_METRICS = {
    "train": ("final_elbo", "n_iter", "training_time_s"),
    "analyze": ("moran_i_mean", "heldout_deviance", "heldout_deviance_mean",
                "train_deviance_mean", "reconstruction_error"),
}


@dataclass
class StageOutcome:
    """One link of the chain: which run holds a stage's result, and whether it was reused."""

    stage: str
    run_id: str
    reused: bool


def main_run_name(config: Config) -> str:
    """``main/<dataset>/<model>/L<L>[/M<M>/l<lengthscale>]``."""
    return f"main/{config.dataset}/" + run_name(config).split("/", 1)[1]


def _reuse_or_run(stage: str, config: Config, upstream: str | None, force: bool,
                  launch: Callable[[], str]) -> StageOutcome:
    if not force:
        found = find_reusable_run(stage, stage_hash(config, stage), code_version(), upstream)
        if found is not None:
            say(STAGE, f"{stage}: reusing {describe_run(found)}")
            return StageOutcome(stage, found.info.run_id, True)
    say(STAGE, f"{stage}: running" + (" (force)" if force else ""))
    return StageOutcome(stage, launch(), False)


def run_main(config: Config, force: bool = False) -> str:
    """Run or reuse the four stages as children of one ``main`` run; return its run ID."""
    kind = model_kind(config)
    tags = {**base_tags(config), TAG_MODEL: kind}
    params = {**config.flat(), "force": bool(force)}
    description = (f"Pipeline preprocess -> train -> analyze -> figures of {kind.upper()} "
                   f"with L={config.model.n_components} on {config.dataset} "
                   f"(config {config.source or '<in memory>'})")
    with open_run(config, STAGE, params=params, tags=tags, run_name=main_run_name(config),
                  description=description) as parent:
        pid = parent.run_id
        pre = _reuse_or_run("preprocess", config, None, force,
                            lambda: run_preprocess(config, parent_run_id=pid))
        train = _reuse_or_run("train", config, pre.run_id, force,
                              lambda: run_train(config, pre.run_id, parent_run_id=pid))
        analyze = _reuse_or_run("analyze", config, train.run_id, force,
                                lambda: run_analyze(config, train.run_id, parent_run_id=pid))
        figures = _reuse_or_run("figures", config, analyze.run_id, force,
                                lambda: run_figures(config, [analyze.run_id], parent_run_id=pid))
        chain = [pre, train, analyze, figures]

        parent.log_params({f"chain.{o.stage}_run_id": o.run_id for o in chain})
        parent.set_tags({f"sf.reused.{o.stage}": str(o.reused).lower() for o in chain})
        headline: dict[str, float] = {"stages_reused": float(sum(o.reused for o in chain))}
        for outcome in chain:
            got = run_metrics(outcome.run_id)
            headline.update({k: got[k] for k in HEADLINE_METRICS.get(outcome.stage, ())
                             if k in got})
        parent.log_metrics(headline)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "chain.json"
            path.write_text(json.dumps({"chain": [asdict(o) for o in chain],
                                        "metrics": headline}, indent=2))
            parent.log_artifact(path)
        reused = [o.stage for o in chain if o.reused]
        say(STAGE, "chain " + " -> ".join(f"{o.stage} {o.run_id[:8]}" for o in chain)
                   + (f" (reused: {', '.join(reused)})" if reused else ""))
    say(STAGE, f"finished run {pid}")
    return pid
