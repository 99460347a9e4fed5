"""The local journal of a run whose tracking server was away: recorded, uploaded in order,
idempotent, resumable, and refused for a folder that is not one (real sqlite store)."""

from __future__ import annotations

import json

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sf_mlflow.errors import StoreError
from sf_mlflow.tracking.journal import Journal, sync


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("journal", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    return uri, client, run.info.run_id


def _journal(tmp_path, uri, run_id) -> Journal:
    journal = Journal.create(tmp_path / f"{run_id}.unsent", run_id=run_id, uri=uri,
                             stage="train", since=1.0e9)
    journal.params([Param("model.n_components", "3")])
    journal.tags([RunTag("sf.converged", "true"), RunTag("sf.failure_reason", "swept")])
    journal.metrics([Metric("elbo", -float(i), 1_700_000_000_000 + i, i) for i in range(1, 2501)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pth").write_bytes(b"weights")
    (out / "training.json").write_text("{}")
    journal.artifacts(out, None)
    (out / "model.pth").write_bytes(b"changed after it was kept")   # the journal keeps its own
    journal.end("FINISHED")
    return journal


def test_sync_uploads_every_write_in_order_and_removes_the_folder(store, tmp_path, capsys):
    uri, client, run_id = store
    journal = _journal(tmp_path, uri, run_id)
    assert journal.describe() == ("2,500 metric values, 1 artifact upload, 2 batches of "
                                  "params/tags, its end (FINISHED)")
    sync([str(journal.folder)])
    assert not journal.folder.exists()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.n_components"] == "3"
    assert run.data.tags["sf.converged"] == "true"
    assert "sf.failure_reason" not in run.data.tags     # not dead: it could not reach the store
    assert [m.step for m in client.get_metric_history(run_id, "elbo")] == list(range(1, 2501))
    path = client.download_artifacts(run_id, "model.pth", str(tmp_path / "dl"))
    assert open(path, "rb").read() == b"weights"
    assert f"run {run_id} (train): 5 kept writes uploaded" in capsys.readouterr().out


def test_a_sync_cut_short_continues_where_it_stopped_and_writes_nothing_twice(store, tmp_path):
    uri, client, run_id = store
    journal = _journal(tmp_path, uri, run_id)
    entries = journal.entries()
    # the first three entries went through before the connection was lost; the third's
    # answer was lost, so it is sent again
    journal._mark_sent(2)
    from sf_mlflow.tracking.journal import _UPLOAD

    for entry in entries[:3]:
        _UPLOAD[entry["kind"]](journal, client, entry)
    sync(str(journal.folder))
    history = client.get_metric_history(run_id, "elbo")
    assert len(history) == 2500 and [m.step for m in history] == list(range(1, 2501))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sync_refuses_a_folder_that_holds_no_journal_in_one_line(tmp_path):
    with pytest.raises(StoreError, match=r"is not a folder of unsent writes \(no journal.json"):
        sync([str(tmp_path)])


def test_sync_to_a_store_without_the_run_names_the_folder_and_keeps_it(store, tmp_path):
    uri, client, run_id = store
    journal = _journal(tmp_path, uri, "0" * 32)
    with pytest.raises(StoreError, match=r"uploading .* stopped after 0 of 5 entries"):
        sync([str(journal.folder)])
    assert journal.folder.is_dir() and json.loads(
        (journal.folder / "journal.json").read_text())["run_id"] == "0" * 32
