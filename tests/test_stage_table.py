"""The STAGES table, the CLI and the MLproject agree; stage hashes stay what they were."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from sf_mlflow.cli import _build_parser
from sf_mlflow.config import config_from_dict
from sf_mlflow.stages._common import STAGE_SECTIONS, stage_hash
from sf_mlflow.stages.table import COMMANDS, STAGES

from test_stages import SMALL   # the config whose stage hashes were computed before the table

REPO = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def mlproject_entry_points() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def test_cli_table_mlproject_and_entry_points_name_the_same_stages():
    assert list(subcommands()) == [*STAGES, *COMMANDS]   # commands: no run, no entry point
    assert set(mlproject_entry_points()) == set(STAGES)
    assert {p.stem for p in (REPO / "entry_points").glob("*.py")} == set(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_mlproject_parameters_are_the_stage_arguments(name):
    entry = mlproject_entry_points()[name]
    flags = re.findall(r"(--[a-z][a-z-]*) \{(\w+)\}", entry["command"])
    assert entry["command"].startswith(f"python entry_points/{name}.py ")
    assert {param for _, param in flags} == set(entry["parameters"])
    args = {a.flag: a for a in (*STAGES[name].args, *STAGES[name].launch)}
    assert {flag for flag, _ in flags} == {"--config", *args}
    for flag, param in flags:
        if flag != "--config":
            assert args[flag].keyword == param
            assert str(entry["parameters"][param]["default"]) == args[flag].default


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_argument_reaches_its_run_function(name):
    import inspect

    stage = STAGES[name]
    run = stage.load()
    assert callable(run) and run.__name__ == f"run_{name}"
    accepted = inspect.signature(run).parameters
    assert all(a.keyword in accepted for a in stage.args)
    parsed = subcommands()[name].parse_args(["-c", "x.yaml"])
    assert set(stage.kwargs(parsed)) == {a.keyword for a in stage.args}


def test_cli_defaults_become_the_run_functions_defaults():
    parse = {name: p.parse_args for name, p in subcommands().items()}
    assert STAGES["train"].kwargs(parse["train"](["-c", "x"])) == {
        "preprocess_run_id": None, "resume_from": None, "register_as": None,
        "register_alias": "latest"}
    assert STAGES["figures"].kwargs(parse["figures"](
        ["-c", "x", "--analyze-run-ids", "a,b c"])) == {"analyze_run_ids": ["a", "b", "c"]}
    assert STAGES["tune"].kwargs(parse["tune"](["-c", "x", "--n-trials", "4"]))["n_trials"] == 4
    assert STAGES["main"].kwargs(parse["main"](["-c", "x"])) == {"force": False}
    assert STAGES["main"].kwargs(parse["main"](["-c", "x", "--force", "TRUE"])) == {"force": True}


def test_stage_hashes_are_unchanged():
    """Values computed before the table existed: reuse keys of existing runs must still match.

    The train hash changed four times, on purpose: ``model.spatial`` gave way to ``model.prior``
    (the only difference of the hashed model and training settings, checked when it changed),
    the defaults of ``model.lengthscale``, ``sigma``, ``group_diff_param`` (``auto``),
    ``per_factor_lengthscale`` (true) and ``training.learning_rate`` (``auto``) changed,
    ``training.batch_size``'s default became ``auto`` (mini-batches above a step's work limit),
    and ``model.init`` (``nndsvda``) came in: a run trained from the old random start is another
    fit and must not be reused as the new default's.
    """
    cfg = config_from_dict(SMALL, "small.yaml")
    assert {s: stage_hash(cfg, s) for s in STAGE_SECTIONS} == {
        "preprocess": "3bd33892cb29", "train": "9d8c46762389", "analyze": "db2931397a7b",
        "figures": "none"}
    assert STAGE_SECTIONS == {"preprocess": ("seed", "dataset", "data", "preprocessing"),
                              "train": ("seed", "model", "training"),
                              "analyze": ("analysis",), "figures": ()}
    for name in ("tune", "main"):  # never reused: no stage hash
        with pytest.raises(KeyError):
            stage_hash(cfg, name)


def test_only_tracking_imports_mlflow_and_stages_import_no_other_stage():
    package = REPO / "sf_mlflow"
    for path in package.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(import mlflow|from mlflow)", text, re.M):
            assert path.parent.name == "tracking", path
    stage_modules = {p.stem for p in (package / "stages").glob("*.py")} - {"__init__"}
    shared = {"_common", "_checks", "_signals", "_study", "table"}
    for name in stage_modules - shared - {"main"}:
        text = (package / "stages" / f"{name}.py").read_text()
        borrowed = set(re.findall(r"sf_mlflow\.stages\.(\w+)", text)) - shared
        assert not borrowed, f"stages/{name}.py imports the stage(s) {borrowed}"
