"""Checks a stage makes before it opens a run or starts long work.

An upstream run named by ID must have produced what the config describes (else the new
run's tags and params would describe other data than it used); a train run must be able
to finish: a registered-model name MLflow accepts, an output folder it can write, enough
training spots for the analysis and no more inducing points than spot locations. Each
failure is one line naming the input, the values and what to change.
"""

from __future__ import annotations

import posixpath
import re
import tempfile
from pathlib import Path

import numpy as np

from sf_mlflow.config import Config
from sf_mlflow.errors import ConfigError, RunLookupError
from sf_mlflow.tracking import TAG_DATASET, TAG_PREPROCESS_HASH, TAG_STAGE_HASH

# ---- upstream runs ------------------------------------------------------------------------------

#: What each upstream stage's settings are, for the message about ``sf.stage_hash``.
_STAGE_HASH_WHAT = {"train": "seed, model and training settings", "analyze": "analysis settings"}


def expected_tags(config: Config, stage: str, *, stage_hash: bool = True) -> dict[str, str]:
    """The tags an upstream run of ``stage`` made for this config carries.

    Every upstream run must hold this config's data set and preprocessing settings; a
    train or analyze run also its own stage's settings (``stage_hash=False`` leaves those
    out, e.g. for comparison figures over several models).
    """
    from sf_mlflow.stages._common import preprocess_hash, stage_hash as hash_of

    tags = {TAG_DATASET: config.dataset, TAG_PREPROCESS_HASH: preprocess_hash(config)}
    if stage_hash and stage in _STAGE_HASH_WHAT:
        tags[TAG_STAGE_HASH] = hash_of(config, stage)
    return tags


def mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """``<key> is <there> there, <here> here`` for every expected tag the run lacks or differs in."""
    out = []
    for key, here in expected.items():
        there = actual.get(key)
        if there != here:
            out.append(f"{key} is {there!r} there, {here!r} here" if there is not None
                       else f"{key} is not set there, {here!r} here")
    return out


def check_upstream(config: Config, stage: str, run, *, param: str | None = None,
                   advice: str | None = None, stage_hash: bool = True) -> None:
    """Refuse an upstream ``stage`` run whose tags say it was made from other data or settings.

    ``param`` names the option that passed the run (default ``<stage>_run_id``); ``advice``
    replaces the default advice to pass a matching run or omit that option.
    """
    check_tags(config, stage, run.info.run_id, run.data.tags, param=param, advice=advice,
               stage_hash=stage_hash)


def check_tags(config: Config, stage: str, run_id: str, tags: dict[str, str], *,
               param: str | None = None, advice: str | None = None,
               stage_hash: bool = True, via: str = "") -> None:
    """:func:`check_upstream` on the ``tags`` that describe run ``run_id`` (``via`` says whose
    they are when another run's, e.g. `` (its preprocess run <id>)``)."""
    diffs = mismatches(expected_tags(config, stage, stage_hash=stage_hash), tags)
    if not diffs:
        return
    what = _STAGE_HASH_WHAT.get(stage)
    if what:
        diffs = [d.replace(f"{TAG_STAGE_HASH} is", f"{TAG_STAGE_HASH} (the {what}) is", 1)
                 for d in diffs]
    param = param or f"{stage}_run_id"
    advice = advice or (f"Pass a run made with this config, or omit --{param.replace('_', '-')} "
                        f"(-P {param}) to use the newest matching one")
    raise RunLookupError(f"{stage} run {run_id}{via} does not match "
                         f"{config.source or '<your config>'}: {'; '.join(diffs)}. {advice}")


# ---- before a long fit --------------------------------------------------------------------------

#: MLflow's rule for aliases (mlflow.utils.validation._REGISTERED_MODEL_ALIAS_REGEX).
_ALIAS = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")


def check_registration(name: str | None, alias: str | None) -> None:
    """Refuse a registered-model name or alias the MLflow registry would refuse after the fit.

    The rules are MLflow's (``mlflow.utils.validation._validate_model_name`` and
    ``_validate_model_alias_name``, plus the file registry's ban on path separators and
    ``%``): a name that is not empty, has no ``/``, ``:``, ``\\`` or ``%`` and does not
    change as a path (``a/../b``, ``.``, a leading ``/``); an alias of letters, digits,
    ``_`` and ``-``, not ``v<number>`` (reserved for versions).
    """
    if name is None:
        return
    hint = "; choose a name such as 'sf_quickstart' (letters, digits, '_', '-', '.')"
    if not name.strip():
        raise ConfigError(f"--register-as {name!r}: the registered model name is empty{hint}")
    bad = [c for c in ("/", ":", "\\", "%") if c in name]
    if bad:
        raise ConfigError(f"--register-as {name!r}: MLflow refuses registered model names "
                          f"containing {' or '.join(repr(c) for c in bad)}{hint}")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise ConfigError(f"--register-as {name!r}: MLflow refuses names that resolve to "
                          f"another name as a path (this one to {norm!r}){hint}")
    if alias and alias.lower() != "latest":
        if not _ALIAS.match(alias) or len(alias) > 255:
            raise ConfigError(f"--register-alias {alias!r}: MLflow accepts aliases of letters, "
                              "digits, '_' and '-' (at most 255 characters), e.g. 'champion'")
        if _VERSION_ALIAS.match(alias):
            raise ConfigError(f"--register-alias {alias!r}: aliases of the form v<number> are "
                              "reserved by MLflow for versions; choose another, e.g. 'champion'")


def check_output_dir(config: Config) -> None:
    """Refuse an ``output_dir`` that cannot be created or written (before any run is opened)."""
    out = Path(config.output_dir)
    where = config.source or '<your config>'
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}: output_dir {str(out)!r} exists and is not a folder "
                          f"({_kind(out)}); set output_dir to a folder you can write")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{where}: output_dir {str(out)!r} cannot be written "
                          f"({err.strerror or err}); set output_dir to a folder you can write") from None


def _kind(path: Path) -> str:
    """What a path that exists and is not a folder is, e.g. ``"a character device"``."""
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a file"


def check_training_spots(config: Config, n_train: int, preprocess_run_id: str) -> None:
    """Refuse fewer training spots than Moran's I needs (``analysis.moran_k + 1``)."""
    need = config.analysis.moran_k + 1
    if n_train < need:
        raise ConfigError(
            f"preprocess run {preprocess_run_id} has {n_train} training spots, fewer than "
            f"analysis.moran_k + 1 = {need} that the analysis needs; loosen the preprocessing "
            "filters (preprocessing.min_counts, max_mt_fraction, holdout_fraction) or lower "
            "analysis.moran_k")


def check_num_inducing(config: Config, coordinates: np.ndarray, groups) -> None:
    """Refuse a spatial model on fewer distinct positions than Moran's I needs, and a
    ``model.num_inducing`` the inducing-point placement would refuse at the fit.

    :func:`~sf_mlflow.models.inducing.select_inducing_points` never caps M: it raises when
    M exceeds the distinct spot locations (within the groups for the ``proportional`` and
    ``equal`` allocations), or for ``derived`` when M is below the number of groups.
    """
    m = config.model
    if not m.spatial:
        return
    X = np.asarray(coordinates)
    need = max(config.analysis.moran_k + 1, 2)
    distinct = int(np.unique(X, axis=0).shape[0])
    if distinct < need:
        raise ConfigError(f"{config.source or '<your config>'}: the training spots lie at "
                          f"{distinct} distinct position(s); a spatial model needs at least "
                          f"{need} (analysis.moran_k + 1): check data.coordinates_key, or set "
                          "model.prior: Gaussian to fit without the spatial prior")
    if m.num_inducing == "auto":
        return
    M = int(m.num_inducing)
    if groups is None or m.inducing_allocation == "derived":
        n = int(np.unique(X, axis=0).shape[0])
        where = "distinct training spot locations"
    else:
        g = np.asarray(groups)
        n = int(sum(np.unique(X[g == c], axis=0).shape[0] for c in np.unique(g)))
        where = "distinct training spot locations within groups"
    if M > n:
        raise ConfigError(f"{config.source or '<your config>'}: model.num_inducing = {M} exceeds "
                          f"the {n} {where}; set model.num_inducing <= {n} (or auto)")
    if groups is not None and m.inducing_allocation == "derived":
        G = int(np.unique(np.asarray(groups)).size)
        if M < G:
            raise ConfigError(f"{config.source or '<your config>'}: inducing_allocation "
                              f"'derived' gives each of the {G} groups a point, so "
                              f"model.num_inducing = {M} must be >= {G}")
