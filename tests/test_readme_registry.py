"""The README's registry snippet runs as written on the quickstart model.

The code block after ``<!-- registry-snippet -->`` in README.md is executed in a fresh
Python process against a model registered as ``sf_quickstart@champion`` in a temp sqlite
MLflow store: the quickstart config as shipped (its `model:` section is the grouped spatial
model, a short fit), and the same data with the non-spatial model, so that the snippet's
groups come from the model itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sf_mlflow.config import load_config
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages.train import run_train

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- registry-snippet -->"


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    assert MARKER in text, f"README.md lost the marker {MARKER}"
    m = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    assert m, "no ```python block after the marker"
    return m.group(1)


@pytest.mark.parametrize("overrides, grouped", [
    ([], True),
    (["model.prior=Gaussian"], False),
], ids=["quickstart", "quickstart-pnmf"])
def test_readme_registry_snippet_runs_on_the_quickstart_model(mlflow_store, tmp_path, overrides,
                                                               grouped):
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      ["training.max_iter=15", "training.device=cpu",
                       f"output_dir={tmp_path / 'outputs'}", *overrides])
    pre_id = run_preprocess(cfg)
    train_id = run_train(cfg, pre_id, register_as="sf_quickstart", register_alias="champion")

    client = MlflowClient()
    mv = client.get_model_version_by_alias("sf_quickstart", "champion")
    assert mv.run_id == train_id
    desc = mv.description
    assert f"L = {cfg.model.n_components} factors" in desc
    assert "fitted on data set `synthetic` with 3 groups" in desc
    assert "**Input**" in desc and "**Params**" in desc and "`output`" in desc
    assert ("`group`" in desc) == grouped

    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = mlflow_store
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # no "`group` is ignored", no positions outside the training extent
    assert "ignored" not in proc.stderr and "ExtrapolationWarning" not in proc.stderr, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert ("'group'" in last) == grouped, last
    assert f"(5, {cfg.model.n_components})" in last and "(5, 2)" in last, last
