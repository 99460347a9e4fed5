"""Stage claims (sf_mlflow.tracking.claims) in a real sqlite MLflow store.

Two processes racing for one claim are in test_main.py
(``test_two_identical_pipelines_at_once_make_one_run_per_stage``); here: one claim per key
whoever asks, a claim whose holder died is taken over, a store without a database takes none.
"""

from __future__ import annotations

import threading
import time

from mlflow.tracking import MlflowClient

from sf_mlflow.tracking.claims import claimed, claims_supported, hold_claim, stage_claim
from sf_mlflow.tracking.runs import configure_tracking


def _running_run(client: MlflowClient) -> str:
    found = client.get_experiment_by_name("claims")
    exp = found.experiment_id if found else client.create_experiment("claims")
    return client.create_run(exp, tags={"sf.stage": "main"}).info.run_id


def test_a_claim_is_held_by_one_run_and_the_other_waits_for_its_release(mlflow_store):
    configure_tracking()
    client = MlflowClient()
    first, second = _running_run(client), _running_run(client)
    lines, order = [], []
    entered = threading.Event()

    def hold():
        with stage_claim("train", "abc", "v1", "pre", first, say=lines.append) as got:
            assert got
            entered.set()
            time.sleep(2.5)
            order.append("first done")

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(30)
    with stage_claim("train", "abc", "v1", "pre", second, say=lines.append) as got:
        order.append("second in")
        assert got
    holder.join()
    assert order == ["first done", "second in"]
    assert lines and lines[0].startswith(f"waiting for run {first} (process ")
    # another key is not held by the first claim
    with stage_claim("train", "abc", "v1", "other-pre", second, say=lines.append) as got:
        assert got


def test_a_claim_whose_holder_died_is_taken_over(mlflow_store):
    configure_tracking()
    client = MlflowClient()
    dead, alive = _running_run(client), _running_run(client)
    lines = []
    # the holder's process was killed: its claim stays, its run is swept FAILED
    gen = stage_claim("analyze", "h", "v1", "t", dead, say=lines.append)
    assert gen.__enter__()
    client.set_terminated(dead, "FAILED")
    with stage_claim("analyze", "h", "v1", "t", alive, say=lines.append) as got:
        assert got
    assert lines == [f"the run {dead} that claimed it is gone (its run ended FAILED); "
                     "taking it over"]


def test_a_store_without_a_database_of_ours_takes_no_claims():
    assert not claims_supported("http://127.0.0.1:5000")
    assert claims_supported("sqlite:////tmp/x.db")
    assert claims_supported("postgresql+psycopg2://u@h/db")
    with claimed("http://127.0.0.1:5000", "k", "r", holder_gone=lambda c: None,
                 say=print) as got:
        assert got is False


def test_a_standalone_stages_claim_makes_main_wait_but_never_waits_itself(mlflow_store):
    configure_tracking()
    client = MlflowClient()
    standalone, main, other = (_running_run(client) for _ in range(3))
    lines, order = [], []
    release = hold_claim("train", "h", "v1", "pre", standalone, say=lines.append)
    assert release is not None

    def finish():
        time.sleep(2.0)
        order.append("standalone done")
        release()

    threading.Thread(target=finish).start()
    with stage_claim("train", "h", "v1", "pre", main, say=lines.append) as got:
        order.append("main in")
        assert got
        # a second standalone run of the same stage while main holds it: a note, no wait
        assert hold_claim("train", "h", "v1", "pre", other, say=lines.append) is None
    assert order == ["standalone done", "main in"]
    assert lines[0].startswith(f"waiting for run {standalone} (process ")
    assert lines[-1].startswith(f"note: run {main} (process ") and \
        lines[-1].endswith("this run computes it too (`main` waits for such a run and reuses it)")


def test_a_standalone_stage_run_holds_its_claim_until_after_it_has_ended(mlflow_store, tmp_path):
    """The wiring in open_run: a stage run without a parent claims (stage, hash, code version,
    upstream) as it opens and releases it only once it has ended FINISHED, so a main waiting
    on the claim finds the finished run to reuse; a child run of main claims nothing."""
    import sqlite3

    from sf_mlflow.config import config_from_dict
    from sf_mlflow.provenance import code_version
    from sf_mlflow.stages._common import open_run
    from sf_mlflow.tracking.store import sqlite_path

    configure_tracking()
    db = sqlite_path(mlflow_store)
    config = config_from_dict({"name": "claims", "output_dir": str(tmp_path / "out")})
    tags = {"sf.stage_hash": "h1", "sf.upstream_run_id": "pre1"}

    def rows():
        with sqlite3.connect(db) as con:
            return con.execute("SELECT key, run_id FROM sf_stage_claims").fetchall()

    with open_run(config, "train", params={}, tags=tags, run_name="t", description="d") as run:
        assert rows() == [(f"train|h1|{code_version()}|pre1", run.run_id)]
        with open_run(config, "analyze", params={}, tags=tags, run_name="c", description="d",
                      parent_run_id=run.run_id):
            assert len(rows()) == 1                 # the child claims nothing
    assert rows() == []
    assert MlflowClient().get_run(run.run_id).info.status == "FINISHED"
