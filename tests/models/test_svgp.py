"""SVGP prior: KL, exact-posterior limit, ELBO gradients, jitter, inducing points, persistence."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.distributions import MultivariateNormal, kl_divergence

import sf_mlflow  # noqa: F401  (flush-denormal setting)
from sf_mlflow.errors import ConfigError, ModelError
from sf_mlflow.models.blocktri import BlockLayout, strict_lower_sq_norm, triangular_quad
from sf_mlflow.models.inducing import allocate_counts, select_inducing_points
from sf_mlflow.models.kernels import make_kernel
from sf_mlflow.models.svgp import INIT_SCALE, SVGPPrior

F64 = torch.float64


def _data(n, seed=0, groups=3, scale=8.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=dtype) * scale
    return x, torch.randint(0, groups, (n,), generator=g)


def _randomise(prior, seed=1, scale=0.5):
    """Random mu and Lu (positive diagonal) so that tests do not run at the initial values."""
    g = torch.Generator().manual_seed(seed)
    L, M = prior.mu.shape
    with torch.no_grad():
        prior.mu.copy_(torch.randn(L, M, generator=g, dtype=prior.mu.dtype))
        Lu = torch.tril(torch.randn(L, M, M, generator=g, dtype=prior.mu.dtype) * scale / M ** 0.5, -1)
        Lu = Lu + torch.diag_embed(torch.rand(L, M, generator=g, dtype=prior.mu.dtype) * 0.8 + 0.2)
        prior.set_lu(Lu)
    return prior


def _prior(x, g, L=2, **kw):
    kw.setdefault("num_inducing", 12)
    kw.setdefault("lengthscale", 1.5)
    return SVGPPrior(x, g, L, **kw)


# ---- KL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("diagonal_only", [False, True])
@pytest.mark.parametrize("mode", ["exp", "softplus"])
def test_kl_matches_torch_distributions(diagonal_only, mode):
    x, g = _data(60)
    prior = _randomise(_prior(x, g, L=3, cholesky_mode=mode, diagonal_only=diagonal_only))
    Lu = prior.lu()
    M = prior.num_inducing
    if diagonal_only:
        assert torch.count_nonzero(torch.tril(Lu, -1)) == 0
    else:
        assert torch.count_nonzero(torch.tril(Lu, -1)) > 0
    q = MultivariateNormal(prior.mu, scale_tril=Lu)
    p = MultivariateNormal(torch.zeros(M, dtype=F64), torch.eye(M, dtype=F64))
    expected = kl_divergence(q, p).sum()
    assert prior.kl(torch.arange(5)).item() == pytest.approx(expected.item(), rel=1e-10)
    # weighted, and independent of the batch
    weighted = _prior(x, g, L=3, cholesky_mode=mode, diagonal_only=diagonal_only, kl_weight=2.5)
    weighted.load_state_dict(prior.state_dict())
    assert weighted.kl(torch.arange(50)).item() == pytest.approx(2.5 * expected.item(), rel=1e-10)


def test_kl_gradient_is_finite_for_a_vanishing_softplus_diagonal():
    x, g = _data(30)
    prior = _prior(x, g, num_inducing=6, cholesky_mode="softplus", diagonal_only=True)
    with torch.no_grad():
        prior.Lu_diag_raw[0, 0] = -200.0        # softplus underflows to 0 here
    kl = prior.kl(None)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(prior.Lu_diag_raw.grad).all()
    # d KL / d raw = d * d' - d' / d -> -1 as raw -> -inf (d ~ e^raw)
    assert prior.Lu_diag_raw.grad[0, 0].item() == pytest.approx(-1.0)


def test_initial_q_is_tighter_than_the_prior():
    x, g = _data(40)
    prior = _prior(x, g)
    assert torch.equal(prior.mu, torch.zeros_like(prior.mu))
    assert torch.allclose(prior.lu(), INIT_SCALE * torch.eye(12, dtype=F64).expand(2, 12, 12))
    # KL of N(0, s^2 I) from N(0, I): 0.5 M L (s^2 - 1 - 2 log s)
    s = INIT_SCALE
    assert prior.kl(None).item() == pytest.approx(0.5 * 12 * 2 * (s * s - 1 - 2 * np.log(s)), rel=1e-12)


# ---- marginals against the exact GP posterior --------------------------------------------------

def _exact_posterior(kernel, X, gX, Xs, gs, mu, Lu, jitter):
    """q(f*) for u = Lzz v, Z = X: mean Ksz Kzz^-1 m_u, var diag(Kss - Ksz Kzz^-1 Kzs + Ksz Kzz^-1 S_u Kzz^-1 Kzs)."""
    with torch.no_grad():
        Kzz = kernel(X, X, gX, gX)
        Kzz = Kzz + jitter * kernel.outputscale * torch.eye(X.shape[0], dtype=F64)
        Ksz = kernel(Xs, X, gs, gX)
        Lzz = torch.linalg.cholesky(Kzz)
        m_u = (Lzz @ mu[..., None])[..., 0]                            # (L, M)
        S_u = Lzz @ Lu @ Lu.mT @ Lzz.mT                                  # (L, M, M)
        W = torch.linalg.solve(Kzz, Ksz.mT)                              # Kzz^-1 Kzs
        mean = (Ksz @ torch.linalg.solve(Kzz, m_u[..., None]))[..., 0]
        kss = kernel.outputscale * torch.ones(Xs.shape[0], dtype=F64)
        var = kss - (Ksz * W.mT).sum(-1) + ((W.mT @ S_u) * W.mT).sum(-1)
    return mean, var


@pytest.mark.parametrize("kernel", ["Matern32", "RBF", "Matern12"])
@pytest.mark.parametrize("multigroup", [False, True])
@pytest.mark.parametrize("per_factor", [False, True])
def test_marginals_equal_exact_gp_posterior_when_z_is_x(kernel, multigroup, per_factor):
    # M = N = 150 > 64 spans several column blocks of the variance term
    X, gX = _data(150, seed=4, scale=15.0)
    Xs, gs = _data(40, seed=5, scale=15.0)
    groups = gX if multigroup else None
    prior = _randomise(SVGPPrior(X, groups, 3, inducing_points=X, inducing_groups=groups,
                                 kernel=kernel, lengthscale=[1.0, 1.7, 2.5] if per_factor else 1.7,
                                 per_factor_lengthscale=per_factor, sigma=1.3, jitter=1e-8))
    assert len(prior.layout.blocks) > 1
    Lu = prior.lu()
    for pts, grp in ((X, gX), (Xs, gs)):
        mean, var = prior.marginals(None, pts, grp if multigroup else None)
        if per_factor:
            refs = []
            for l, ls in enumerate([1.0, 1.7, 2.5]):
                k = make_kernel(kernel, ls, 1.3, multigroup=multigroup, dtype=F64)
                refs.append(_exact_posterior(k, X, gX, pts, grp, prior.mu[l:l + 1], Lu[l:l + 1], 1e-8))
            ref_mean = torch.cat([r[0] for r in refs]); ref_var = torch.cat([r[1] for r in refs])
        else:
            k = make_kernel(kernel, 1.7, 1.3, multigroup=multigroup, dtype=F64)
            ref_mean, ref_var = _exact_posterior(k, X, gX, pts, grp, prior.mu, Lu, 1e-8)
        assert mean.shape == (3, pts.shape[0]) and var.shape == (3, pts.shape[0])
        assert torch.allclose(mean, ref_mean, rtol=1e-6, atol=1e-7)
        assert torch.allclose(var, ref_var, rtol=1e-6, atol=1e-7)
        assert bool((var >= 0).all())
    assert prior.jitter_used == 1e-8          # no escalation was needed


def test_diagonal_only_matches_full_model_with_diagonal_lu():
    x, g = _data(80, seed=6)
    full = _randomise(_prior(x, g, L=3))
    diag = _prior(x, g, L=3, diagonal_only=True)
    with torch.no_grad():
        diag.mu.copy_(full.mu)
        diag.Lu_diag_raw.copy_(full.Lu_diag_raw)
        full.Lu_lower.zero_()
    m1, v1 = full.marginals(None, x, g)
    m2, v2 = diag.marginals(None, x, g)
    assert torch.allclose(m1, m2, rtol=1e-12) and torch.allclose(v1, v2, rtol=1e-10)
    assert not hasattr(diag, "Lu_lower")


# ---- ELBO gradient -----------------------------------------------------------------------------

class _Elbo(torch.nn.Module):
    """ELBO of a count block as a module, so ``functional_call`` can substitute parameters."""

    def __init__(self, prior, x, g, batch):
        super().__init__()
        self.prior, self.x, self.g, self.batch = prior, x, g, batch

    def forward(self, loadings):
        from sf_mlflow.models.likelihood import expected_log_likelihood

        mean, var = self.prior.marginals(None, self.x, self.g)
        return expected_log_likelihood(self.batch, mean, var, loadings, mode="lower-bound") - self.prior.kl(None)


@pytest.mark.parametrize("diagonal_only", [False, True])
def test_elbo_gradient_passes_gradcheck(diagonal_only):
    from sf_mlflow.models.likelihood import CountBatch

    x, g = _data(7, seed=7, scale=4.0)
    prior = _randomise(_prior(x, g, L=2, num_inducing=5, train_lengthscale=True,
                              cholesky_mode="softplus" if diagonal_only else "exp",
                              diagonal_only=diagonal_only), scale=0.3)
    rng = np.random.default_rng(0)
    batch = CountBatch.from_scipy(sp.csr_matrix(rng.poisson(2.0, size=(7, 4)).astype(float)), dtype=F64)
    model = _Elbo(prior, x, g, batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = {"prior.mu", "prior.Lu_diag_raw", "prior.kernel.raw_lengthscale", "prior.kernel.raw_sigma",
                "prior.kernel.raw_group_diff"}
    assert set(names) == expected | (set() if diagonal_only else {"prior.Lu_lower"})
    params = dict(model.named_parameters())

    def elbo(loadings, *values):
        return torch.func.functional_call(model, dict(zip(names, values)), (loadings,))

    loadings = torch.tensor(rng.uniform(0.2, 1.5, size=(4, 2)), dtype=F64, requires_grad=True)
    inputs = (loadings,) + tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(elbo, inputs, atol=1e-6, rtol=1e-5)


# ---- Kzz factorisation -------------------------------------------------------------------------

def test_cholesky_is_cached_while_hyperparameters_are_fixed():
    x, g = _data(50)
    prior = _prior(x, g)
    L1 = prior.chol_kzz()
    prior.marginals(None, x[:10], g[:10])
    assert prior.chol_kzz() is L1
    with torch.no_grad():
        prior.kernel.raw_lengthscale.add_(0.1)        # an in-place update, as an optimiser makes
    L2 = prior.chol_kzz()
    assert L2 is not L1 and not torch.allclose(L1, L2)
    # trained hyperparameters: factorised with the graph, and gradients reach them
    trained = _prior(x, g, train_lengthscale=True)
    _randomise(trained)
    _, var = trained.marginals(None, x[:10], g[:10])
    var.sum().backward()
    assert trained.kernel.raw_lengthscale.grad is not None
    assert trained.kernel.raw_lengthscale.grad.abs().item() > 0


def test_duplicate_inducing_points_are_rescued_by_jitter_escalation():
    Z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=F64)
    x, _ = _data(10, scale=2.0)
    prior = SVGPPrior(x, None, 2, inducing_points=Z, jitter=1e-20, lengthscale=2.0)
    # with jitter 1e-20, 1 + 1e-20 == 1 in float64: the second pivot is exactly 0
    with pytest.warns(RuntimeWarning, match="needed jitter"):
        mean, var = prior.marginals(None, x)
    assert 1e-20 < prior.jitter_used <= 1e-2
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()


@pytest.mark.parametrize("param, value", [("raw_lengthscale", float("nan")), ("raw_sigma", float("nan"))])
def test_hopeless_cholesky_raises_model_error(param, value):
    x, g = _data(30)
    prior = _prior(x, g, num_inducing=8)
    with torch.no_grad():
        getattr(prior.kernel, param).fill_(value)
    with pytest.raises(ModelError) as err:
        prior.marginals(None, x, g)
    msg = str(err.value)
    assert "lengthscale = " in msg and "M = 8" in msg and "minimum distance between inducing points" in msg


# ---- inducing points ---------------------------------------------------------------------------

def _grouped_points(sizes, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((sum(sizes), 2)) * 10
    g = np.repeat(np.arange(len(sizes)), sizes)
    return X, g


def test_proportional_allocation():
    X, g = _grouped_points([50, 30, 20])
    for M, expected in ((10, [5, 3, 2]), (7, [4, 2, 1])):   # 7: quotas 3.5, 2.1, 1.4 -> +1 to group 0
        Z, gZ = select_inducing_points(X, g, M, "proportional", seed=0)
        assert Z.shape == (M, 2) and np.bincount(gZ, minlength=3).tolist() == expected


def test_equal_allocation_and_caps_by_group_size():
    X, g = _grouped_points([50, 30, 20])
    _, gZ = select_inducing_points(X, g, 7, "equal", seed=0)    # 7/3: 2 each, remainder to the largest
    assert np.bincount(gZ).tolist() == [3, 2, 2]
    X, g = _grouped_points([50, 3, 2])
    Z, gZ = select_inducing_points(X, g, 15, "equal", seed=0)   # quotas 5: groups 1, 2 capped at 3, 2
    assert np.bincount(gZ).tolist() == [10, 3, 2]
    # a group with as many points as spots gets its spots exactly
    assert {tuple(p) for p in Z[gZ == 2]} == {tuple(p) for p in X[g == 2]}
    assert allocate_counts(np.array([5.0, 5.0, 5.0]), np.array([50, 3, 2]), 15).tolist() == [10, 3, 2]


def test_derived_allocation_leaves_no_group_empty():
    rng = np.random.default_rng(1)
    X = rng.random((200, 2)) * 10
    g = np.zeros(200, dtype=np.int64)
    g[:60] = 1
    g[[5, 77]] = 2                      # two scattered spots: a majority nowhere
    Z, gZ = select_inducing_points(X, g, 6, "derived", seed=0)
    counts = np.bincount(gZ, minlength=3)
    assert counts.sum() == 6 and (counts >= 1).all()
    with pytest.raises(ModelError, match="num_inducing = 2 must be >= the number of groups G = 3"):
        select_inducing_points(X, g, 2, "derived")


def test_inducing_points_are_seeded_k_means_centres():
    X, g = _grouped_points([120, 80], seed=3)
    Z1, g1 = select_inducing_points(X, g, 20, "proportional", seed=5)
    Z2, g2 = select_inducing_points(X, g, 20, "proportional", seed=5)
    assert np.array_equal(Z1, Z2) and np.array_equal(g1, g2)
    # each centre lies within its group's bounding box
    for c in (0, 1):
        lo, hi = X[g == c].min(0), X[g == c].max(0)
        assert ((Z1[g1 == c] >= lo) & (Z1[g1 == c] <= hi)).all()
    Z, gZ = select_inducing_points(X, None, 10, seed=0)
    assert Z.shape == (10, 2) and not gZ.any()


def test_impossible_inducing_requests_name_m_n_and_groups():
    X, g = _grouped_points([5, 4])
    with pytest.raises(ModelError, match=r"num_inducing = 10 exceeds.*N = 9.*0: 5, 1: 4"):
        select_inducing_points(X, g, 10, "proportional")
    with pytest.raises(ModelError, match=r"num_inducing = 10 exceeds.*N = 9"):
        select_inducing_points(X, None, 10)
    with pytest.raises(ModelError, match="allocation = 'random'"):
        select_inducing_points(X, g, 3, "random")


# ---- persistence and prediction ----------------------------------------------------------------

@pytest.mark.parametrize("diagonal_only", [False, True])
def test_state_dict_round_trip_reproduces_predictions(diagonal_only):
    x, g = _data(120, seed=8, dtype=torch.float32)
    kw = dict(num_inducing=70, lengthscale=1.2, diagonal_only=diagonal_only)
    prior = _randomise(_prior(x, g, L=3, **kw))
    state = prior.state_dict()
    for key in ("mu", "Lu_diag_raw", "Z", "g_Z", "kernel.raw_lengthscale", "kernel.raw_sigma",
                "kernel.raw_group_diff"):
        assert key in state
    assert ("Lu_lower" in state) != diagonal_only
    xs, gs = _data(33, seed=9, dtype=torch.float32)
    mean, var = prior.predict(xs, gs)
    loaded = SVGPPrior(x, g, 3, inducing_points=state["Z"], inducing_groups=state["g_Z"], **kw)
    loaded.load_state_dict(state)
    mean2, var2 = loaded.predict(xs, gs)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)
    with pytest.raises(ModelError, match="multi-group SVGP state into a single-group model"):
        SVGPPrior(x, None, 3, inducing_points=state["Z"], **kw).load_state_dict(state)


def test_state_with_another_block_layout_loads_to_the_same_lu():
    x, g = _data(100, seed=10)
    prior = _randomise(_prior(x, g, L=2, num_inducing=90))
    state = dict(prior.state_dict())
    other = BlockLayout(90, 2, 7)
    state["Lu_lower"] = other.from_dense(prior.lu())
    state["Lu_block"] = torch.tensor(7)
    loaded = _prior(x, g, L=2, inducing_points=prior.Z, inducing_groups=prior.g_Z)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.lu(), prior.lu())


def test_predict_in_chunks_equals_predict_at_once_and_groupwise():
    x, g = _data(90, seed=11)
    prior = _randomise(_prior(x, g, L=2, num_inducing=30))
    xs, gs = _data(57, seed=12)
    m1, v1 = prior.predict(xs, gs, chunk_size=10_000)
    m2, v2 = prior.predict(xs, gs, chunk_size=8)
    assert torch.allclose(m1, m2, rtol=1e-12, atol=1e-14) and torch.allclose(v1, v2, rtol=1e-12, atol=1e-14)
    mt, vt = prior.marginals(torch.arange(57), xs, gs)
    assert torch.allclose(m1, mt, rtol=1e-12) and torch.allclose(v1, vt, rtol=1e-12)
    gw = prior.groupwise(xs, chunk_size=10)
    assert gw.shape == (3, 2, 57)
    for code in range(3):
        m, _ = prior.predict(xs, torch.full((57,), code))
        assert torch.allclose(gw[code], m, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(gw[0], gw[1])


@pytest.mark.parametrize("per_factor", [False, True])
def test_groupwise_equals_the_prediction_with_every_spot_in_one_group(per_factor):
    x, g = _data(120, seed=13)
    prior = _randomise(_prior(x, g, L=3, num_inducing=40, per_factor_lengthscale=per_factor,
                              lengthscale=2.0))
    if per_factor:
        with torch.no_grad():
            prior.kernel.raw_lengthscale.copy_(torch.log(torch.tensor([1.0, 2.0, 4.0])))
        prior.clear_cache()
    xs, _ = _data(45, seed=14)
    gw = prior.groupwise(xs, group_codes=[2, 0], chunk_size=16)
    assert gw.shape == (2, 3, 45)
    for i, code in enumerate([2, 0]):
        m, _ = prior.predict(xs, torch.full((45,), code))
        assert torch.allclose(gw[i], m, rtol=1e-10, atol=1e-12)


def test_logging_properties_and_input_errors():
    x, g = _data(40)
    prior = _prior(x, g, num_inducing=10, lengthscale=2.0, sigma=0.5, per_factor_lengthscale=True)
    assert prior.num_inducing == 10 and prior.sigma == pytest.approx([0.5, 0.5])   # per factor
    assert prior.lengthscale == pytest.approx([2.0, 2.0]) and prior.jitter_used is None
    prior.marginals(None, x, g)
    assert prior.jitter_used == pytest.approx(1e-5)
    with pytest.raises(ModelError, match="groups"):
        prior.marginals(None, x)
    with pytest.raises(ModelError, match="coordinates"):
        prior.marginals(torch.arange(3))
    with pytest.raises(ConfigError, match="cholesky_mode = 'cholesky'"):
        _prior(x, g, cholesky_mode="cholesky")


# ---- the blocked triangular product on its own --------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_blocked_triangular_quad_and_norm(shared, block):
    L, M, B = 3, 7, 5
    gen = torch.Generator().manual_seed(block)
    At = torch.randn((B, M) if shared else (L, B, M), generator=gen, dtype=F64, requires_grad=True)
    d = (torch.rand(L, M, generator=gen, dtype=F64) + 0.1).requires_grad_()
    layout = BlockLayout(M, L, block)
    storage = torch.randn(layout.size, generator=gen, dtype=F64, requires_grad=True)
    Lu = layout.to_dense(storage, d)
    assert torch.equal(Lu, torch.tril(Lu))
    expected = ((Lu.mT @ At.mT) ** 2).sum(-2)
    assert torch.allclose(triangular_quad(At, storage, d, layout), expected, rtol=1e-12)
    assert torch.allclose(strict_lower_sq_norm(storage, layout), (torch.tril(Lu, -1) ** 2).sum(), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda a, s, dd: triangular_quad(a, s, dd, layout), (At, storage, d))
    assert torch.autograd.gradcheck(lambda s: strict_lower_sq_norm(s, layout), (storage,))


@pytest.mark.parametrize("per_factor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mean_only_path_equals_the_marginal_mean(per_factor, dtype):
    """means() / predict(return_var=False) use Kxz (Lzz^-T mu): the same mean, cheaper."""
    x, g = _data(120, seed=21, dtype=dtype)
    prior = _randomise(_prior(x, g, L=3, num_inducing=40, per_factor_lengthscale=per_factor)
                       .to(dtype))
    if per_factor:
        with torch.no_grad():
            prior.kernel.raw_lengthscale.add_(torch.tensor([0.0, 0.3, -0.3], dtype=dtype))
        prior.clear_cache()
    xs, gs = _data(75, seed=22, dtype=dtype)
    full_mean, _ = prior.predict(xs, gs)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(prior.predict(xs, gs, return_var=False, chunk_size=20),
                               full_mean, **tol)
    torch.testing.assert_close(prior.means(torch.arange(75), xs, gs), full_mean, **tol)
