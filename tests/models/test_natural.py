"""Natural-gradient training of the SVGP prior, stopping rules, roll-back and defaults."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from sf_mlflow.analysis.deviance import poisson_deviance
from sf_mlflow.data.preprocess import heldout_split
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import ConfigError, ModelError
from sf_mlflow.models._training import VALIDATION_MIN_DELTA
from sf_mlflow.models.inducing import auto_num_inducing
from sf_mlflow.models.inputs import check_counts
from sf_mlflow.models.likelihood import CountBatch, poisson_deviance as block_deviance
from sf_mlflow.models.natural import (MAX_MEAN_STEP, NaturalGradient, _flipped_cholesky,
                                      _lower_inverse, _lu_from_flipped, _solve_flipped,
                                      _symmetric)
from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
from sf_mlflow.models.pnmf import PNMF, ConvergenceWarning, NonFiniteELBOError
from sf_mlflow.models.settings import SVGP
from sf_mlflow.models.svgp import SVGPPrior
from test_spatial_recovery import matched_correlation


# ---- the step itself -------------------------------------------------------------------------

def _gaussian_problem(diagonal_only=False, seed=0, n=80, num_inducing=25):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 10
    y = torch.sin(x[:, 0] / 3) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    prior = SVGPPrior(x, None, 1, num_inducing=num_inducing, lengthscale=3.0, seed=0,
                      diagonal_only=diagonal_only).double()
    return x, y, prior


def _gaussian_gradients(prior, x, y, noise):
    """Gradients of sum_b E_q log N(y_b | f_b, noise) in the marginals, by autograd."""
    mean, var, At = prior.marginals_and_interp(x)
    m = mean.detach().requires_grad_(True)
    v = var.detach().requires_grad_(True)
    ell = (-0.5 * math.log(2 * math.pi * noise) - ((y - m) ** 2 + v) / (2 * noise)).sum()
    g_mean, g_var = torch.autograd.grad(ell, [m, v])
    return At.detach(), g_mean, g_var


def _steps(prior, x, y, noise, lr, n):
    """n natural steps of size lr on the conjugate model, without a trust region."""
    opt = NaturalGradient(prior, lr, max_mean_step=None)
    for _ in range(n):
        opt.step(*_gaussian_gradients(prior, x, y, noise))


def _exact_posterior(prior, x, y, noise):
    """Whitened posterior of the conjugate model: precision I + A A^T / noise (M, M) and
    mean precision^{-1} A y / noise (M,)."""
    A = prior.marginals_and_interp(x)[2].detach().T
    precision = torch.eye(A.shape[0], dtype=torch.float64) + A @ A.T / noise
    return precision, torch.linalg.solve(precision, A @ y / noise)


# M 300 takes the curvature in row blocks (natural.CURVATURE_BLOCK_ROWS), M 25 in one product
@pytest.mark.parametrize("n, num_inducing", [(80, 25), (500, 300)])
def test_one_step_of_size_one_is_the_exact_posterior_of_a_conjugate_model(n, num_inducing):
    x, y, prior = _gaussian_problem(n=n, num_inducing=num_inducing)
    noise = 0.09
    At, g_mean, g_var = _gaussian_gradients(prior, x, y, noise)
    precision, mean = _exact_posterior(prior, x, y, noise)   # A does not depend on q(v)
    NaturalGradient(prior, 1.0, max_mean_step=None).step(At, g_mean, g_var)
    with torch.no_grad():
        Lu = prior.lu()[0]
        torch.testing.assert_close(prior.mu[0], mean, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(Lu @ Lu.T, torch.linalg.inv(precision), rtol=1e-7, atol=1e-9)
    # the posterior is a fixed point: a second step leaves it where it is
    At, g_mean, g_var = _gaussian_gradients(prior, x, y, noise)
    NaturalGradient(prior, 1.0, max_mean_step=None).step(At, g_mean, g_var)
    with torch.no_grad():
        torch.testing.assert_close(prior.mu[0], mean, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_factors_of_a_precision_read_its_upper_triangle_only(dtype):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 300, generator=g, dtype=torch.float64)
    P = X @ X.T / 300 + torch.eye(300, dtype=torch.float64)
    garbled = torch.triu(P) + torch.tril(torch.full_like(P, float("nan")), -1)
    Lf = _flipped_cholesky(garbled)
    torch.testing.assert_close(Lf, torch.linalg.cholesky(P.flip(0, 1)))
    Lu = _lu_from_flipped(Lf, dtype)
    assert Lu.dtype == dtype and bool((Lu.triu(1) == 0).all())
    tol = {"rtol": 1e-3, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close((Lu @ Lu.T).double(), torch.linalg.inv(P), **tol)
    assert _flipped_cholesky(P - 2 * torch.eye(300, dtype=torch.float64)) is None


def test_a_float32_model_factors_a_well_conditioned_precision_in_float32_and_others_in_float64():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 400, generator=g, dtype=torch.float64)
    P = X @ X.T * 10.0 + torch.eye(400, dtype=torch.float64)    # condition number 1.5e4
    Lf = _flipped_cholesky(P, torch.float32)
    assert Lf.dtype == torch.float32
    Lu = _lu_from_flipped(Lf, torch.float32).double()
    exact = torch.linalg.inv(P)
    assert float((Lu @ Lu.T - exact).norm() / exact.norm()) < 1e-3
    theta = torch.randn(400, generator=g, dtype=torch.float64)
    solved = _solve_flipped(Lf, theta)
    assert solved.dtype == torch.float64
    exact_solve = torch.linalg.solve(P, theta)
    assert float((solved - exact_solve).norm() / exact_solve.norm()) < 1e-3
    # a diagonal spread beyond the bound is factored in float64, as is every float64 model's
    spread = torch.diag(torch.logspace(0, 8, 400, dtype=torch.float64))
    assert _flipped_cholesky(spread, torch.float32).dtype == torch.float64
    assert _flipped_cholesky(P).dtype == torch.float64
    # float64 decides: an indefinite precision has no factor in either dtype
    assert _flipped_cholesky(P - 1e9 * torch.eye(400, dtype=torch.float64), torch.float32) is None


@pytest.mark.parametrize("M", [255, 256, 600])
def test_the_blocked_triangular_inverse_is_the_inverse(M):
    g = torch.Generator().manual_seed(M)
    X = torch.randn(M, M, generator=g, dtype=torch.float64)
    Lf = torch.linalg.cholesky(X @ X.T / M + torch.eye(M, dtype=torch.float64))
    inv = _lower_inverse(Lf)
    assert bool((inv.triu(1) == 0).all())
    torch.testing.assert_close(inv @ Lf, torch.eye(M, dtype=torch.float64), rtol=0, atol=1e-12)


def _sampled_precisions(seed, draws, n=200, fraction=0.5):
    """The precision after ``draws`` steps of size 1 from the same gradients, each with a
    fresh sample of the curvature's spots: ``I + (n / n_s) A_s A_s^T / noise`` (the Gaussian
    likelihood's curvature does not depend on q), and the exact ``I + A A^T / noise``."""
    x, y, prior = _gaussian_problem(n=n)
    grads = _gaussian_gradients(prior, x, y, 0.09)
    opt = NaturalGradient(prior, 1.0, max_mean_step=None, curvature_fraction=fraction,
                          generator=torch.Generator().manual_seed(seed))
    out = []
    for _ in range(draws):
        opt.step(*grads)
        out.append(_symmetric(opt.precision[0]))
    return torch.stack(out), _exact_posterior(prior, x, y, 0.09)[0]


def test_a_sampled_curvature_is_unbiased_and_repeats_with_its_generator():
    draws, exact = _sampled_precisions(seed=0, draws=400)
    one_draw = (draws[0] - exact).abs().max() / exact.diagonal().max()
    assert float(one_draw) > 0.05                       # one sample is far from the curvature
    mean_error = (draws.mean(0) - exact).abs().max() / exact.diagonal().max()
    assert float(mean_error) < 0.25 * float(one_draw)    # the average of 400 is near it
    again, _ = _sampled_precisions(seed=0, draws=3)
    torch.testing.assert_close(again, draws[:3], rtol=0, atol=0)
    other, _ = _sampled_precisions(seed=1, draws=1)
    assert not torch.equal(other[0], draws[0])
    every, _ = _sampled_precisions(seed=0, draws=1, fraction=1.0)
    torch.testing.assert_close(every[0], exact, rtol=1e-9, atol=1e-9)


def test_with_a_sampled_curvature_the_mean_still_reaches_the_exact_posterior():
    # the mean's fixed point needs only g_mu (all spots); the curvature preconditions it
    x, y, prior = _gaussian_problem(n=200)
    opt = NaturalGradient(prior, 0.5, max_mean_step=None, curvature_fraction=0.5,
                          generator=torch.Generator().manual_seed(0))
    for _ in range(80):
        opt.step(*_gaussian_gradients(prior, x, y, 0.09))
    _, mean = _exact_posterior(prior, x, y, 0.09)
    with torch.no_grad():
        torch.testing.assert_close(prior.mu[0], mean, rtol=1e-5, atol=1e-6)


def test_smaller_steps_converge_to_the_same_posterior():
    x, y, prior = _gaussian_problem()
    noise = 0.09
    _steps(prior, x, y, noise, 0.5, 40)
    _, mean = _exact_posterior(prior, x, y, noise)
    with torch.no_grad():
        torch.testing.assert_close(prior.mu[0], mean, rtol=1e-6, atol=1e-7)


def test_diagonal_q_takes_the_mean_field_step():
    x, y, prior = _gaussian_problem(diagonal_only=True)
    noise = 0.09
    _steps(prior, x, y, noise, 0.5, 400)
    # stationary point of the mean-field ELBO: the exact posterior mean, and precisions
    # 1 + diag(A A^T) / noise
    precision, mean = _exact_posterior(prior, x, y, noise)
    with torch.no_grad():
        torch.testing.assert_close(prior.lu_diagonal()[0], torch.diagonal(precision).rsqrt(),
                                   rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(prior.mu[0], mean, rtol=1e-4, atol=1e-5)


def test_trust_region_bounds_the_move_of_the_marginal_means():
    x, y, prior = _gaussian_problem()
    At, g_mean, g_var = _gaussian_gradients(prior, x, 50.0 * y, 0.01)   # a huge pull
    before = prior.marginals_and_interp(x)[0].detach()
    opt = NaturalGradient(prior, 1.0)
    opt.step(At, g_mean, g_var)
    after = prior.marginals_and_interp(x)[0].detach()
    assert float((after - before).abs().max()) <= MAX_MEAN_STEP * (1 + 1e-6)
    assert opt.shrinks == 1


def test_a_precision_that_is_not_positive_definite_halves_the_step():
    x, y, prior = _gaussian_problem()
    At, g_mean, _ = _gaussian_gradients(prior, x, y, 0.09)
    g_var = torch.full_like(g_mean, 40.0)   # a (Monte Carlo-like) positive curvature
    opt = NaturalGradient(prior, 1.0)
    opt.step(At, g_mean, g_var)
    assert opt.halvings > 0
    d = prior.lu_diagonal()
    assert bool(torch.isfinite(prior.lu()).all()) and bool((d > 0).all())


def test_step_size_must_lie_in_the_unit_interval():
    _, _, prior = _gaussian_problem()
    with pytest.raises(ModelError, match=r"lr = 1.5 must be in \(0, 1\]"):
        NaturalGradient(prior, 1.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ModelError, match=rf"curvature_fraction = {bad} must be in \(0, 1\]"):
            NaturalGradient(prior, 0.5, curvature_fraction=bad)


# ---- the estimator with natural gradients ----------------------------------------------------

@pytest.fixture(scope="module")
def grouped():
    return make_synthetic(n_spots=600, n_genes=80, n_components=3, n_groups=3, lengthscale=0.2,
                          group_effect=0.5, mean_counts=200, seed=4)


def _svgp(**kw):
    """PNMF with the spatial prior; keywords naming SVGP settings go to the prior."""
    spatial = {k: kw.pop(k) for k in list(kw) if k in SVGP().to_dict()}
    return PNMF(3, prior=SVGP(**{"num_inducing": 60, "lengthscale": 4.0, **spatial}),
                **{"random_state": 0, **kw})


@pytest.mark.parametrize("lr,batch_size", [(0.1, 300), (0.3, 300), (1.0, None)])
def test_grouped_model_is_stable_at_any_step(grouped, lr, batch_size):
    # a full step (1.0) replaces q(v) by one batch's estimate: for full batches only
    X = grouped.coordinates * 20
    m = _svgp(learning_rate=lr, max_iter=60, tol=0, batch_size=batch_size)
    m.fit(grouped.counts, coordinates=X, groups=grouped.groups)
    assert np.isfinite(m.elbo_history_).all()
    # the fit starts where PNMF ends, near the optimum: stable means it does not fall away
    start, end = m.elbo_history_[:5].mean(), m.elbo_history_[-10:].mean()
    assert end > start - 1e-2 * abs(start)


def test_natural_needs_the_svgp_prior_and_a_step_in_the_unit_interval(grouped):
    with pytest.raises(ConfigError, match="optimizer = 'natural' needs prior = 'svgp'"):
        PNMF(3, optimizer="natural").fit(grouped.counts)
    with pytest.raises(ConfigError, match=r"learning_rate = 2 is invalid with optimizer 'natural'"):
        _svgp(optimizer="natural", learning_rate=2).fit(grouped.counts, coordinates=grouped.coordinates)


def test_auto_optimizer_is_natural_for_svgp_and_adam_for_gaussian():
    assert _svgp()._validated()["optimizer"] == "natural"
    assert PNMF(3)._validated()["optimizer"] == "Adam"


def test_trained_kernel_hyperparameters_move_by_adam(grouped):
    m = _svgp(train_lengthscale=True, max_iter=15, tol=0)
    m.fit(grouped.counts, coordinates=grouped.coordinates * 20, groups=grouped.groups)
    assert np.isfinite(m.elbo_history_).all()
    assert m.prior_.lengthscale != pytest.approx(4.0)
    # q(v) is trainable again after the fit (natural steps froze it only during the fit)
    assert m.prior_.mu.requires_grad


def test_non_finite_elbo_rolls_back_to_the_last_finite_state_which_can_resume(grouped):
    X = grouped.coordinates * 20
    model = _svgp(max_iter=30, tol=0)

    def corrupt(state):
        if state.iteration == 15:
            with torch.no_grad():
                model.prior_.mu.fill_(float("nan"))

    with pytest.raises(NonFiniteELBOError, match=r"became nan at iteration 16.*iteration 10") as err:
        model.fit(grouped.counts, coordinates=X, groups=grouped.groups, callback=corrupt)
    assert (err.value.iteration, err.value.kept_iteration) == (16, 10)
    assert model.n_iter_ == 10 and np.isfinite(model.elbo_history_).all()
    assert np.isfinite(model.get_factors()).all() and np.isfinite(model.loadings_).all()
    reference = _svgp(max_iter=30, tol=0).fit(grouped.counts, coordinates=X, groups=grouped.groups)
    # the rolled-back state is the uninterrupted fit's state at iteration 10
    np.testing.assert_allclose(model.elbo_history_, reference.elbo_history_[:10], rtol=1e-10)
    resumed = _svgp(max_iter=30, tol=0).fit(grouped.counts, coordinates=X, groups=grouped.groups,
                                           resume=model.checkpoint())
    np.testing.assert_allclose(resumed.elbo_history_, reference.elbo_history_, rtol=1e-6)


def test_unconverged_fit_warns_and_says_why(grouped):
    with pytest.warns(ConvergenceWarning, match="max_iter = 5 reached"):
        m = _svgp(max_iter=5, tol=1e-4).fit(grouped.counts, coordinates=grouped.coordinates * 20,
                                           groups=grouped.groups)
    assert (m.converged_, m.stop_reason_) == (False, "max_iter")


def test_converged_fit_does_not_warn(grouped):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m = _svgp(max_iter=2000, tol=1e-3, learning_rate=1.0).fit(
            grouped.counts, coordinates=grouped.coordinates * 20, groups=grouped.groups)
    assert (m.converged_, m.stop_reason_) == (True, "tol")
    assert m.n_iter_ < 2000


def test_stopping_rule_reads_a_deterministic_evaluation_block(grouped):
    model = _svgp(max_iter=12, tol=0, batch_size=200, y_batch_size=40)
    trainer = model._start(model._validated(), check_counts(grouped.counts),
                           grouped.coordinates * 20, grouped.groups, None)
    trainer.run(None)
    seen = [trainer.evaluate_elbo(), trainer.evaluate_elbo()]
    assert seen[0] == seen[1] and math.isfinite(seen[0])


def test_early_stopping_keeps_the_best_heldout_state(grouped):
    X = grouped.coordinates * 20
    held = heldout_split(grouped.counts.shape[0], 0.15, 0, grouped.groups)
    tr, te = ~held, held
    model = _svgp(max_iter=400, tol=0, validation_every=2, patience=3, learning_rate=1.0)
    model.fit(grouped.counts[tr], coordinates=X[tr], groups=grouped.groups[tr],
              validation=(grouped.counts[te], X[te], grouped.groups[te]))
    hist = model.validation_history_
    assert model.stop_reason_ == "validation" and model.converged_
    # rolled back to the last check that improved the best by the minimum delta, then
    # `patience` checks without such an improvement
    best = int(np.flatnonzero(hist[:, 0] == model.n_iter_)[0])
    assert len(hist) - 1 - best == 3
    assert hist[best, 1] <= hist[:, 1].min() * (1 + VALIDATION_MIN_DELTA)
    batch = CountBatch.from_scipy(grouped.counts[te], dtype=torch.float32)
    F = torch.as_tensor(np.log(model.predict_at(X[te], grouped.groups[te])).T, dtype=torch.float32)
    again = block_deviance(batch, F, torch.as_tensor(model.loadings_))
    assert again == pytest.approx(hist[best, 1], rel=1e-5)


def test_validation_errors_name_the_input(grouped):
    X = grouped.coordinates
    with pytest.raises(ConfigError, match="validation needs prior = 'svgp'"):
        PNMF(3).fit(grouped.counts, validation=(grouped.counts, X, None))
    with pytest.raises(Exception, match=r"validation Y_val has 5 genes, Y has 80"):
        _svgp().fit(grouped.counts, coordinates=X, groups=grouped.groups,
                    validation=(grouped.counts[:, :5], X, grouped.groups))
    with pytest.raises(Exception, match="validation groups_val = None"):
        _svgp().fit(grouped.counts, coordinates=X, groups=grouped.groups,
                    validation=(grouped.counts, X, None))


# ---- num_inducing = "auto" -------------------------------------------------------------------

def test_auto_num_inducing_grows_with_distinct_locations_and_is_capped():
    rng = np.random.default_rng(0)
    assert auto_num_inducing(rng.random((50, 2))) == 50          # fewer locations than the floor
    assert auto_num_inducing(rng.random((600, 2))) == 100        # the floor
    assert auto_num_inducing(rng.random((5000, 2))) == 500       # a tenth
    assert auto_num_inducing(rng.random((41786, 2))) == 3000     # the plan's cap
    # duplicates count once
    assert auto_num_inducing(np.repeat(rng.random((30, 2)), 4, axis=0)) == 30


def test_auto_num_inducing_is_capped_lower_on_a_cpu():
    import torch

    from sf_mlflow.models.inducing import AUTO_MAX, AUTO_MAX_CPU, auto_max

    assert (auto_max(torch.device("cpu")), auto_max("cuda"), auto_max(torch.device("cuda", 1))
            ) == (AUTO_MAX_CPU, AUTO_MAX, AUTO_MAX) == (1000, 3000, 3000)
    X = np.random.default_rng(0).random((41786, 2)) * 200
    M, why = auto_num_inducing(X, lengthscale=2.0, explain=True, max_points=auto_max("cpu"))
    assert M == 1000 and "capped at 1000 on a CPU (3000 on a GPU)" in why
    assert auto_num_inducing(X, lengthscale=2.0, max_points=auto_max("cuda")) == 3000
    # a fit on the CPU takes the CPU's cap (a number in the config is used as it is)
    from sf_mlflow.models.settings import SVGP

    prior = SVGP(lengthscale=2.0).build(torch.as_tensor(X[:20000], dtype=torch.float32), None, 2,
                                        kl_weight=1.0, seed=0)
    assert prior.num_inducing == 1000


def test_auto_is_the_default_and_records_the_value_used(grouped):
    model = PNMF(3, prior="svgp", max_iter=2, tol=0)
    assert model._validated()["spatial"].num_inducing == "auto"
    model.fit(grouped.counts, coordinates=grouped.coordinates * 20, groups=grouped.groups)
    assert model.num_inducing_ == auto_num_inducing(grouped.coordinates) == 100
    assert model.prior_.num_inducing == 100


def test_auto_batch_size_by_spots_factors_inducing_points_and_device():
    from sf_mlflow.models.settings import AUTO_BATCH_MIN, resolve_batch_size

    def chosen(n_spots, device="cpu", prior="svgp", **kw):
        p = PNMF(10, prior=prior, **kw)._validated()
        why = resolve_batch_size(p, n_spots, device)
        return p["batch_size"], why

    # the shipped data sets (<= 6,471 spots) and anything up to 10,000 at L 10, M 1,000: all spots
    assert chosen(10000)[0] is None and "within 1e+11 on a cpu" in chosen(10000)[1]
    # Slide-seq: 41,786 spots at the CPU's M cap 1,000 -> 10,000 a step; the why names the way out
    B, why = chosen(41786)
    assert B == 10000 and "10,000 of 41,786 spots a step" in why and "training.batch_size" in why
    # a GPU takes 20x the work (at its M cap 3,000: 22,222 spots), fewer factors more spots
    assert chosen(41786, "cuda")[0] == 22222 and chosen(41786, torch.device("cuda", 1))[0] == 22222
    assert chosen(41786, spatial_components=2)[0] is None
    assert chosen(41786, prior=SVGP(num_inducing=3000))[0] == 1111
    assert chosen(10 ** 6, prior=SVGP(num_inducing=20000))[0] == AUTO_BATCH_MIN
    # the Gaussian prior, and a number or null as set, are left alone
    assert chosen(10 ** 6, prior="gaussian") == (None, "all spots (Gaussian prior: a step is cheap)")
    assert chosen(41786, batch_size=500) == (500, "as set")
    assert chosen(41786, batch_size=None) == (None, "as set")
    with pytest.raises(ConfigError, match=r"batch_size = 'many' is invalid.*'auto' or an integer or null"):
        PNMF(prior="svgp", batch_size="many")._validated()


def test_auto_batch_size_is_used_said_and_kept(grouped, monkeypatch, capsys):
    from sf_mlflow.models import settings

    # the CPU's work limit and smallest batch scaled down to this data set: 2 factors, M 60
    monkeypatch.setitem(settings.AUTO_BATCH_WORK, "cpu", 2 * 60 ** 2 * 250)
    monkeypatch.setattr(settings, "AUTO_BATCH_MIN", 100)
    model = _svgp(max_iter=3, tol=0, verbose=True).set_params(n_components=2)
    model.fit(grouped.counts, coordinates=grouped.coordinates * 20, groups=grouped.groups)
    assert model.batch_size_ == 250 and model.num_inducing_ == 60
    assert model.batch_size_rule_.startswith("250 of 600 spots a step")
    assert model.start_report_["batch_size_rule"] == model.batch_size_rule_
    assert "batch size: 250 of 600 spots a step" in capsys.readouterr().out
    monkeypatch.setattr(settings, "AUTO_BATCH_MIN", 700)   # more than the data: all spots
    model.fit(grouped.counts, coordinates=grouped.coordinates * 20, groups=grouped.groups)
    assert model.batch_size_ is None and "the smallest mini-batch auto takes is 700" in model.batch_size_rule_


def test_auto_curvature_fraction_samples_a_quarter_of_a_mini_batch_and_repeats(grouped, capsys):
    from sf_mlflow.models.settings import AUTO_CURVATURE_FRACTION, curvature_fraction

    assert curvature_fraction({"batch_size": None, "curvature_fraction": "auto"}, 600) == 1.0
    assert curvature_fraction({"batch_size": 600, "curvature_fraction": "auto"}, 600) == 1.0
    assert curvature_fraction({"batch_size": 250, "curvature_fraction": "auto"}, 600) == \
        AUTO_CURVATURE_FRACTION == 0.25
    assert curvature_fraction({"batch_size": 250, "curvature_fraction": 0.3}, 600) == 0.3
    data = (grouped.counts, grouped.coordinates * 20, grouped.groups)

    def fit(**kw):
        model = _svgp(max_iter=6, tol=0, batch_size=250, **kw).set_params(n_components=2)
        return model.fit(data[0], coordinates=data[1], groups=data[2])

    sampled = fit(verbose=True)
    assert sampled.start_report_["curvature_fraction"] == 0.25
    assert "natural steps: curvature from 25% of each batch's spots" in capsys.readouterr().out
    assert np.isfinite(sampled.elbo_history_).all()
    np.testing.assert_array_equal(fit().elbo_history_, sampled.elbo_history_)
    every = fit(curvature_fraction=1.0)
    assert "curvature_fraction" not in every.start_report_
    assert not np.array_equal(every.elbo_history_, sampled.elbo_history_)
    with pytest.raises(ConfigError, match="curvature_fraction"):
        fit(curvature_fraction=1.5)


def test_explicit_num_inducing_above_the_distinct_locations_is_still_an_error(grouped):
    with pytest.raises(ModelError, match=r"num_inducing = 900 exceeds the number of distinct spot"):
        _svgp(num_inducing=900, groups=False).fit(grouped.counts, coordinates=grouped.coordinates)
    with pytest.raises(ConfigError, match=r"SVGP: num_inducing = 'many' is invalid"):
        _svgp(num_inducing="many")


# ---- the grouped model earns its keep on group-specific fields ---------------------------------

def test_grouped_model_recovers_group_specific_fields_and_predicts_heldout_spots_best():
    data = make_synthetic(n_spots=1500, n_genes=150, n_components=3, n_groups=3, lengthscale=0.2,
                          group_effect=0.6, mean_counts=150, seed=7)
    X = data.coordinates * 20.0
    held = heldout_split(data.counts.shape[0], 0.1, 0, data.groups)
    tr, te = ~held, held
    Y, g = data.counts[tr], data.groups[tr]
    common = dict(max_iter=300, tol=1e-5, random_state=0)
    mggp = PNMF(3, prior=SVGP(num_inducing=300), **common).fit(Y, coordinates=X[tr], groups=g)
    single = PNMF(3, prior=SVGP(num_inducing=300, groups=False), **common).fit(
        Y, coordinates=X[tr])
    pnmf = PNMF(3, **common).fit(Y)
    truth = data.truth["factors"][tr]
    r = {name: matched_correlation(m.get_factors(), truth)
         for name, m in (("mggp", mggp), ("single", single), ("pnmf", pnmf))}
    assert r["mggp"] >= 0.95 and r["mggp"] > r["single"] and r["mggp"] > r["pnmf"], r

    def heldout(model, log_factors):
        return poisson_deviance(data.counts[te], factors=np.exp(log_factors),
                                loadings=model.loadings_)["total"]

    dev = {
        "mggp": heldout(mggp, np.log(mggp.predict_at(X[te], data.groups[te]))),
        "single": heldout(single, np.log(single.predict_at(X[te]))),
        "pnmf": heldout(pnmf, nearest_neighbour_log_factors(X[tr], np.log(pnmf.get_factors()), X[te])),
    }
    assert dev["mggp"] < dev["single"] and dev["mggp"] < dev["pnmf"], dev


def test_early_stopping_keeps_the_start_when_no_later_check_beats_it(grouped, monkeypatch):
    """The start's held-out check (iteration 0) is a state early stopping can roll back to:
    training must improve on where it started, or the start is what the fit returns."""
    from sf_mlflow.models._training import Trainer

    held = np.arange(grouped.n_spots) % 10 == 0
    Y, X, g = grouped.counts.tocsr(), grouped.coordinates * 20, grouped.groups
    checks = iter(range(10**6))
    # every later check is worse than the one before: the start stays the best
    monkeypatch.setattr(Trainer, "heldout_deviance", lambda self: 1000.0 + next(checks))
    started = {}
    run = Trainer.run

    def spy(self, callback):
        started["mu"] = self.prior.mu.detach().clone()
        return run(self, callback)

    monkeypatch.setattr(Trainer, "run", spy)
    m = _svgp(validation_every=2, patience=3, max_iter=50, tol=0)
    m.fit(Y[~held], coordinates=X[~held], groups=g[~held], validation=(Y[held], X[held], g[held]))
    assert m.stop_reason_ == "validation" and m.early_stopped_at_ == 6 and m.kept_iteration_ == 0
    assert m.validation_history_[:, 0].tolist() == [0, 2, 4, 6]
    assert torch.equal(m.prior_.mu.detach(), started["mu"])
    assert m.n_iter_ == 1 and np.isfinite(m.elbo_history_).all()    # the start's ELBO
