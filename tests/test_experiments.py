"""Which experiment runs go to, the launcher run of `mlflow run`, and one-experiment lookups."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from sf_mlflow.tracking import find_latest_run, lookup_experiment_id, select_experiment, stage_run
from sf_mlflow.tracking.experiments import chosen_experiment


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    yield
    select_experiment(None)


def open_stage(name="cfg_exp", stage="preprocess", tags=None):
    return stage_run(stage, experiment=name, params={"a": 1}, tags=tags or {}, run_name="r")


def test_rules(monkeypatch, mlflow_store):
    assert chosen_experiment("cfg") == ("name", "cfg", "the config's name")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "7")             # set by the user
    assert chosen_experiment("cfg")[:2] == ("id", "7")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")                  # ... by mlflow run, Default
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    assert chosen_experiment("cfg")[:2] == ("name", "cfg")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "3")             # mlflow run --experiment-name
    assert chosen_experiment("cfg")[:2] == ("id", "3")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env_exp")
    assert chosen_experiment("cfg")[:2] == ("name", "env_exp")
    select_experiment("flag_exp")
    assert chosen_experiment("cfg")[:2] == ("name", "flag_exp")


def test_printed_ui_links_open_the_model_training_view_on_the_port_they_name(monkeypatch,
                                                                              mlflow_store):
    import mlflow

    from sf_mlflow.tracking import experiment_url, ui_command

    command, url = ui_command("3", "abc")
    assert command == f"mlflow ui --backend-store-uri {mlflow_store} --port 5000"
    assert url == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv("SF_UI_PORT", "5055")     # 5000 taken: one setting moves them all
    command, url = ui_command("3")
    assert command.endswith("--port 5055") and url.startswith("http://127.0.0.1:5055/#/experiments/3?")
    assert experiment_url("3").startswith("http://127.0.0.1:5055/#/experiments/3/runs?")
    assert experiment_url("3").endswith("&workflowType=machine_learning")
    # on a tracking server: its own address, no command to start a UI
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://mlflow-host:8080/")
    command, url = ui_command("3", "abc")
    assert command == "open http://mlflow-host:8080"
    assert url == "http://mlflow-host:8080/#/experiments/3/runs/abc?workflowType=machine_learning"


def test_experiments_of_a_sqlite_store_keep_their_artifacts_beside_it(mlflow_store, tmp_path,
                                                                       monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)            # as under mlflow run: the project's folder
    with open_stage("beside") as run:
        pass
    location = MlflowClient().get_experiment(run.info.experiment_id).artifact_location
    assert location.startswith(str(tmp_path / "mlruns" / "beside-"))
    assert list(elsewhere.iterdir()) == []


def test_runs_go_to_the_config_experiment_tagged_for_the_runs_table(mlflow_store):
    with open_stage() as run:
        pass
    client = MlflowClient()
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "cfg_exp"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert '"metrics.`moran_i_mean`"' in exp.tags["mlflow.sharedViewState.sf-headline"]
    select_experiment("flag_exp")
    with open_stage() as run:
        pass
    assert client.get_experiment(run.info.experiment_id).name == "flag_exp"


def test_mlflow_run_in_default_is_left_as_a_launcher(monkeypatch, mlflow_store):
    client = MlflowClient()
    outer = client.create_run("0", run_name="mlflow-run")
    client.log_param(outer.info.run_id, "config", "x.yaml")
    client.set_tag(outer.info.run_id, "mlflow.project.entryPoint", "preprocess")
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    with open_stage() as run:
        assert lookup_experiment_id() == run.info.experiment_id
    stage = client.get_run(run.run_id)
    launcher = client.get_run(outer.info.run_id)
    assert client.get_experiment(stage.info.experiment_id).name == "cfg_exp"
    assert stage.info.status == "FINISHED" and stage.data.params["config"] == "x.yaml"
    assert stage.data.tags["sf.launcher_run_id"] == outer.info.run_id
    assert stage.data.tags["mlflow.project.entryPoint"] == "preprocess"
    assert launcher.data.tags["sf.redirected_to_run_id"] == run.run_id
    assert "sf.stage" not in launcher.data.tags
    assert launcher.info.run_name == "launcher -> r"

    # mlflow run --experiment-name: the stage attaches to mlflow run's run
    exp = client.create_experiment("chosen")
    outer = client.create_run(exp)
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    with open_stage() as run:
        assert run.run_id == outer.info.run_id
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_lookups_never_cross_experiments(mlflow_store):
    with open_stage("one", tags={"sf.k": "v"}):
        pass
    with open_stage("two", tags={"sf.k": "v"}) as two:
        pass
    client = MlflowClient()
    one_id = client.get_experiment_by_name("one").experiment_id
    assert find_latest_run("preprocess", {"sf.k": "v"}, one_id).info.experiment_id == one_id
    assert lookup_experiment_id("three") is None                # not created by a lookup
    with open_stage("two", stage="train"):
        found = find_latest_run("preprocess", {"sf.k": "v"})    # the open run's experiment
    assert found.info.run_id == two.run_id
    with pytest.raises(ValueError, match="no stage run is open"):
        find_latest_run("preprocess", {"sf.k": "v"})
