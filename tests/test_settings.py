"""One settings table from config to kernel: every model and training key reaches the model."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import numpy as np
import pytest

from sf_mlflow.config import ModelConfig, TrainingConfig, config_from_dict
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP, ModelParams, TrainingParams
from sf_mlflow.stages.train import build_model

#: A valid value other than the default for every field of the model and training sections.
OTHER = {
    "n_components": 4, "mode": "expanded", "num_samples": 3, "loadings_mode": "gradient",
    "init": "random", "kl_weight": 0.5, "spatial_components": 2, "kernel": "Matern52", "num_inducing": 40,
    "lengthscale": 0.7, "sigma": 1.5,
    "group_diff_param": 2.0, "groups": False, "train_lengthscale": True,
    "per_factor_lengthscale": False, "cholesky_mode": "softplus", "diagonal_only": True,
    "inducing_allocation": "equal", "jitter": 1e-4, "prior": "Gaussian",
    "max_iter": 7, "learning_rate": 0.05, "optimizer": "Adam", "tol": 1e-3, "tol_window": 3,
    "validation_every": 2, "patience": 2, "dtype": "float64", "device": "cpu", "batch_size": 50,
    "y_batch_size": 20, "curvature_fraction": 0.25, "shuffle": False, "log_every": 5,
    "verbose": True, "distributed": True,
    "time_budget": 1200.0,
}


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_the_other_values_cover_every_field_and_differ_from_the_defaults():
    assert set(OTHER) == set(_fields(ModelConfig)) | set(_fields(TrainingConfig))
    defaults = {**dataclasses.asdict(ModelConfig()), **dataclasses.asdict(TrainingConfig())}
    assert [k for k, v in OTHER.items() if defaults[k] == v] == []


@pytest.mark.parametrize("key", sorted(OTHER))
def test_every_model_and_training_key_reaches_the_estimator(key):
    section = "model" if key in _fields(ModelConfig) else "training"
    base = build_model(config_from_dict({}))
    model = build_model(config_from_dict({section: {key: OTHER[key]}}))
    if key == "prior":
        assert (base.prior, model.prior) == (SVGP(), "gaussian")
    elif key == "verbose":    # the config's verbose prints every iteration
        assert (base.log_every, model.log_every) == (TrainingParams().log_every, 1)
    elif key in _fields(SVGP):
        assert getattr(model.prior, key) == OTHER[key] != getattr(base.prior, key)
    else:
        assert getattr(model, key) == OTHER[key] != getattr(base, key)


def test_the_estimator_takes_its_defaults_from_the_settings_table():
    signature = inspect.signature(PNMF.__init__).parameters
    for table in (ModelParams(), TrainingParams()):
        for name, value in dataclasses.asdict(table).items():
            assert signature[name].default == value, name


def test_config_sections_and_estimator_share_types_and_ranges():
    for section, tables in ((ModelConfig, (ModelParams, SVGP)), (TrainingConfig, (TrainingParams,))):
        hints = typing.get_type_hints(section)
        for table in tables:
            mine = {f.name: f for f in dataclasses.fields(section)}
            for f in dataclasses.fields(table):
                assert mine[f.name].metadata == f.metadata
                assert hints[f.name] == typing.get_type_hints(table)[f.name]


def test_spatial_settings_reach_the_fitted_prior_and_kernel():
    data = make_synthetic(n_spots=300, n_genes=40, n_components=2, n_groups=2, seed=0)
    cfg = config_from_dict({"model": {key: OTHER[key] for key in _fields(SVGP) if key != "groups"}
                            | {"n_components": 2},
                            "training": {"max_iter": 3, "tol": 0.0, "device": "cpu", "dtype": "float64",
                                         "validation_every": 0}})
    model = build_model(cfg)
    model.verbose = False
    model.fit(data.counts, coordinates=data.coordinates, groups=data.groups)
    prior = model.prior_
    assert model.num_inducing_ == 40 and prior.cholesky_mode == "softplus" and prior.diagonal_only
    assert prior.jitter == pytest.approx(1e-4) and model.uses_groups_
    assert type(prior.kernel).__name__.startswith("Matern52")
    np.testing.assert_allclose(prior.kernel.sigma.detach().numpy(), 1.5, rtol=0.2)  # trained
    assert prior.kernel.lengthscale.dim() == 0               # shared by the factors
    assert prior.kernel.lengthscale.requires_grad            # trained
    assert float(prior.kernel.group_diff_param) == pytest.approx(2.0, rel=0.2)


def test_the_settings_know_every_kernel_of_the_kernel_table():
    from sf_mlflow.models.kernels import KERNELS
    from sf_mlflow.models.settings import KERNEL_NAMES

    assert set(KERNEL_NAMES) == set(KERNELS)
