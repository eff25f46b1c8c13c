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
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import trio

from sidecar.errors import AccessDenied, BackendTimeout, BackendUnavailable, NotFound, ObjectChanged, SidecarError
from sidecar.log import get_logger
from sidecar.store.base import DirInfo, Listing, ObjectInfo, StoreStats

T = TypeVar("T")
log = get_logger(__name__)


async def run_on_loop(loop: asyncio.AbstractEventLoop, coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Runs `coro_fn()` on an asyncio loop in another thread and waits for it from trio."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    async def wrapper() -> T:
        return await coro_fn()

    fut = asyncio.run_coroutine_threadsafe(wrapper(), loop)
    fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
    try:
        await done.wait()
    except BaseException:
        fut.cancel()
        raise
    return fut.result()


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


def translate(exc: BaseException, what: str) -> SidecarError:
    """Maps fsspec/botocore/aiohttp errors to domain errors. Messages carry no request details."""
    if isinstance(exc, SidecarError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return NotFound(what)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"access denied: {what}")
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
    """Counts the retries s3fs makes inside one call (it logs each at debug level) and drops
    those records, so the counter costs no log output."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith(("Retryable error", "Client error (maybe retryable)")):
            _RetryCounter.count += 1
        return False


def _count_s3fs_retries() -> None:
    s3fs_log = logging.getLogger("s3fs")
    if not any(isinstance(f, _RetryCounter) for f in s3fs_log.filters):
        s3fs_log.addFilter(_RetryCounter())
        s3fs_log.setLevel(logging.DEBUG)


class FsspecStore:
    """Generic store over an async fsspec file system; `root` is the bucket (or container)."""

    def __init__(self, fs: Any, bucket: str, name: str, deadline: float = 30.0) -> None:
        self.fs = fs
        self.bucket = bucket
        self.name = name
        self.deadline = deadline
        self.stats = StoreStats()

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

    async def _run(self, what: str, coro_fn: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        deadline = deadline or self.deadline
        started = trio.current_time()
        try:
            with trio.fail_after(deadline):
                return await run_on_loop(self.fs.loop, coro_fn)
        except trio.TooSlowError:
            self.stats.errors += 1
            raise BackendTimeout(f"{what}: no answer within {deadline:g} s") from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            err = translate(exc, what)
            if not isinstance(err, (NotFound, ObjectChanged)):
                self.stats.errors += 1
            raise err from None
        finally:
            took = trio.current_time() - started
            self.stats.calls += 1
            self.stats.latency_sum_s += took
            self.stats.latency_max_s = max(self.stats.latency_max_s, took)
            self.stats.retries = _RetryCounter.count

    def _object_info(self, d: dict[str, Any]) -> ObjectInfo:
        etag = d.get("ETag") or d.get("etag") or d.get("generation") or d.get("md5Hash") or ""
        mtime = d.get("LastModified") or d.get("last_modified") or d.get("mtime") or d.get("updated")
        return ObjectInfo(self._key(d["name"]), int(d.get("size") or 0), str(etag).strip('"'), _mtime(mtime))

    async def list_dir(self, prefix: str) -> Listing:
        self.stats.list_requests += 1
        entries = await self._run(f"list {prefix or '/'}", lambda: self.fs._ls(self._path(prefix), detail=True, refresh=True))
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

    async def stat(self, key: str) -> ObjectInfo | DirInfo | None:
        self.stats.head_requests += 1
        try:
            d = await self._run(f"stat {key}", lambda: self.fs._info(self._path(key), refresh=True))
        except NotFound:
            return None
        if d.get("type") == "directory":
            return DirInfo(key)
        return self._object_info(d)

    def _fetched(self, data: bytes) -> bytes:
        self.stats.get_requests += 1
        self.stats.bytes_fetched += len(data)
        return data

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        return self._fetched(await self._run(f"read {key}", lambda: self.fs._cat_file(self._path(key), start=start, end=end)))

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: Callable[[int, bytes], None], object_size: int | None = None
    ) -> None:
        # Generic fallback: one ranged read, then split. Stores that can stream override this.
        data = await self._get_range_sized(key, start, end, etag, object_size)
        for i, pos in enumerate(range(0, len(data), block_size)):
            on_block(i, data[pos : pos + block_size])

    async def _get_range_sized(self, key: str, start: int, end: int, etag: str, object_size: int | None) -> bytes:
        return await self.get_range(key, start, end, etag)

    async def put_file(self, key: str, path: str, size: int) -> ObjectInfo:
        await self._run(f"write {key}", lambda: self.fs._put_file(path, self._path(key)), deadline=self._upload_deadline(size))
        self.stats.put_requests += 1
        self.stats.bytes_stored += size
        info = await self.stat(key)
        if not isinstance(info, ObjectInfo):
            raise BackendUnavailable(f"write {key}: the object is not there after the upload")
        return info

    async def delete(self, key: str) -> None:
        self.stats.delete_requests += 1
        await self._run(f"delete {key}", lambda: self.fs._rm_file(self._path(key)))

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        await self._run(f"copy {src}", lambda: self.fs._cp_file(self._path(src), self._path(dst)))
        info = await self.stat(dst)
        if not isinstance(info, ObjectInfo):
            raise BackendUnavailable(f"copy {src}: the copy is not there")
        return info

    async def put_marker(self, key: str) -> None:
        await self._run(f"mkdir {key}", lambda: self.fs._pipe_file(self._path(key.rstrip("/")) + "/", b""))

    def _upload_deadline(self, size: int) -> float:
        # The deadline bounds each part's worth of time, not the whole of a large upload.
        return self.deadline * max(1, -(-size // (64 << 20)))

    async def close(self) -> None:
        pass


MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 16 << 20
UPLOAD_CONCURRENCY = 8


def _read_part(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class _S3Writes:
    """Uploads, deletes and copies of the S3 store (mixed into S3Store)."""

    fs: Any
    bucket: str
    stats: StoreStats

    async def put_file(self, key: str, path: str, size: int) -> ObjectInfo:
        async def single() -> str:
            data = await asyncio.get_running_loop().run_in_executor(None, _read_part, path, 0, size)
            resp = await self.fs._call_s3("put_object", Bucket=self.bucket, Key=key, Body=data)
            return resp["ETag"]

        async def multipart() -> str:
            loop = asyncio.get_running_loop()
            part_size = max(PART_SIZE, -(-size // 9000))
            mpu = await self.fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=key)
            upload_id = mpu["UploadId"]
            gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

            async def part(number: int, offset: int) -> dict[str, Any]:
                async with gate:
                    data = await loop.run_in_executor(None, _read_part, path, offset, min(part_size, size - offset))
                    resp = await self.fs._call_s3(
                        "upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                    )
                    return {"PartNumber": number, "ETag": resp["ETag"]}

            try:
                parts = await asyncio.gather(*(part(i + 1, off) for i, off in enumerate(range(0, size, part_size))))
                resp = await self.fs._call_s3(
                    "complete_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
                return resp["ETag"]
            except BaseException:
                try:
                    await self.fs._call_s3("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
                except Exception:
                    pass
                raise

        fn = multipart if size > MULTIPART_THRESHOLD else single
        etag = await self._run(f"write {key}", fn, deadline=self._upload_deadline(size))  # type: ignore[attr-defined]
        self.stats.put_requests += 1
        self.stats.bytes_stored += size
        return ObjectInfo(key, size, str(etag).strip('"'), time.time())

    async def delete(self, key: str) -> None:
        self.stats.delete_requests += 1
        await self._run(f"delete {key}", lambda: self.fs._call_s3("delete_object", Bucket=self.bucket, Key=key))  # type: ignore[attr-defined]

    async def put_marker(self, key: str) -> None:
        marker = key.rstrip("/") + "/"
        await self._run(f"mkdir {key}", lambda: self.fs._call_s3("put_object", Bucket=self.bucket, Key=marker, Body=b""))  # type: ignore[attr-defined]


class S3Store(_S3Writes, FsspecStore):
    """S3 through s3fs: LIST with delimiter page by page, and ranged GETs conditional on the etag
    (`If-Match`), so a block fetched after the object changed fails with ObjectChanged instead of
    mixing old and new bytes."""

    async def list_dir(self, prefix: str) -> Listing:
        self.stats.list_requests += 1
        key_prefix = f"{prefix}/" if prefix else ""

        async def collect() -> list[dict[str, Any]]:
            return [d async for d in self.fs._iterdir(self.bucket, prefix=key_prefix)]

        entries = await self._run(f"list {prefix or '/'}", collect)
        return self._to_listing(key_prefix, entries)

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        async def fetch() -> bytes:
            resp = await self.fs._call_s3(
                "get_object", Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"'
            )
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        if end <= start:
            return b""
        return self._fetched(await self._run(f"read {key}", fetch))

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: Callable[[int, bytes], None], object_size: int | None = None
    ) -> None:
        token = trio.lowlevel.current_trio_token()
        stats = self.stats

        def deliver(i: int, data: bytes) -> None:
            stats.bytes_fetched += len(data)
            on_block(i, data)

        async def stream() -> None:
            resp = await self.fs._call_s3(
                "get_object", Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"'
            )
            body = resp["Body"]
            try:
                # Each block is filled in place in a buffer of its exact size and handed over
                # as it is: no growing buffer, no second copy of 8 MiB per block.
                for index, pos in enumerate(range(start, end, block_size)):
                    buf = bytearray(min(block_size, end - pos))
                    with memoryview(buf) as view:
                        filled = 0
                        while filled < len(buf):
                            chunk = await body.read(len(buf) - filled)
                            if not chunk:
                                break
                            view[filled : filled + len(chunk)] = chunk
                            filled += len(chunk)
                    if filled < len(buf):  # the stream ended early: the cache fails what is missing
                        return
                    token.run_sync_soon(deliver, index, buf)
            finally:
                body.close()

        self.stats.get_requests += 1
        # The deadline covers the whole stream: the mount's deadline per block, at least one.
        blocks = max(1, -(-(end - start) // block_size))
        await self._run(f"read {key}", stream, deadline=self.deadline * blocks)


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
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = retries
    _count_s3fs_retries()
    return fs
