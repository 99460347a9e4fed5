"""Sparse Poisson likelihood terms, checked against dense brute force and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from sf_mlflow.models.likelihood import (
    CountBatch,
    expected_log_likelihood,
    likelihood_and_update,
    multiplicative_update,
)
from sf_mlflow.models.priors import GaussianPrior

# many small torch ops: one thread (see tests/conftest.py, one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


def problem(seed: int, B: int = 12, D: int = 9, L: int = 3, rate: float = 1.5, var_hi: float = 0.5):
    """Random counts (B, D), marginals (L, B) and loadings (D, L) in float64."""
    rng = np.random.default_rng(seed)
    Y = rng.poisson(rate, size=(B, D)).astype(np.float64)
    mean = torch.tensor(rng.normal(0.0, 1.0, size=(L, B)), dtype=F64)
    var = torch.tensor(rng.uniform(0.05, var_hi, size=(L, B)), dtype=F64)
    W = torch.tensor(rng.gamma(1.0, 1.0, size=(D, L)), dtype=F64)
    return Y, CountBatch.from_scipy(sp.csr_matrix(Y), dtype=F64), mean, var, W


def dense_terms(Y: np.ndarray, F: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force over the dense matrix: (sum Y log R, sum R) for F (L, B) or (E, L, B)."""
    R = torch.einsum("dl,...lb->...bd", W, torch.exp(F))
    Yt = torch.as_tensor(Y, dtype=F64)
    return (Yt * torch.log(R)).sum((-1, -2)), R.sum((-1, -2))


# ---- CountBatch ------------------------------------------------------------------------------

def test_count_batch_from_scipy_drops_zeros_sums_duplicates_and_sorts():
    coo = sp.coo_matrix((np.array([2.0, 0.0, 1.0, 3.0]), (np.array([1, 0, 1, 0]), np.array([2, 1, 2, 0]))),
                        shape=(2, 3))
    b = CountBatch.from_scipy(coo, dtype=F64)
    assert (b.n_spots, b.n_genes, b.nnz) == (2, 3, 2)
    assert b.rows.tolist() == [0, 1] and b.cols.tolist() == [0, 2]
    assert b.values.tolist() == [3.0, 3.0]
    assert b.lgamma_sum == pytest.approx(2 * math.lgamma(4.0))
    # a hand-made batch in column-major order is put in row-major order
    c = CountBatch(torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([5.0, 7.0]), 2, 2, 0.0)
    assert c.rows.tolist() == [0, 1] and c.values.tolist() == [7.0, 5.0]


def test_count_batch_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="nnz"):
        CountBatch(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0, 2.0]), 2, 2, 0.0)


# ---- the analytic lower bound ---------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lower_bound_equals_dense_brute_force(seed):
    Y, b, mean, var, W = problem(seed)
    y_log_r, _ = dense_terms(Y, mean, W)
    rate = (W @ torch.exp(mean + var / 2)).sum()
    expected = y_log_r - rate - gammaln(Y + 1).sum()
    got = expected_log_likelihood(b, mean, var, W, mode="lower-bound")
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_lower_bound_elbo_matches_monte_carlo_of_the_same_bound():
    """Rate term and KL by sampling F ~ q: E[exp F] and E[log q - log p] against closed forms."""
    Y, b, mean, var, W = problem(3, B=10, D=6, var_hi=0.4)
    prior = GaussianPrior(10, 3, mean=mean, scale=var.sqrt(), dtype=F64)
    idx = torch.arange(10)
    with torch.no_grad():
        analytic = (expected_log_likelihood(b, mean, var, W, mode="lower-bound") - prior.kl(idx)).item()
        g = torch.Generator().manual_seed(0)
        E = 200_000
        F = mean + var.sqrt() * torch.randn((E, *mean.shape), generator=g, dtype=F64)
        rate = torch.einsum("l,elb->e", W.sum(0), torch.exp(F))               # (E,)
        log_q = (-0.5 * (F - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum((1, 2))
        log_p = (-0.5 * F ** 2 - 0.5 * math.log(2 * math.pi)).sum((1, 2))
        y_log_r, _ = dense_terms(Y, mean, W)                                   # deterministic part
        per_draw = y_log_r - rate - gammaln(Y + 1).sum() - (log_q - log_p)
        mc, se = per_draw.mean().item(), per_draw.std().item() / math.sqrt(E)
    assert se < 0.3  # a mistake in either closed form shifts the result by more than 1.5
    assert abs(analytic - mc) < 5 * se


@pytest.mark.parametrize("mode", ["lower-bound", "expanded", "simple"])
def test_gradients_match_finite_differences(mode):
    _, b, mean, var, W = problem(4, B=6, D=5)
    args = (mean.requires_grad_(), var.requires_grad_(), W.requires_grad_())

    def f(m, v, w):
        gen = torch.Generator().manual_seed(7)  # same draws on every call
        return expected_log_likelihood(b, m, v, w, mode=mode, num_samples=3, generator=gen)

    assert torch.autograd.gradcheck(f, args)


def test_float32_agrees_with_float64_at_large_log_factors():
    """Log-factors near 60 with tiny loadings: same rates, evaluated in the rescaled form."""
    Y, b64, mean, var, W = problem(5)
    mean = mean + 60.0
    W = W * math.exp(-60.0)
    ref = expected_log_likelihood(b64, mean, var, W).item()
    b32 = b64.to(dtype=torch.float32)
    got = expected_log_likelihood(b32, mean.float(), var.float(), W.float()).item()
    assert math.isfinite(got)
    assert got == pytest.approx(ref, rel=1e-4)


# ---- Monte Carlo modes -----------------------------------------------------------------------

def test_expanded_and_simple_are_unbiased_and_agree():
    Y, b, mean, var, W = problem(6, var_hi=0.8)
    # reference E_q[log p(Y | F)] from independent dense draws
    g = torch.Generator().manual_seed(123)
    E = 100_000
    F = mean + var.sqrt() * torch.randn((E, *mean.shape), generator=g, dtype=F64)
    y_log_r, rate = dense_terms(Y, F, W)
    ref_draws = y_log_r - rate
    ref = ref_draws.mean().item() - gammaln(Y + 1).sum()
    ref_se = ref_draws.std().item() / math.sqrt(E)
    for mode in ("expanded", "simple"):
        est = [expected_log_likelihood(b, mean, var, W, mode=mode, num_samples=40,
                                       generator=torch.Generator().manual_seed(s)).item() for s in range(20)]
        se = np.std(est) / math.sqrt(len(est))
        assert abs(np.mean(est) - ref) < 5 * math.hypot(se, ref_se), mode
        assert np.std(est) > 0, mode  # really random


def test_expanded_log_rate_term_dominates_the_lower_bound():
    """Jensen: E[log sum W e^F] >= log sum W e^{E F}; the rate terms of the two modes are equal."""
    Y, b, mean, var, W = problem(7, var_hi=1.0)
    lb = expected_log_likelihood(b, mean, var, W, mode="lower-bound").item()
    gaps = [expected_log_likelihood(b, mean, var, W, mode="expanded", num_samples=20,
                                    generator=torch.Generator().manual_seed(s)).item() - lb
            for s in range(30)]
    assert np.mean(gaps) > 5 * np.std(gaps) / math.sqrt(len(gaps))
    # with no variance the two modes coincide exactly
    zero = torch.zeros_like(var)
    a = expected_log_likelihood(b, mean, zero, W, mode="lower-bound")
    e = expected_log_likelihood(b, mean, zero, W, mode="expanded", generator=torch.Generator().manual_seed(0))
    assert e.item() == pytest.approx(a.item(), rel=1e-12)


def test_monte_carlo_modes_are_reproducible_with_a_generator():
    _, b, mean, var, W = problem(8)
    a = expected_log_likelihood(b, mean, var, W, mode="simple", generator=torch.Generator().manual_seed(3))
    c = expected_log_likelihood(b, mean, var, W, mode="simple", generator=torch.Generator().manual_seed(3))
    assert a.item() == c.item()


# ---- loadings update -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_var", [False, True])
def test_multiplicative_update_never_decreases_the_bound(seed, with_var):
    """For fixed factors: the Poisson log-likelihood (var = 0) or its lower bound (var > 0)."""
    _, b, mean, var, W = problem(seed, B=30, D=12, L=4, rate=2.0)
    if not with_var:
        var = torch.zeros_like(var)
    values = [expected_log_likelihood(b, mean, var, W).item()]
    for _ in range(15):
        W = multiplicative_update(b, mean, var, W)
        values.append(expected_log_likelihood(b, mean, var, W).item())
    steps = np.diff(values)
    assert (steps >= -1e-9 * abs(values[0])).all(), steps
    assert values[-1] > values[0] + 1.0  # and it does make progress from a random start


def test_multiplicative_update_fixed_point_is_stationary():
    """After many steps, d bound / dW vanishes wherever W > 0 (KKT of the maximisation in W)."""
    _, b, mean, var, W = problem(11, B=40, D=8, L=3, rate=3.0)
    for _ in range(3000):
        W = multiplicative_update(b, mean, var, W)
    W = W.clone().requires_grad_()
    expected_log_likelihood(b, mean, var, W).backward()
    active = W.detach() > 1e-6
    scale = torch.exp(mean + var / 2).sum(1).expand_as(W)  # size of the gradient's terms
    assert (W.grad.abs() / scale)[active].max() < 1e-4


def test_fused_update_in_lower_bound_mode_matches_the_separate_functions():
    _, b, mean, var, W = problem(12)
    ll, new = likelihood_and_update(b, mean, var, W)
    assert ll.item() == pytest.approx(expected_log_likelihood(b, mean, var, W).item(), rel=1e-12)
    torch.testing.assert_close(new, multiplicative_update(b, mean, var, W))


@pytest.mark.parametrize("mode", ["expanded", "simple"])
@pytest.mark.parametrize("seed", range(4))
def test_fused_update_never_decreases_the_monte_carlo_estimate_for_its_draws(mode, seed):
    """With the draws held fixed (same generator seed) the step is an exact MM step."""
    _, b, mean, var, W = problem(20 + seed, B=25, D=10, L=3, rate=2.0, var_hi=0.8)

    def estimate(w):
        gen = torch.Generator().manual_seed(seed)
        return expected_log_likelihood(b, mean, var, w, mode=mode, num_samples=5, generator=gen).item()

    values = [estimate(W)]
    for _ in range(10):
        ll, W_next = likelihood_and_update(b, mean, var, W, mode=mode, num_samples=5,
                                           generator=torch.Generator().manual_seed(seed))
        assert ll.item() == pytest.approx(values[-1], rel=1e-12)
        W = W_next
        values.append(estimate(W))
    assert (np.diff(values) >= -1e-9 * abs(values[0])).all(), values
    assert values[-1] > values[0] + 1.0


def test_blocks_without_counts_give_only_the_rate_term():
    b = CountBatch.from_scipy(sp.csr_matrix((4, 3)), dtype=F64)
    mean, var = torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)
    W = torch.ones(3, 2, dtype=F64)
    assert expected_log_likelihood(b, mean, var, W).item() == pytest.approx(-24.0)
    assert multiplicative_update(b, mean, var, W).abs().sum().item() == 0.0


def test_bad_arguments_are_named():
    _, b, mean, var, W = problem(13)
    with pytest.raises(ValueError, match="mode = 'exact'"):
        expected_log_likelihood(b, mean, var, W, mode="exact")
    with pytest.raises(ValueError, match="loadings"):
        expected_log_likelihood(b, mean, var, W[:, :2])
    with pytest.raises(ValueError, match="var"):
        expected_log_likelihood(b, mean, var[:, :3], W)
    with pytest.raises(ValueError, match="num_samples"):
        expected_log_likelihood(b, mean, var, W, mode="expanded", num_samples=0)
