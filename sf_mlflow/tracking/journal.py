"""A run's writes kept on local disk while its tracking server is away, and uploaded later.

When a tracking server has not answered for longer than ``SF_TRACKING_OUTAGE_S``
(:func:`~sf_mlflow.tracking.outage.outage_wait`), a stage stops waiting for it: from then on
every write of its run (params, tags, metrics, artifacts, and finally its end) is appended to
a journal in ``<output_dir>/<stage>/<run_id>.unsent`` and the stage goes on. If the server
answers by the time the stage ends, the journal is uploaded then and removed; if not, the
stage ends with one line naming the folder, and ``spatial_factorization sync <folder>``
uploads it once the server is back. Uploading is idempotent and resumable: metrics keep the
timestamps they were taken at (MLflow ignores a metric written twice), and a ``sent`` file
counts the entries already uploaded, so a sync cut short continues where it stopped.

Layout of a journal folder::

    journal.json    run ID, tracking URI, stage, since when the server was away
    entries.jsonl   one write per line, in order: params, tags, metrics, artifacts, end
    files/<n>/      a copy of the files of the n-th entry, one that logs artifacts
    sent            how many entries have been uploaded
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sf_mlflow.errors import StoreError
from sf_mlflow.tracking.liveness import TAG_FAILURE_REASON
from sf_mlflow.tracking.outage import (
    answers,
    check_server,
    note_back,
    since_text,
    unreachable,
)

__all__ = ["Journal", "end_kept", "sync", "SUFFIX", "sync_command"]

SUFFIX = ".unsent"
_HEADER, _ENTRIES, _SENT, _FILES = "journal.json", "entries.jsonl", "sent", "files"


def sync_command(folder: Path) -> str:
    return f"spatial_factorization sync {folder}"


class Journal:
    """The writes of run ``run_id`` that its tracking server at ``uri`` has not received."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        header = json.loads((self.folder / _HEADER).read_text())
        self.run_id: str = header["run_id"]
        self.uri: str = header["tracking_uri"]
        self.stage: str = header.get("stage", "")
        self.since: float = float(header.get("away_since", time.time()))

    @classmethod
    def create(cls, folder: Path, *, run_id: str, uri: str, stage: str,
               since: float) -> "Journal":
        """A new, empty journal in ``folder`` (an existing one for the run is continued)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / _HEADER).exists():
            header = {"run_id": run_id, "tracking_uri": uri, "stage": stage,
                      "away_since": since, "created": time.time()}
            (folder / _HEADER).write_text(json.dumps(header, indent=1))
        return cls(folder)

    # ---- recording ------------------------------------------------------------------------

    def _append(self, entry: dict) -> None:
        with open(self.folder / _ENTRIES, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def params(self, items: Iterable[Param]) -> None:
        self._append({"kind": "params", "items": [[p.key, p.value] for p in items]})

    def tags(self, items: Iterable[RunTag]) -> None:
        self._append({"kind": "tags", "items": [[t.key, t.value] for t in items]})

    def metrics(self, items: Iterable[Metric]) -> None:
        rows = [[m.key, m.value, m.timestamp, m.step] for m in items]
        if rows:
            self._append({"kind": "metrics", "items": rows})

    def artifacts(self, local: str | Path, artifact_path: str | None) -> None:
        """Keep a copy of the file or folder ``local``, to be logged under ``artifact_path``."""
        local = Path(local)
        slot = self.folder / _FILES / str(len(self.entries()))
        shutil.rmtree(slot, ignore_errors=True)
        # a copy, not a hard link: a file rewritten in place later must not change what the
        # run logged
        if local.is_dir():
            shutil.copytree(local, slot)
        else:
            slot.mkdir(parents=True)
            shutil.copy2(local, slot / local.name)
        self._append({"kind": "artifacts", "files": str(slot.relative_to(self.folder)),
                      "artifact_path": artifact_path})

    def end(self, status: str) -> None:
        self._append({"kind": "end", "status": status, "end_time": int(time.time() * 1000)})

    # ---- reading and uploading ------------------------------------------------------------

    def entries(self) -> list[dict]:
        path = self.folder / _ENTRIES
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def sent(self) -> int:
        try:
            return int((self.folder / _SENT).read_text())
        except (OSError, ValueError):
            return 0

    def _mark_sent(self, n: int) -> None:
        tmp = self.folder / (_SENT + ".tmp")
        tmp.write_text(str(n))
        os.replace(tmp, self.folder / _SENT)

    def describe(self) -> str:
        """e.g. ``"3 writes: 1,200 metric values, 1 artifact folder, its end (FINISHED)"``."""
        entries = self.entries()[self.sent():]
        n_metrics = sum(len(e["items"]) for e in entries if e["kind"] == "metrics")
        n_files = sum(1 for e in entries if e["kind"] == "artifacts")
        n_other = sum(1 for e in entries if e["kind"] in ("params", "tags"))
        parts = [f"{n_metrics:,} metric values"] if n_metrics else []
        if n_files:
            parts.append(f"{n_files} artifact upload{'s' if n_files > 1 else ''}")
        if n_other:
            parts.append(f"{n_other} batch{'es' if n_other > 1 else ''} of params/tags")
        ends = [e["status"] for e in entries if e["kind"] == "end"]
        if ends:
            parts.append(f"its end ({ends[-1]})")
        return ", ".join(parts) or "nothing"

    def upload(self, client: MlflowClient) -> int:
        """Send every entry not yet sent, in order; return how many were sent."""
        entries = self.entries()
        start = self.sent()
        for n, entry in enumerate(entries[start:], start=start):
            _UPLOAD[entry["kind"]](self, client, entry)
            self._mark_sent(n + 1)
        return len(entries) - start

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _upload_params(journal: Journal, client: MlflowClient, entry: dict) -> None:
    # a param logged before the outage (its answer lost) is there already: MLflow refuses
    # to log it again only when the value differs, which a journal never asks
    existing = client.get_run(journal.run_id).data.params
    items = [Param(k, v) for k, v in entry["items"] if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(journal.run_id, params=items[i:i + 100])


def _upload_tags(journal: Journal, client: MlflowClient, entry: dict) -> None:
    client.log_batch(journal.run_id, tags=[RunTag(k, v) for k, v in entry["items"]])


def _upload_metrics(journal: Journal, client: MlflowClient, entry: dict) -> None:
    items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in entry["items"]]
    for i in range(0, len(items), 1000):
        client.log_batch(journal.run_id, metrics=items[i:i + 1000])


def _upload_artifacts(journal: Journal, client: MlflowClient, entry: dict) -> None:
    client.log_artifacts(journal.run_id, str(journal.folder / entry["files"]),
                         entry["artifact_path"])


def _upload_end(journal: Journal, client: MlflowClient, entry: dict) -> None:
    run = client.get_run(journal.run_id)
    if TAG_FAILURE_REASON in run.data.tags:
        # swept as dead while its process could not reach the server: it was not
        client.delete_tag(journal.run_id, TAG_FAILURE_REASON)
    client.set_terminated(journal.run_id, entry["status"], end_time=int(entry["end_time"]))


_UPLOAD: dict[str, Callable[[Journal, MlflowClient, dict], None]] = {
    "params": _upload_params, "tags": _upload_tags, "metrics": _upload_metrics,
    "artifacts": _upload_artifacts, "end": _upload_end}


def end_kept(journal: Journal, status: str, client: MlflowClient, *, fail: bool) -> None:
    """End a run whose writes are kept in ``journal``: upload them now if its server answers,
    else say in one line where they are and how to upload them (:class:`StoreError` when
    ``fail``; printed otherwise, e.g. while an interrupt or another error ends the stage)."""
    journal.end(status)
    if answers(journal.uri):
        try:    # MLflow's own timeouts and retries: a large model file takes its time
            n = journal.upload(client)
        except Exception as err:
            if not unreachable(err):
                raise
        else:
            note_back(journal.uri)
            journal.remove()
            print(f"tracking server {journal.uri} answers again: {n} kept writes of run "
                  f"{journal.run_id} uploaded", flush=True)
            return
    message = (f"the tracking server {journal.uri} has not answered since "
               f"{since_text(journal.since)}: run {journal.run_id} and what it "
               f"could not log ({journal.describe()}) are kept in {journal.folder}; upload "
               f"them once the server is back: {sync_command(journal.folder)}")
    if fail:
        raise StoreError(message)
    print(f"error: {message}", file=sys.stderr, flush=True)


def _journal_at(folder: str | Path) -> Journal:
    folder = Path(folder)
    if not (folder / _HEADER).is_file():
        raise StoreError(
            f"{str(folder)!r} is not a folder of unsent writes (no {_HEADER} in it); a stage "
            f"that could not reach its tracking server names its folder, "
            f"<output_dir>/<stage>/<run id>{SUFFIX}")
    return Journal(folder)


def sync(folder: list[str] | str, tracking_uri: str | None = None) -> None:
    """``spatial_factorization sync FOLDER...``: upload the writes kept in each folder to the
    run's tracking server (``tracking_uri`` overrides the one the run was made in), then
    remove the folder. A folder already half uploaded continues where it stopped."""
    folders = [folder] if isinstance(folder, (str, Path)) else list(folder)
    journals = [_journal_at(f) for f in folders]
    for journal in journals:
        uri = tracking_uri or journal.uri
        check_server(uri)
        what = journal.describe()
        try:
            n = journal.upload(MlflowClient(uri))
        except Exception as err:
            from sf_mlflow.tracking.store import explain_failure

            raise StoreError(
                f"uploading {journal.folder} to {uri} stopped after {journal.sent()} of "
                f"{len(journal.entries())} entries: "
                f"{explain_failure(err) or str(err)[:300]}; run the same command again to "
                "continue") from None
        journal.remove()
        print(f"run {journal.run_id} ({journal.stage}): {n} kept writes uploaded to {uri} "
              f"({what}); removed {journal.folder}", flush=True)
