"""What every stage shares: tags from the config, and a staging folder for outputs."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from sf_mlflow.config import Config
from sf_mlflow.tracking import TAG_CONFIG_HASH, TAG_DATASET, TAG_PREPROCESS_HASH

PREPROCESS_SECTIONS = ("seed", "dataset", "data", "preprocessing")


def preprocess_hash(config: Config) -> str:
    """Hash of every setting that determines a preprocess run's output."""
    return config.digest(*PREPROCESS_SECTIONS)


def base_tags(config: Config) -> dict[str, str]:
    return {TAG_DATASET: config.dataset, TAG_CONFIG_HASH: config.digest(),
            TAG_PREPROCESS_HASH: preprocess_hash(config)}


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
