"""The store over any async fsspec file system (Azure and GCS build on it; S3 has its own,
sidecar.store.s3).

Every call goes through `_run` (sidecar.store.calls), submitted to fsspec's loop
(sidecar.store.bridge).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from sidecar.errors import BackendUnavailable, NotFound, ObjectChanged
from sidecar.log import get_logger
from sidecar.mtime import Mtime, rfc3339_text, seconds_text
from sidecar.store.base import DirInfo, Gate, Listing, ObjectInfo, block_pieces
from sidecar.store.calls import CallingStore
from sidecar.store.bridge import MIN_RATE, Progress, ProgressCallback, run_on_loop
from sidecar.store.classify import PROBE_BODY, WriteDenied, probe_name, reason_of
from sidecar.store.patches import calling_store

T = TypeVar("T")
log = get_logger(__name__)


def _mtime(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def _mtime_text(mtime: float) -> str:
    """rclone's `mtime` metadata: seconds since the epoch with a fraction (exact to the ns)."""
    return seconds_text(mtime)


def _rfc3339(mtime: float) -> str:
    """rclone's `mtime` metadata on Azure and GCS: RFC 3339 with a fraction, UTC (exact to the ns)."""
    return rfc3339_text(mtime)


def _user_mtime(metadata: Any) -> float | None:
    """The `mtime` user metadata (rclone's convention: seconds with a fraction on S3, RFC 3339
    on Azure and GCS; gsutil's `goog-reserved-file-mtime`, whole seconds, after it)."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get("mtime") or metadata.get("Mtime")
    if isinstance(value, str):
        parsed = Mtime.parse_seconds(value) or Mtime.parse_rfc3339(value)
        if parsed is not None:
            return parsed
    gsutil = metadata.get("goog-reserved-file-mtime")
    try:
        return float(int(gsutil)) if gsutil is not None else None
    except (TypeError, ValueError):
        return None


async def run_write_probe(loop: Any, probe: Callable[[], Awaitable[None]]) -> None:
    """Runs a pre-flight's write probe on fsspec's loop; a refusal is WriteDenied (the
    credentials may read, not write), anything else is raised as it is."""
    try:
        await run_on_loop(loop, probe)
    except Exception as exc:
        if reason_of(exc) == "access_denied":
            raise WriteDenied() from exc
        raise


class FsspecStore(CallingStore):
    """Generic store over an async fsspec file system; `root` is the bucket (or container)."""

    streams = False  # get_blocks reads its whole range at once

    def __init__(self, fs: Any, bucket: str, name: str, deadline: float = 30.0) -> None:
        super().__init__(name, deadline)
        self.fs = fs
        self.bucket = bucket

    async def warm_up(self) -> None:
        """Builds the SDK client ahead of the first request (botocore loads its models then:
        a few hundred milliseconds that would otherwise land on the first read)."""
        set_session = getattr(self.fs, "set_session", None)
        if set_session is not None:
            try:
                await self._run("connect", set_session)
            except Exception as exc:  # the first real request reports it properly
                log.debug("warm_up_failed", error=type(exc).__name__)

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{key}" if key else self.bucket

    def _key(self, path: str) -> str:
        path = path.split("://", 1)[-1]
        return path[len(self.bucket) + 1 :] if path.startswith(self.bucket + "/") else ""

    async def _submit(self, call: Callable[[], Awaitable[T]], progress: Progress | None) -> T:
        """On fsspec's loop (sidecar.store.bridge)."""

        async def counted() -> T:
            calling_store.set(self)  # in this call's own task: the SDK's retries in it are ours
            return await call()

        if progress is None:
            return await run_on_loop(self.fs.loop, counted)
        return await run_on_loop(self.fs.loop, counted, stall=self.deadline, progress=progress)

    def _object_info(self, d: dict[str, Any]) -> ObjectInfo:
        etag = d.get("ETag") or d.get("etag") or d.get("generation") or d.get("md5Hash") or ""
        mtime = d.get("LastModified") or d.get("last_modified") or d.get("mtime") or d.get("updated")
        return ObjectInfo(self._key(d["name"]), int(d.get("size") or 0), str(etag).strip('"'), _mtime(mtime))

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        self.stats.list_requests += 1
        entries = await self._run(f"list {prefix or '/'}", lambda: self.fs._ls(self._path(prefix), detail=True, refresh=True))
        return self._to_listing(prefix, entries)

    async def probe(self, prefix: str, *, writable: bool, write_probe: bool, max_entries: int) -> Listing | None:
        """The pre-flight check's calls (sidecar.preflight), raw: what the backend raises is raised
        as it is, for the check to read. Lists the folder `prefix` and, for a writable storage,
        writes and deletes a probe object (WriteDenied if that is refused). Returns the folder's
        listing when it has at most `max_entries` entries (the mount answers its root from it)."""
        path = f"{self.bucket}/{prefix}" if prefix else self.bucket

        async def listing() -> list[dict[str, Any]]:
            if not await self.fs._exists(self.bucket):
                raise FileNotFoundError(self.bucket)
            try:
                return list(await self.fs._ls(path, detail=True))
            except FileNotFoundError:
                if prefix:  # an empty or new folder inside an existing bucket is fine
                    return []
                raise

        entries = await run_on_loop(self.fs.loop, listing)
        if writable and write_probe:
            key = f"{path}/{probe_name()}"

            async def probe() -> None:
                await self.fs._pipe_file(key, PROBE_BODY)
                await self.fs._rm_file(key)

            await run_write_probe(self.fs.loop, probe)
        return self._to_listing(prefix, entries) if len(entries) <= max_entries else None

    def _to_listing(self, prefix: str, entries: list[dict[str, Any]]) -> Listing:
        out = Listing()
        for d in entries:
            key = self._key(d["name"])
            if d.get("type") == "directory":
                out.dirs.append(key.rstrip("/"))
            elif key.endswith("/") or key == prefix:
                out.markers.append(key)
            else:
                out.files.append(self._object_info(d))
        return out

    async def stat(self, key: str, *, folder_first: bool = False) -> ObjectInfo | DirInfo | None:
        if folder_first and await self._has_folder(key):
            return DirInfo(key)
        self.stats.head_requests += 1
        try:
            d = await self._run(f"stat {key}", lambda: self.fs._info(self._path(key), refresh=True))
        except NotFound:
            return None
        if d.get("type") == "directory":
            return DirInfo(key)
        return self._object_info(d)

    async def _has_folder(self, key: str) -> bool:
        """Whether anything lies under `key/` (adlfs lists every name starting with `key`, the
        object `key` itself too: only names below `key/` count)."""
        self.stats.list_requests += 1
        try:
            entries = await self._run(f"list {key}/", lambda: self.fs._ls(self._path(key) + "/", detail=True, refresh=True))
        except NotFound:
            return False
        return any(self._key(d["name"]).startswith(key + "/") for d in entries)

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        return self._fetched(await self._run(f"read {key}", lambda: self.fs._cat_file(self._path(key), start=start, end=end)))

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: Callable[[int, bytes], None], object_size: int | None = None,
        gate: Gate | None = None,
    ) -> None:
        # Generic fallback: one ranged read, then split. Stores that can stream override this.
        data = await self._get_range_sized(key, start, end, etag, object_size)
        for i, lo, hi in block_pieces(start, start + len(data), block_size):
            on_block(i, data[lo - start : hi - start])

    async def _get_range_sized(self, key: str, start: int, end: int, etag: str, object_size: int | None) -> bytes:
        return await self.get_range(key, start, end, etag)

    async def put_file(self, key: str, path: str, size: int, *, expected: Any = ..., reuse: Any = (), mtime: float | None = None) -> ObjectInfo:
        # The generic store checks the precondition with a HEAD just before the upload (a small
        # window remains) and sends the whole file: S3 overrides both.
        if expected is not ...:
            current = await self.stat(key)
            if (current.etag if isinstance(current, ObjectInfo) else None) != expected:
                raise ObjectChanged(f"write {key}")
        progress = Progress(grace=size / MIN_RATE)

        async def put() -> None:
            await self.fs._put_file(path, self._path(key), callback=ProgressCallback(progress), **self._upload_options(mtime))

        await self._run(f"write {key}", put, progress=progress)
        self.stats.put_requests += 1
        self.stats.bytes_stored += size
        info = await self.stat(key)
        if not isinstance(info, ObjectInfo):
            raise BackendUnavailable(f"write {key}: the object is not there after the upload")
        return info

    def _upload_options(self, mtime: float | None) -> dict[str, Any]:
        """Extra arguments of the fsspec upload (the mtime metadata, where the store keeps it)."""
        return {}

    async def delete(self, key: str) -> None:
        self.stats.delete_requests += 1
        await self._run(f"delete {key}", lambda: self.fs._rm_file(self._path(key)))

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo:
        await self._run(f"copy {src}", lambda: self.fs._cp_file(self._path(src), self._path(dst)))
        info = await self.stat(dst)
        if not isinstance(info, ObjectInfo):
            raise BackendUnavailable(f"copy {src}: the copy is not there")
        return info

    async def put_marker(self, key: str) -> None:
        await self._run(f"mkdir {key}", lambda: self.fs._pipe_file(self._path(key.rstrip("/")) + "/", b""))
