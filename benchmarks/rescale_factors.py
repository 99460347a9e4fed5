"""How much longer a lengthscale must be under the plan's coordinate rule to keep its meaning.

Issue #13 replaced the pre-#13 coordinate scaling (bounding-box centre, longest side ->
``spatial_scale``; no mitochondrial-share filter) by the plan's (mean centre, geometric-mean
side -> ``4 x spatial_scale``; spots above ``max_mt_fraction`` dropped first). Both are
``scaled = (raw - center) * scale``, so a lengthscale ``l`` chosen under the old rule spans
``l / old_scale`` raw units (pixels, micrometres) of tissue, and the same tissue distance is
``l * new_scale / old_scale`` under the new rule. This script computes that factor for every
shipped config, on its own data after its own filters, and for the defaults (the tune stage's
default lengthscale range), and prints one JSON line per config::

    python benchmarks/rescale_factors.py            # from the project root

Configs whose data file is absent (the full Slide-seq puck) are reported as such.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def factor(cfg) -> dict:
    """old/new coordinate scale of a config's data set, after its filters."""
    from sf_mlflow.data.preprocess import preprocess
    from sf_mlflow.data.sources import SLIDESEQ_DEFAULT_PATH, load_dataset
    from sf_mlflow.errors import DataError

    if cfg.dataset == "slideseq" and not Path(cfg.data.path or SLIDESEQ_DEFAULT_PATH).is_file():
        # no download attempt: this is a report, not a data fetch
        raise DataError(f"{cfg.data.path or SLIDESEQ_DEFAULT_PATH} is absent")
    data = load_dataset(cfg)
    new_pp = cfg.preprocessing
    old_pp = dataclasses.replace(new_pp, coordinate_scaling="longest_side", max_mt_fraction=None)
    new = preprocess(data, new_pp, seed=cfg.seed).report
    old = preprocess(data, old_pp, seed=cfg.seed).report
    return {
        "spots": new["spots_kept"],
        "side_lengths_raw": [round(v, 1) for v in new["coordinate_side_lengths"]],
        "old_scale": old["coordinate_scale"],
        "new_scale": new["coordinate_scale"],
        "factor": new["coordinate_scale"] / old["coordinate_scale"],
    }


def main() -> int:
    from sf_mlflow.config import Config, load_config
    from sf_mlflow.errors import DataError

    os.chdir(ROOT)  # the configs' data paths are relative to the project root
    rows = []
    targets = [("<defaults>", Config())] + [
        (str(p.relative_to(ROOT)), load_config(p)) for p in sorted((ROOT / "configs").rglob("*.yaml"))]
    for name, cfg in targets:
        row = {"config": name, "dataset": cfg.dataset, "spatial": cfg.model.spatial,
               "lengthscale": cfg.model.lengthscale,
               "tune_range": [cfg.tuning.lengthscale.low, cfg.tuning.lengthscale.high]}
        try:
            row.update(factor(cfg))
        except DataError as e:
            row["skipped"] = str(e).split(";")[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
