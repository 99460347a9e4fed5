"""What every stage shares: tags from the config, and a staging folder for outputs."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from sf_mlflow.config import Config
from sf_mlflow.tracking import (
    TAG_CONFIG_HASH,
    TAG_DATASET,
    TAG_PREPROCESS_HASH,
    TAG_REUSABLE,
    TAG_STAGE_HASH,
)

PREPROCESS_SECTIONS = ("seed", "dataset", "data", "preprocessing")

#: The config sections that determine each stage's output (its upstream run carries the rest).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "preprocess": PREPROCESS_SECTIONS,
    "train": ("seed", "model", "training"),
    "analyze": ("analysis",),
    "figures": (),
}


def preprocess_hash(config: Config) -> str:
    """Hash of every setting that determines a preprocess run's output."""
    return stage_hash(config, "preprocess")


def stage_hash(config: Config, stage: str) -> str:
    """Hash of the settings a stage's output depends on, besides its upstream run.

    Two runs of a stage with the same stage hash, upstream run and code version
    compute the same thing, so the ``main`` pipeline reuses the finished one.
    """
    sections = STAGE_SECTIONS.get(stage)
    if sections is None:
        raise KeyError(f"unknown stage {stage!r}")
    return config.digest(*sections) if sections else "none"


def base_tags(config: Config, stage: str | None = None) -> dict[str, str]:
    tags = {TAG_DATASET: config.dataset, TAG_CONFIG_HASH: config.digest(),
            TAG_PREPROCESS_HASH: preprocess_hash(config)}
    if stage is not None:
        tags[TAG_STAGE_HASH] = stage_hash(config, stage)
        tags[TAG_REUSABLE] = "true"
    return tags


def say(stage: str, message: str) -> None:
    """Progress line on stdout, prefixed with the stage (flushed: runs may be long)."""
    print(f"[{stage}] {message}", flush=True)


@contextlib.contextmanager
def staging_dir(config: Config, stage: str, run_id: str) -> Iterator[Path]:
    """Folder for a stage's outputs: ``<output_dir>/<stage>/<run_id>``.

    Outputs are written to ``<run_id>.partial`` and the folder is renamed only when the
    stage succeeded, so a failed or interrupted stage leaves no folder that looks complete.
    """
    final = Path(config.output_dir) / stage / run_id
    partial = final.with_name(run_id + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
