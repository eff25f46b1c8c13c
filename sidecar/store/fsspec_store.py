"""fsspec-backed object stores.

fsspec's async file systems (s3fs, adlfs, gcsfs) run their coroutines on fsspec's own asyncio
loop in a dedicated IO thread. We submit coroutines there with `run_coroutine_threadsafe` and
wait for the result from trio without occupying a worker thread: the future's done-callback
wakes the trio task through its trio token. Cancelling the trio side (a deadline) cancels the
asyncio task, so an abandoned request does not linger.

Every call is bounded by the mount's deadline and every backend error is translated into a
domain error here, so nothing above this module sees botocore or aiohttp exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import inspect
import io
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import trio

from sidecar.errors import AccessDenied, BackendTimeout, BackendUnavailable, NoCredentials, NotFound, ObjectChanged, SidecarError
from sidecar.log import get_logger
from sidecar.mtime import Mtime, rfc3339_text, seconds_text
from sidecar.store.base import DirInfo, Gate, Listing, ObjectInfo, StoreStats, block_pieces
from sidecar.store.ledger import UploadLedger

T = TypeVar("T")
log = get_logger(__name__)


class Progress:
    """When a backend call last moved (a response arrived, a chunk of a body, a part of an
    upload). Ticked from the asyncio thread, read from trio: a float store is atomic. `grace`
    counts as movement at the start (for calls that can only report at their end)."""

    def __init__(self, grace: float = 0.0) -> None:
        self.last = time.monotonic() + grace
        self.longest_gap = 0.0  # the longest time without movement, so far

    def tick(self, *_: Any) -> None:
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self.last)
        self.last = max(self.last, now)

    def stalled(self, after: float) -> bool:
        """Whether the call went `after` seconds without moving, at some point or now."""
        return max(self.longest_gap, time.monotonic() - self.last) >= after

    def grant(self, seconds: float) -> None:
        """The next step cannot report progress (a server assembling an object): it counts as
        moving for `seconds` more."""
        self.last = max(self.last, time.monotonic() + seconds)


STALL_AFTER = 5.0  # s without progress: a call counts as stalled (status, metrics, `degraded`)
COMPLETE_RATE = 32 << 20  # bytes/s a server is granted to assemble a multipart object
FAIL_FAST_S = 1.0  # after a timeout, the same call fails at once for this long
MIN_RATE = 1 << 20  # bytes/s: an upload that cannot report progress is given size / MIN_RATE


async def run_on_loop(
    loop: asyncio.AbstractEventLoop, coro_fn: Callable[[], Awaitable[T]], *, stall: float | None = None, progress: Progress | None = None
) -> T:
    """Runs `coro_fn()` on an asyncio loop in another thread and waits for it from trio. With
    `stall`, raises trio.TooSlowError (and cancels the call) once `progress` has not moved for
    `stall` seconds: a transfer may take as long as it needs while it moves."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    async def wrapper() -> T:
        return await coro_fn()

    fut = asyncio.run_coroutine_threadsafe(wrapper(), loop)
    fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
    try:
        if stall is None or progress is None:
            await done.wait()
        else:
            while not done.is_set():
                left = progress.last + stall - time.monotonic()
                if left <= 0:
                    raise trio.TooSlowError
                with trio.move_on_after(left):
                    await done.wait()
    except BaseException:
        fut.cancel()
        raise
    return fut.result()


# Errors of a body that broke off mid-way (a reset connection): the read is tried again.
def _body_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError]
    try:
        import aiohttp

        errors += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    except ImportError:
        pass
    try:
        from botocore.exceptions import ResponseStreamingError

        errors.append(ResponseStreamingError)
    except ImportError:
        pass
    return tuple(errors)


BODY_RETRIES = 3  # per call, for bodies cut off mid-way


class _ProgressCallback:
    """An fsspec callback that ticks a Progress on every update of a transfer."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __getattr__(self, name: str) -> Any:
        return self.progress.tick  # set_size, relative_update, absolute_update, call, ...

    def branched(self, *args: Any, **kwargs: Any) -> "_ProgressCallback":
        return self


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


def translate(exc: BaseException, what: str) -> SidecarError:
    """Maps fsspec/botocore/aiohttp errors to domain errors. Messages carry no request details."""
    if isinstance(exc, SidecarError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return NotFound(what)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"access denied: {what}")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return NoCredentials(f"no usable credentials: {what}")
    code = _error_code(exc)
    if code in ("PreconditionFailed", "412", "ConditionNotMet"):
        return ObjectChanged(what)
    if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
        return NotFound(what)
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return AccessDenied(f"access denied: {what}")
    if isinstance(exc, (OSError, asyncio.TimeoutError)) or code is not None or _is_client_error(exc):
        return BackendUnavailable(f"{what}: {type(exc).__name__}")
    raise exc  # a programming error, not a backend one: let the adapter log its traceback


def _retry_attempts(response: Any) -> int:
    """How many times botocore sent a request again before this answer (its own retries of 5xx,
    throttling and broken connections, which s3fs never sees)."""
    if not isinstance(response, dict):
        return 0
    n = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    return n if isinstance(n, int) else 0


def _is_client_error(exc: BaseException) -> bool:
    mod = type(exc).__module__
    return mod.startswith(("botocore", "aiobotocore", "aiohttp", "azure", "google", "gcsfs", "adlfs"))


def _error_code(exc: BaseException) -> str | None:
    for e in (exc, exc.__cause__, exc.__context__):
        status = getattr(e, "code", None) if e is not None else None
        if isinstance(status, int) and status in (403, 404, 412):  # gcsfs HttpError
            return str(status)
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            err = resp.get("Error", {})
            return str(err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        if e is not None and "PreconditionFailed" in str(e):
            return "PreconditionFailed"
    return None


class _RetryCounter(logging.Filter):
    """Counts the retries s3fs really makes inside one call and drops its debug records, so the
    counter costs no log output. s3fs logs every ClientError as "maybe retryable" (404s too):
    only those it retries count, i.e. its retryable errors, throttling, and the 5xx answers our
    error handler asks it to retry."""

    count = 0
    THROTTLED = ("SlowDown", "reduce your request rate", "XAmzContentSHA256Mismatch")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("Retryable error"):
            _RetryCounter.count += 1
        elif record.msg.startswith("Client error") and any(p in str(record.args) for p in self.THROTTLED):
            _RetryCounter.count += 1
        return False


def _retry_server_errors(exc: BaseException) -> bool:
    """s3fs's hook for errors it does not retry by itself: 500/502/503/504 are transient (the
    S3 guidance is to retry them)."""
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") if hasattr(exc, "response") else None
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    if status in (500, 502, 503, 504) and code not in _RetryCounter.THROTTLED:
        _RetryCounter.count += 1
        return True
    return False


def _count_s3fs_retries() -> None:
    s3fs_log = logging.getLogger("s3fs")
    if not any(isinstance(f, _RetryCounter) for f in s3fs_log.filters):
        s3fs_log.addFilter(_RetryCounter())
        s3fs_log.setLevel(logging.DEBUG)
        import s3fs.core

        s3fs.core.set_custom_error_handler(_retry_server_errors)


class FsspecStore:
    """Generic store over an async fsspec file system; `root` is the bucket (or container)."""

    streams = False  # get_blocks reads its whole range at once

    def __init__(self, fs: Any, bucket: str, name: str, deadline: float = 30.0) -> None:
        self.fs = fs
        self.bucket = bucket
        self.name = name
        self.deadline = deadline
        self.stats = StoreStats()
        self._inflight: set[Progress] = set()
        self._timed_out: dict[str, float] = {}  # call -> when it last timed out
        self._resent = 0  # requests the SDK's client sent again (S3: counted from each answer)

    def stalled_calls(self, after: float = STALL_AFTER) -> int:
        """Backend calls in flight that have not moved for `after` seconds (a stalling backend
        shows here long before the calls time out). Those that ended are `stats.stalls`."""
        now = time.monotonic()
        return sum(1 for p in list(self._inflight) if now - p.last > after)

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

    async def _run(self, what: str, coro_fn: Callable[[], Awaitable[T]], *, progress: Progress | None = None) -> T:
        """One backend call. Without `progress` it must finish within the mount's deadline; with
        it (transfers, which tick it as they move) it fails only after making no progress for
        that long, however large it is."""
        deadline = self.deadline
        failed_at = self._timed_out.get(what)
        if failed_at is not None and time.monotonic() - failed_at < FAIL_FAST_S:
            # The kernel retries a failed read-ahead at once with a synchronous read of the same
            # pages: the same call again right after a timeout fails at once, not a second
            # deadline later.
            self.stats.errors += 1
            raise BackendTimeout(f"{what}: timed out {time.monotonic() - failed_at:.1f} s ago")
        started = trio.current_time()
        watched = progress or Progress()
        self._inflight.add(watched)
        try:
            if progress is None:
                with trio.fail_after(deadline):
                    return await run_on_loop(self.fs.loop, coro_fn)
            return await run_on_loop(self.fs.loop, coro_fn, stall=deadline, progress=progress)
        except trio.TooSlowError:
            self.stats.errors += 1
            self.stats.stalls += 1  # no progress for the deadline: a stall, however short the deadline
            watched.longest_gap = -1.0  # counted here, not again below
            self._timed_out[what] = time.monotonic()
            if len(self._timed_out) > 1024:
                self._timed_out.clear()
            raise BackendTimeout(f"{what}: no answer within {deadline:g} s" if progress is None else f"{what}: no progress for {deadline:g} s") from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            self._resent += _retry_attempts(getattr(exc, "response", None))
            err = translate(exc, what)
            if not isinstance(err, (NotFound, ObjectChanged)):
                self.stats.errors += 1
            raise err from None
        finally:
            self._inflight.discard(watched)
            if watched.longest_gap >= 0 and watched.stalled(STALL_AFTER):
                self.stats.stalls += 1
            took = trio.current_time() - started
            self.stats.calls += 1
            self.stats.latency_sum_s += took
            self.stats.latency_max_s = max(self.stats.latency_max_s, took)
            self.stats.sdk_retries = _RetryCounter.count + self._resent

    def _object_info(self, d: dict[str, Any]) -> ObjectInfo:
        etag = d.get("ETag") or d.get("etag") or d.get("generation") or d.get("md5Hash") or ""
        mtime = d.get("LastModified") or d.get("last_modified") or d.get("mtime") or d.get("updated")
        return ObjectInfo(self._key(d["name"]), int(d.get("size") or 0), str(etag).strip('"'), _mtime(mtime))

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        self.stats.list_requests += 1
        entries = await self._run(f"list {prefix or '/'}", lambda: self.fs._ls(self._path(prefix), detail=True, refresh=True))
        return self._to_listing(prefix, entries)

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        return None  # kept in the mount's own mtime index only

    def listing_of(self, prefix: str, entries: list[dict[str, Any]]) -> Listing:
        """Folder `prefix`'s listing from the entries the pre-flight check listed with this
        store's client (all of them)."""
        return self._to_listing(prefix, entries)

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

    def _fetched(self, data: bytes) -> bytes:
        self.stats.get_requests += 1
        self.stats.bytes_fetched += len(data)
        return data

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
            await self.fs._put_file(path, self._path(key), callback=_ProgressCallback(progress), **self._upload_options(mtime))

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

    async def close(self) -> None:
        pass


MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 16 << 20
INLINE_READ = 256 << 10  # a staged file up to this size is read on the event loop, not in a thread
REUSE_PART_SIZE = 8 << 20  # finer parts when unchanged ranges can be copied: less is sent again
UPLOAD_CONCURRENCY = 8


def _read_part(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class _ProgressBody(io.BytesIO):
    """An upload body that ticks a Progress each time the HTTP client reads a chunk of it to
    send (aiohttp reads 64 KiB at a time as the socket drains): a stall shows within seconds,
    while a slow link that still moves never counts as one."""

    def __init__(self, data: bytes, progress: Progress) -> None:
        super().__init__(data)
        self.progress = progress

    def read(self, size: int | None = -1) -> bytes:
        self.progress.tick()
        return super().read(size)


class _S3Writes:
    """Uploads, deletes and copies of the S3 store (mixed into S3Store)."""

    fs: Any
    bucket: str
    stats: StoreStats
    ledger: UploadLedger | None = None  # where multipart uploads are recorded (sidecar.store.ledger)

    async def abort_abandoned(self) -> list[str]:
        """Aborts the multipart uploads a killed predecessor left open (by the ledger); a kill
        before an upload's id was known leaves its key and time: the key's uploads started then
        (within a minute) are aborted. Returns the keys."""
        if self.ledger is None:
            return []
        aborted = []
        for left in self.ledger.abandoned():
            ids = [left.upload_id] if left.upload_id else await self._uploads_started_near(left.key, left.since)
            for upload_id in ids:
                try:
                    await self._run(f"abort {left.key}", lambda: self.fs._call_s3(  # type: ignore[attr-defined]
                        "abort_multipart_upload", Bucket=self.bucket, Key=left.key, UploadId=upload_id))
                    aborted.append(left.key)
                except NotFound:
                    pass  # already gone (completed, or aborted by the bucket's lifecycle rule)
        self.ledger.clear()
        return aborted

    async def _uploads_started_near(self, key: str, since: float) -> list[str]:
        listed = await self._run(f"list uploads {key}", lambda: self.fs._call_s3(  # type: ignore[attr-defined]
            "list_multipart_uploads", Bucket=self.bucket, Prefix=key))
        return [u["UploadId"] for u in listed.get("Uploads", [])
                if u.get("Key") == key and abs(u["Initiated"].timestamp() - since) < 60]

    async def put_file(self, key: str, path: str, size: int, *, expected: Any = ..., reuse: Any = (), mtime: float | None = None) -> ObjectInfo:
        """One PUT up to MULTIPART_THRESHOLD, else a multipart upload (UPLOAD_CONCURRENCY parts in
        flight). The precondition travels with the write: `If-None-Match: *` for a new object,
        `If-Match` for a replacement (412 -> ObjectChanged). Parts that lie inside `reuse` are
        copied server-side from the expected version (UploadPartCopy with x-amz-copy-source-
        if-match), so an append or an edit in place sends only the parts it touched."""
        cond: dict[str, str] = {}
        meta: dict[str, Any] = {"Metadata": {"mtime": _mtime_text(mtime)}} if mtime is not None else {}
        if expected is None:
            cond["IfNoneMatch"] = "*"
        elif expected is not ...:
            cond["IfMatch"] = f'"{expected}"'
        progress = Progress()
        copied = 0

        async def single() -> str:
            if size <= INLINE_READ:  # from the page cache: cheaper than a hop to a thread and back
                data = _read_part(path, 0, size)
            else:
                data = await asyncio.get_running_loop().run_in_executor(None, _read_part, path, 0, size)
            try:
                resp = await self.fs._call_s3("put_object", Bucket=self.bucket, Key=key, Body=_ProgressBody(data, progress), **cond, **meta)
            except Exception as exc:
                if not isinstance(translate(exc, key), ObjectChanged):
                    raise
                # The SDK may have sent this PUT twice: the first stored it and its answer was
                # lost (a reset, a 503 from a proxy). The precondition then meets our own
                # object. Its etag (the MD5 of a plain PUT's bytes) tells ours from another
                # writer's; anything else stays a conflict.
                head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
                if head.get("ETag", "").strip('"') != hashlib.md5(data, usedforsecurity=False).hexdigest():
                    raise
                return head["ETag"]
            return resp["ETag"]

        async def multipart() -> str:
            nonlocal copied
            loop = asyncio.get_running_loop()
            if reuse:
                part_size = max(REUSE_PART_SIZE, -(-size // 9000))
            else:
                part_size = max(PART_SIZE, -(-size // 9000))
            if "IfMatch" in cond:
                # Some servers (moto) ignore If-Match on CompleteMultipartUpload: check first too.
                head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
                if head["ETag"].strip('"') != expected:
                    raise ObjectChanged(f"write {key}")
            ledger = self.ledger
            started = ledger.creating(key) if ledger is not None else 0.0
            mpu = await self.fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=key, **meta)
            upload_id = mpu["UploadId"]
            if ledger is not None:
                ledger.opened(key, upload_id, started)
            gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

            def reusable(lo: int, hi: int) -> bool:
                return any(a <= lo and hi <= b for a, b in reuse)

            async def part(number: int, offset: int) -> dict[str, Any]:
                nonlocal copied
                length = min(part_size, size - offset)
                async with gate:
                    if reusable(offset, offset + length):
                        resp = await self.fs._call_s3(
                            "upload_part_copy", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                            CopySource={"Bucket": self.bucket, "Key": key}, CopySourceRange=f"bytes={offset}-{offset + length - 1}",
                            CopySourceIfMatch=f'"{expected}"',
                        )
                        copied += length
                        etag = resp["CopyPartResult"]["ETag"]
                    else:
                        data = await loop.run_in_executor(None, _read_part, path, offset, length)
                        resp = await self.fs._call_s3(
                            "upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                            Body=_ProgressBody(data, progress),
                        )
                        etag = resp["ETag"]
                    progress.tick()
                    return {"PartNumber": number, "ETag": etag}

            try:
                parts = await asyncio.gather(*(part(i + 1, off) for i, off in enumerate(range(0, size, part_size))))
                # The server assembles the object before it answers (S3: up to minutes for a
                # large one; moto: ~1 s per 100 MiB), with nothing to report meanwhile.
                progress.grant(size / COMPLETE_RATE)
                resp = await self.fs._call_s3(
                    "complete_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond
                )
            except BaseException:
                try:
                    await self.fs._call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
                except Exception:
                    pass  # still open: the ledger keeps it, and the next start aborts it
                else:
                    if ledger is not None:
                        ledger.done(key, upload_id, started)
                raise
            if ledger is not None:
                ledger.done(key, upload_id, started)
            return resp["ETag"]

        fn = multipart if size > MULTIPART_THRESHOLD else single
        etag = await self._run(f"write {key}", fn, progress=progress)  # type: ignore[attr-defined]
        self.stats.put_requests += 1
        self.stats.bytes_stored += size - copied
        self.stats.bytes_copied += copied
        return ObjectInfo(key, size, str(etag).strip('"'), mtime if mtime is not None else time.time())

    async def delete(self, key: str) -> None:
        self.stats.delete_requests += 1
        await self._run(f"delete {key}", lambda: self.fs._call_s3("delete_object", Bucket=self.bucket, Key=key))  # type: ignore[attr-defined]

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo:
        """A server-side CopyObject (metadata, mtime included, copied too); its answer carries
        the new etag, so no HEAD follows. Objects of 5 GiB or more (or of unknown size) are
        copied in parts by s3fs."""
        if size is None or size >= 5 << 30:
            return await super().copy(src, dst)  # type: ignore[misc]

        async def copy_object() -> Any:
            return await self.fs._call_s3("copy_object", Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src})

        resp = await self._run(f"copy {src}", copy_object)  # type: ignore[attr-defined]
        self.stats.put_requests += 1
        etag = str(resp.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
        return ObjectInfo(dst, size, etag, time.time())

    async def put_marker(self, key: str) -> None:
        marker = key.rstrip("/") + "/"
        await self._run(f"mkdir {key}", lambda: self.fs._call_s3("put_object", Bucket=self.bucket, Key=marker, Body=b""))  # type: ignore[attr-defined]


class S3Store(_S3Writes, FsspecStore):
    """S3 through s3fs: LIST with delimiter page by page, and ranged GETs conditional on the etag
    (`If-Match`), so a block fetched after the object changed fails with ObjectChanged instead of
    mixing old and new bytes."""

    streams = True  # get_blocks reads the body block by block, as its gate allows

    async def warm_up(self) -> None:
        await super().warm_up()
        client = getattr(self.fs, "_s3", None)
        if client is not None:  # botocore's own retries (503 SlowDown, resets) are invisible to s3fs
            client.meta.events.register("after-call.s3", self._count_resent, unique_id=f"sidecar-resent-{id(self)}")

    def _count_resent(self, parsed: Any = None, **_: Any) -> None:
        self._resent += _retry_attempts(parsed)

    @contextlib.asynccontextmanager
    async def rehearsal(self) -> AsyncIterator[None]:
        """Within it, requests for REHEARSAL_KEY are answered inside the SDK (a handler on the
        client's `before-send` event: zeros, as many as the Range asks; a HEAD answers the
        size): no request is sent. The store's counters are reset after it. The worker rehearses
        a first read and a stat with it (`worker.rehearse_read`): botocore builds its state for
        an operation on the operation's first call (event-name aliases and handler lookups,
        shapes, serializer, parser), which the first read after start paid: the first GetObject
        after the check's LIST took 5.7-7.2 ms against 3.8-4.8 ms later, 4.9-5.7 ms once
        rehearsed."""
        from aiobotocore.awsrequest import AioAWSResponse

        client = getattr(self.fs, "_s3", None)  # built by `warm_up`
        if client is None:
            yield
            return

        def answer(request: Any, **_: Any) -> Any:
            if REHEARSAL_KEY not in request.url:
                return None
            asked = request.headers.get("Range") or b"bytes=0-0"
            asked = asked.decode() if isinstance(asked, bytes) else asked
            lo, _, hi = asked.removeprefix("bytes=").partition("-")
            size = int(hi or lo) - int(lo or 0) + 1
            headers = {"content-length": str(size), "content-range": f"bytes {lo}-{hi}/{REHEARSAL_SIZE}", "etag": '"0"',
                       "accept-ranges": "bytes", "last-modified": "Thu, 01 Jan 2026 00:00:00 GMT", "content-type": "application/octet-stream"}
            if request.method == "HEAD":
                headers["content-length"] = str(REHEARSAL_SIZE)
                del headers["content-range"]
            return AioAWSResponse(request.url, 200, headers, _Zeros(0 if request.method == "HEAD" else size))

        client.meta.events.register_first("before-send.s3", answer, unique_id=REHEARSAL_KEY)
        try:
            yield
        finally:
            client.meta.events.unregister("before-send.s3", unique_id=REHEARSAL_KEY)
            self.stats.__init__()  # type: ignore[misc]  # in place: nothing was asked of the server

    def listing_of(self, prefix: str, entries: list[dict[str, Any]]) -> Listing:
        return self._to_listing(f"{prefix}/" if prefix else "", entries)

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        key_prefix = f"{prefix}/" if prefix else ""
        complete = True

        async def collect() -> list[dict[str, Any]]:
            nonlocal complete
            out = []
            async for d in self.fs._iterdir(self.bucket, prefix=key_prefix):
                out.append(d)
                if max_entries is not None and len(out) > max_entries:
                    complete = False
                    break
            return out

        entries = await self._run(f"list {prefix or '/'}", collect)
        self.stats.list_requests += max(1, -(-len(entries) // 1000))  # pages of 1,000
        listing = self._to_listing(key_prefix, entries)
        listing.complete = complete
        return listing

    async def stat(self, key: str, *, folder_first: bool = False) -> ObjectInfo | DirInfo | None:
        """A HEAD (its `mtime` metadata wins over Last-Modified: rclone's convention), and only
        if there is no such object, one LIST of `key/` to tell a folder from nothing. With
        `folder_first`, the LIST comes first and the HEAD only if it finds nothing."""

        async def folder() -> bool:
            self.stats.list_requests += 1
            page = await self._run(f"stat {key}/", lambda: self.fs._call_s3("list_objects_v2", Bucket=self.bucket, Prefix=key + "/", MaxKeys=1))
            return bool(page.get("KeyCount", 0) or page.get("Contents"))

        if folder_first and key and await folder():
            return DirInfo(key)

        async def head() -> Any:
            try:
                return await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
            except FileNotFoundError:
                return None

        self.stats.head_requests += 1
        resp = await self._run(f"stat {key}", head) if key else None
        if resp is not None:
            return ObjectInfo(key, int(resp.get("ContentLength", 0)), str(resp.get("ETag", "")).strip('"'),
                              _user_mtime(resp.get("Metadata")) or _mtime(resp.get("LastModified")))
        if folder_first:
            return None
        return DirInfo(key) if await folder() else None

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        """A server-side copy of the object onto itself with the new `mtime` metadata (the bytes
        are not sent again; conditional on the etag)."""

        async def copy() -> Any:
            return await self.fs._call_s3(
                "copy_object", Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                CopySourceIfMatch=f'"{etag}"', MetadataDirective="REPLACE", Metadata={"mtime": _mtime_text(mtime)},
            )

        resp = await self._run(f"set mtime {key}", copy)
        self.stats.put_requests += 1
        result = resp.get("CopyObjectResult", {})
        info = await self.stat(key) if not result.get("ETag") else None
        if isinstance(info, ObjectInfo):
            return info
        return ObjectInfo(key, -1, str(result.get("ETag", "")).strip('"'), mtime)

    async def _open_body(self, key: str, start: int, end: int, etag: str) -> Any:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"')
        return resp["Body"]

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        body_errors = _body_errors()

        async def fetch() -> bytes:
            for attempt in range(BODY_RETRIES + 1):
                body = await self._open_body(key, start, end, etag)
                try:
                    return await body.read()
                except body_errors:
                    if attempt == BODY_RETRIES:
                        raise
                    self.stats.retries += 1  # the body broke off: read the range again
                    await asyncio.sleep(0.05 * 2**attempt)
                finally:
                    body.close()
            raise AssertionError("unreachable")

        if end <= start:
            return b""
        return self._fetched(await self._run(f"read {key}", fetch))

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: Callable[[int, bytes], None], object_size: int | None = None,
        gate: Gate | None = None,
    ) -> None:
        token = trio.lowlevel.current_trio_token()
        stats = self.stats
        progress = Progress()
        body_errors = _body_errors()

        def deliver(i: int, data: bytes) -> None:
            stats.bytes_fetched += len(data)
            on_block(i, data)

        # aiohttp buffers up to twice the largest read asked of it before it stops reading the
        # socket: a gated stream reads in small pieces, so what waits for its reader stays small.
        piece = GATED_READ if gate is not None else STREAM_READ

        async def stream() -> None:
            # Each block's chunks are joined once (no zero-filled buffer, one copy) and handed
            # over as soon as the block is complete. A body that breaks off is requested again
            # from the block it broke in (blocks already handed over are not fetched again).
            index, pos, retries = 0, start, 0
            while pos < end:
                body = await self._open_body(key, pos, end, etag)
                progress.tick()
                held = _hold_back(body) if gate is not None else None
                try:
                    while pos < end:
                        if gate is not None and index >= gate.allowed:
                            # Backpressure: the reader has not asked this far yet. The body
                            # waits unread (TCP holds the server back) and the stall watchdog
                            # is told it is a wait, not a stall.
                            progress.grant(gate.idle + 1)
                            if not await gate.wait_asyncio(index):
                                return
                            progress.tick()
                        want = min((pos // block_size + 1) * block_size, end) - pos  # to the block's end
                        chunks, filled = [], 0
                        while filled < want:
                            chunk = await body.read(min(want - filled, piece))
                            if not chunk:
                                break
                            chunks.append(chunk)
                            filled += len(chunk)
                            progress.tick()
                        if filled < want:  # the stream ended early: the cache fails what is missing
                            return
                        token.run_sync_soon(deliver, index, chunks[0] if len(chunks) == 1 else b"".join(chunks))
                        index, pos = index + 1, pos + want
                except body_errors:
                    retries += 1
                    if retries > BODY_RETRIES:
                        raise
                    stats.retries += 1
                    await asyncio.sleep(0.05 * 2**retries)
                finally:
                    body.close()
                    if held is not None:  # its small window stays with the socket: never reused
                        held.abort()

        self.stats.get_requests += 1
        # No fixed total: the stream may take as long as it needs while bytes keep arriving.
        await self._run(f"read {key}", stream, progress=progress)


REHEARSAL_KEY = ".storage-sidecar-rehearsal"  # the key of the warm-up calls no server ever sees
REHEARSAL_SIZE = 2 << 20  # the size of the rehearsed object (its memory stays with the worker)
REHEARSAL_PIECE = 64 << 10  # bytes per read of its body


class _Zeros:
    """The raw body of a rehearsed response (S3Store.rehearsal), read as aiohttp's is."""

    url = REHEARSAL_KEY

    def __init__(self, size: int) -> None:
        self.content = self
        self._left = size

    async def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left, REHEARSAL_PIECE)  # pieces as a socket gives them
        self._left -= n
        return bytes(n)

    def at_eof(self) -> bool:
        return not self._left

    def close(self) -> None:
        pass


GATED_READ = 128 * 1024  # bytes per body read of a gated stream (aiohttp's buffer is held to twice that)
STREAM_READ = 256 * 1024  # bytes per body read of any other stream: aiohttp buffers twice the largest read asked of it, 512 KiB at least
FOLLOW_RCVBUF = 256 * 1024  # bytes (the kernel doubles it): ~25 MB/s at 20 ms round trip


def _hold_back(body: Any) -> Any:
    """Gives a streamed body's connection a small receive buffer (no autotuning): a stream that
    waits for its reader then holds back the server within about that much, and a stream the
    reader abandons has had little more than that sent for nothing (the kernel would otherwise
    grow the buffer to many MiB on a fast link, all of it sent, none of it read). Returns the
    connection's transport, to be closed after the stream, or None if the socket is not
    reachable (the stream then works as any other)."""
    try:
        response = body._raw_stream
        transport = response.connection.transport
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FOLLOW_RCVBUF)
    except (AttributeError, OSError):
        return None
    # aiohttp stops reading the socket once its buffer passes twice its low-water mark, 256 KiB
    # by default for the whole session (aiobotocore passes no `read_bufsize`), and reading only
    # raises the mark: lowered here, for this response only, to the piece a gated stream reads.
    content = getattr(response, "content", None)
    if hasattr(content, "_low_water") and hasattr(content, "_high_water"):
        content._low_water, content._high_water = GATED_READ, 2 * GATED_READ
    return transport


def make_s3_filesystem(
    options: dict[str, Any], credentials: dict[str, str], endpoint: str | None, region: str | None, *, retries: int = 3
) -> Any:
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if region or options.get("region"):
        client_kwargs["region_name"] = options.get("region") or region
    kwargs: dict[str, Any] = dict(
        anon=bool(options.get("anonymous")),
        endpoint_url=options.get("endpoint_url") or endpoint,
        client_kwargs=client_kwargs,
        skip_instance_cache=True,
        use_listings_cache=False,
        # botocore does not retry on its own: s3fs's retry loop (`retries`, with backoff) is the
        # one place that does, and the mount's deadline bounds it.
        config_kwargs={"max_pool_connections": 32, "connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 1, "mode": "standard"}},
    )
    if options.get("requester_pays"):
        kwargs["requester_pays"] = True
    if not kwargs["anon"]:
        if credentials.get("access_key_id"):
            kwargs["key"] = credentials["access_key_id"]
            kwargs["secret"] = credentials.get("secret_access_key")
            if credentials.get("session_token"):
                kwargs["token"] = credentials["session_token"]
    import aiobotocore.session

    session = aiobotocore.session.AioSession()
    session.get_component("event_emitter").register_last("before-call.s3", _small_bodies_at_once)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)
    fs = s3fs.S3FileSystem(session=session, **kwargs)
    fs.retries = retries
    _count_s3fs_retries()
    _quick_plain_results()
    return fs


_PLAIN = frozenset({type(None), bool, int, float, str, bytes, dict, list, tuple})


async def _resolve_plain_quickly(obj: Any) -> Any:
    """aiobotocore's `resolve_awaitable` with a fast path: a plain value (most event handlers
    return None) is returned without `inspect.isawaitable`, whose ABC check ran ~130 times per
    request. Same result for every input."""
    if type(obj) in _PLAIN:
        return obj
    if inspect.isawaitable(obj):
        return await obj
    return obj


def _quick_plain_results() -> None:
    """Puts `_resolve_plain_quickly` in place of aiobotocore's `resolve_awaitable` in the modules
    that imported it (where a module no longer has it, nothing changes). A PUT of 2 KiB to a
    local S3 server: 1.11-1.35 ms of client CPU against 1.19-1.73 ms, side by side."""
    import importlib

    for name in ("hooks", "context", "parsers", "regions", "retryhandler", "httpchecksum", "retries.standard", "credentials"):
        try:
            module = importlib.import_module(f"aiobotocore.{name}")
        except ImportError:
            continue
        if getattr(module, "resolve_awaitable", None) is not None and module.resolve_awaitable is not _resolve_plain_quickly:
            module.resolve_awaitable = _resolve_plain_quickly


def fast_timestamp(value: Any) -> Any:
    """botocore's timestamp parser for the two forms S3 sends, an HTTP date in headers
    (Last-Modified) and ISO 8601 in listings, without dateutil, which took a sixth of a small
    GET's CPU in the worker (py-spy); anything else goes to botocore's own parser."""
    if isinstance(value, str):
        try:
            if value.endswith(" GMT"):
                parsed = email.utils.parsedate_to_datetime(value)
            else:
                parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
        except (TypeError, ValueError, IndexError):
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def _small_bodies_at_once(params: dict[str, Any], **_: Any) -> None:
    """botocore asks for `100 Continue` before sending any body (it turns bytes into a file
    object first): a round trip more per PUT, which for a small body costs more than sending
    it. A body up to INLINE_READ goes at once; a larger one still waits for the go-ahead (a
    refusal, e.g. a failed precondition, then costs no body)."""
    headers = params.get("headers") or {}
    if "Expect" in headers:
        from botocore.utils import determine_content_length

        size = determine_content_length(params.get("body"))
        if size is not None and size <= INLINE_READ:
            del headers["Expect"]
