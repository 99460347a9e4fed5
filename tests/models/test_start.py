"""The spatial start's kernel hyperparameters
(:func:`sf_mlflow.models.start.choose_hyperparameters`) and its conjugate q(v)
(:func:`sf_mlflow.models.start.conjugate_qv`), on log-factors drawn with a known structure:
no fit, only the exact GP evidence and one solve; and the PNMF start it follows, on generated
counts (one fitted iteration)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.kernels import make_kernel
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP
from sf_mlflow.models.start import NUGGET_SHARES, choose_hyperparameters, conjugate_qv


def _square(n: int, side: float, seed: int) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).uniform(0, side, (n, 2)))


def _field(x: torch.Tensor, lengthscale: float, K: int, seed: int) -> torch.Tensor:
    """K draws of a unit-variance Matern-3/2 field at x (n, 2): (K, n)."""
    kern = make_kernel("Matern32", lengthscale, 1.0, dtype=torch.float64)
    C = kern(x, x) + 1e-6 * torch.eye(x.shape[0], dtype=torch.float64)
    z = torch.as_tensor(np.random.default_rng(seed).standard_normal((x.shape[0], K)))
    return (torch.linalg.cholesky(C) @ z).T


def test_a_smooth_field_observed_precisely_gets_no_nugget_and_its_own_lengthscale():
    x = _square(600, 200.0, 0)
    m = _field(x, 30.0, 2, 1)
    v = torch.full_like(m, 0.01)
    hyper = choose_hyperparameters(m, v, x, None, SVGP(groups=False), seed=0)
    assert (hyper["nugget"] <= NUGGET_SHARES[1] * m.var(dim=1).numpy() + 1e-12).all()
    assert ((hyper["lengthscale"] > 10) & (hyper["lengthscale"] < 90)).all(), hyper


def test_spot_level_variation_goes_to_the_nugget_not_to_a_short_lengthscale():
    """Cells whose log-factors are a smooth field plus their own variation (as cell types
    interleave in real tissue): without a nugget the evidence would call the cell-to-cell
    variation a field at the spot spacing."""
    x = _square(800, 200.0, 2)
    smooth = _field(x, 40.0, 2, 3)
    own = torch.as_tensor(np.random.default_rng(4).standard_normal(smooth.shape))
    m = smooth + own
    v = torch.full_like(m, 0.01)
    hyper = choose_hyperparameters(m, v, x, None, SVGP(groups=False), seed=0)
    share = hyper["nugget"] / m.var(dim=1).numpy()
    assert (share >= 0.3).all(), hyper
    assert (hyper["lengthscale"] > 15).all(), hyper


def test_group_offsets_with_cell_level_variation_choose_long_lengthscales_and_a_group_difference():
    x = _square(900, 200.0, 5)
    groups = torch.as_tensor(np.random.default_rng(6).integers(0, 6, 900))
    offsets = torch.as_tensor(np.random.default_rng(7).normal(0, 1.5, (2, 6)))
    own = torch.as_tensor(np.random.default_rng(8).standard_normal((2, 900)))
    m = offsets[:, groups] + 0.8 * own
    v = torch.full_like(m, 0.02)
    hyper = choose_hyperparameters(m, v, x, groups, SVGP(), seed=0)
    assert hyper["group_diff_param"] > 0.01, hyper
    assert (hyper["nugget"] > 0).all() and (hyper["lengthscale"] > 20).all(), hyper


def test_the_nugget_smooths_the_conjugate_start():
    """With a nugget the start's field follows what neighbouring spots share: its values at
    the spots are closer to the smooth part than to the spot-level values."""
    x = _square(500, 100.0, 9).float()
    smooth = _field(x.double(), 30.0, 1, 10)
    m = (smooth + torch.as_tensor(np.random.default_rng(11).standard_normal(smooth.shape))).float()
    v = torch.full_like(m, 0.01)
    errors = {}
    for nugget in (None, torch.tensor([1.0], dtype=torch.float64)):
        gp = SVGP(groups=False, lengthscale=30.0, sigma=1.0, num_inducing=150).build(
            x, None, 1, kl_weight=1.0, seed=0)
        conjugate_qv(gp, m, v, x, None, nugget=nugget)
        with torch.no_grad():
            f = gp.predict(x, None, return_var=False).double()
        errors[nugget is not None] = float((f - smooth).square().mean())
    assert errors[True] < 0.7 * errors[False], errors


def test_the_pnmf_start_uses_every_spot_and_gene_whatever_the_gp_batches():
    """The batches are for the GP's step: a PNMF start on mini-batches of spots and genes
    stops (tol) far from PNMF's optimum (Slide-seq size, B 7,000 and Db 2,000 of 17,702
    genes: matched correlation 0.78 against 0.94), and the spatial fit never recovers."""
    data = make_synthetic(n_spots=600, n_genes=120, n_components=3, n_groups=2, seed=3)
    Y, X, g = data.counts.tocsr(), data.coordinates, data.groups
    held = np.arange(600) % 10 == 0
    reports = []
    for B, Db in [(None, None), (100, 30)]:
        model = PNMF(3, prior=SVGP(num_inducing=60), batch_size=B, y_batch_size=Db, max_iter=1,
                     random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # one iteration: not converged, on purpose
            model.fit(Y[~held], coordinates=X[~held], groups=g[~held],
                      validation=(Y[held], X[held], g[held]))
        reports.append(model.start_report_)
    full, batched = reports
    assert batched["pnmf_iterations"] == full["pnmf_iterations"]
    assert batched["pnmf_heldout_deviance"] == full["pnmf_heldout_deviance"]
    np.testing.assert_allclose(batched["lengthscale"], full["lengthscale"])
