"""PNMF estimator with the Gaussian (non-spatial) prior, on synthetic data with known truth."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import ConfigError, DataError, ModelError
from sf_mlflow.models.device import MALLOC_ENV, resolve_device
from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
from sf_mlflow.models.pnmf import PNMF, ConvergenceWarning
from sf_mlflow.models.settings import SVGP
from sf_mlflow.models.priors import GaussianPrior

# many small torch ops: one thread (see tests/conftest.py, one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

L = 5


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_spots=1500, n_genes=300, n_components=L, n_groups=3, mean_counts=300.0, seed=0)


@pytest.fixture(scope="module")
def fitted(data):
    return PNMF(L, max_iter=400, random_state=0).fit(data.counts)


def matched_correlations(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson correlation of each true column with its Hungarian-matched estimated column."""
    k = truth.shape[1]
    C = np.corrcoef(truth.T, est.T)[:k, k:]
    r, c = linear_sum_assignment(-C)
    return C[r, c]


# ---- fitting -----------------------------------------------------------------------------

def test_recovers_true_log_factors(fitted, data):
    """Matched Pearson correlation on the log scale (log-factors are what the prior models)."""
    corr = matched_correlations(np.log(fitted.get_factors()), data.truth["log_factors"])
    assert corr.min() >= 0.9, corr
    corr_w = matched_correlations(fitted.loadings_, data.truth["loadings"])
    assert corr_w.min() >= 0.9, corr_w


def test_learned_attributes(fitted, data):
    N, D = data.counts.shape
    assert fitted.loadings_.shape == (D, L) and (fitted.loadings_ >= 0).all()
    assert fitted.get_factors().shape == (N, L)
    assert fitted.get_factors(exp_mean=True).shape == (N, L)
    assert (fitted.get_factors(exp_mean=True) > fitted.get_factors()).all()
    scales = fitted.get_factor_scales()
    assert scales.shape == (N, L) and (scales > 0).all()
    assert fitted.elbo_history_.shape == (fitted.n_iter_,)
    assert fitted.converged_ and not fitted.stopped_early_ and fitted.n_iter_ < 400
    assert (fitted.n_spots_, fitted.n_features_in_) == (N, D)
    assert fitted.device_ == torch.device("cpu") and fitted.fit_time_ > 0
    assert isinstance(fitted.prior_, GaussianPrior)


def test_elbo_rises_and_is_a_true_bound(fitted, data):
    h = fitted.elbo_history_
    assert h[-1] > h[0]
    assert h[-10:].mean() > h[:10].mean()
    # ELBO <= max_F log p(Y | F) <= the saturated Poisson log-likelihood (lgamma included)
    y = data.counts.data
    saturated = float((y * np.log(y) - y - gammaln(y + 1)).sum())
    assert h.max() < saturated
    # and not absurdly far below: within the deviance of the truth plus a generous KL allowance
    assert h[-1] > saturated - 2.0 * data.counts.sum()


def test_expected_counts_match_the_data_total(fitted, data):
    """At a fixed point of the multiplicative update, sum E[R] equals sum Y."""
    mu = fitted.expected_counts()
    assert mu.shape == data.counts.shape
    assert mu.sum() == pytest.approx(data.counts.sum(), rel=0.01)
    assert fitted.expected_counts(genes=[0, 3]).shape == (data.counts.shape[0], 2)


def test_minibatch_training_increases_the_elbo(data):
    m = PNMF(L, batch_size=500, y_batch_size=150, max_iter=600, tol=0, random_state=1).fit(data.counts)
    h = m.elbo_history_
    assert len(h) == 600
    assert h[-30:].mean() > h[:30].mean()
    corr = matched_correlations(np.log(m.get_factors()), data.truth["log_factors"])
    assert corr.min() >= 0.85, corr


@pytest.mark.parametrize("kwargs, n_iter", [
    ({"loadings_mode": "gradient"}, 120),
    ({"optimizer": "AdamW"}, 120),
    # Monte Carlo gradients are noisier, so these get more steps
    ({"mode": "expanded", "num_samples": 3}, 200),
    ({"mode": "simple", "num_samples": 3}, 200),
])
def test_other_modes_fit(data, kwargs, n_iter):
    m = PNMF(L, max_iter=n_iter, tol=0, random_state=0, **kwargs).fit(data.counts)
    h = m.elbo_history_
    assert np.isfinite(h).all()
    assert h[-12:].mean() > h[:12].mean()
    corr = matched_correlations(np.log(m.get_factors()), data.truth["log_factors"])
    assert corr.min() >= 0.85, (kwargs, corr)


def test_sgd_runs(data):
    m = PNMF(L, optimizer="SGD", learning_rate=0.5, max_iter=30, tol=0).fit(data.counts)
    assert np.isfinite(m.elbo_history_).all()


def test_float64_and_dense_input(data):
    Y = data.counts[:300].toarray()
    m = PNMF(3, dtype="float64", max_iter=20).fit(Y)
    assert m.prior_.mu.dtype == torch.float64 and m.loadings_.dtype == np.float64


def test_same_seed_gives_bitwise_identical_results(data):
    Y = data.counts[:600]
    kw = dict(max_iter=40, batch_size=200, mode="expanded", num_samples=2)
    a = PNMF(L, random_state=3, **kw).fit(Y)
    b = PNMF(L, random_state=3, **kw).fit(Y)
    c = PNMF(L, random_state=4, **kw).fit(Y)
    assert np.array_equal(a.get_factors(), b.get_factors())
    assert np.array_equal(a.loadings_, b.loadings_)
    assert np.array_equal(a.elbo_history_, b.elbo_history_)
    assert not np.array_equal(a.get_factors(), c.get_factors())


def test_fit_leaves_global_rngs_alone(data):
    torch.manual_seed(123)
    np.random.seed(123)
    PNMF(L, max_iter=5, batch_size=300, mode="simple").fit(data.counts[:600])
    t, n = torch.rand(1).item(), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    assert (torch.rand(1).item(), np.random.rand()) == (t, n)


def test_callback_sees_every_iteration_and_can_stop(data):
    seen = []

    def cb(state):
        seen.append((state.iteration, state.elbo))
        return state.iteration == 7

    m = PNMF(L, max_iter=100, tol=0).fit(data.counts[:500], callback=cb)
    assert [it for it, _ in seen] == list(range(1, 8))
    assert m.n_iter_ == 7 and m.stopped_early_ and not m.converged_
    assert [e for _, e in seen] == list(m.elbo_history_)


def test_verbose_progress_lines(data, capsys):
    PNMF(L, max_iter=30, tol=0, tol_window=10, verbose=True, log_every=10).fit(data.counts[:300])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    pattern = (r"iter +(\d+)/30  ELBO -\d\.\d{4}e\+\d\d  rel\.change (\S+) +\d+\.\d\d it/s"
               r"(  ETA <= \d+m\d\ds)?")
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [10, 20, 30]
    # an ETA until the last line
    assert [m.group(3) is not None for m in matches] == [True, True, False]
    # the relative change needs two full windows of history: undefined at 10, a number from 20
    assert [m.group(2) for m in matches][0] == "n/a"
    assert all(float(m.group(2)) >= 0 for m in matches[1:])


def test_progress_lines_come_by_the_clock_too(data, capsys, monkeypatch):
    """Iterations slower than PROGRESS_EVERY_S seconds each still get a line each, whatever
    log_every says (here the clock's period is 0: every iteration is late)."""
    import sf_mlflow.models.progress as progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    PNMF(L, max_iter=7, tol=0, verbose=True, log_every=1000).fit(data.counts[:300])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(re.match(r"iter +(\d+)/7", line).group(1)) for line in lines] == list(range(1, 8))
    assert all("ETA <= " in line for line in lines[:-1])


def test_initialisation_phases_report_progress_with_an_eta(data, capsys, monkeypatch):
    """Each phase before the first iteration says how far it is (here on every step: the
    clock's period is 0), with an ETA."""
    import sf_mlflow.models.progress as progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    n = 600
    PNMF(3, prior=SVGP(num_inducing=40), max_iter=2, tol=0, verbose=True).fit(
        data.counts[:n], coordinates=data.coordinates[:n] * 20, groups=data.groups[:n])
    out = capsys.readouterr().out
    for what, unit in [("PNMF start", "iterations"), ("kernel hyperparameters", "candidates"),
                       ("conjugate start", "blocks")]:
        lines = re.findall(rf"^{what}: (\d+)/(\d+) {unit}, \d+m\d\ds so far, ETA (<= )?\d+m\d\ds$",
                           out, flags=re.M)
        assert lines, f"no progress line of {what}:\n{out}"
        done = [int(d) for d, _, _ in lines]
        assert done == sorted(done) and done[0] == 1, lines


def test_a_stop_noted_between_steps_keeps_the_next_slow_step_from_starting(data, monkeypatch):
    """A signal that lands between two slow steps (phase TRAINING: "stop after the current
    iteration") stops the fit before the next step starts, state untouched, rather than
    after a step of seconds or minutes; without a request, steps run as before."""
    import sf_mlflow.models._training as training
    import sf_mlflow.models.progress as progress

    monkeypatch.setattr(training, "INTERRUPTIBLE_STEP_S", 0.0)   # every step counts as slow
    Y = data.counts[:300]
    model = PNMF(L, max_iter=6, tol=0, random_state=0)
    seen = []

    def stop_after_third(state):
        seen.append(state.iteration)
        if state.iteration == 3:
            progress.note_stop_request()      # what the signal handler does in TRAINING
        return False

    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(Y, callback=stop_after_third)
    finally:
        progress.note_stop_request(False)
    assert seen == [1, 2, 3]                  # step 4 never started
    whole = PNMF(L, max_iter=3, tol=0, random_state=0).fit(Y)
    assert model.elbo_history_ == pytest.approx(whole.elbo_history_)
    np.testing.assert_allclose(model.get_factors(), whole.get_factors(), rtol=1e-6)


def test_a_noted_stop_ends_initialisation_at_its_next_step_or_phase(data):
    """The signal handler notes a stop as well as raising it: should Python drop its
    KeyboardInterrupt (raised inside a weakref callback), the next progress step of an
    initialisation phase, or the next phase, raises it again; the training loop's own
    iterations are left to end (the callback stops the fit after them)."""
    import sf_mlflow.models.progress as progress

    try:
        progress.note_stop_request()
        with pytest.raises(KeyboardInterrupt):
            PNMF(L, prior=SVGP(num_inducing=20), max_iter=2).fit(
                data.counts[:200], coordinates=data.coordinates[:200])
        start = progress.Progress(None, "PNMF start", 10)
        with _in_phase("initialisation"):
            with pytest.raises(KeyboardInterrupt):
                start.tick()
        with _in_phase(progress.TRAINING):
            start.tick()                       # in the loop: the iteration ends first
        assert start.done == 1
    finally:
        progress.note_stop_request(False)
    PNMF(L, max_iter=2, tol=0).fit(data.counts[:200])   # cleared: fits run again


def test_a_stop_noted_between_two_pieces_of_the_start_ends_it_before_the_next(data, monkeypatch):
    """An interrupt Python dropped after the inducing points were placed (CI: the handler's
    KeyboardInterrupt raised inside a weakref callback) ends the start at its next line: the
    conjugate start, which reports no progress step before its first block, never begins."""
    import io
    import sys

    import sf_mlflow.models.progress as progress

    class NotingAStop(io.StringIO):
        def write(self, text):
            if text.startswith("inducing points: M ="):
                progress.note_stop_request()   # what the handler does before raising
            return super().write(text)

    out = NotingAStop()
    monkeypatch.setattr(sys, "stdout", out)
    try:
        with pytest.raises(KeyboardInterrupt):
            PNMF(3, prior=SVGP(num_inducing=30), max_iter=2, tol=0, verbose=True).fit(
                data.counts[:300], coordinates=data.coordinates[:300] * 20, groups=data.groups[:300])
    finally:
        progress.note_stop_request(False)
    assert "inducing points: M =" in out.getvalue()
    assert "conjugate start" not in out.getvalue(), out.getvalue()


def _in_phase(name):
    """Enter phase ``name`` while a stop is noted (entering would raise, as it should)."""
    import contextlib

    import sf_mlflow.models.progress as progress

    @contextlib.contextmanager
    def inside():
        progress._PHASES.append(name)
        try:
            yield
        finally:
            progress._PHASES.pop()
    return inside()


def test_time_budget_stops_the_fit_and_keeps_the_best_checked_state(data):
    n = 900
    held = np.arange(n) % 10 == 0
    X = data.coordinates[:n] * 20
    Y = data.counts[:n].tocsr()
    val = (Y[held], X[held], data.groups[:n][held])
    with pytest.warns(ConvergenceWarning, match=r"the time budget \(0\.001 s\) ran out at iteration 1"):
        model = PNMF(3, prior=SVGP(num_inducing=40), time_budget=0.001,
                     random_state=0).fit(Y[~held], coordinates=X[~held],
                                         groups=data.groups[:n][~held], validation=val)
    assert model.stop_reason_ == "time_budget" and not model.converged_
    checks = model.validation_history_
    assert checks[:, 0].tolist() == [0, 1]   # the start's check and the one at the budget
    best = int(checks[np.argmin(checks[:, 1]), 0])
    if best == 1:                             # the last state is the best: kept as it is
        assert model.kept_iteration_ is None and model.n_iter_ == 1
    else:                                     # rolled back to the start's state
        assert (model.early_stopped_at_, model.kept_iteration_) == (1, 0)
    # the kept state is the best check's: its held-out deviance is that check's
    from sf_mlflow.models.likelihood import CountBatch, poisson_deviance
    F = torch.log(torch.as_tensor(model.predict_at(val[1], val[2])).T)
    dev = poisson_deviance(CountBatch.from_scipy(val[0], dtype=torch.float64), F,
                           torch.as_tensor(model.loadings_, dtype=torch.float64))
    assert float(dev) == pytest.approx(checks[:, 1].min(), rel=1e-4)


@pytest.mark.parametrize("value, seconds", [("20m", 1200.0), ("90s", 90.0), ("1.5h", 5400.0),
                                            ("1h30m", 5400.0), (45, 45.0), ("30", 30.0)])
def test_time_budget_takes_durations(value, seconds):
    assert PNMF(2, time_budget=value)._validated()["time_budget"] == seconds


@pytest.mark.parametrize("value, expected", [("20x", "a duration such as 90s, 20m"),
                                             (0, "a value > 0"), ("-5m", "a duration")])
def test_bad_time_budgets_are_named(value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"PNMF: time_budget = {value!r}")) as err:
        PNMF(2, time_budget=value)._validated()
    assert expected in str(err.value)


# ---- persistence and new spots ---------------------------------------------------------------

def test_save_load_roundtrip(fitted, tmp_path):
    path = tmp_path / "model.pt"
    fitted.save(path)
    loaded = PNMF.load(path)
    assert np.array_equal(loaded.get_factors(), fitted.get_factors())
    assert np.array_equal(loaded.get_factor_scales(), fitted.get_factor_scales())
    assert np.array_equal(loaded.loadings_, fitted.loadings_)
    assert np.array_equal(loaded.elbo_history_, fitted.elbo_history_)
    assert loaded.get_params() == {**fitted.get_params(), "device": "cpu"}
    assert (loaded.n_iter_, loaded.converged_, loaded.n_spots_) == (fitted.n_iter_, fitted.converged_,
                                                                    fitted.n_spots_)
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"format_version", "hyperparameters", "state", "attributes"}


def test_files_of_format_1_with_flat_spatial_arguments_still_load(data, tmp_path):
    """Models registered before the SVGP settings object stored its fields as PNMF arguments."""
    n = 400
    model = PNMF(2, prior=SVGP(num_inducing=30, lengthscale=0.3, groups=False), max_iter=3, tol=0,
                 random_state=0).fit(data.counts[:n], coordinates=data.coordinates[:n])
    model.save(tmp_path / "new.pt")
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    spatial = blob["hyperparameters"].pop("prior")["svgp"]
    spatial["use_groups"] = spatial.pop("groups")
    blob["hyperparameters"].update(prior="svgp", **spatial)
    blob["format_version"] = 1
    del blob["state"]["train_coordinates"]      # format 1 kept them in the model's dtype
    torch.save(blob, tmp_path / "old.pt")
    old = PNMF.load(tmp_path / "old.pt")
    assert old.prior == model.prior and not old.uses_groups_
    np.testing.assert_array_equal(old.get_factors(), model.get_factors())
    np.testing.assert_allclose(old.train_coordinates_, data.coordinates[:n], rtol=1e-6)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ModelError, match="format_version"):
        PNMF.load(path)


def test_transform_reproduces_the_fitted_factors(fitted, data):
    """q(F) of a spot depends only on its counts and W, so refitting it alone lands in the same place."""
    rows = np.arange(0, 1500, 5)
    new = fitted.transform(data.counts[rows])
    old = fitted.get_factors()[rows]
    assert new.shape == (len(rows), L)
    log_err = np.abs(np.log(new) - np.log(old))
    assert np.median(log_err) < 0.05, np.median(log_err)
    for l in range(L):
        assert np.corrcoef(np.log(new[:, l]), np.log(old[:, l]))[0, 1] > 0.98


def test_predict_at_without_training_coordinates_names_the_fix(fitted):
    assert fitted.train_coordinates_ is None and fitted.inducing_points_ is None
    with pytest.raises(ModelError, match=r"fit\(Y, coordinates=X\)"):
        fitted.predict_at(np.zeros((3, 2)))


def test_predict_at_of_the_gaussian_prior_is_the_nearest_neighbour_rule(data):
    model = PNMF(L, max_iter=30, tol=0.0, random_state=0).fit(data.counts[:1000],
                                                              coordinates=data.coordinates[:1000])
    np.testing.assert_array_equal(model.train_coordinates_, data.coordinates[:1000])
    query = data.coordinates[1000:1100]
    want = np.exp(nearest_neighbour_log_factors(data.coordinates[:1000], np.log(model.get_factors()),
                                                query, k=4))
    np.testing.assert_allclose(model.predict_at(query, neighbours=4), want)
    with pytest.raises(ModelError, match="no std"):
        model.predict_at(query, return_std=True)
    with pytest.raises(DataError, match=r"shape \(n_spots, 2\)"):
        model.predict_at(np.zeros((3, 3)))


# ---- parameters and errors -------------------------------------------------------------------

def test_get_and_set_params():
    m = PNMF(4, learning_rate=0.05)
    params = m.get_params()
    assert params["n_components"] == 4 and params["learning_rate"] == 0.05
    assert PNMF(**params).get_params() == params
    assert m.set_params(max_iter=7) is m and m.max_iter == 7
    with pytest.raises(ConfigError, match="max_iters"):
        m.set_params(max_iters=7)
    assert "learning_rate=0.05" in repr(m)


def test_spatial_settings_are_checked_where_they_are_written():
    with pytest.raises(ConfigError, match=r"SVGP: lengthscale = -1.0 is out of range: expected a value > 0"):
        SVGP(lengthscale=-1.0)
    model = PNMF(2, prior=SVGP(num_inducing=50))
    with pytest.raises(ConfigError, match=r"SVGP: kernel = 'Matern99' is invalid"):
        model.set_params(prior__kernel="Matern99")
    model.set_params(prior__lengthscale=2.5)
    assert model.prior == SVGP(num_inducing=50, lengthscale=2.5)
    assert model.get_params()["prior__lengthscale"] == 2.5
    with pytest.raises(ConfigError, match="prior__bandwidth"):
        model.set_params(prior__bandwidth=1.0)


def test_init_does_not_validate():
    PNMF(n_components=-1, mode="nonsense")  # scikit-learn convention: checks happen in fit


@pytest.mark.parametrize("params, match", [
    ({"n_components": 0}, r"PNMF: n_components = 0 is out of range: expected a value >= 1"),
    ({"n_components": "3"}, r"n_components = '3' is invalid: expected an integer"),
    ({"mode": "exact"}, r"mode = 'exact' .*'lower-bound'"),
    ({"prior": "gp"}, r"prior = 'gp' .*'gaussian', 'svgp'"),
    ({"loadings_mode": "em"}, r"loadings_mode = 'em'"),
    ({"optimizer": "LBFGS"}, r"optimizer = 'LBFGS'"),
    ({"learning_rate": 0.0}, r"learning_rate = 0.0 .*> 0"),
    ({"num_samples": 0}, r"num_samples = 0"),
    ({"batch_size": 0}, r"batch_size = 0 .*>= 1"),
    ({"batch_size": 1.5}, r"batch_size = 1.5 is invalid: expected one of 'auto' or an integer or null"),
    ({"tol_window": 0}, r"tol_window = 0"),
    ({"dtype": "float16"}, r"dtype = 'float16'"),
    ({"max_iter": 2.5}, r"max_iter = 2.5"),
    ({"shuffle": "yes"}, r"shuffle = 'yes'"),
    ({"kl_weight": -1.0}, r"kl_weight = -1.0"),
])
def test_bad_hyperparameters_are_named(params, match):
    Y = np.ones((5, 4))
    with pytest.raises(ConfigError, match=match):
        PNMF(**{"n_components": 2, "max_iter": 2, **params}).fit(Y)


@pytest.mark.parametrize("Y, kwargs, match", [
    (np.ones(5), {}, r"Y must be 2-D .*shape \(5,\)"),
    (np.ones((2, 3, 4)), {}, r"Y must be 2-D"),
    (-np.ones((5, 4)), {}, r"Y contains negative values"),
    (np.full((5, 4), 0.5), {}, r"Y contains 20 non-integer values"),
    (np.full((5, 4), np.nan), {}, r"Y contains NaN"),
    (np.ones((0, 4)), {}, r"Y is empty"),
    ("counts", {}, r"Y must be a numeric array"),
    (np.ones((5, 4)), {"coordinates": np.zeros((4, 2))}, r"coordinates must have shape .*\(5, 2\), got \(4, 2\)"),
    (np.ones((5, 4)), {"coordinates": np.full((5, 2), np.inf)}, r"coordinates contain NaN"),
    (np.ones((5, 4)), {"groups": np.zeros(3, dtype=int)}, r"groups must have shape .*\(5,\)"),
    (np.ones((5, 4)), {"groups": -np.ones(5, dtype=int)}, r"groups must be integer group codes"),
    (np.ones((5, 4)), {"callback": 3}, r"callback = 3 is not callable"),
])
def test_bad_inputs_are_named(Y, kwargs, match):
    with pytest.raises((DataError, ConfigError), match=match):
        PNMF(2, max_iter=2).fit(Y, **kwargs)


def test_svgp_prior_needs_coordinates():
    with pytest.raises(DataError, match=r"coordinates = None, but prior = 'svgp'.*\(5, 2\)"):
        PNMF(2, prior="svgp", max_iter=2).fit(np.ones((5, 4)))


def test_methods_need_a_fitted_model():
    for call in (lambda m: m.get_factors(), lambda m: m.transform(np.ones((2, 3))),
                 lambda m: m.save("x.pt")):
        with pytest.raises(ModelError, match="fit"):
            call(PNMF(2))


def test_transform_checks_the_gene_count(fitted):
    with pytest.raises(DataError, match="Y_new has 3 genes.*300"):
        fitted.transform(np.ones((2, 3)))


def test_sparse_input_with_empty_rows_and_columns():
    Y = sp.random(60, 20, density=0.3, random_state=0, format="csr")
    Y.data = np.ceil(Y.data * 4)
    Y = Y.tolil()
    Y[5, :] = 0
    Y[:, 7] = 0
    m = PNMF(3, max_iter=50).fit(Y.tocsr())
    assert np.isfinite(m.get_factors()).all() and np.isfinite(m.elbo_history_).all()
    assert m.loadings_[7].max() < 1e-3


# ---- device --------------------------------------------------------------------------------

def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("AUTO").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device = 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on machines without CUDA")
@pytest.mark.parametrize("name", ["gpu", "cuda"])
def test_gpu_falls_back_to_cpu_with_one_warning(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_device(name) == torch.device("cpu")
    assert len(caught) == 1
    assert "CUDA is not available" in str(caught[0].message) and "CPU" in str(caught[0].message)


# Bytes glibc holds in mmapped blocks while a 128 MiB tensor lives, before and after a fit.
FREED_MEMORY_PROBE = """
import ctypes, torch
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped():
    t = torch.ones(2 ** 25)
    held = libc.mallinfo2().hblkhd
    del t
    return held
before = mapped()
PNMF(2, max_iter=3).fit(make_synthetic(n_spots=60, n_genes=20, n_components=2, seed=0).counts)
print(before, mapped())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("setting", [None, "0"])
def test_a_cpu_fit_keeps_freed_memory_in_the_process_unless_told_not_to(setting):
    env = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
    if setting is not None:
        env[MALLOC_ENV] = setting
    out = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    before, after = int(out[-2]), int(out[-1])
    assert before >= 2 ** 27                     # glibc's default: a large tensor is mmapped
    assert (after < 2 ** 27) == (setting is None)  # after a fit, from the kept heap


def test_predict_at_of_the_spatial_prior_and_its_public_attributes(data):
    n = 600
    model = PNMF(3, prior=SVGP(num_inducing=40, lengthscale=0.3), max_iter=5, tol=0.0,
                 random_state=0).fit(data.counts[:n], coordinates=data.coordinates[:n],
                                     groups=data.groups[:n])
    assert model.uses_groups_
    np.testing.assert_array_equal(model.train_groups_, data.groups[:n])
    assert model.inducing_points_.shape == (40, 2) and model.inducing_groups_.shape == (40,)
    at_train = model.predict_at(data.coordinates[:n], data.groups[:n])
    np.testing.assert_allclose(at_train, model.get_factors(), rtol=1e-4)
    f, s = model.predict_at(data.coordinates[:n], data.groups[:n], return_std=True)
    np.testing.assert_allclose(model.predict_at(data.coordinates[:n], data.groups[:n], exp_mean=True),
                               f * np.exp(0.5 * s * s), rtol=1e-5)
    with pytest.raises(DataError, match="groups = None"):
        model.predict_at(data.coordinates[:3])
