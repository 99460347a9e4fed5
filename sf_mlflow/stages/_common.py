"""What every stage shares: tags from the config, the upstream run, a run, a staging folder."""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from sf_mlflow import files
from sf_mlflow.config import Config
from sf_mlflow.data.io import PreprocessedData, read_preprocessed
from sf_mlflow.errors import ConfigError, RunLookupError
from sf_mlflow.provenance import code_version
from sf_mlflow.stages._checks import check_upstream
from sf_mlflow.stages.table import STAGES
from sf_mlflow.tracking import (
    TAG_CONFIG_HASH,
    TAG_DATASET,
    TAG_PREPROCESS_HASH,
    TAG_REUSABLE,
    TAG_STAGE_HASH,
    TAG_UPSTREAM,
    UNSENT_SUFFIX,
    StageRun,
    describe_experiment,
    describe_run,
    download_artifacts,
    experiment_url,
    ui_address,
    ui_port,
    find_latest_run,
    get_stage_run,
    lookup_experiment_id,
    stage_run,
)
from sf_mlflow.tracking.claims import hold_claim

#: The config sections that determine each stage's output (its upstream run carries the rest):
#: the ``sections`` of the stages in :data:`~sf_mlflow.stages.table.STAGES` whose runs are reused.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    name: stage.sections for name, stage in STAGES.items() if stage.sections is not None}

PREPROCESS_SECTIONS = STAGE_SECTIONS["preprocess"]


# ---- hashes and tags ----------------------------------------------------------------------------

def preprocess_hash(config: Config) -> str:
    """Hash of every setting that determines a preprocess run's output."""
    return stage_hash(config, "preprocess")


def stage_hash(config: Config, stage: str) -> str:
    """Hash of the settings a stage's output depends on, besides its upstream run.

    Two runs of a stage with the same stage hash, upstream run and code version
    compute the same thing, so the ``main`` pipeline reuses the finished one.
    """
    sections = STAGE_SECTIONS.get(stage)
    if sections is None:
        raise KeyError(f"unknown stage {stage!r}")
    return config.digest(*sections) if sections else "none"


def single_process(config: Config, stage: str) -> None:
    """Refuse ``training.distributed`` in a stage that fits in one process (main, tune).

    Only the train entry point splits a fit across torchrun's processes; under torchrun
    every process of another stage would make its own runs.
    """
    where = [f"{config.source}: training.distributed"] if config.training.distributed else []
    where += [f"{config.source}: models.{name}.training.distributed"
              for name, c in config.model_configs().items() if c.training.distributed]
    if where:
        raise ConfigError(f"{where[0]} = true is supported by the train entry point only, not by "
                          f"{stage}: set it false here, or train with `torchrun --nproc-per-node K "
                          "-m sf_mlflow.cli train -c CONFIG --set training.distributed=true`")


def base_tags(config: Config, stage: str | None = None) -> dict[str, str]:
    tags = {TAG_DATASET: config.dataset, TAG_CONFIG_HASH: config.digest(),
            TAG_PREPROCESS_HASH: preprocess_hash(config)}
    if stage is not None:
        tags[TAG_STAGE_HASH] = stage_hash(config, stage)
        tags[TAG_REUSABLE] = "true"
    return tags


# ---- names --------------------------------------------------------------------------------------

#: The kinds of model :func:`model_kind` names, and which of them have a GP prior.
MODEL_KINDS = ("pnmf", "svgp", "mggp", "hybrid")
SPATIAL_KINDS = ("svgp", "mggp", "hybrid")


def model_kind(config: Config) -> str:
    """``"pnmf"`` (Gaussian prior), ``"svgp"`` (GP prior, one kernel for all spots),
    ``"mggp"`` (GP prior with the multi-group kernel over cell-type groups) or ``"hybrid"``
    (``model.spatial_components`` of the factors under the GP prior): the model's name in
    run names, the ``sf.model`` tag, descriptions, export keys and the report."""
    if not config.model.spatial:
        return "pnmf"
    if config.model.spatial_components is not None:
        return "hybrid"
    return "mggp" if config.model.groups else "svgp"


def run_name(config: Config) -> str:
    """``train/<model>/L<L>[/K<spatial components>][/M<M>/l<lengthscale>]``."""
    m = config.model
    kind = model_kind(config)
    name = f"train/{kind}/L{m.n_components}"
    if kind == "hybrid":
        name += f"/K{m.spatial_components}"
    if kind in SPATIAL_KINDS:
        name += f"/M{m.num_inducing}/l{setting(m.lengthscale)}"
    return name


def setting(value) -> str:
    """A numeric setting for names and descriptions: ``4``, ``0.5``, or ``auto``."""
    return value if isinstance(value, str) else f"{value:g}"


def safe_name(name: str) -> str:
    """A group name usable in a file name (``L2/3 IT`` -> ``L2_3_IT``)."""
    return files.safe_name(name, "group")


#: Words for the characters a file name leaves out, when two group names differ only there.
#: (Brackets only separate: ``T(cell)`` -> ``T_cell``.)
_SPELLED = {"/": "slash", " ": "space", "\\": "backslash", ":": "colon", "+": "plus",
            "&": "and", ",": "comma", "#": "hash", "(": "", ")": ""}


def _spelled(name: str) -> str:
    """``L2/3`` -> ``L2_slash_3``: a file-name part that keeps what safe_name drops."""
    def word(m: re.Match) -> str:
        c = m.group()
        return f"_{_SPELLED.get(c, f'u{ord(c):04x}')}_"
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._-]", word, str(name))).strip("_") or "group"


def group_file_names(names) -> list[str]:
    """File-name parts of the groups ``names``, in order, all distinct.

    :func:`safe_name` of each; groups whose safe names coincide (``L2/3`` and ``L2_3``)
    spell out the characters that set them apart (``L2_slash_3``, ``L2_3``), so a reader
    can tell which file is which; only names that still coincide get a short suffix from
    a hash of their own name. The names are the same from run to run (and, for groups
    that do not clash, the same as before).
    """
    safe = [safe_name(n) for n in names]
    counts: dict[str, int] = {}
    for s in safe:
        counts[s] = counts.get(s, 0) + 1
    out = [s if counts[s] == 1 else _spelled(n) for s, n in zip(safe, names)]
    seen: dict[str, int] = {}
    for o in out:
        seen[o] = seen.get(o, 0) + 1
    return [o if seen[o] == 1 else f"{o}_{hashlib.sha256(str(n).encode()).hexdigest()[:6]}"
            for o, n in zip(out, names)]


def say(stage: str, message: str) -> None:
    """Progress line on stdout, prefixed with the stage (flushed: runs may be long)."""
    print(f"[{stage}] {message}", flush=True)


# ---- upstream runs ------------------------------------------------------------------------------

def _newest_matching(config: Config, stage: str) -> tuple[dict[str, str], str]:
    """Tags that mark a run of ``stage`` made for this config, and how to say it.

    A preprocess run matches on the preprocessing settings alone (every model of a data
    set shares it); any other run on the whole config.
    """
    src = config.source or "<your config>"
    if stage == "preprocess":
        return ({TAG_PREPROCESS_HASH: preprocess_hash(config)},
                f"matches dataset '{config.dataset}' and the preprocessing settings of {src}")
    return {TAG_CONFIG_HASH: config.digest()}, f"was made with the config {src}"


def resolve_upstream(config: Config, stage: str, run_id: str | None, *, by: str,
                     param: str | None = None, advice: str | None = None):
    """The upstream run of ``stage`` that stage ``by`` reads.

    The run ``run_id`` if given (checked to be a FINISHED ``stage`` run made from this
    config's data and, for a train or analyze run, its settings: see
    :func:`~sf_mlflow.stages._checks.check_upstream`, whose ``advice`` ends a refusal),
    else the newest
    FINISHED ``stage`` run made for this config in this run's experiment (never another
    experiment's: see :func:`~sf_mlflow.tracking.lookup_experiment_id`), else
    :class:`RunLookupError` with the
    command that makes one and the MLproject parameter ``param`` (default
    ``<stage>_run_id``) that passes one.
    """
    if run_id:
        run = get_stage_run(run_id, stage)
        check_upstream(config, stage, run, param=param, advice=advice)
        return run
    tags, matching = _newest_matching(config, stage)
    exp_id = lookup_experiment_id(config.name)
    run = find_latest_run(stage, tags, exp_id) if exp_id is not None else None
    if run is None:
        src = config.source or "<your config>"
        where = describe_experiment(exp_id) if exp_id is not None else f"'{config.name}'"
        raise RunLookupError(
            f"no FINISHED {stage} run {matching} in experiment {where}; run it first:\n"
            f"  mlflow run . -e {stage} --env-manager local -P config={src}\n"
            f"or pass one with -P {param or stage + '_run_id'}=<run id>")
    say(by, f"using the newest matching {stage} run {describe_run(run)}")
    return run


def load_preprocessed(run_id: str, dst: str | Path | None = None) -> PreprocessedData:
    """The data a preprocess run logged (downloaded to ``dst``, else to a temporary folder)."""
    if dst is not None:
        return read_preprocessed(download_artifacts(run_id, "data", dst))
    with tempfile.TemporaryDirectory() as tmp:
        return read_preprocessed(download_artifacts(run_id, "data", tmp))


# ---- the run and its outputs --------------------------------------------------------------------

@contextlib.contextmanager
def open_run(config: Config, stage: str, *, params: Mapping[str, Any],
             tags: Mapping[str, Any], run_name: str, description: str,
             parent_run_id: str | None = None, headline: str | None = None
             ) -> Iterator[StageRun]:
    """:func:`~sf_mlflow.tracking.stage_run` in the config's experiment, announced on stdout.

    The first progress line is ``run <id>: <headline>`` (default: the description); the
    caller says ``finished run <id>`` with :func:`finished` after the block.
    """
    with stage_run(stage, experiment=config.name, params=params, tags=tags,
                   run_name=run_name, description=description,
                   parent_run_id=parent_run_id) as run:
        run.spool = (Path(config.output_dir) / stage / f"{run.run_id}{UNSENT_SUFFIX}").absolute()
        say(stage, f"run {run.run_id}: {headline if headline is not None else description}")
        if parent_run_id is None and stage in CLAIMED and TAG_STAGE_HASH in tags:
            # (under main, main holds the claim of what its children compute)
            release = hold_claim(stage, tags[TAG_STAGE_HASH], code_version(),
                                 tags.get(TAG_UPSTREAM), run.run_id,
                                 say=lambda line: say(stage, line))
            if release is not None:     # released once the run has ended, not before
                run.after_end.append(release)
        yield run


#: Stages whose standalone runs hold the claim of what they compute (see
#: :mod:`sf_mlflow.tracking.claims`), so that a ``main`` started meanwhile waits for them.
CLAIMED = ("preprocess", "train", "analyze", "figures")


#: Local output folders of the runs of this process (run ID -> folder), for :func:`finished`.
_OUTPUT_DIRS: dict[str, Path] = {}


def finished(stage: str, run: StageRun) -> str:
    """Say that the run finished and where its outputs are; return its ID.

    Prints the run ID, its experiment, the artifact location and the local copy of the
    outputs (the staging folder of :func:`staging_dir`), and the UI URL of the experiment.
    """
    info = run.info
    say(stage, f"finished run {run.run_id} in experiment {describe_experiment(info.experiment_id)}")
    say(stage, f"  artifacts:  {info.artifact_uri}")
    local = _OUTPUT_DIRS.get(run.run_id)
    if local is not None and local.is_dir():
        say(stage, f"  local copy: {local.resolve()}")
    server = ui_address()[1]
    say(stage, f"  in the UI:  {experiment_url(info.experiment_id)}"
               + ("" if server else f"  (after `mlflow ui --port {ui_port()}`)"))
    return run.run_id


@contextlib.contextmanager
def staging_dir(config: Config, stage: str, run_id: str) -> Iterator[Path]:
    """Folder for a stage's outputs: ``<output_dir>/<stage>/<run_id>``.

    Outputs are written to ``<run_id>.partial`` and the folder is renamed only when the
    stage succeeded, so a failed or interrupted stage leaves no folder that looks complete.
    """
    final = Path(config.output_dir) / stage / run_id
    partial = final.with_name(run_id + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.filename is None:
            # numpy, h5py and zipfile often raise ENOSPC without the file: name the folder
            err.filename = str(partial)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _OUTPUT_DIRS[run_id] = final
