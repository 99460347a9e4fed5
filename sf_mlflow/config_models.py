"""The ``models:`` key of a config: several models fitted over one preprocess run.

``models:`` is a list of preset names (:data:`MODEL_PRESETS`)::

    models: [pnmf, svgp, mggp, hybrid]

or a mapping of names to overrides of the ``model`` and ``training`` sections (a preset's
name starts from the preset)::

    models:
      pnmf: {model: {prior: Gaussian}}
      svgp: {model: {prior: SVGP, groups: false}, training: {max_iter: 800}}

Each entry is validated like the sections it overrides (errors name the file, the key
``models.<name>.<section>.<key>`` and the value); :meth:`sf_mlflow.config.Config.model_configs`
gives each model's effective config. The ``main`` stage fits and analyzes every model
and compares them.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Mapping

from sf_mlflow.config import ModelConfig, TrainingConfig, _build, _check_renamed
from sf_mlflow.errors import ConfigError

__all__ = ["MODEL_PRESETS", "MODEL_SECTIONS", "models_as_mapping", "build_models", "half_spatial"]

#: Names a ``models:`` list may use, and the ``model``/``training`` overrides they stand for.
#: As keys of a ``models:`` mapping they start from these overrides too.
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pnmf": {"model": {"prior": "Gaussian"}},
    "svgp": {"model": {"prior": "SVGP", "groups": False}},
    "mggp": {"model": {"prior": "SVGP", "groups": True}},
    # NSFH: spatial_components is half of n_components, rounded up (see half_spatial)
    "hybrid": {"model": {"prior": "SVGP", "groups": False}},
}

#: Presets whose ``model.spatial_components`` (unless given) is half the model's L, rounded up.
HALF_SPATIAL = ("hybrid",)

#: The sections a ``models:`` entry may override.
MODEL_SECTIONS = ("model", "training")

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MODELS_EXPECTED = (f"a list of model names ({', '.join(MODEL_PRESETS)}) or a mapping of names "
                    "to model/training overrides, e.g. {svgp: {model: {lengthscale: 8}}}")


def models_as_mapping(value: Any, source: str) -> Any:
    """A ``models:`` list of preset names as the mapping ``{name: None}`` (overrides can then
    address ``models.<name>.<section>.<key>``); anything else as it is."""
    if not isinstance(value, (list, tuple)):
        return value
    out: dict[str, None] = {}
    for i, name in enumerate(value):
        if not isinstance(name, str) or name not in MODEL_PRESETS:
            raise ConfigError(
                f"{source}: models[{i}] = {name!r} is not a known model: expected one of "
                f"{', '.join(MODEL_PRESETS)}, or write models as a mapping of names to "
                f"overrides, e.g. models: {{{name}: {{model: {{prior: SVGP}}}}}}")
        if name in out:
            raise ConfigError(f"{source}: models[{i}] = {name!r} is listed twice")
        out[name] = None
    return out


def _build_entry(name: str, raw: Any, source: str) -> dict[str, dict[str, Any]]:
    """One ``models:`` entry validated: the preset's overrides, then the entry's own."""
    where = f"models.{name}"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} = {raw!r} is invalid: expected a mapping with "
                          f"{' and/or '.join(MODEL_SECTIONS)} overrides (or nothing)")
    for key in raw:
        if key not in MODEL_SECTIONS:
            hint = difflib.get_close_matches(str(key), MODEL_SECTIONS, n=1)
            raise ConfigError(f"{source}: unknown key '{where}.{key}'"
                              + (f" (did you mean '{where}.{hint[0]}'?)" if hint else "")
                              + f"; allowed keys here: {', '.join(MODEL_SECTIONS)} (the other "
                              "sections are shared by every model)")
    _check_renamed(raw, source, prefix=f"{where}.")
    out = {}
    for section, cls in (("model", ModelConfig), ("training", TrainingConfig)):
        given = raw.get(section)
        if given is not None and not isinstance(given, Mapping):
            raise ConfigError(f"{source}: {where}.{section} must be a mapping of keys to "
                              f"values, got {given!r}")
        merged = {**MODEL_PRESETS.get(name, {}).get(section, {}), **(given or {})}
        built = _build(cls, merged, source, f"{where}.{section}.")
        out[section] = {k: getattr(built, k) for k in merged}
    return out


def build_models(raw: Any, source: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The validated ``models:`` block (None or empty: no models listed)."""
    raw = models_as_mapping(raw, source)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: models = {raw!r} is invalid: expected {_MODELS_EXPECTED}")
    models = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise ConfigError(f"{source}: models: the name {name!r} is invalid: expected letters, "
                              "digits, '_' or '-' (it names runs, tags and figure folders)")
        models[name] = _build_entry(name, entry, source)
    return models


def half_spatial(models: dict[str, dict[str, dict[str, Any]]], n_components: int
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """``models`` with the ``hybrid`` preset's K set: ``ceil(L / 2)`` of its L factors
    spatial (L: the entry's ``model.n_components``, else the config's ``n_components``),
    unless the entry sets ``model.spatial_components`` itself. Written into the entry, so
    the config's YAML (``to_dict``) says which K was fitted."""
    out = {}
    for name, sections in models.items():
        model = dict(sections.get("model", {}))
        if name in HALF_SPATIAL and "spatial_components" not in model:
            model["spatial_components"] = -(-int(model.get("n_components", n_components)) // 2)
        out[name] = {**sections, "model": model}
    return out
