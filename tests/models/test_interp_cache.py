"""The training spots' interpolation A kept across natural steps (sf_mlflow.models.interp_cache)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

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
    monkeypatch.setattr(interp_cache, "cache_limit", lambda: max_bytes)
    model = PNMF(3, prior=SVGP(num_inducing=60, **kw), batch_size=250, max_iter=12, tol=0,
                 random_state=0)
    model.fit(data[0], coordinates=data[1], groups=data[2])
    return model, calls


@pytest.mark.parametrize("per_factor", [True, False])
def test_after_one_epoch_the_steps_take_a_from_the_cache_and_fit_the_same(data, monkeypatch,
                                                                          per_factor):
    cached, calls = _fit(data, monkeypatch, 2 ** 30,
                         per_factor_lengthscale=per_factor)
    # the first epoch (3 batches of the shuffled 600 spots) computes A; later steps reuse it
    assert len(calls) == 3 and sum(calls) == 600
    plain, calls = _fit(data, monkeypatch, 0, per_factor_lengthscale=per_factor)
    assert len(calls) == 12
    np.testing.assert_allclose(cached.elbo_history_, plain.elbo_history_, rtol=1e-5)
    np.testing.assert_allclose(cached.prior_.mu.detach().numpy(), plain.prior_.mu.detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_trained_kernel_hyperparameters_compute_a_every_step(data, monkeypatch):
    _, calls = _fit(data, monkeypatch, 2 ** 30, train_lengthscale=True)
    assert len(calls) == 12


def test_the_limit_is_a_share_of_the_available_memory_split_among_local_processes(monkeypatch):
    monkeypatch.setattr(interp_cache, "available_memory", lambda: 10 * 2 ** 30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert interp_cache.cache_limit() == int(interp_cache.MEMORY_SHARE * 10 * 2 ** 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert interp_cache.cache_limit() == int(interp_cache.MEMORY_SHARE * 10 * 2 ** 30 / 4)
    monkeypatch.setattr(interp_cache, "available_memory", lambda: None)
    assert interp_cache.cache_limit() == interp_cache.FALLBACK_BYTES


def test_a_cache_over_the_limit_is_off(data):
    prior = SVGPPrior(torch.as_tensor(data[1], dtype=torch.float32), None, 3, num_inducing=60)
    size = 600 * 60 * 4            # one kernel for all factors, float32
    assert interp_cache.InterpCache(prior, 600, enabled=True, limit=size).enabled
    assert not interp_cache.InterpCache(prior, 600, enabled=True, limit=size - 1).enabled
    assert not interp_cache.InterpCache(prior, 600, enabled=False, limit=size).enabled


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_reads_this_machine():
    avail = interp_cache.available_memory()
    assert avail is not None and 0 < avail <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
