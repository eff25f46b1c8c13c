"""The writer: staged files become objects.

One component owns everything between "a writer closed its file" and "the object is stored":
the conditional upload (the object must still be the version the file was based on, or absent
for a new file), partial re-uploads of large files (ranges unchanged since the base are copied
server-side, not sent again), the conflict state, and a bounded background queue that retries
failed uploads with jittered exponential backoff.

Publishing rule: only a *committed* file is ever uploaded: its writer closed or fsynced it after
its last change (`StagedFile.committed`, persisted on every flip). A file the sidecar was
writing when it died is `incomplete`: kept, reported, published only by `publish()` (an explicit
command), never by itself. So is a file one of whose writes failed (ENOSPC, EIO: a hole in what
is staged): its close fails with EIO too, until a later write fills the hole or a truncate cuts it.

Modes (`write_mode`):
- `durable` (default): close/fsync returns once the object is stored (`commit` awaits the
  upload; a failure is EIO and the file stays queued for retry);
- `writeback`: close returns once the bytes are staged on disk; the queue uploads them in commit
  order, each once it has rested `delay` seconds since its last commit (as rclone's
  --vfs-write-back). SIGTERM flushes the queue within the grace period, without waiting out the
  delay; after a crash the next start does.

Deadlines are the store's: metadata calls have the mount's deadline, transfers fail when they
make no progress for that long (a stall), whatever their size. Nothing here adds a timeout.

Concurrency: trio thread only. One upload per file at a time (`StagedFile.uploading`); writes
that race an upload bump `generation`, so the file stays dirty and is uploaded again.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from sidecar.errors import IncompleteWrite, NotFound, ObjectChanged, SidecarError, UploadFailed, WriteConflict
from sidecar.log import get_logger
from sidecar.store.base import ObjectInfo, ObjectStore
from sidecar.vfs.staging import StagedFile, StagingArea

log = get_logger(__name__)

WRITE_MODES = ("durable", "writeback")
RETRY_FIRST = 1.0
RETRY_CAP = 30.0
BATCH_SLACK = 0.1  # s: a queued file due this soon is uploaded with the files due now
REUSE_MIN = 16 << 20  # files below this are sent whole: a partial re-upload saves little


def unchanged_ranges(f: StagedFile) -> list[tuple[int, int]]:
    """Ranges of the staged file that still hold the base object's bytes at the same offsets."""
    if f.base_etag is None or f.base_size is None or f.changed is None:
        return []
    limit = min(f.base_size, f.size)
    out, pos = [], 0
    for lo, hi in f.changed:
        if lo > pos:
            out.append((pos, min(lo, limit)))
        pos = max(pos, hi)
    if pos < limit:
        out.append((pos, limit))
    return [(lo, hi) for lo, hi in out if hi > lo]


class Writer:
    def __init__(
        self,
        store: ObjectStore,
        staging: StagingArea,
        *,
        mode: str = "durable",
        delay: float = 0.0,
        on_stored: Callable[[StagedFile, ObjectInfo], None] | None = None,
    ) -> None:
        if mode not in WRITE_MODES:
            raise ValueError(f"write_mode must be one of {', '.join(WRITE_MODES)}")
        self.store = store
        self.staging = staging
        self.mode = mode
        self.delay = delay  # write-back: seconds from a file's last commit to its upload
        self.on_stored = on_stored or (lambda f, info: None)
        self._wake = trio.Event()
        self._asleep_until = float("-inf")  # when the background queue looks next by itself

    # -- what is waiting ----------------------------------------------------------------------

    def queued(self) -> list[StagedFile]:
        """Committed files with bytes the bucket does not have, in commit order."""
        return [f for f in self.staging.by_key.values() if f.dirty and f.committed and f.state == "dirty"]

    def unsynced(self) -> dict[str, int]:
        pending = self.staging.pending()
        return {
            "files": len(pending),
            "bytes": sum(f.size for f in pending),
            "queued": len(self.queued()),
            "incomplete": sum(f.state == "incomplete" for f in pending),
            "conflicts": sum(f.state == "conflict" for f in pending),
        }

    # -- a writer closes or fsyncs ------------------------------------------------------------

    async def commit(self, f: StagedFile) -> None:
        """The writer closed or fsynced `f`: its bytes may be published. In durable mode this
        returns once they are stored (UploadFailed / WriteConflict otherwise, and the file stays
        queued); in write-back mode once the commit is recorded on disk."""
        if not f.dirty or f.state == "conflict" or f.orphan:
            if f.state == "conflict" and not f.orphan:
                raise WriteConflict(f.key)
            return  # an orphan's name was unlinked: there is nothing to publish
        if f.holes:  # a write failed: what is staged is not what its writer wrote
            raise IncompleteWrite(f"{f.key}: {f.last_error}")
        if not f.committed:
            self.staging.mark(f, committed=True, state="dirty")
        if self.mode == "writeback":
            # Uploaded once it has rested `delay` seconds since its last commit: a file closed
            # again meanwhile (an editor's saves, a log reopened) is sent once, a temporary file
            # renamed or deleted meanwhile never, and a burst of closes (`cp -r`, `git`) does not
            # compete with its own uploads.
            f.next_try = max(f.next_try, trio.current_time() + self.delay)
            if f.next_try < self._asleep_until:  # else the queue wakes in time for it anyway
                self._wake.set()
            return
        await self.upload(f)

    def abandon_uncommitted(self) -> list[StagedFile]:
        """At shutdown: files still open with uncommitted changes become `incomplete`."""
        left = [f for f in self.staging.by_key.values() if f.dirty and not f.committed and f.state == "dirty"]
        for f in left:
            self.staging.mark(f, state="incomplete")
            log.error("incomplete_file_kept", key=f.key, size=f.size, local_path=str(f.data_path),
                      reason="still open for writing when the mount stopped; not published")
        return left

    async def publish(self, key: str) -> ObjectInfo | None:
        """Uploads an `incomplete` file on a person's explicit request (whole, conditionally)."""
        f = self.staging.by_key.get(key)
        if f is None or f.state != "incomplete":
            raise NotFound(f"no incomplete staged file for {key}")
        f.holes = []
        self.staging.mark(f, state="dirty", committed=True, changed=None)
        return await self.upload(f)

    # -- one upload ---------------------------------------------------------------------------

    async def upload(self, f: StagedFile) -> ObjectInfo | None:
        """Stores `f` if it is dirty. Raises UploadFailed (EIO; it stays queued) or WriteConflict
        (the object is no longer the version `f` was based on; the local copy is kept)."""
        while f.uploading is not None:  # one upload of a file at a time
            await f.uploading.wait()
        if not f.dirty:
            return None
        if f.state == "conflict":
            raise WriteConflict(f.key)
        f.uploading = trio.Event()
        generation, changed = f.generation, f.changed
        reuse = unchanged_ranges(f) if f.size >= REUSE_MIN else []
        f.changed = [] if changed is not None else None  # writes during the upload land here
        try:
            info = await self.store.put_file(f.key, str(f.data_path), f.size, expected=f.base_etag, reuse=reuse, mtime=f.mtime)
        except ObjectChanged:
            f.changed = changed
            self.staging.mark(f, state="conflict")
            f.last_error = "the object changed in the bucket since this file was opened for writing; local copy kept"
            log.error("write_conflict", key=f.key, local_path=str(f.data_path))
            raise WriteConflict(f.key) from None
        except SidecarError as exc:
            f.changed = changed
            f.upload_failures += 1
            f.last_error = f"{exc.code}: {exc}"
            delay = min(RETRY_FIRST * 2 ** (f.upload_failures - 1), RETRY_CAP) * random.uniform(0.5, 1.0)
            f.next_try = trio.current_time() + delay
            log.warning("upload_failed", key=f.key, code=exc.code, failures=f.upload_failures, next_try_s=round(delay, 1))
            raise UploadFailed(f"{f.key}: {exc}") from None
        except BaseException:
            f.changed = changed
            raise
        finally:
            event, f.uploading = f.uploading, None
            event.set()
            self._wake.set()  # the queue looks again (a failure schedules a retry)
        f.upload_failures, f.last_error, f.next_try = 0, None, 0.0
        raced = f.generation != generation
        # `committed` is left as it is: a write during the upload cleared it, and a close after
        # that write set it again (the shell's `>` closes once before writing, once after).
        self.staging.mark(f, dirty=raced, base_etag=info.etag, base_size=info.size, changed=f.changed if raced else [])
        log.info("uploaded", key=f.key, size=info.size, reused=sum(hi - lo for lo, hi in reuse))
        self.on_stored(f, info)
        return info

    async def upload_pending(self, *, only_idle: bool = True) -> int:
        """Uploads queued files now (those no handle has open, unless `only_idle` is false);
        returns how many staged files are left."""
        for f in self.queued():
            if only_idle and f.handles > 0:
                continue
            try:
                await self.upload(f)
            except (UploadFailed, WriteConflict):
                pass
        return len(self.staging.pending())

    # -- the background queue -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Uploads committed files that are not stored yet (write-back mode, failed uploads,
        files recovered after a crash), one at a time in commit order, each retried with
        jittered exponential backoff (capped at RETRY_CAP) while the backend fails."""
        task_status.started()
        while True:
            # Files due within BATCH_SLACK go with this round: a burst of closes is one walk
            # over the queue, not one per file.
            now = trio.current_time()
            due = [f for f in self.queued() if f.next_try <= now + BATCH_SLACK and f.uploading is None]
            for f in due:
                try:
                    await self.upload(f)
                except (UploadFailed, WriteConflict):
                    pass
            waiting = [f.next_try for f in self.queued() if f.uploading is None]
            self._wake = trio.Event()
            self._asleep_until = min(waiting) if waiting else float("inf")
            with trio.move_on_at(self._asleep_until):
                await self._wake.wait()
            self._asleep_until = float("-inf")
