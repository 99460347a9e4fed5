"""Several models over one preprocess run: ``main`` fits, analyzes and compares them and logs
``report.html`` (real sqlite MLflow store); the report page itself (no MLflow)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
from mlflow.tracking import MlflowClient

from sf_mlflow.config import config_from_dict
from sf_mlflow.report import Figure, ModelResult, render_report
from sf_mlflow.stages._common import stage_hash
from sf_mlflow.stages.main import run_main

from test_main import stage_runs
from test_stages import SMALL

MODELS = ("pnmf", "svgp", "mggp")
COMPARE = {**SMALL, "name": "compare_tests",
           "model": {"n_components": 3, "num_inducing": 30, "lengthscale": 2.0},
           "models": list(MODELS),
           "training": {"max_iter": 25, "device": "cpu", "log_every": 25},
           "analysis": {"group_loadings_iter": 20}}

PNG = b"\x89PNG\r\n\x1a\n" + b"not really an image"


def section(page: str, anchor: str) -> str:
    start = page.index(f'id="{anchor}"')
    end = page.find("<section", start + 1)
    return page[start:end if end > 0 else len(page)]


def test_render_report_escapes_inlines_and_marks_the_best(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    models = [ModelResult("c", "prior y", {"heldout_deviance": 20.0, "moran_i_mean": 0.7,
                                           "final_elbo": float("nan")}, {"train": "t2"}),
              ModelResult("a<b", "prior <x>", {"heldout_deviance": 10.0, "moran_i_mean": 0.5},
                          {"train": "t1"}, [Figure(tmp_path / "a.png", "factors & maps")], True)]
    page = render_report("title <&>", models,
                         comparison=[Figure(tmp_path / "a.png", "compare moran i")])
    assert "title &lt;&amp;&gt;" in page and "a&lt;b" in page and "<x>" not in page
    # a file Pillow cannot read is inlined as it is
    assert page.count("data:image/png;base64," + base64.b64encode(PNG).decode()) == 2
    assert not re.findall(r'src="(?!data:image/png;base64,)', page)   # self-contained
    assert '<td class="best">10.0</td>' in page       # lowest held-out deviance, the only bold
    assert page.count('class="best"') == 1            # Moran's I is not ranked
    assert "&ndash;" in page                          # a NaN ELBO is shown as missing
    assert "no figures" in section(page, "model-c")
    table = section(page, "metrics")
    assert table.index("a&lt;b") < table.index(">c<")   # ranked by held-out deviance
    assert "<td>+10.0</td>" in table                    # no per-spot values: no interval


def test_the_report_says_how_each_fit_stopped():
    stops = [ModelResult("early", "", {"heldout_deviance": 1.0, "early_stopped_at": 380,
                                       "kept_iteration": 330}, {}, converged=True),
             ModelResult("budget", "", {"heldout_deviance": 2.0, "time_budget_s": 60,
                                        "early_stopped_at": 41, "kept_iteration": 40}, {},
                         converged=False),
             ModelResult("tol", "", {"heldout_deviance": 3.0}, {}, converged=True),
             ModelResult("cut", "", {"heldout_deviance": 4.0}, {}, converged=False)]
    rows = section(render_report("t", stops), "metrics").split("<tr>")[2:]
    said = [r.split('<td class="text">')[-2].split("</td>")[0] for r in rows]
    assert said == ["early-stopped at iteration 380, kept iteration 330",
                    "stopped by the time budget at iteration 41, kept iteration 40",
                    "converged", "not converged"]


def test_paired_interval_covers_the_summed_difference():
    from sf_mlflow.report import paired_interval

    assert paired_interval(np.full(300, 2.0)) == (600.0, 600.0)
    diff = np.random.default_rng(1).normal(1.0, 4.0, size=400)
    lo, hi = paired_interval(diff)
    assert lo < diff.sum() < hi
    half = 1.96 * diff.std() * np.sqrt(diff.size)      # the normal approximation's
    assert abs((hi - lo) / 2 - half) < 0.15 * half
    assert paired_interval(diff) == (lo, hi)            # seeded: the same report twice


def test_report_gives_intervals_for_differences_and_flags_duplicate_factors(tmp_path):
    """Three models on the same 300 held-out spots: one clearly worse than the best, one
    that the held-out spots cannot tell from it; one whose factors 1 and 3 are one pattern."""
    from sf_mlflow.report import duplicate_factors

    rng = np.random.default_rng(0)
    best = rng.gamma(2.0, 10.0, size=300)
    worse = best + rng.normal(3.0, 1.0, size=300)            # ~ +900 in total, sure
    noise = rng.normal(0.0, 5.0, size=300)
    tied = best + noise - noise.mean() + 0.1                 # +30 in total, sd ~87: a tie
    F = rng.gamma(2.0, 1.0, size=(500, 3))
    F[:, 2] = F[:, 0] * rng.lognormal(0, 0.05, size=500)     # factor 3 repeats factor 1
    assert [(i, j) for i, j, _ in duplicate_factors(F)] == [(1, 3)]
    models = [ModelResult(name, name, {"heldout_deviance": float(d.sum())}, {}, [],
                          heldout_deviance=d, factors=F if name == "dup" else F[:, :2])
              for name, d in (("worse", worse), ("dup", tied), ("best", best))]
    table = section(render_report("t", models), "metrics")
    rows = table.split("<tr>")[2:]
    assert [r.split("</a>")[0].rsplit(">", 1)[1] for r in rows] == ["best", "dup", "worse"]
    row = {r.split("</a>")[0].rsplit(">", 1)[1]: r for r in rows}
    assert "<td>best</td>" in row["best"]
    lo, hi = [float(x.replace(",", "")) for x in re.search(
        r"\[([-+\d,.]+), ([-+\d,.]+)\]", row["worse"]).groups()]
    assert 0 < lo < (worse - best).sum() < hi
    assert "(not distinguishable)" in row["dup"] and "+30.0 [" in row["dup"]
    assert "not distinguishable" not in row["worse"]
    assert "factors 1 and 3 duplicate each other (r = " in row["dup"]
    assert "duplicate" not in row["worse"] and "duplicate" not in row["best"]


def test_inlined_pngs_are_smaller_and_the_same_picture(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from sf_mlflow.report import png_bytes

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.scatter(*np.random.default_rng(0).random((2, 2000)), c=np.arange(2000), s=4)
    fig.savefig(tmp_path / "map.png")
    small = png_bytes(tmp_path / "map.png")
    assert len(small) < (tmp_path / "map.png").stat().st_size
    (tmp_path / "small.png").write_bytes(small)
    a = np.asarray(Image.open(tmp_path / "map.png").convert("RGB"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "small.png").convert("RGB"), dtype=float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 2.0


def test_main_compares_several_models_then_reuses_every_stage(mlflow_store, tmp_path, capsys):
    cfg = config_from_dict(COMPARE, "compare.yaml")
    client = MlflowClient()
    first = run_main(cfg)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.info.run_name == "main/synthetic/pnmf+svgp+mggp"
    # every model named by its kind: run names and the sf.model tag tell svgp from mggp
    for name in MODELS:
        train = client.get_run(run.data.tags[f"sf.chain.{name}.train_run_id"])
        assert train.data.tags["sf.model"] == name and train.info.run_name.startswith(
            f"train/{name}/L3")
        analyze = client.get_run(run.data.tags[f"sf.chain.{name}.analyze_run_id"])
        assert analyze.data.tags["sf.model"] == name
        assert analyze.data.tags["mlflow.note.content"].startswith(f"Analyze {name.upper()} ")
    children = stage_runs(client, first)
    assert sorted(r.data.tags["sf.stage"] for r in children) == sorted(
        ["preprocess", "figures"] + ["train", "analyze"] * 3)

    # the chain is in tags, one train and analyze run per model on the one preprocess run
    tags = run.data.tags
    assert not [k for k in run.data.params if k.startswith("chain.")]
    pre, fig = tags["sf.chain.preprocess_run_id"], tags["sf.chain.figures_run_id"]
    analyses = {}
    for name in MODELS:
        train = client.get_run(tags[f"sf.chain.{name}.train_run_id"])
        analyze = client.get_run(tags[f"sf.chain.{name}.analyze_run_id"])
        assert train.data.tags["sf.upstream_run_id"] == pre
        assert analyze.data.tags["sf.upstream_run_id"] == train.info.run_id
        expect = {"pnmf": ("Gaussian", None), "svgp": ("SVGP", "false"),
                  "mggp": ("SVGP", "true")}[name]
        assert train.data.params["model.prior"] == expect[0]
        if expect[1]:
            assert train.data.params["model.groups"] == expect[1]
        m = run.data.metrics[f"{name}.heldout_deviance"]
        assert np.isfinite(m) and m == analyze.data.metrics["heldout_deviance"]
        analyses[name] = analyze.info.run_id
    assert client.get_run(fig).data.tags["sf.upstream_run_id"] == ",".join(analyses.values())
    # the experiment's headline view shows each model's numbers, not empty shared columns
    view = client.get_experiment(run.info.experiment_id).tags["mlflow.sharedViewState.sf-headline"]
    for name in analyses:
        assert f"metrics.`{name}.heldout_deviance_mean`" in json.loads(view)["selectedColumns"]

    # report.html: the metrics table and every model's figures, inline
    assert {a.path for a in client.list_artifacts(first)} == {"chain.json", "report.html"}
    page = (tmp_path / "outputs" / "main" / first / "report.html").read_text()
    assert client.download_artifacts(first, "report.html", str(tmp_path / "dl")) and \
        (tmp_path / "dl" / "report.html").read_text() == page
    figures = json.loads(open(client.download_artifacts(fig, "figures.json",
                                                        str(tmp_path / "fig"))).read())
    table = section(page, "metrics")
    for name, aid in analyses.items():
        assert f'id="model-{name}"' in page and f">{name}</a>" in table
        assert f"{run.data.metrics[f'{name}.heldout_deviance']:,.1f}" in table
        own = [f for f in figures if f.endswith(".png") and aid[:8] in f]
        assert len(own) >= 5
        assert section(page, f"model-{name}").count("data:image/png;base64,") == len(own)
    comparison = section(page, "comparison")
    assert "Moran&#x27;s I of each model&#x27;s factors" in comparison
    assert "paired with their best-correlated counterpart" in comparison
    # ranked by held-out deviance, each difference to the best with its interval; the M
    # and lengthscales the fits used, not "auto"
    ranked = sorted(MODELS, key=lambda n: run.data.metrics[f"{n}.heldout_deviance"])
    assert [table.index(f">{n}</a>") for n in ranked] == sorted(
        table.index(f">{n}</a>") for n in ranked)
    assert table.count("% interval]") == 1 and len(re.findall(r"\[[-+\d,.]+, [-+\d,.]+\]",
                                                             table)) == 2
    assert "M=30" in table and "M=auto" not in table and "MGGP-SVGP prior (with groups)" in table
    assert page.count("data:image/png;base64,") == len([f for f in figures if f.endswith(".png")])
    assert not re.findall(r'src="(?!data:image/png;base64,)', page)
    out = capsys.readouterr().out
    assert f"[main] report: {tmp_path / 'outputs' / 'main' / first / 'report.html'}" in out
    assert f"mlflow ui --backend-store-uri {mlflow_store}" in out

    # again: every stage reused, the same chain
    n_stage_runs = len(stage_runs(client))
    second = run_main(cfg)
    assert len(stage_runs(client)) == n_stage_runs and stage_runs(client, second) == []
    again = client.get_run(second).data
    assert {k: v for k, v in again.tags.items() if k.startswith("sf.chain.")} == \
        {k: v for k, v in tags.items() if k.startswith("sf.chain.")}
    assert all(v == "true" for k, v in again.tags.items() if k.startswith("sf.reused."))
    assert again.metrics["stages_reused"] == 8

    # a model's runs are the ones a one-model config with its settings makes and reuses
    single = config_from_dict({**COMPARE, "models": None,
                               "model": {**COMPARE["model"], "prior": "SVGP", "groups": False}},
                              "svgp.yaml")
    svgp_train = client.get_run(tags["sf.chain.svgp.train_run_id"])
    assert svgp_train.data.tags["sf.stage_hash"] == stage_hash(single, "train")
    one = client.get_run(run_main(single)).data.tags
    assert one["sf.reused.train"] == "true" and one["sf.reused.analyze"] == "true"
    assert one["sf.chain.analyze_run_id"] == analyses["svgp"]
