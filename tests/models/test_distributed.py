"""Data-parallel fits (``training.distributed``) under the real torchrun, with gloo on the CPU.

Each test launches ``python -m torch.distributed.run --standalone --nproc-per-node 2`` on a
worker script written into ``tmp_path`` (or on the CLI's train entry point) and compares what
rank 0 wrote with the single-process fit on the same batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sf_mlflow.errors import ConfigError
from sf_mlflow.models.distributed import TORCHRUN_ENV
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP

REPO = Path(__file__).resolve().parents[2]

#: The fits compared: natural-gradient SVGP on full batches, Adam PNMF on spot mini-batches
#: (multiplicative W through its running statistics), and a hybrid (natural steps of q(v),
#: Adam on the per-spot Gaussian part) on spot and gene mini-batches, and a Monte Carlo ELBO
#: mode (each rank uses its columns of the whole batch's draw).
CASES = {
    "svgp_natural": dict(prior="svgp", tol=0.0),
    "pnmf_adam_minibatch": dict(prior="gaussian", batch_size=50, learning_rate=0.05),
    "hybrid_minibatch": dict(prior="svgp", spatial_components=2, batch_size=60, y_batch_size=20,
                             learning_rate=0.5),
    "pnmf_simple_minibatch": dict(prior="gaussian", mode="simple", num_samples=2, batch_size=50,
                                  learning_rate=0.05),
}

#: Shared by the worker script and the in-process reference fits.
COMMON = textwrap.dedent('''
    import numpy as np
    import torch
    from sf_mlflow.models.pnmf import PNMF
    from sf_mlflow.models.settings import SVGP

    def data():
        """120 spots x 30 genes from three smooth spatial programmes (seeded)."""
        rng = np.random.default_rng(7)
        X = rng.uniform(0, 10, size=(120, 2))
        F = np.stack([np.sin(X[:, 0] / 2), np.cos(X[:, 1] / 3), X[:, 0] / 10 - 0.5])
        W = rng.gamma(1.0, 1.0, size=(30, 3))
        return rng.poisson(3.0 * (W @ np.exp(F)).T).astype(np.float64), X

    def model(case, distributed, **extra):
        kw = dict(CASES[case])
        prior = SVGP(num_inducing=20, groups=False) if kw.pop("prior") == "svgp" else "gaussian"
        kw = {"max_iter": 15, "tol_window": 5, **kw, **extra}
        return PNMF(3, prior=prior, device="cpu", random_state=0, distributed=distributed, **kw)

    def result(m):
        state = {k: v.detach().double().clone() for k, v in m.prior_.state_dict().items()}
        return {"history": torch.as_tensor(m.elbo_history_), "W": m._loadings_t.double().clone(),
                "prior": state}
''')

WORKER = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    CASES = {cases!r}
    {common}
    mode, out = sys.argv[1], sys.argv[2]
    Y, X = data()
    results = {{}}
    for case in CASES:
        if mode == "fit":
            m = model(case, True).fit(Y, coordinates=X)
            # and a fit interrupted after 7 iterations, checkpointed by rank 0
            stopped = model(case, True).fit(Y, coordinates=X, callback=lambda s: s.iteration == 7)
            if dist.get_rank() == 0:
                stopped.save_checkpoint(f"{{out}}.{{case}}.ckpt")
        else:                          # resumed in a new torchrun from that checkpoint
            m = model(case, True).fit(Y, coordinates=X, resume=f"{{out}}.{{case}}.ckpt")
        results[case] = result(m)
    if dist.get_rank() == 0 and results:
        torch.save(results, out)
    # what is left of the process group once it is left: its threads must be gone, not torn
    # down by the interpreter's exit (which can abort the process)
    from sf_mlflow.models.distributed import Communicator
    rank = dist.get_rank()
    Communicator.leave()
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in tasks]
    with open(f"{{out}}.{{mode}}.threads.{{rank}}", "w") as f:
        f.write("\\n".join(sorted(names)))
''').format(cases=CASES, common=COMMON)

namespace: dict = {"CASES": CASES}
exec(COMMON, namespace)   # the same data and estimators for the in-process reference fits


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 <args>`` (a free rendezvous port each time)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_worker(tmp_path: Path, mode: str) -> dict:
    """Rank 0's results; ``fit`` also leaves ``rank0.pt.<case>.ckpt``, the checkpoint of each
    case's fit stopped by its callback after 7 iterations, which ``resume`` continues."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "rank0.pt"
    torchrun([str(script), mode, str(out)], tmp_path)
    return torch.load(out)


def assert_same_fit(got: dict, want: dict, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(got["history"], want["history"], rtol=rtol)
    np.testing.assert_allclose(got["W"], want["W"], rtol=rtol, atol=atol)
    assert set(got["prior"]) == set(want["prior"])
    for key, value in want["prior"].items():
        np.testing.assert_allclose(got["prior"][key], value, rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The folder of a torchrun of 2 gloo processes that fitted every case, and rank 0's results."""
    folder = tmp_path_factory.mktemp("dist")
    return folder, run_worker(folder, "fit")


@pytest.fixture
def two_process_fits(two_process_run):
    return two_process_run[1]


@pytest.mark.filterwarnings("ignore:PNMF did not converge")
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_fit_what_one_process_fits_on_the_same_batches(two_process_fits, case):
    Y, X = namespace["data"]()
    single = namespace["result"](namespace["model"](case, False).fit(Y, coordinates=X))
    got = two_process_fits[case]
    assert len(got["history"]) == 15
    assert_same_fit(got, single, rtol=1e-4, atol=1e-5)
    if case == "hybrid_minibatch":   # the Gaussian part's per-spot parameters are compared too
        assert any(k.startswith("gaussian.") for k in single["prior"])
        assert any(k.startswith("spatial.mu") for k in single["prior"])


def test_a_distributed_fit_resumes_from_its_checkpoint_in_a_new_torchrun(two_process_run):
    folder, two_process_fits = two_process_run
    for case in CASES:
        blob = PNMF.load_checkpoint(folder / f"rank0.pt.{case}.ckpt")
        assert blob["trainer"]["iteration"] == 7
    resumed = run_worker(folder, "resume")
    for case in CASES:
        # the same processes, the same batches, the same additions: the uninterrupted fit
        assert_same_fit(resumed[case], two_process_fits[case], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from Linux /proc")
def test_leaving_the_process_group_ends_its_gloo_threads_on_every_rank(two_process_run):
    """After fits (whose first optimiser imports torch.distributed.nn through torch._dynamo),
    ``Communicator.leave()`` frees the group: no gloo thread is left for the interpreter's exit
    to tear down (seen: rank 1 aborted now and then with "terminate called without an active
    exception" when the group outlived Python)."""
    folder, _ = two_process_run
    for rank in (0, 1):
        names = (folder / f"rank0.pt.fit.threads.{rank}").read_text().split()
        assert names   # at least the main thread
        assert not [n for n in names if "gloo" in n], (rank, names)


def test_nproc_per_node_inside_torchrun_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    """``--nproc-per-node`` under torchrun would start K processes per rank: refused, no exec."""
    from sf_mlflow.cli import main

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "-c", str(tmp_path / "any.yaml"), "--nproc-per-node", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: --nproc-per-node 2 was given to a process that torchrun already started" in err


def test_distributed_without_torchrun_is_a_config_error_naming_the_key_and_the_launch(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    Y, X = namespace["data"]()
    with pytest.raises(ConfigError, match=r"training\.distributed = true needs a process started "
                                          r"by torchrun .*torchrun --nproc-per-node K"):
        PNMF(3, prior=SVGP(num_inducing=20, groups=False), max_iter=2, device="cpu",
             distributed=True).fit(Y, coordinates=X)


# ---- the train stage under torchrun ----------------------------------------------------------------

STAGE_CONFIG = {
    "name": "dist_tests", "seed": 3, "dataset": "synthetic",
    "data": {"synthetic": {"n_spots": 160, "n_genes": 40, "n_components": 3, "n_groups": 2,
                           "mean_counts": 200}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1, "spatial_scale": 10.0},
    "model": {"n_components": 3, "prior": "SVGP", "num_inducing": 20},
    "training": {"max_iter": 12, "device": "cpu", "log_every": 4, "tol": 0.0, "batch_size": 70},
}


def _train_runs(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps) if r.data.tags.get("sf.stage") == "train"]


def test_the_train_stage_refuses_distributed_outside_torchrun_before_making_a_run(mlflow_store,
                                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient

    from sf_mlflow.config import config_from_dict
    from sf_mlflow.stages.train import run_train

    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    raw = {**STAGE_CONFIG, "training": {**STAGE_CONFIG["training"], "distributed": True}}
    with pytest.raises(ConfigError, match=r"training\.distributed.*torchrun --nproc-per-node K -m "
                                          r"sf_mlflow\.cli train"):
        run_train(config_from_dict(raw, "dist.yaml"))
    assert _train_runs(MlflowClient(mlflow_store)) == []


def test_distributed_is_not_hashed_and_is_a_param_only_when_set():
    """K processes compute the single-process fit, so ``training.distributed`` changes no hash
    (either run is reused for the other); a config without it keeps its params and hashes."""
    from sf_mlflow.config import config_from_dict, load_config
    from sf_mlflow.stages._common import STAGE_SECTIONS, stage_hash

    plain = config_from_dict(STAGE_CONFIG, "dist.yaml")
    on = config_from_dict({**STAGE_CONFIG, "training": {**STAGE_CONFIG["training"],
                                                        "distributed": True}}, "dist.yaml")
    assert on.training.distributed is True and plain.training.distributed is False
    assert "training.distributed" not in plain.flat()
    assert on.flat()["training.distributed"] is True
    assert on.digest() == plain.digest()
    assert {s: stage_hash(on, s) for s in STAGE_SECTIONS if s not in ("tune", "main")} == \
        {s: stage_hash(plain, s) for s in STAGE_SECTIONS if s not in ("tune", "main")}
    overridden = load_config(str(REPO / "configs" / "quickstart.yaml"), ["training.distributed=true"])
    assert overridden.training.distributed is True
    with pytest.raises(ConfigError, match="training.distributed"):
        load_config(str(REPO / "configs" / "quickstart.yaml"), ["training.distributed=maybe"])


@pytest.mark.parametrize("stage", ["main", "tune"])
def test_main_and_tune_refuse_distributed_before_making_a_run(mlflow_store, stage):
    from mlflow.tracking import MlflowClient

    from sf_mlflow.config import config_from_dict
    from sf_mlflow.stages.main import run_main
    from sf_mlflow.stages.tune import run_tune

    raw = {**STAGE_CONFIG, "training": {**STAGE_CONFIG["training"], "distributed": True}}
    with pytest.raises(ConfigError, match=f"training.distributed = true is supported by the train "
                                          f"entry point only, not by {stage}"):
        (run_main if stage == "main" else run_tune)(config_from_dict(raw, "dist.yaml"))
    client = MlflowClient(mlflow_store)
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_the_train_stage_under_torchrun_makes_one_run_from_rank_0_and_resumes_after_sigterm(
        mlflow_store, tmp_path):
    """The CLI's train entry point under torchrun, 2 ranks: only rank 0 makes a run (one per
    launch), logs and writes outputs. SIGTERM to torchrun reaches every rank; all stop after the
    same iteration, rank 0 logs the checkpoint once and ends the run interrupted; a new torchrun
    resumes it to the fit one process makes without interruption, under the same stage hash."""
    import signal

    from mlflow.tracking import MlflowClient

    from sf_mlflow.config import config_from_dict
    from sf_mlflow.stages._common import stage_hash
    from sf_mlflow.stages.preprocess import run_preprocess
    from sf_mlflow.stages.train import run_train

    raw = {**STAGE_CONFIG, "training": {**STAGE_CONFIG["training"], "max_iter": 10**6, "log_every": 1}}
    run_preprocess(config_from_dict(raw, "dist.yaml"))
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**_env(), "MLFLOW_TRACKING_URI": mlflow_store}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sf_mlflow.cli", "train", "-c", str(path), "--set", "training.distributed=true"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("iter") and int(line.split()[1].split("/")[0]) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait() != 0
    assert out.count("checkpoint logged") == 1, out[-3000:]
    client = MlflowClient(mlflow_store)
    (killed,) = _train_runs(client)
    assert killed.data.tags["sf.interrupted"] == "true"
    stopped = int(killed.data.metrics["interrupted_at_iteration"])
    assert "--resume-from " + killed.info.run_id in out
    done = torchrun(["-m", "sf_mlflow.cli", "train", "-c", str(path), "--set",
                     "training.distributed=true", "--set", f"training.max_iter={stopped + 4}",
                     "--resume-from", killed.info.run_id], tmp_path, env)
    assert done.stdout.count("final ELBO") == 1     # only rank 0 reports
    (resumed,) = [r for r in _train_runs(client) if r.info.run_id != killed.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert resumed.data.params["training.distributed"] == "true"
    assert sorted(p.name for p in (tmp_path / "outputs" / "train").iterdir()) == [resumed.info.run_id]
    one = config_from_dict({**raw, "training": {**raw["training"], "max_iter": stopped + 4}}, "one.yaml")
    single = run_train(one)

    def curve(run_id):
        history = sorted(client.get_metric_history(run_id, "elbo"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, stopped + 5))
        return [m.value for m in history]

    np.testing.assert_allclose(curve(resumed.info.run_id), curve(single), rtol=1e-4)
    assert resumed.data.tags["sf.stage_hash"] == stage_hash(one, "train") == \
        client.get_run(single).data.tags["sf.stage_hash"]
