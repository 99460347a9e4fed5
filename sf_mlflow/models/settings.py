"""The model's settings, declared once: the spatial prior, the model and its training.

Each block is a dataclass whose fields carry type, default, range and a description
(:func:`sf_mlflow.constraints.param`). They are the single source of these settings:

* :class:`SVGP` is the spatial prior's settings object (kernel, inducing points,
  variational options), taken as it is by ``PNMF(prior=SVGP(...))``; it builds the
  torch module (:meth:`SVGP.build`);
* :class:`ModelParams` and :class:`TrainingParams` hold the estimator's other
  hyperparameters; ``PNMF.__init__`` takes its defaults from them;
* the config's ``model:`` and ``training:`` sections (:mod:`sf_mlflow.config`) inherit
  these fields, so a YAML key, a ``-P`` override and a keyword argument are checked by
  the same table, and a new setting is one field here plus its use.

Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from sf_mlflow.constraints import Duration, checked_fields, param
from sf_mlflow.errors import ConfigError

__all__ = ["SVGP", "ModelParams", "TrainingParams", "spatial_settings", "check_spatial_components",
           "resolve_optimizer", "resolve_batch_size", "curvature_fraction", "KERNEL_NAMES", "DEFAULT_LEARNING_RATE", "ADAM_BESIDE_NATURAL"]

#: ``learning_rate: auto`` of Adam, AdamW and SGD (and of PNMF).
DEFAULT_LEARNING_RATE = 0.1

#: ``learning_rate: auto`` beside natural steps: Adam's step for trained kernel
#: hyperparameters (log scale: ~5 % a step) and a hybrid's non-spatial factors.
ADAM_BESIDE_NATURAL = 0.05

#: ``batch_size: auto`` of a spatial prior: the work of one natural step, spots x spatial
#: factors x M^2 (the curvature and the kernel solves of every spot cost ~L M^2 each), that a
#: full batch may take on each kind of device; above it, mini-batches of that much work.
#: On two CPU cores 1e11 is about 6 s a step (0.6 ms a spot at L 10, M 1,000).
AUTO_BATCH_WORK = {"cpu": 1e11, "cuda": 2e12}
#: The smallest mini-batch ``batch_size: auto`` takes (fewer spots make noisy natural steps).
AUTO_BATCH_MIN = 1000

#: ``curvature_fraction: auto`` on spot mini-batches: the curvature of a natural step from a
#: quarter of the batch's spots. bench_convergence, 41,786 spots x 2,000 genes, 600 s at the
#: plan's M 3,000, B 7,000: a quarter 0.9624 x PNMF's held-out deviance, matched correlation
#: 0.993, a half 0.9623 and 0.994 (an earlier version, before the full-batch PNMF start: a half
#: 22 steps, 0.9632 and 0.972; all spots 13 steps, 0.9630 and 0.970); 300 s at the CPU defaults
#: (M 1,000, B 10,000): a quarter 106 steps, 0.9628 x and 0.992, as a half was. bench_svgp: the
#: natural step at M 3,000 costs 0.87-1.11 x the Adam step's FLOP floor with a quarter (four
#: runs), 1.14 x with a half in a run between them (1.15-1.37 x in four earlier runs).
AUTO_CURVATURE_FRACTION = 0.25

#: Kernels of :data:`sf_mlflow.models.kernels.KERNELS`, by name (kept here so that the
#: settings and the config load without torch; a test keeps the two equal).
KERNEL_NAMES = ("Matern32", "Matern12", "Matern52", "RBF")


@dataclass
class SVGP:
    """Settings of the spatial prior: a multi-group sparse variational GP over coordinates.

    ``PNMF(prior=SVGP(lengthscale=2.0, num_inducing=500))``; ``SVGP()`` is the default
    spatial model. Every field is checked on construction, so a bad value fails where it
    is written. See :class:`sf_mlflow.models.svgp.SVGPPrior` for the math.
    """

    kernel: Literal[KERNEL_NAMES] = param("Matern32", doc="GP kernel")
    num_inducing: Union[Literal["auto"], int] = param(
        "auto", 1, doc="number of inducing points M; auto = one per lengthscale-wide square cell "
                       "the spots (of each group, with groups) occupy, at the shortest initial "
                       "lengthscale, at least 100 (or all locations), at most 1000 on a CPU and "
                       "3000 on a GPU")
    lengthscale: Union[Literal["auto"], float] = param(
        "auto", 0.0, lo_open=True,
        doc="kernel lengthscale in scaled coordinates; auto = chosen per factor from the data (the "
            "GP evidence of the PNMF log-factors the fit starts from) and learned")
    sigma: Union[Literal["auto"], float] = param(
        "auto", 0.0, lo_open=True, doc="kernel amplitude; auto = chosen per factor from the data")
    group_diff_param: Union[Literal["auto"], float] = param(
        "auto", 0.0, doc="how different groups are in the MGGP kernel (0 = identical); auto = "
                         "chosen from the data")
    groups: bool = param(True, doc="multi-group kernel over cell-type groups (false: ignore the groups)")
    train_lengthscale: bool = param(
        False, doc="also move the kernel hyperparameters (lengthscale, sigma, the MGGP group "
                   "difference) by gradient steps on the ELBO during the fit; off by default: "
                   "lengthscale/sigma/group_diff_param auto already choose them from the data")
    per_factor_lengthscale: bool = param(True, doc="one lengthscale and amplitude per factor instead "
                                                   "of one shared by all factors")
    cholesky_mode: Literal["exp", "softplus"] = param("exp", doc="map from raw to positive Cholesky diagonal")
    diagonal_only: bool = param(False, doc="keep only the diagonal of the variational Cholesky factor")
    inducing_allocation: Literal["proportional", "equal", "derived"] = param(
        "proportional", doc="how inducing points are shared among groups")
    jitter: float = param(1e-5, 0.0, lo_open=True, doc="diagonal jitter on Kzz, relative to sigma^2")

    def __post_init__(self) -> None:
        if type(self) is SVGP:   # subclasses (the config's model section) check themselves
            for name, value in checked_fields(self, "SVGP").items():
                object.__setattr__(self, name, value)

    # A kernel built from "auto" settings starts at these values; the fit replaces them by the
    # ones it chooses from the data (sf_mlflow.models.start) before the first step, and a saved
    # model's state overwrites them.
    @property
    def initial_lengthscale(self) -> float:
        """The lengthscale a kernel is built with (``auto``: a placeholder of 1)."""
        return 1.0 if self.lengthscale == "auto" else float(self.lengthscale)

    @property
    def initial_sigma(self) -> float:
        return 1.0 if self.sigma == "auto" else float(self.sigma)

    @property
    def initial_group_diff(self) -> float:
        return 1.0 if self.group_diff_param == "auto" else float(self.group_diff_param)

    @property
    def learns_hyperparameters(self) -> bool:
        """Whether the kernel hyperparameters take gradient steps during the fit."""
        return bool(self.train_lengthscale)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (the form stored in saved models)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SVGP)}

    @classmethod
    def from_settings(cls, obj: Any) -> "SVGP":
        """The SVGP settings held by any object with these fields (e.g. the config's model section)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(SVGP)})

    def build(self, coordinates, groups, n_components: int, *, kl_weight: float, seed: int,
              inducing_points=None, inducing_groups=None):
        """The torch prior module these settings describe.

        coordinates : Tensor, (N, 2); groups : Tensor of int, (N,), or None (ignored
        when ``groups=False``); ``inducing_points`` (M, 2) and ``inducing_groups`` (M,)
        restore a saved model's Z without rerunning k-means.
        """
        from sf_mlflow.models.inducing import auto_max, auto_num_inducing
        from sf_mlflow.models.svgp import SVGPPrior

        used = groups if self.groups else None
        num_inducing = self.num_inducing
        if inducing_points is None and num_inducing == "auto":
            num_inducing = auto_num_inducing(coordinates.detach().cpu().numpy(),
                                             None if used is None else used.detach().cpu().numpy(),
                                             None if self.lengthscale == "auto" else self.lengthscale,
                                             max_points=auto_max(coordinates.device))
        n_groups = None if used is None else int(used.max().item()) + 1
        return SVGPPrior(coordinates, used, n_components, num_inducing=num_inducing,
                         kernel=self.kernel, lengthscale=self.initial_lengthscale,
                         sigma=self.initial_sigma, group_diff_param=self.initial_group_diff,
                         n_groups=n_groups, train_lengthscale=self.learns_hyperparameters,
                         per_factor_lengthscale=self.per_factor_lengthscale,
                         cholesky_mode=self.cholesky_mode, diagonal_only=self.diagonal_only,
                         inducing_allocation=self.inducing_allocation, jitter=self.jitter,
                         kl_weight=kl_weight, seed=seed, inducing_points=inducing_points,
                         inducing_groups=inducing_groups)


@dataclass
class ModelParams:
    """The estimator's model settings shared by both priors."""

    n_components: int = param(10, 1, doc="number of factors L")
    mode: Literal["lower-bound", "expanded", "simple"] = param(
        "lower-bound", doc="how the ELBO's expected log-likelihood is computed")
    num_samples: int = param(8, 1, doc="Monte Carlo samples for the expanded and simple modes")
    loadings_mode: Literal["multiplicative", "gradient"] = param(
        "multiplicative", doc="how loadings W are updated")
    kl_weight: float = param(1.0, 0.0, doc="weight of the KL term (1 = the true ELBO)")
    init: Literal["nndsvda", "random"] = param(
        "nndsvda", doc="where the KL-NMF start of W and the factors begins: nndsvda = from the "
                       "counts' leading singular vectors (no factor starts dead); random = seeded "
                       "uniform")
    spatial_components: Optional[int] = param(
        None, 0, omit_unset=True,
        doc="with the SVGP prior: the first K of the L factors are spatial (GP prior) and the "
            "other L - K non-spatial (Gaussian prior), fitted jointly (NSFH); null = all L spatial")


@dataclass
class TrainingParams:
    """The estimator's optimisation settings."""

    max_iter: int = param(2000, 1, doc="maximum number of iterations")
    learning_rate: Union[Literal["auto"], float] = param(
        "auto", 0.0, lo_open=True,
        doc="optimiser step size; with optimizer natural the natural-gradient step in (0, 1]; auto = "
            "natural: 1 on full batches, a decreasing schedule on mini-batches; Adam and the "
            "others: 0.1")
    optimizer: Literal["auto", "natural", "Adam", "AdamW", "SGD"] = param(
        "auto", doc="optimiser of the variational parameters; auto = natural for SVGP, Adam for Gaussian")
    tol: float = param(1e-4, 0.0, doc="stop when two consecutive checks of the ELBO on a fixed "
                                      "evaluation block change it by less than this, relative")
    tol_window: int = param(10, 1, doc="iterations between two checks of the stopping rule")
    validation_every: int = param(10, 0, doc="iterations between held-out deviance checks of a "
                                             "spatial model (early stopping); 0 = none")
    patience: int = param(5, 1, doc="stop after this many held-out checks without improvement")
    dtype: Literal["float32", "float64"] = param("float32", doc="floating-point precision of the fit")
    device: Literal["cpu", "gpu", "cuda", "auto"] = param(
        "auto", doc="cpu; gpu/cuda (falls back to cpu with a warning); auto = cuda when present")
    batch_size: Union[Literal["auto"], int, None] = param(
        "auto", 1, doc="spots per mini-batch; null = all spots; auto = all spots for the Gaussian prior "
                       "and for a spatial one up to a step's work limit on the device "
                       "(N L M^2 <= 1e11 on a CPU, about 10,000 spots at L 10, M 1,000; 2e12 on a "
                       "GPU), else as many spots as that work allows (at least 1,000)")
    y_batch_size: Optional[int] = param(None, 1, doc="genes per mini-batch; null = all genes")
    curvature_fraction: Union[Literal["auto"], float] = param(
        "auto", 0.0, 1.0, lo_open=True, omit_unset=True,
        doc="with natural steps: share of a batch's spots whose curvature a step uses (an "
            "unbiased sample, drawn every step); 1 = all; auto = all on full batches, 0.25 on "
            "spot mini-batches")
    shuffle: bool = param(True, doc="draw mini-batches in a fresh random order every epoch")
    log_every: int = param(50, 1, doc="iterations between progress lines (and at least one "
                                      "every 10 s)")
    time_budget: Optional[Duration] = param(
        None, 0.0, lo_open=True, omit_unset=True,
        doc="wall-clock limit of one fit, initialisation included (e.g. 90s, 20m, 1.5h); at the "
            "budget the fit stops and keeps its best held-out state (stop reason time_budget); "
            "null = none")
    distributed: bool = param(
        False, unhashed=True,
        doc="data-parallel fit on torch.distributed: each of the processes torchrun starts fits a "
            "share of every batch (same result as one process); launch with torchrun "
            "--nproc-per-node K -m sf_mlflow.cli train ... --set training.distributed=true")


def spatial_settings(prior: Any) -> Optional[SVGP]:
    """The SVGP settings ``prior`` stands for, or None for the Gaussian prior."""
    if isinstance(prior, SVGP):
        return prior
    if isinstance(prior, str) and prior.lower() in ("svgp", "gaussian"):
        return SVGP() if prior.lower() == "svgp" else None
    raise ConfigError(f"prior = {prior!r} is not recognised; expected 'gaussian', 'svgp' or a "
                      "settings object sf_mlflow.models.settings.SVGP(...)")


def check_spatial_components(n_components: int, spatial: bool, value: Optional[int], where: str) -> None:
    """Check ``spatial_components`` against the other model settings; raise ConfigError.

    ``where`` prefixes the message with the owner and key path (``"PNMF: "``,
    ``"run.yaml: model."``). None is always valid; a K needs the spatial prior (the
    Gaussian prior has no spatial factors to count) and ``0 <= K <= n_components``.
    """
    if value is None:
        return
    if not spatial:
        raise ConfigError(f"{where}spatial_components = {value!r} needs the SVGP prior (it counts "
                          "the factors that follow the GP prior; with the Gaussian prior none "
                          "does): set prior SVGP, or spatial_components null")
    if not 0 <= value <= n_components:
        raise ConfigError(f"{where}spatial_components = {value!r} is out of range: expected "
                          f"0 <= spatial_components <= n_components = {n_components}")


def resolve_optimizer(p: dict, given: Any) -> None:
    """Resolve ``optimizer`` and ``learning_rate: auto`` in the estimator's validated
    hyperparameters ``p`` (in place); ``given`` is the learning rate as the user wrote it.

    ``optimizer: auto`` is natural steps when any factor is spatial, else Adam. ``learning_rate:
    auto`` is, for natural steps, 1 (the step on full batches; the trainer decreases it on
    spot mini-batches, ``Trainer.natural_step_size``) with Adam at ADAM_BESIDE_NATURAL for
    what is not q(v), and DEFAULT_LEARNING_RATE for the gradient optimisers. Sets
    ``learning_rate_auto`` and, for natural steps, ``adam_learning_rate``.
    """
    if p["optimizer"] == "auto":
        p["optimizer"] = "natural" if p["n_spatial"] > 0 else "Adam"
    auto = p["learning_rate"] == "auto"
    p["learning_rate_auto"] = auto
    if p["optimizer"] != "natural":
        p["learning_rate"] = DEFAULT_LEARNING_RATE if auto else p["learning_rate"]
        return
    if p["n_spatial"] == 0:
        raise ConfigError("optimizer = 'natural' needs prior = 'svgp' and spatial_components "
                          "null or > 0 (natural-gradient steps act on the GP's q(v)); use "
                          "optimizer = 'Adam' for the Gaussian prior")
    if not auto and p["learning_rate"] > 1.0:
        raise ConfigError(f"learning_rate = {given!r} is invalid with optimizer 'natural': it is "
                          "the natural-gradient step, expected a number in (0, 1] (1 = exact for a "
                          "Gaussian likelihood; 0.1-0.5 for mini-batches) or auto")
    p["adam_learning_rate"] = ADAM_BESIDE_NATURAL if auto else p["learning_rate"]
    p["learning_rate"] = 1.0 if auto else p["learning_rate"]


def resolve_batch_size(p: dict, n_spots: int, device: Any) -> str:
    """Resolve ``batch_size: auto`` in the validated hyperparameters ``p`` (in place) for a fit
    on ``n_spots`` spots on ``device`` (a torch device or its type string); returns why.

    The Gaussian prior takes all spots (a step costs O(N D L), cheap). A spatial prior's step
    costs about ``B K M^2`` for K spatial factors and M inducing points (M as set, or the
    device's cap of ``num_inducing: auto``): all spots while ``N K M^2`` is within
    AUTO_BATCH_WORK of the device, else the most spots within it, at least AUTO_BATCH_MIN.
    Deterministic given N, the settings and the device kind, so a fit repeats.
    """
    if p["batch_size"] != "auto":
        return "as set"
    spatial, K = p["spatial"], p["n_spatial"]
    if spatial is None or K == 0:
        p["batch_size"] = None
        return "all spots (Gaussian prior: a step is cheap)"
    from sf_mlflow.models.inducing import auto_max

    kind = getattr(device, "type", str(device))
    M = auto_max(kind) if spatial.num_inducing == "auto" else int(spatial.num_inducing)
    work = AUTO_BATCH_WORK["cpu" if kind == "cpu" else "cuda"]
    per_spot = float(K) * M * M
    if n_spots * per_spot <= work:
        p["batch_size"] = None
        return f"all {n_spots:,} spots: N L M^2 = {n_spots * per_spot:.2g} is within {work:.0e} on a {kind}"
    B = int(max(AUTO_BATCH_MIN, work // per_spot))
    if B >= n_spots:
        p["batch_size"] = None
        return f"all {n_spots:,} spots (the smallest mini-batch auto takes is {AUTO_BATCH_MIN:,})"
    p["batch_size"] = B
    return (f"{B:,} of {n_spots:,} spots a step: all of them would be N L M^2 = {n_spots * per_spot:.2g} "
            f"(L {K} spatial factors, M {M}), more than {work:.0e} on a {kind}; set "
            f"training.batch_size to choose")


def curvature_fraction(p: dict, n_spots: int) -> float:
    """The share of a batch's spots whose curvature a natural step uses, for the validated
    hyperparameters ``p`` (``batch_size`` resolved) of a fit on ``n_spots`` spots.

    ``curvature_fraction: auto`` is all spots on full batches, where a step of size 1 replaces
    the precision by the batch's estimate, and AUTO_CURVATURE_FRACTION on spot mini-batches,
    where the precision is a running mean over steps and the batch is itself a sample.
    """
    value = p.get("curvature_fraction", "auto")
    if value != "auto":
        return float(value)
    B = p.get("batch_size")
    return 1.0 if B is None or B >= n_spots else AUTO_CURVATURE_FRACTION
