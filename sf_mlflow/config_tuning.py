"""The ``tuning`` block of a config: the tune stage's search space and study settings.

Split from :mod:`sf_mlflow.config`, which builds and validates these dataclasses like
every other block; :func:`check_tuning` adds the checks that need the whole config (a
range against ``model.n_components``, a ``search_space`` key against the model and
training settings it names).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal, Optional

from sf_mlflow.constraints import Invalid as _Invalid
from sf_mlflow.constraints import check_range as _check_range
from sf_mlflow.constraints import coerce as _coerce
from sf_mlflow.constraints import describe as _describe
from sf_mlflow.constraints import param as _f
from sf_mlflow.errors import ConfigError

__all__ = ["LengthscaleRange", "InducingRange", "SpatialComponentsRange", "SearchParam",
           "TuningConfig", "TUNABLE_SECTIONS", "check_tuning"]


@dataclass
class LengthscaleRange:
    """Search range of ``model.lengthscale`` in the tune stage.

    The defaults were 0.5-20 under the pre-#13 scaling (longest side -> spatial_scale = 50,
    chosen on the default synthetic data, the unit square); the plan's rule makes that square
    4 x 50 = 200 wide, a factor 4.000 (benchmarks/rescale_factors.py), so the same range of
    tissue distances (1 % to 40 % of the square's side) is 2-80.
    """

    low: float = _f(2.0, 0.0, lo_open=True, doc="smallest lengthscale tried, in scaled coordinates")
    high: float = _f(80.0, 0.0, lo_open=True, doc="largest lengthscale tried")
    log: bool = _f(True, doc="sample log-uniformly (true) or uniformly")


@dataclass
class InducingRange:
    """Search range of ``model.num_inducing`` in the tune stage."""

    low: int = _f(100, 1, doc="fewest inducing points tried")
    high: int = _f(1000, 1, doc="most inducing points tried")
    step: int = _f(1, 1, doc="only multiples of this step above low are tried")
    log: bool = _f(False, doc="sample log-uniformly (true) or uniformly")


@dataclass
class SpatialComponentsRange:
    """Search range of ``model.spatial_components`` (the hybrid's K) in the tune stage."""

    low: Optional[int] = _f(None, 0, omit_unset=True, doc="fewest spatial factors tried; null: K not searched")
    high: Optional[int] = _f(None, 0, omit_unset=True, doc="most tried, at most model.n_components")


@dataclass
class SearchParam:
    """One further search-space entry: ``tuning.search_space.<dotted config key>``."""

    type: Literal["float", "int", "categorical"] = _f("float", doc="how the value is sampled")
    low: Optional[float] = _f(None, doc="float/int: smallest value")
    high: Optional[float] = _f(None, doc="float/int: largest value")
    log: bool = _f(False, doc="float/int: sample log-uniformly")
    step: Optional[float] = _f(None, 0.0, lo_open=True, doc="float/int: discretisation step")
    choices: Optional[list] = _f(None, doc="categorical: the values tried")


@dataclass
class TuningConfig:
    """The tune stage: an Optuna study over model.lengthscale, model.num_inducing and more.

    Not part of the config hash (``Config.digest``) nor of other stages' params, so adding
    or changing this block never changes which preprocess or train runs a config matches.
    """

    n_trials: int = _f(20, 1, doc="trials in the whole study (all workers together)")
    lengthscale: LengthscaleRange = field(default_factory=LengthscaleRange)
    num_inducing: InducingRange = field(default_factory=InducingRange)
    spatial_components: SpatialComponentsRange = field(default_factory=SpatialComponentsRange)
    search_space: dict[str, SearchParam] = field(default_factory=dict)
    pruner: Literal["median", "percentile", "hyperband", "none"] = _f(
        "median", doc="stops trials whose held-out deviance is poor part-way through")
    n_startup_trials: int = _f(3, 0, doc="median/percentile: trials finished before any is pruned")
    n_warmup_steps: int = _f(0, 0, doc="median/percentile: iterations before a trial can be pruned")
    percentile: float = _f(25.0, 0.0, 100.0, lo_open=True, hi_open=True,
                           doc="percentile pruner: keep trials in the best this-many percent")
    report_every: int = _f(25, 1, doc="iterations between held-out deviance evaluations")
    sampler: Literal["tpe", "random"] = _f("tpe", doc="Optuna sampler")
    seed: Optional[int] = _f(None, 0, doc="sampler seed; null = the config's seed")
    study_name: Optional[str] = _f(None, doc="null = <name>-<hash of config and search space>")
    storage: Optional[str] = _f(
        None, doc="Optuna storage URL; null = sqlite file <output_dir>/optuna.db")
    register_as: Optional[str] = _f(None, doc="registered model name; null = <name>-tuned")
    alias: str = _f("best", doc="alias set on the best trial's model version")



#: Config sections whose keys the tune stage may search (the preprocess run is fixed).
TUNABLE_SECTIONS = ("model", "training")


def check_tuning(cfg, source: str) -> None:
    """Check the ``tuning`` block of a built config against the rest of it."""
    from sf_mlflow.config import _schema_field, _scalar_kind  # config imports this module

    t = cfg.tuning
    for key, rng in (("lengthscale", t.lengthscale), ("num_inducing", t.num_inducing)):
        if rng.low > rng.high:
            raise ConfigError(f"{source}: tuning.{key}.low = {rng.low!r} is larger than "
                              f"tuning.{key}.high = {rng.high!r}")
    k, L = t.spatial_components, cfg.model.n_components
    if (k.low is None) != (k.high is None) or k.low is not None and not k.low <= k.high <= L:
        raise ConfigError(f"{source}: tuning.spatial_components = {{low: {k.low}, high: {k.high}}} is "
                          f"invalid: expected 0 <= low <= high <= model.n_components = {L} (both "
                          "set), or neither (the hybrid's K is then not searched)")
    if t.num_inducing.log and t.num_inducing.step != 1:
        raise ConfigError(f"{source}: tuning.num_inducing.step = {t.num_inducing.step!r} cannot "
                          "be combined with tuning.num_inducing.log: true (use step: 1)")
    for key, sp in t.search_space.items():
        where = f"tuning.search_space.{key}"
        target = _schema_field(key)
        if target is None or key.split(".")[0] not in TUNABLE_SECTIONS:
            hint = difflib.get_close_matches(key, list(cfg.flat(*TUNABLE_SECTIONS)), n=1)
            raise ConfigError(
                f"{source}: {where}: {key!r} is not a setting that can be searched"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; expected a dotted key of a {' or '.join(TUNABLE_SECTIONS)} setting such as "
                "model.sigma (the preprocess run is fixed during tuning)")
        if key in ("model.lengthscale", "model.num_inducing", "model.spatial_components"):
            raise ConfigError(f"{source}: {where}: set its range in tuning.{key.split('.')[1]} "
                              "instead (low, high)")
        tp, fld = target
        _check_entry(source, key, where, sp, tp, fld, _scalar_kind(tp))


def _check_entry(source: str, key: str, where: str, sp: SearchParam, tp, fld, kind) -> None:
    """Check one ``tuning.search_space`` entry against the setting it searches: its type
    ``tp``, dataclass field ``fld`` (with the allowed range) and scalar kind ``kind``."""
    if sp.type == "categorical":
        if not sp.choices:
            raise ConfigError(f"{source}: {where}.choices = {sp.choices!r} is invalid: a "
                              "categorical entry needs a non-empty list of choices")
        if sp.low is not None or sp.high is not None:
            raise ConfigError(f"{source}: {where}: a categorical entry takes choices, "
                              "not low/high")
        for c in sp.choices:
            try:
                value = _coerce(c, tp)
            except _Invalid as e:
                raise ConfigError(f"{source}: {where}.choices: {c!r} is invalid for {key}: "
                                  f"expected {e.expected}") from None
            problem = _check_range(value, fld.metadata)
            if problem:
                raise ConfigError(f"{source}: {where}.choices: {c!r} is out of range for "
                                  f"{key}: expected {problem}")
        return
    if sp.choices is not None:
        raise ConfigError(f"{source}: {where}.choices is only for type: categorical "
                          f"(this entry has type: {sp.type})")
    wanted = int if sp.type == "int" else float
    if kind is not wanted:
        raise ConfigError(f"{source}: {where}.type = {sp.type!r} does not fit {key}, which "
                          f"expects {_describe(tp)}"
                          + ("; use type: categorical with choices" if kind not in (int, float)
                             else f"; use type: {'int' if kind is int else 'float'}"))
    for end in ("low", "high"):
        v = getattr(sp, end)
        if v is None:
            raise ConfigError(f"{source}: {where}.{end} is missing: a {sp.type} entry needs "
                              "low and high")
        if wanted is int and not float(v).is_integer():
            raise ConfigError(f"{source}: {where}.{end} = {v!r} is invalid: expected an "
                              "integer")
        problem = _check_range(wanted(v), fld.metadata)
        if problem:
            raise ConfigError(f"{source}: {where}.{end} = {v!r} is out of range for {key}: "
                              f"expected {problem}")
    if sp.low > sp.high:
        raise ConfigError(f"{source}: {where}.low = {sp.low!r} is larger than "
                          f"{where}.high = {sp.high!r}")
    if sp.log and sp.low <= 0:
        raise ConfigError(f"{source}: {where}.low = {sp.low!r} is invalid with log: true: "
                          "expected a value > 0")
    if sp.step is not None:
        if sp.log:
            raise ConfigError(f"{source}: {where}: step and log: true cannot be combined")
        if wanted is int and not float(sp.step).is_integer():
            raise ConfigError(f"{source}: {where}.step = {sp.step!r} is invalid: expected "
                              "an integer")
