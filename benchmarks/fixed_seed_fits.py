"""Fixed-seed fits whose ELBO history, factors and loadings are saved, to compare two versions.

Run it before and after a change that must not alter behaviour, then compare:

    python benchmarks/fixed_seed_fits.py --out before.npz      # on the old code
    python benchmarks/fixed_seed_fits.py --out after.npz --compare before.npz

Prints one JSON line per case (max relative difference of the ELBO history, factors and
loadings against the reference file when one is given).

What changed, version by version (``--compare`` against the commit before the change):

* Spatial fits start where PNMF ends (issue #19, ``sf_mlflow/models/start.py``): the
  Gaussian cases are bit for bit unchanged (``elbo/factors/loadings_max_rel_diff`` 0.0); the
  three spatial cases differ everywhere, as they must: they start from a fitted PNMF and the
  conjugate GP posterior instead of a KL-NMF regression, and their kernels now have one
  amplitude per factor. First and last ELBO before -> after: ``svgp_natural_groups``
  -180,601 / -169,157 -> -169,649 / -169,187; ``svgp_natural_minibatch`` -179,987 / -167,843
  -> -171,608 / -168,519; ``svgp_adam_nogroups`` -180,646 / -173,910 -> -178,393 / -172,996.
  The fits start near where they used to end; these cases fix lengthscale 0.3 (a tenth of
  what the evidence would choose here), so the ELBOs are not the new defaults' quality
  (``benchmarks/bench_quality.py`` is).
* The start's evidence has a nugget (spot-level variance no smooth field explains; issue #19):
  four cases bit for bit unchanged (the evidence chose no nugget there);
  ``svgp_adam_nogroups`` (sigma chosen from the data, no groups) differs, first and last ELBO
  -177,379 / -172,675 -> -173,906 / -171,375 (one thread each).
* The natural step factors a float32 model's new precision in float32 while its diagonal
  spread allows (b300569, issue #20): the Gaussian cases and the Adam case bit for bit
  unchanged; the two natural cases within float32 rounding (ELBO history 4.6e-7 and 4.5e-7
  relative, factors 3.4e-5 and 1.4e-5, loadings 9.3e-6 and 1.5e-6).
* The PNMF start always fits on every spot and gene, whatever the GP's batches (0c29bae,
  issue #20): four cases bit for bit unchanged (full batches); ``svgp_natural_minibatch``
  (batch_size 400) starts from the full-batch PNMF, first and last ELBO -171,466 / -168,595
  -> -170,749 / -167,967. Later commits up to 13bf376 leave all five bit for bit unchanged.
* ``curvature_fraction: auto`` on spot mini-batches is a quarter of the batch's spots, not a
  half (9ece9c1, issue #20): four cases bit for bit unchanged (full batches, or Adam);
  ``svgp_natural_minibatch`` draws a different curvature sample every step, ELBO history up
  to 2.2e-2 relative apart at single steps, first and last ELBO -170,749 / -167,967 ->
  -170,749 / -167,873.
* KL-NMF starts from NNDSVDa instead of a random draw (``init: nndsvda``, issue #19): every
  case differs, as it must (factors and loadings are another solution's, relative
  differences up to 1e2 and beyond where one is near zero); first and last ELBO before ->
  after: ``gaussian_adam`` -171,910 / -167,450 -> -170,995 / -167,157;
  ``gaussian_minibatch_sgd`` -169,041 / -179,135 -> -168,842 / -178,881;
  ``svgp_natural_groups`` -169,549 / -169,044 -> -169,512 / -169,032;
  ``svgp_natural_minibatch`` -170,749 / -167,873 -> -170,718 / -168,127;
  ``svgp_adam_nogroups`` -173,906 / -171,375 -> -173,863 / -171,363 (one thread each).
  ``init: random`` gives the old fits.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF

try:   # the settings object of the spatial prior (after the re-cut of the seams)
    from sf_mlflow.models.settings import SVGP
except ImportError:   # pragma: no cover - the flat keyword arguments of older versions
    SVGP = None

CASES = {
    "gaussian_adam": dict(prior="gaussian", max_iter=60, batch_size=None),
    "gaussian_minibatch_sgd": dict(prior="gaussian", optimizer="SGD", learning_rate=0.5, max_iter=40,
                                   batch_size=300, y_batch_size=100),
    "svgp_natural_groups": dict(prior="svgp", max_iter=40, num_inducing=60, lengthscale=0.3,
                                validation_every=10),
    "svgp_natural_minibatch": dict(prior="svgp", max_iter=30, num_inducing=60, lengthscale=0.3,
                                   batch_size=400, learning_rate=0.3),
    "svgp_adam_nogroups": dict(prior="svgp", optimizer="Adam", learning_rate=0.01, max_iter=30,
                               num_inducing=50, lengthscale=0.3, use_groups=False, train_lengthscale=True),
}
SPATIAL_KEYS = ("num_inducing", "lengthscale", "use_groups", "train_lengthscale")


def build(spec: dict) -> PNMF:
    spec = dict(spec)
    spatial = {k: spec.pop(k) for k in SPATIAL_KEYS if k in spec}
    if SVGP is not None and spec["prior"] == "svgp":
        if "use_groups" in spatial:
            spatial["groups"] = spatial.pop("use_groups")
        spec["prior"] = SVGP(**spatial)
        spatial = {}
    return PNMF(n_components=4, random_state=3, tol=0.0, device="cpu", **spec, **spatial)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = make_synthetic(n_spots=1200, n_genes=150, n_components=4, n_groups=3, mean_counts=200.0, seed=1)
    held = np.arange(data.n_spots) % 10 == 0
    Y, X, g = data.counts.tocsr(), data.coordinates, data.groups
    saved = {}
    for name, spec in CASES.items():
        model = build(spec)
        validation = (Y[held], X[held], g[held]) if spec.get("validation_every") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(Y[~held], coordinates=X[~held], groups=g[~held], validation=validation)
        saved[f"{name}/elbo"] = np.asarray(model.elbo_history_)
        saved[f"{name}/factors"] = model.get_factors()
        saved[f"{name}/loadings"] = model.loadings_
    np.savez(args.out, **saved)
    if args.compare:
        ref = np.load(args.compare)
        for name in CASES:
            row = {"case": name}
            for part in ("elbo", "factors", "loadings"):
                a, b = saved[f"{name}/{part}"], ref[f"{name}/{part}"]
                row[f"{part}_max_rel_diff"] = (float("inf") if a.shape != b.shape else
                                               float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
