"""Deletes that wait a moment and go many to a request: the old names of renamed objects.

On an object store a rename is a copy and a delete. rsync, git and editors write every file under
a temporary name and rename it: in durable mode a file cost its upload, the rename's copy and a
delete. The copy makes the new name complete before the rename returns; the delete only removes a
name the mount already hides, so it may wait and go with others, up to DELETE_BATCH in one
request (S3 DeleteObjects). Stores without a batch request (and WebDAV, whose rename is one MOVE)
delete at once, as before.

What keeps it invisible to the mount's users and safe for the bucket:
- a name waiting for its delete is hidden: the mount's listings and lookups do not show it;
- before anything writes that name again (a create, the destination of a rename, a folder renamed
  or removed around it), its delete is sent and finished first: a delete never lands after, and
  removes, a newer object written through this mount;
- each delete names the version the rename copied (S3's conditional delete, where the server
  knows it: another client's newer object there is left alone);
- the waiting deletes are journaled beside the staging area; after a kill the next start deletes
  those still at the journaled version (a HEAD each).
They are sent DELETE_IDLE s after the last rename, DELETE_MAX_AGE s after the oldest waiting one,
at once when DELETE_BATCH wait, and at the end of the mount. Meanwhile another client listing
the bucket still sees the old names (SEMANTICS, "Renames").
"""

from __future__ import annotations

import math

import trio

from sidecar.errors import SidecarError
from sidecar.log import get_logger
from sidecar.store.base import ObjectInfo, ObjectStore
from sidecar.store.ledger import JsonLines

DELETE_IDLE = 1.0  # s without a new rename before the waiting deletes go
DELETE_MAX_AGE = 30.0  # s the oldest waiting delete waits at most
DELETE_BATCH = 1000  # waiting deletes that go at once (S3's DeleteObjects limit)
RETRY_S = 5.0  # s before deletes whose request failed are tried again

log = get_logger(__name__)


def report_refused(refused: dict[str, str]) -> None:
    """Logs the old names a `delete_many` left in the bucket, with why."""
    for key, code in refused.items():
        log.warning("old_name_not_deleted", key=key, code=code,
                    reason="another version is there now" if code == "changed" else "the server refused the delete")


class DeleteJournal(JsonLines):
    """Lines "queued key etag" and "done keys", beside the upload ledger."""

    def queued(self, key: str, etag: str) -> None:
        self._append({"op": "queued", "key": key, "etag": etag})

    def done(self, keys: list[str]) -> None:
        self._append({"op": "done", "keys": keys})

    def left(self) -> list[tuple[str, str]]:
        """The deletes queued and never done, oldest first."""
        left: dict[str, str] = {}
        for doc in self._records():
            try:
                if doc.get("op") == "queued":
                    left[str(doc["key"])] = str(doc["etag"])
                elif doc.get("op") == "done":
                    for key in doc["keys"]:
                        left.pop(str(key), None)
            except (KeyError, TypeError):
                continue  # at worst one old name stays in the bucket
        return list(left.items())


class PendingDeletes:
    def __init__(self, store: ObjectStore, journal: DeleteJournal | None = None) -> None:
        self.store = store
        self.journal = journal
        self._waiting: dict[str, tuple[str, float]] = {}  # key -> (etag, when queued), oldest first
        self._sending: dict[str, trio.Event] = {}
        self._last = -math.inf
        self._retry_at = -math.inf
        self._wake = trio.Event()
        self.running = False
        self.sent = 0  # old names deleted
        self.requests = 0  # requests that deleted them

    @property
    def active(self) -> bool:
        """Renames leave their deletes here (else they delete at once)."""
        return self.running and getattr(self.store, "deletes_in_batches", False)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._sending)

    def hides(self, key: str) -> bool:
        return key in self._waiting or key in self._sending

    def add(self, key: str, etag: str) -> None:
        if self.journal is not None:
            self.journal.queued(key, etag)
        now = trio.current_time()
        self._waiting.pop(key, None)
        self._waiting[key] = (etag, now)
        self._last = now
        if len(self._waiting) == 1 or len(self._waiting) >= DELETE_BATCH:
            self._wake.set()

    async def claim(self, key: str) -> None:
        """Before `key` is written again: its waiting delete is sent now and finished."""
        sending = self._sending.get(key)
        if sending is not None:
            await sending.wait()
        if key in self._waiting:
            await self._send([key], raise_errors=True)

    async def claim_under(self, prefix: str) -> None:
        """Before a folder is listed to be renamed or removed: the deletes of names in it."""
        base = prefix + "/" if prefix else ""
        for event in [e for k, e in self._sending.items() if k.startswith(base)]:
            await event.wait()
        keys = [k for k in self._waiting if k.startswith(base)]
        if keys:
            await self._send(keys, raise_errors=True)

    def _due(self) -> float:
        if not self._waiting:
            return math.inf
        if len(self._waiting) >= DELETE_BATCH:
            return self._retry_at
        oldest = next(iter(self._waiting.values()))[1]
        return max(self._retry_at, min(self._last + DELETE_IDLE, oldest + DELETE_MAX_AGE))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sends the waiting deletes when due; first those a killed predecessor journaled."""
        self.running = True
        task_status.started()
        try:
            await self._replay()
            while True:
                self._wake = trio.Event()
                with trio.move_on_at(self._due()):
                    await self._wake.wait()
                if self._due() <= trio.current_time():
                    await self.flush()
        finally:
            self.running = False

    async def flush(self) -> None:
        """Sends every waiting delete (stops at the first failed request: they wait for a retry)."""
        while self._waiting:
            if not await self._send(list(self._waiting)[:DELETE_BATCH]):
                return

    async def _send(self, keys: list[str], *, raise_errors: bool = False) -> bool:
        items: list[tuple[str, str | None]] = [(k, self._waiting.pop(k)[0]) for k in keys]
        events = {k: trio.Event() for k in keys}
        self._sending.update(events)
        try:
            refused = await self.store.delete_many(items)
        except BaseException as exc:
            now = trio.current_time()
            for key, etag in items:  # back in line (and in the journal still, for a kill)
                self._waiting.setdefault(key, (etag or "", now))
            if not isinstance(exc, SidecarError) or raise_errors:
                raise
            log.warning("old_names_not_deleted", count=len(items), code=exc.code, retry_in_s=RETRY_S)
            self._retry_at = now + RETRY_S
            return False
        finally:
            for key in keys:
                self._sending.pop(key, None)
                events[key].set()
        self._retry_at = -math.inf
        self.requests += 1
        self.sent += len(items) - len(refused)
        report_refused(refused)
        if self.journal is not None:
            if self._waiting or self._sending:
                self.journal.done(keys)
            else:
                self.journal.clear()
        return True

    async def _replay(self) -> None:
        """Queues again the deletes a killed predecessor journaled, each only if its object is
        still at the journaled version (one HEAD each: a server may ignore the delete's
        condition); one that cannot be checked now stays journaled for the next start."""
        if self.journal is None:
            return
        left = self.journal.left()
        if not left:
            return
        self.journal.clear()
        for key, etag in left:
            try:
                found = await self.store.stat(key)
            except SidecarError:
                self.journal.queued(key, etag)
                continue
            if isinstance(found, ObjectInfo) and found.etag == etag and not self.hides(key):
                self.add(key, etag)
                log.info("old_name_delete_resumed", key=key)
