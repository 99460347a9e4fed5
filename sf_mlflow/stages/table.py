"""The table of pipeline stages: :data:`STAGES` maps a stage name to a :class:`Stage`.

One row per stage says which function runs it, which CLI arguments it takes besides
``--config`` and ``--set``, which config sections its output depends on (hashed into
the stage hash that ``main`` uses to reuse finished runs) and what it does in one
line. :mod:`sf_mlflow.cli` builds its subcommands from this table and dispatches
through it, and :func:`sf_mlflow.stages._common.stage_hash` reads the hashed sections
from it.

The table imports no stage module (the run function is named by its import path and
imported on use), so ``spatial_factorization --help`` stays fast.

Adding a stage ``<name>`` takes four things:

1. the stage module ``sf_mlflow/stages/<name>.py`` with a ``run_<name>(config, **kwargs)
   -> run ID`` function (shared steps -- upstream lookup, tags, staging folder, progress
   lines -- are in :mod:`sf_mlflow.stages._common`; a stage imports no other stage,
   except ``main``, which chains them);
2. one row in :data:`STAGES` below: the run function's import path, one :class:`Arg` per
   keyword argument of the run function that the CLI passes (``--foo-bar`` becomes
   ``foo_bar=``), the config sections its output depends on (``None`` if its runs are
   never reused) and a one-line description;
3. the entry point ``entry_points/<name>.py``, a copy of another one with the stage's name;
4. the entry in ``MLproject``: one parameter per argument, passed to the entry point as
   ``--foo-bar {foo_bar}``.

``tests/test_stage_table.py`` checks that the CLI, this table and the MLproject agree.

:data:`COMMANDS` lists the CLI commands that are not stages (they read finished runs and
start none, so they have no MLproject entry point), e.g. ``export``.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from sf_mlflow.errors import ConfigError

# ---- argument values ---------------------------------------------------------------------------


def boolean(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``; empty is false)."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def or_none(text: str) -> str | None:
    """The text, or None when empty (MLproject passes unset parameters as "")."""
    return text or None


def run_ids(text: str) -> list[str]:
    """Run IDs separated by commas and/or spaces."""
    return text.replace(",", " ").split()


def parse_n_trials(text: str | int | None) -> int | None:
    """``-P n_trials=...`` as given (empty: take tuning.n_trials from the config)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 1:
        raise ConfigError(f"n_trials = {text!r} is invalid: expected a whole number >= 1")
    return int(value)


def _same(value: Any) -> Any:
    return value


# ---- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One CLI argument of a stage: ``--<name>``, passed as the keyword ``name`` with ``_``.

    ``type`` converts the text while parsing (a bad value is a usage error); ``value``
    turns the parsed value into the run function's keyword argument when the stage runs
    (after the config is loaded, so its errors are the stage's one-line errors).
    """

    name: str
    help: str
    default: str = ""
    type: Callable[[str], Any] = str
    value: Callable[[Any], Any] = or_none
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def keyword(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Stage:
    """A row of :data:`STAGES`."""

    run: str
    """The run function as ``module:function``; it takes the config, then the args' keywords."""
    args: tuple[Arg, ...]
    sections: tuple[str, ...] | None
    """Config sections the output depends on besides the upstream run (None: never reused)."""
    description: str
    launch: tuple[Arg, ...] = ()
    """Options of how the process is started (CLI and MLproject), not passed to ``run``."""

    def load(self) -> Callable[..., str]:
        """The run function (imports the stage module)."""
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)

    def kwargs(self, parsed: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
        """The run function's keyword arguments from parsed CLI arguments."""
        values = vars(parsed) if isinstance(parsed, argparse.Namespace) else parsed
        return {a.keyword: a.value(values[a.keyword]) for a in self.args}


def process_count(text: str) -> int:
    """``--nproc-per-node``: an integer >= 1 (argparse reports the error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (expected an "
                                         "integer >= 1)")
    return value


_PREPROCESS_RUN = Arg("preprocess-run-id",
                      "upstream preprocess run (default: newest matching FINISHED run)")

STAGES: dict[str, Stage] = {
    "preprocess": Stage(
        run="sf_mlflow.stages.preprocess:run_preprocess",
        args=(),
        sections=("seed", "dataset", "data", "preprocessing"),
        description="load, filter and split a data set; log it as a preprocess run"),
    "train": Stage(
        run="sf_mlflow.stages.train:run_train",
        args=(
            _PREPROCESS_RUN,
            Arg("resume-from",
                "continue an interrupted (KILLED) train run from its checkpoint"),
            Arg("register-as",
                "also register the model as an MLflow pyfunc model NAME (empty: don't)",
                metavar="NAME"),
            Arg("register-alias",
                "alias of the new version (default latest, MLflow's newest version)",
                default="latest", value=lambda v: v or "latest", metavar="ALIAS"),
        ),
        sections=("seed", "model", "training"),
        description="fit the model on a preprocess run's data; log it as a train run",
        launch=(Arg("nproc-per-node",
                    "fit on K processes of this machine: re-runs the command under torchrun "
                    "--standalone with training.distributed=true (default 1: one process)",
                    default="1", type=process_count, value=int, metavar="K"),)),
    "analyze": Stage(
        run="sf_mlflow.stages.analyze:run_analyze",
        args=(Arg("train-run-id",
                  "upstream train run (default: newest FINISHED one of this config)"),),
        sections=("analysis",),
        description="compute factors, Moran's I, deviances and enrichment of a train run"),
    "figures": Stage(
        run="sf_mlflow.stages.figures:run_figures",
        args=(Arg("analyze-run-ids",
                  "one or more analyze run IDs, comma- or space-separated "
                  "(default: newest FINISHED one of this config)", value=run_ids),),
        sections=(),
        description="draw the figures of one analyze run, or compare several"),
    "tune": Stage(
        run="sf_mlflow.stages.tune:run_tune",
        args=(
            Arg("n-trials",
                "trials in the whole study, all workers together (default: tuning.n_trials)",
                value=parse_n_trials, metavar="N"),
            Arg("storage",
                "Optuna storage, e.g. postgresql://user@host/db to share the study "
                "among workers (default: tuning.storage, else sqlite <output_dir>/optuna.db)",
                metavar="URL"),
            Arg("study-name",
                "default: tuning.study_name, else <name>-<hash of config and search space>"),
            _PREPROCESS_RUN,
        ),
        sections=None,
        description="Optuna study over lengthscale and inducing points; trials are train runs"),
    "main": Stage(
        run="sf_mlflow.stages.main:run_main",
        args=(Arg("force",
                  "rerun every stage even when a matching finished run exists",
                  default="false", type=boolean, value=_same, metavar="{true,false}"),),
        sections=None,
        description="run preprocess -> train -> analyze -> figures, reusing finished stages"),
}
"""Every stage, in the order the CLI lists them."""


# ---- commands that are not stages --------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A CLI option of a :class:`Command`, e.g. ``("-o", "--output")``; required unless it
    has a default or is ``optional`` (then None when left out); ``repeat``: may be given
    several times, a list."""

    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    default: str | None = None
    optional: bool = False
    repeat: bool = False
    switch: bool = False
    """A flag without a value: False unless given."""
    positional: bool = False
    """An argument without a flag (``flags`` holds its name); with ``repeat``: one or more."""

    @property
    def required(self) -> bool:
        return self.default is None and not (self.optional or self.repeat or self.switch
                                             or self.positional)

    @property
    def keyword(self) -> str:
        return self.flags[-1].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    """A row of :data:`COMMANDS`: a CLI command that reads finished runs and starts none.

    It takes no config and is no MLflow run (so it has no MLproject entry point).
    """

    run: str
    """The function as ``module:function``; it takes the options' keywords."""
    options: tuple[Option, ...]
    description: str

    def load(self) -> Callable[..., Any]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)

    def kwargs(self, parsed: argparse.Namespace) -> dict[str, Any]:
        return {o.keyword: getattr(parsed, o.keyword) for o in self.options}


COMMANDS: dict[str, Command] = {
    "export": Command(
        run="sf_mlflow.export:export_h5ad",
        options=(Option(("--run-id",), "the analyze run to export", metavar="ID"),
                 Option(("-o", "--output"), "the .h5ad file to write", metavar="FILE.h5ad"),
                 Option(("--tracking-uri",), "the store holding the run (default: "
                        "MLFLOW_TRACKING_URI, else ./mlflow.db); never created when missing",
                        metavar="URI", optional=True),
                 Option(("--force",), "replace FILE.h5ad when it exists (it is written under "
                        "a temporary name and renamed when complete)", switch=True)),
        description="write an analyze run (counts, positions, factors, loadings, Moran's I, "
                    "run IDs) as an AnnData .h5ad file"),
    "sync": Command(
        run="sf_mlflow.tracking.journal:sync",
        options=(Option(("folder",), "a folder of unsent writes, <output_dir>/<stage>/<run "
                        "id>.unsent, as named by the stage that kept it", metavar="FOLDER",
                        repeat=True, positional=True),
                 Option(("--tracking-uri",), "upload there (default: the server the run was "
                        "made in)", metavar="URI", optional=True)),
        description="upload what a stage kept locally while its tracking server was away "
                    "(params, metrics, artifacts, the run's end), then remove the folder"),
    "show-config": Command(
        run="sf_mlflow.config_reference:show_config",
        options=(Option(("-c", "--config"), "YAML config file (left out: the defaults alone)",
                        metavar="CONFIG", optional=True),
                 Option(("--set",), "override a config key, e.g. model.n_components=5 "
                        "(repeatable)", metavar="KEY=VALUE", repeat=True)),
        description="print every config key with its resolved value and where it came from "
                    "(file, --set or default)"),
}
"""Commands besides the stages, listed after them by the CLI."""
