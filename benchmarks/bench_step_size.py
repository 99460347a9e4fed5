"""Natural-gradient step sizes on spot mini-batches: ``learning_rate: auto`` against constants.

The same MGGP fit (defaults otherwise: the start where PNMF ends, kernel hyperparameters from
the data, M from the lengthscale) on spot mini-batches, with the natural step at ``auto``
(``Trainer.natural_step_size``: ``max(rho, 0.5 (1 + (t - 1) rho)^-0.6)``, rho = B / N) and at
constant 0.1, 0.3 and 1.0. Every fit runs a fixed number of iterations (tol 0, no early
stopping) and its held-out deviance is recorded every ``--every`` iterations: the curve
shows how fast and how far each schedule goes, and how noisy it ends.

Cases: generated planted factors with group-specific fields (N 10,000, B 2,000 by default)
and, when ``$SF_SHARED_DATA`` (default ``../shared/data``) has it, the osmFISH cortex
(B 2,000 of its ~4,300 kept training cells, the shipped config's batch).

Output: one JSON line per (case, schedule) with the curve and the final and best held-out
deviance, then one ``summary`` line per case with each schedule's final deviance as a ratio
to auto's (in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = ("auto", 0.1, 0.3, 1.0)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def generated(args):
    from sf_mlflow.data.preprocess import heldout_split, rescale_coordinates
    from sf_mlflow.data.synthetic import make_synthetic

    d = make_synthetic(n_spots=args.n_spots, n_genes=200, n_components=5, n_groups=4,
                       lengthscale=0.15, group_effect=0.5, mean_counts=300, seed=0)
    X = rescale_coordinates(d.coordinates, 50.0)[0]
    return d.counts.tocsr(), X, d.groups, heldout_split(d.n_spots, 0.1, 0, d.groups)


def osmfish(shared: Path):
    from sf_mlflow.config import load_config
    from sf_mlflow.data.preprocess import preprocess
    from sf_mlflow.data.sources import load_dataset

    cfg = load_config(REPO / "configs" / "osmfish" / "svgp.yaml",
                      [f"data.path={shared / 'osmfish_sscortex.h5ad'}"])
    res = preprocess(load_dataset(cfg), cfg.preprocessing, seed=cfg.seed)
    return res.data.counts.tocsr(), res.data.coordinates, res.data.groups, np.asarray(res.heldout)


def run(case: str, Y, X, g, held, batch: int, iters: int, every: int) -> None:
    from sf_mlflow.models.pnmf import PNMF
    from sf_mlflow.models.settings import SVGP

    finals = {}
    for lr in SCHEDULES:
        model = PNMF(5 if case == "generated" else 6, prior=SVGP(), learning_rate=lr,
                     batch_size=batch, max_iter=iters, tol=0.0, validation_every=every,
                     patience=10**6, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(Y[~held], coordinates=X[~held], groups=g[~held],
                      validation=(Y[held], X[held], g[held]))
        curve = model.validation_history_
        finals[str(lr)] = float(curve[-1, 1])
        emit({"case": case, "learning_rate": lr, "batch_size": batch, "n_train": int((~held).sum()),
              "final_heldout_deviance": float(curve[-1, 1]), "best_heldout_deviance": float(curve[:, 1].min()),
              "start_heldout_deviance": float(curve[0, 1]), "seconds": round(model.fit_time_, 1),
              "curve": [[int(i), round(float(v), 1)] for i, v in curve]})
    emit({"case": case, "summary": "final held-out deviance / auto's",
          **{k: v / finals["auto"] for k, v in finals.items()}})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-spots", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    run("generated", *generated(args), args.batch_size, args.iters, args.every)
    shared = Path(os.environ.get("SF_SHARED_DATA", REPO.parent / "shared" / "data"))
    if (shared / "osmfish_sscortex.h5ad").is_file():
        run("osmfish", *osmfish(shared), args.batch_size, args.iters, args.every)
    else:
        emit({"case": "osmfish", "skipped": f"{shared} has no osmfish_sscortex.h5ad (set SF_SHARED_DATA)"})


if __name__ == "__main__":
    main()
