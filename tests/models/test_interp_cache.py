"""The training spots' interpolation A kept across natural steps (sf_mlflow.models.interp_cache)."""

from __future__ import annotations

import numpy as np
import pytest

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models import interp_cache
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP
from sf_mlflow.models.svgp import SVGPPrior


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_spots=600, n_genes=60, n_components=3, n_groups=3, lengthscale=0.2,
                       group_effect=0.5, mean_counts=200, seed=2)
    return d.counts, d.coordinates * 20, d.groups


def _fit(data, monkeypatch, max_bytes, **kw):
    """A 12-step fit on mini-batches of 250 of 600 spots; counts the batches whose A was
    computed (the others came from the cache)."""
    calls = []
    original = SVGPPrior.marginals_and_interp

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SVGPPrior, "marginals_and_interp", counted)
    monkeypatch.setattr(interp_cache, "MAX_BYTES", max_bytes)
    model = PNMF(3, prior=SVGP(num_inducing=60, **kw), batch_size=250, max_iter=12, tol=0,
                 random_state=0)
    model.fit(data[0], coordinates=data[1], groups=data[2])
    return model, calls


@pytest.mark.parametrize("per_factor", [True, False])
def test_after_one_epoch_the_steps_take_a_from_the_cache_and_fit_the_same(data, monkeypatch,
                                                                          per_factor):
    cached, calls = _fit(data, monkeypatch, interp_cache.MAX_BYTES,
                         per_factor_lengthscale=per_factor)
    # the first epoch (3 batches of the shuffled 600 spots) computes A; later steps reuse it
    assert len(calls) == 3 and sum(calls) == 600
    plain, calls = _fit(data, monkeypatch, 0, per_factor_lengthscale=per_factor)
    assert len(calls) == 12
    np.testing.assert_allclose(cached.elbo_history_, plain.elbo_history_, rtol=1e-5)
    np.testing.assert_allclose(cached.prior_.mu.detach().numpy(), plain.prior_.mu.detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_trained_kernel_hyperparameters_compute_a_every_step(data, monkeypatch):
    _, calls = _fit(data, monkeypatch, interp_cache.MAX_BYTES, train_lengthscale=True)
    assert len(calls) == 12
