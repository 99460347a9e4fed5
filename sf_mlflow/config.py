"""Typed configuration: YAML files validated into dataclasses.

A config file has the top-level keys of :class:`Config`; every block is a
dataclass whose fields carry their type, default and allowed range, so one
generic validator checks them all and every error names the file, the dotted
key, the offending value and what is expected.

Overrides (``mlflow run -P model.lengthscale=2`` or the CLI's
``--set model.lengthscale=2``) are dotted keys whose string values are parsed
as YAML scalars and validated exactly like values from the file.

Numbers are parsed robustly: YAML 1.1 loaders (PyYAML) read ``1e-1`` as the
string ``'1e-1'``, so float fields accept any string ``float()`` accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from sf_mlflow.constraints import Invalid as _Invalid
from sf_mlflow.constraints import check_range as _check_range
from sf_mlflow.constraints import coerce as _coerce
from sf_mlflow.constraints import param as _f
from sf_mlflow.errors import ConfigError
from sf_mlflow.config_tuning import (
    InducingRange,
    LengthscaleRange,
    SearchParam,
    SpatialComponentsRange,
    TuningConfig,
    check_tuning,
)
from sf_mlflow.models.settings import SVGP, ModelParams, TrainingParams, check_spatial_components

__all__ = [
    "Config",
    "DataConfig",
    "SyntheticConfig",
    "PreprocessingConfig",
    "ModelConfig",
    "TrainingConfig",
    "AnalysisConfig",
    "TuningConfig",
    "LengthscaleRange",
    "InducingRange",
    "SpatialComponentsRange",
    "SearchParam",
    "load_config",
    "config_from_dict",
    "parse_overrides",
]


@dataclass
class SyntheticConfig:
    """Generated data with known truth (``dataset: synthetic``)."""

    n_spots: int = _f(2000, 10, doc="number of spots N")
    n_genes: int = _f(300, 1, doc="number of genes D")
    n_components: int = _f(5, 1, doc="number of true factors L")
    n_groups: int = _f(3, 1, doc="number of cell-type groups G")
    lengthscale: float = _f(0.15, 0.0, lo_open=True,
                            doc="smoothness of the true factor fields, relative to the unit square "
                                "(the default coordinate scaling makes that square 4 x "
                                "spatial_scale wide, so l here is l x 4 x spatial_scale model units)")
    group_effect: float = _f(0.5, 0.0, 1.0,
                             doc="0: all groups share one pattern per factor; 1: independent patterns")
    mean_counts: float = _f(300.0, 0.0, lo_open=True, doc="expected total counts per spot")
    layout: Literal["uniform", "grid"] = _f("uniform", doc="how spot coordinates are drawn")


@dataclass
class DataConfig:
    """Where the counts come from. Keys not used by the chosen dataset are ignored."""

    path: Optional[str] = _f(
        None, doc="slideseq: cache file (default data/slideseqv2.h5ad); h5ad: the file to read")
    coordinates_key: str = _f("spatial", doc="obsm key of the (N, 2) spot coordinates")
    group_key: Optional[str] = _f(
        "auto", doc="obs column of group labels; 'auto' = 'cluster' for slideseq, none for h5ad; null = no groups")
    layer: Optional[str] = _f(None, doc="AnnData layer holding raw counts; null = X (or adata.raw, see use_raw)")
    use_raw: Literal["auto", True, False] = _f(
        "auto", doc="read the counts from adata.raw (all genes): true; from X or data.layer: false; "
                    "'auto' = slideseq: raw when the file has it; h5ad: raw when present and X "
                    "is not integral")
    missing_groups: Literal["drop", "unknown"] = _f(
        "drop", doc="spots whose group label is missing: drop them, or give them the group 'unknown'")
    make_unique: bool = _f(
        False, omit_unset=True,
        doc="gene or spot names that occur more than once: false = refuse the file; true = "
            "append -1, -2, ... to the repeats, as anndata's var_names_make_unique does")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        # the validator compares Literal choices with ==, so 0 and 1.0 pass as False and True;
        # store the bool itself so equal settings hash (Config.digest) and log alike
        if self.use_raw != "auto":
            self.use_raw = bool(self.use_raw)


@dataclass
class PreprocessingConfig:
    """Quality control, gene selection, coordinate scaling and the held-out split."""

    spatial_scale: float = _f(50.0, 0.0, lo_open=True,
                              doc="coordinate scale: geometric_mean makes the geometric mean of the "
                                  "two side lengths 4 x spatial_scale; longest_side makes the longest "
                                  "side spatial_scale")
    coordinate_scaling: Literal["geometric_mean", "longest_side"] = _f(
        "geometric_mean", doc="geometric_mean: the plan's rule (centre at the mean, sqrt(side_x "
                              "side_y) -> 4 x spatial_scale); longest_side: the pre-#13 rule (centre "
                              "on the bounding box, longest side -> spatial_scale)")
    max_mt_fraction: Optional[float] = _f(
        0.2, 0.0, 1.0, doc="drop spots whose mitochondrial share of counts (genes mt-/MT-) exceeds "
                           "this, before min_counts; null = keep all")
    filter_mt: bool = _f(True, doc="drop mitochondrial genes (names starting mt- or MT-)")
    min_counts: Union[Literal["auto"], int] = _f(
        "auto", 0, doc="drop spots with fewer total counts (after filter_mt); auto = 10 % of the "
                       "median spot total, rounded down")
    min_cells: Union[Literal["auto"], int] = _f(
        "auto", 0, doc="drop genes detected in fewer spots; auto = 1 % of the spots, rounded up, "
                       "at least 1 and at most 10")
    n_top_genes: Optional[int] = _f(None, 1, doc="keep the k genes of highest Poisson deviance; null = all")
    holdout_fraction: float = _f(0.05, 0.0, 1.0, hi_open=True,
                                 doc="seeded fraction of spots held out for validation")


@dataclass
class ModelConfig(ModelParams, SVGP):
    """The factor model: PNMF with an MGGP-SVGP (spatial) or Gaussian (non-spatial) prior.

    Its fields are the estimator's (:class:`~sf_mlflow.models.settings.ModelParams`) and
    the spatial prior's (:class:`~sf_mlflow.models.settings.SVGP`, used when
    ``prior: SVGP``), plus the choice of prior.
    """

    prior: Literal["SVGP", "Gaussian"] = _f(
        "SVGP", doc="SVGP: GP prior over the coordinates (spatial); Gaussian: independent factors")

    @property
    def spatial(self) -> bool:
        """The SVGP prior is chosen."""
        return self.prior == "SVGP"

    def spatial_prior(self) -> SVGP:
        """The spatial prior's settings object (whatever ``prior`` is)."""
        return SVGP.from_settings(self)


@dataclass
class TrainingConfig(TrainingParams):
    """Optimisation settings (:class:`~sf_mlflow.models.settings.TrainingParams`)."""

    verbose: bool = _f(False, doc="print every progress line instead of a sparser cadence")


@dataclass
class AnalysisConfig:
    """What the analyze stage computes from a trained model."""

    moran_k: int = _f(6, 1, doc="neighbours in the kNN graph of Moran's I")
    exp_mean: bool = _f(False, doc="report E[exp F] instead of exp(E[F]) as the factors")
    group_loadings_iter: int = _f(100, 1, doc="multiplicative updates when refitting W per group")
    n_top_genes: int = _f(10, 1, doc="top and bottom genes per factor and group in the enrichment")


#: Sections left out of ``Config.flat()`` and ``Config.digest()`` unless asked for by name.
#: ``models`` is never hashed itself: each listed model's effective config is (see
#: :meth:`Config.model_configs`), so a stage's hash is the one a one-model config gives.
UNHASHED_SECTIONS = ("tuning", "models")


@dataclass
class Config:
    """A whole experiment: data, preprocessing, model and training."""

    name: str = _f("sf_mlflow", doc="experiment name in MLflow")
    seed: int = _f(0, 0, doc="seed for data generation, splits, initialisation and mini-batches")
    dataset: Literal["slideseq", "h5ad", "synthetic"] = _f("synthetic", doc="data source")
    output_dir: str = _f("outputs", doc="local folder for stage outputs")
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    models: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=dict, metadata={"internal": True})
    """Models fitted over one preprocess run by ``main``: name -> validated ``model`` and
    ``training`` overrides (presets applied); empty = the one model of ``model:``."""
    source: Optional[str] = field(default=None, compare=False, repr=False,
                                  metadata={"internal": True})

    # ---- views -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested plain dict of every setting (the form written back to YAML)."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        if not d["models"]:
            d.pop("models")
        return d

    def model_configs(self) -> dict[str, "Config"]:
        """The effective config of each model under ``models:``, in order (empty if none).

        Each is this config with the model's ``model``/``training`` overrides applied and
        no ``models:``, so its hashes and params are those of a one-model config with the
        same settings.
        """
        out = {}
        for name, sections in self.models.items():
            out[name] = dataclasses.replace(
                self, models={},
                model=dataclasses.replace(self.model, **sections.get("model", {})),
                training=dataclasses.replace(self.training, **sections.get("training", {})))
        return out

    def flat(self, *sections: str) -> dict[str, Any]:
        """Dotted-key view, e.g. ``{"model.lengthscale": 4.0}``, optionally of some sections only.

        Without sections: every section but ``tuning`` and ``models`` (``UNHASHED_SECTIONS``).
        """
        d = self.to_dict()
        if sections:
            d = {k: v for k, v in d.items() if k in sections}
        else:
            d = {k: v for k, v in d.items() if k not in UNHASHED_SECTIONS}
        unset = _unset_omitted(self)
        return {k: v for k, v in _flatten(d).items() if k not in unset}

    def preprocess_settings(self) -> dict[str, Any]:
        """Everything that determines a preprocess run's output."""
        return {k: v for k, v in self.flat("seed", "dataset", "data", "preprocessing").items()}

    def digest(self, *sections: str) -> str:
        """Short stable hash of the given sections (all but ``UNHASHED_SECTIONS`` when none).

        ``unhashed`` settings (:func:`sf_mlflow.constraints.param`, e.g. ``training.distributed``:
        K processes compute the single-process result) are left out, so a run made either way
        is reused by the other.
        """
        unhashed = _unset_omitted(self, hashing=True)
        flat = {k: v for k, v in self.flat(*sections).items() if k not in unhashed}
        payload = json.dumps(flat, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- generic validation ---------------------------------------------------------------------

def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _same(value: Any, default: Any) -> bool:
    """``value`` is ``default`` itself, not merely equal to it (0 is not False)."""
    return type(value) is type(default) and value == default


def _unset_omitted(obj: Any, prefix: str = "", hashing: bool = False) -> set[str]:
    """Dotted keys of the ``omit_unset`` fields at their default and of the ``unhashed`` ones at
    their default (all ``unhashed`` ones with ``hashing``), see :func:`sf_mlflow.constraints.param`."""
    out: set[str] = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _unset_omitted(value, f"{prefix}{f.name}.", hashing)
        elif (f.metadata.get("omit_unset") and _same(value, f.default)) or (
                f.metadata.get("unhashed") and (hashing or value == f.default)):
            out.add(prefix + f.name)
    return out


def _check_model(cfg: Config, source: str) -> None:
    """Checks across the model section's keys, of ``model:`` and of every ``models:`` entry."""
    named = ((f"models.{name}.model.", c) for name, c in cfg.model_configs().items())
    for where, c in [("model.", cfg), *named]:
        check_spatial_components(c.model.n_components, c.model.spatial, c.model.spatial_components,
                                 f"{source}: {where}")


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping of keys to values, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'"
                + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
                + f"; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw.get(name), source, f"{prefix}{name}.")
            continue
        if typing.get_origin(tp) is dict:  # {name: dataclass}, e.g. tuning.search_space
            kwargs[name] = _build_mapping(typing.get_args(tp)[1], raw.get(name), source,
                                          f"{prefix}{name}.")
            continue
        if name not in raw:
            continue
        value = raw[name]
        try:
            coerced = _coerce(value, tp)
        except _Invalid as e:
            raise ConfigError(
                f"{source}: {prefix}{name} = {shown(value)} is invalid: expected {e.expected}") from None
        problem = _check_range(coerced, f.metadata)
        if problem:
            raise ConfigError(f"{source}: {prefix}{name} = {shown(value)} is out of range: "
                              f"expected {problem}")
        kwargs[name] = coerced
    return cls(**kwargs)


def _build_mapping(cls: type, raw: Any, source: str, prefix: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.')} must be a mapping of names to "
                          f"settings, got {shown(raw)}")
    return {str(k): _build(cls, v, source, f"{prefix}{k}.") for k, v in raw.items()}


def _schema_field(key: str):
    """(type, field) of a dotted config key such as ``model.sigma``, or None."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        if part not in fields:
            return None
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return (None if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict
                    else (tp, fields[part]))
        if not dataclasses.is_dataclass(tp):
            return None
        cls = tp
    return None


def _scalar_kind(tp: Any) -> Any:
    """``int``, ``float``, ``bool``, ``str`` or Literal of a (possibly Optional) field type; a
    number that may also be ``auto`` (``Union[Literal["auto"], float]``) is its number type."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        numbers = [a for a in inner if a in (int, float)]
        if len(numbers) == 1 and all(typing.get_origin(a) is Literal for a in inner if a not in numbers):
            return numbers[0]
        return inner[0] if len(inner) == 1 else tp
    return tp


# ---- public API -----------------------------------------------------------------------------

#: Longest value an error message prints (a value of megabytes would drown the message).
SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """``repr(value)``, cut to SHOWN_CHARS characters for an error message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 20] + f"... ({len(text):,} characters)"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a config never needs ``*name``, and a few lines
    of nested aliases expand into billions of values (the "billion laughs") once copied."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            raise yaml.YAMLError(f"YAML aliases are not accepted in a config (found "
                                 f"*{event.anchor} at line {mark.line + 1}, column "
                                 f"{mark.column + 1}); write the value out where it is needed")
        return super().compose_node(parent, index)


def read_yaml(text: str, source: str) -> Any:
    """The YAML document ``text`` (from ``source``), aliases refused; ConfigError if invalid."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)   # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {str(e)[:SHOWN_CHARS * 2]}") from None


def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Turn ``["model.lengthscale=2", ...]`` (or a mapping) into ``{dotted key: value}``.

    String values are parsed as YAML scalars, so ``true``, ``null`` and ``3`` mean what they
    say; type checking happens later, together with the file's values.
    """
    if not items:
        return {}
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value "
                                  "(e.g. model.lengthscale=2.0)")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v))
    out = {}
    for k, v in pairs:
        if isinstance(v, str):
            try:
                v = yaml.load(v, Loader=_ConfigLoader) if v.strip() else None  # noqa: S506
            except yaml.YAMLError:
                pass
        out[k] = v
    return out


def _apply_overrides(raw: dict, overrides: Mapping[str, Any], source: str) -> dict:
    raw = json.loads(json.dumps(raw, default=str)) if raw else {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}={shown(value)}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _check_renamed(raw: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Keys of older versions get an error that says what replaced them."""
    model = raw.get("model")
    if isinstance(model, Mapping) and "spatial" in model:
        try:
            spatial = _coerce(model["spatial"], bool)
        except _Invalid:
            spatial = True
        raise ConfigError(f"{source}: {prefix}model.spatial was replaced by model.prior; write "
                          f"`prior: {'SVGP' if spatial else 'Gaussian'}` instead of "
                          f"`spatial: {model['spatial']}`")


def config_from_dict(raw: Mapping[str, Any] | None, source: str = "<config>",
                     overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Config:
    """Validate a nested mapping (plus dotted-key overrides) into a :class:`Config`."""
    ov = parse_overrides(overrides)
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a config must be a mapping of keys to values, "
                          f"got {type(raw).__name__}")
    from sf_mlflow.config_models import build_models, half_spatial, models_as_mapping

    raw = dict(raw or {})
    if "models" in raw:
        raw["models"] = models_as_mapping(raw["models"], source)
    merged = _apply_overrides(raw, ov, source)
    label = source + (" (with overrides)" if ov else "")
    _check_renamed(merged, label)
    models = build_models(merged.pop("models", None), label)
    cfg = _build(Config, merged, label, "")
    check_tuning(cfg, label)
    cfg.models = half_spatial(models, cfg.model.n_components)
    _check_model(cfg, label)
    cfg.source = source
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file, then apply dotted-key overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist "
                          "(pass the path of a YAML file, e.g. configs/quickstart.yaml)")
    return config_from_dict(read_yaml(p.read_text(), str(path)), str(path), overrides)
