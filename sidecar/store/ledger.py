"""The ledger of a mount's multipart uploads, so that none is left behind by a killed worker.

An S3 multipart upload that is neither completed nor aborted stays in the bucket, invisible to
listings and billed for its parts, until someone aborts it. A worker SIGKILLed while it uploads
cannot abort its own. So the store writes here, beside the mount's staging area, when it starts
one ("creating", before the request: the kill may come before the answer), once it has its id
("open"), and when it is over ("done"); at the next start the worker aborts every upload the
ledger says was left open (sidecar.store.fsspec_store.S3Store.abort_abandoned). A line is one
write(2): a kill leaves it whole or missing, and the page cache keeps it through the kill.

Nothing here touches uploads the ledger does not name: another client's uploads in the bucket
are none of this mount's business.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Abandoned:
    key: str
    upload_id: str | None  # None: the kill came before the upload's id was known
    since: float  # when it was started (wall clock)


class JsonLines:
    """An append-only file of JSON lines. A line is one write(2): a kill leaves it whole or
    missing, and the page cache keeps it through the kill."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _append(self, doc: dict[str, Any]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, ("\n" + json.dumps(doc) + "\n").encode())
        finally:
            os.close(fd)

    def _records(self) -> Iterator[dict[str, Any]]:
        """The lines written, in order; a torn one (a full disk) is skipped."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                yield doc

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class UploadLedger(JsonLines):
    def creating(self, key: str) -> float:
        t = time.time()
        self._append({"op": "creating", "key": key, "t": t})
        return t

    def opened(self, key: str, upload_id: str, t: float) -> None:
        self._append({"op": "open", "key": key, "upload_id": upload_id, "t": t})

    def done(self, key: str, upload_id: str | None, t: float) -> None:
        self._append({"op": "done", "key": key, "upload_id": upload_id, "t": t})

    def abandoned(self) -> list[Abandoned]:
        """Uploads started and never finished, by what the ledger says."""
        started: dict[tuple[str, float], Abandoned] = {}
        for doc in self._records():
            try:
                key, t = str(doc["key"]), float(doc["t"])
            except (ValueError, KeyError, TypeError):
                continue  # at worst one upload is not aborted
            if doc.get("op") == "creating":
                started[(key, t)] = Abandoned(key, None, t)
            elif doc.get("op") == "open":
                started[(key, t)] = Abandoned(key, str(doc.get("upload_id")), t)
            elif doc.get("op") == "done":
                started.pop((key, t), None)
        return list(started.values())
