"""Checkpoints: a fit stopped part-way and resumed equals one that was never stopped."""

import numpy as np
import pytest

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import ConfigError, DataError, ModelError
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_spots=400, n_genes=60, n_components=3, n_groups=2, seed=3)


CASES = {
    # mini-batches over spots and genes, shuffled: the batch order must be restored
    "gaussian-minibatch": dict(prior="gaussian", batch_size=150, y_batch_size=40),
    # Monte Carlo ELBO: the torch generator must be restored
    "gaussian-simple": dict(prior="gaussian", mode="simple", num_samples=3),
    # spatial prior with groups, expanded mode, spot mini-batches
    "svgp-expanded": dict(prior=SVGP(num_inducing=40, lengthscale=0.3), mode="expanded", num_samples=2,
                          batch_size=200),
    "svgp-gradient-loadings": dict(prior=SVGP(num_inducing=30, lengthscale=0.3), loadings_mode="gradient"),
    # the natural-gradient optimiser's carried precision, full and diagonal q(v), and Adam
    "svgp-natural-minibatch": dict(prior=SVGP(num_inducing=40, lengthscale=0.3), optimizer="natural",
                                   learning_rate=0.3, batch_size=150),
    "svgp-natural-diagonal": dict(prior=SVGP(num_inducing=40, lengthscale=0.3, diagonal_only=True),
                                  optimizer="natural"),
    "svgp-adam": dict(prior=SVGP(num_inducing=40, lengthscale=0.3), optimizer="Adam", learning_rate=0.01,
                      batch_size=200),
}


def _fit(data, params, **kw):
    model = PNMF(3, max_iter=24, tol=0, random_state=5, **params)
    groups = data.groups if isinstance(params["prior"], SVGP) else None
    coords = data.coordinates if isinstance(params["prior"], SVGP) else None
    return model.fit(data.counts, coordinates=coords, groups=groups, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_fit_equals_uninterrupted_fit(data, case, tmp_path):
    params = CASES[case]
    reference = _fit(data, params)

    stopped = _fit(data, params, callback=lambda state: state.iteration == 10)
    assert stopped.n_iter_ == 10 and stopped.stopped_early_
    path = tmp_path / "ckpt.pt"
    stopped.save_checkpoint(path)

    resumed = _fit(data, params, resume=PNMF.load_checkpoint(path))
    assert resumed.n_iter_ == reference.n_iter_ == 24
    np.testing.assert_allclose(resumed.elbo_history_, reference.elbo_history_, rtol=1e-10)
    np.testing.assert_allclose(resumed.loadings_, reference.loadings_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(resumed.get_factors(), reference.get_factors(), rtol=1e-9)


@pytest.mark.parametrize("case", ["svgp-natural-minibatch", "gaussian-simple"])
@pytest.mark.parametrize("slow", [True, False], ids=["snapshot-each-step", "snapshot-every-10"])
def test_a_step_cut_short_by_an_interrupt_is_undone_and_resumes_exactly(data, case, slow,
                                                                       monkeypatch):
    """KeyboardInterrupt (a signal's, Ctrl-C's) raised at the end of step 13, after it changed
    the state: the trainer restores a whole state (the step's start when steps are slow, else
    its last snapshot, iteration 10), the model keeps it as a checkpoint, and the fit resumed
    from it equals the uninterrupted one."""
    from sf_mlflow.models import _training
    from sf_mlflow.models._training import Trainer
    from sf_mlflow.models.progress import STEP, TRAINING, current_phase

    params = CASES[case]
    reference = _fit(data, params)
    monkeypatch.setattr(_training, "INTERRUPTIBLE_STEP_S", 0.0 if slow else 1e9)
    step = Trainer._step

    def step_then_interrupt(self, *args):
        value = step(self, *args)
        if len(self.history) == 12 and current_phase() in (TRAINING, STEP):  # not the PNMF start
            raise KeyboardInterrupt
        return value

    monkeypatch.setattr(Trainer, "_step", step_then_interrupt)
    cut = PNMF(3, max_iter=24, tol=0, random_state=5, **params)
    with pytest.raises(KeyboardInterrupt):
        _fit_model(cut, data, params)
    monkeypatch.setattr(Trainer, "_step", step)
    kept = 12 if slow else 10
    assert cut.stop_reason_ == "interrupted" and cut.n_iter_ == kept
    np.testing.assert_allclose(cut.elbo_history_, reference.elbo_history_[:kept], rtol=1e-10)
    resumed = _fit(data, params, resume=cut.checkpoint())
    np.testing.assert_allclose(resumed.elbo_history_, reference.elbo_history_, rtol=1e-10)
    np.testing.assert_allclose(resumed.loadings_, reference.loadings_, rtol=1e-9, atol=1e-12)


def _fit_model(model, data, params):
    spatial = isinstance(params["prior"], SVGP)
    return model.fit(data.counts, coordinates=data.coordinates if spatial else None,
                     groups=data.groups if spatial else None)


def test_checkpoint_from_inside_the_callback(data):
    params = CASES["gaussian-minibatch"]
    reference = _fit(data, params)
    saved = {}

    def cb(state):
        if state.iteration == 7:
            saved["ckpt"] = state.checkpoint()

    model = PNMF(3, max_iter=24, tol=0, random_state=5, **params)
    model.fit(data.counts, callback=cb)
    np.testing.assert_allclose(model.elbo_history_, reference.elbo_history_, rtol=1e-12)
    resumed = _fit(data, params, resume=saved["ckpt"])
    np.testing.assert_allclose(resumed.elbo_history_, reference.elbo_history_, rtol=1e-10)


def test_resume_may_extend_max_iter(data):
    params = CASES["gaussian-minibatch"]
    stopped = _fit(data, params, callback=lambda state: state.iteration == 10)
    longer = PNMF(3, max_iter=30, tol=0, random_state=5, **params)
    longer.fit(data.counts, resume=stopped.checkpoint())
    assert longer.n_iter_ == 30
    np.testing.assert_array_equal(longer.elbo_history_[:10], stopped.elbo_history_)


def test_resume_rejects_other_hyperparameters_and_data(data):
    params = CASES["gaussian-minibatch"]
    ckpt = _fit(data, params, callback=lambda state: state.iteration == 3).checkpoint()
    other = PNMF(3, max_iter=24, tol=0, random_state=6, **params)
    with pytest.raises(ConfigError, match=r"random_state: checkpoint 5, now 6"):
        other.fit(data.counts, resume=ckpt)
    same = PNMF(3, max_iter=24, tol=0, random_state=5, **params)
    with pytest.raises(DataError, match=r"shape \(400, 60\).*\(400, 59\)"):
        same.fit(data.counts[:, :59], resume=ckpt)


def test_a_resume_with_another_prior_setting_names_that_setting_alone(data):
    params = CASES["svgp-adam"]
    ckpt = _fit(data, params, callback=lambda state: state.iteration == 2).checkpoint()
    other = PNMF(3, max_iter=24, tol=0, random_state=5,
                 **{**params, "prior": SVGP(num_inducing=40, lengthscale=0.5)})
    with pytest.raises(ConfigError) as err:
        other.fit(data.counts, coordinates=data.coordinates, groups=data.groups, resume=ckpt)
    assert str(err.value) == ("cannot resume: hyperparameters differ from the checkpoint's "
                              "(prior.svgp.lengthscale: checkpoint 0.3, now 0.5)")


def test_checkpoint_needs_a_stopped_fit(data, tmp_path):
    finished = _fit(data, CASES["gaussian-minibatch"])
    with pytest.raises(ModelError, match=r"stopped early .*inside a fit callback use state.checkpoint\(\)"):
        finished.checkpoint()
    (tmp_path / "x.pt").write_bytes(b"")
    import torch

    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(ModelError, match="not a PNMF checkpoint"):
        PNMF.load_checkpoint(tmp_path / "x.pt")
