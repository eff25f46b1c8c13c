"""S3 through s3fs and aiobotocore: listings page by page, ranged GETs conditional on the etag
and streamed block by block as the reader's gate allows, uploads with their precondition in the
request (single PUT or multipart, unchanged parts copied in place), and the rehearsal that
warms the SDK's per-operation state without a request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from sidecar.errors import NotFound, ObjectChanged
from sidecar.log import get_logger
from sidecar.store.base import Buffer, DirInfo, Gate, Listing, ObjectInfo, StoreStats
from sidecar.store.bridge import BODY_RETRIES, COMPLETE_RATE, Progress, body_errors, run_on_loop
from sidecar.store.classify import PROBE_BODY, probe_name, reason_of
from sidecar.store.fsspec_store import FsspecStore, _mtime, _mtime_text, _user_mtime, run_write_probe
from sidecar.store.ledger import UploadLedger
from sidecar.store.s3get import LeanGets
from sidecar.store.patches import INLINE_BODY, count_s3fs_retries, fast_timestamp, quick_200_check, quick_plain_results, retry_attempts, small_bodies_at_once


log = get_logger(__name__)

MULTIPART_THRESHOLD = 16 << 20


PART_SIZE = 16 << 20




REUSE_PART_SIZE = 8 << 20  # finer parts when unchanged ranges can be copied: less is sent again


UPLOAD_CONCURRENCY = 8
DELETE_BATCH = 1000  # keys per DeleteObjects, S3's limit


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
        done: dict[str, int] = {"copied": 0}

        async def upload() -> str:
            if size <= MULTIPART_THRESHOLD:
                return await self._put_single(key, path, size, cond, meta, progress)
            return await self._put_multipart(key, path, size, cond, meta, progress, expected, reuse, done)

        etag = await self._run(f"write {key}", upload, progress=progress)  # type: ignore[attr-defined]
        self.stats.put_requests += 1
        self.stats.bytes_stored += size - done["copied"]
        self.stats.bytes_copied += done["copied"]
        return ObjectInfo(key, size, str(etag).strip('"'), mtime if mtime is not None else time.time())

    async def _put_single(self, key: str, path: str, size: int, cond: dict[str, str], meta: dict[str, Any], progress: Progress) -> str:
        """One PutObject (runs on fsspec's loop)."""
        if size <= INLINE_BODY:  # from the page cache: cheaper than a hop to a thread and back
            data = _read_part(path, 0, size)
        else:
            data = await asyncio.get_running_loop().run_in_executor(None, _read_part, path, 0, size)
        try:
            resp = await self.fs._call_s3("put_object", Bucket=self.bucket, Key=key, Body=_ProgressBody(data, progress), **cond, **meta)
        except Exception as exc:
            if reason_of(exc) != "object_changed":
                raise
            # The SDK may have sent this PUT twice: the first stored it and its answer was
            # lost (a reset, a 503 from a proxy). The precondition then meets our own
            # object. Its etag (the MD5 of a plain PUT's bytes) tells ours from another
            # writer's; anything else stays a conflict.
            head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
            if head.get("ETag", "").strip('"') != hashlib.md5(data, usedforsecurity=False).hexdigest():
                raise
            return str(head["ETag"])
        return str(resp["ETag"])

    async def _put_multipart(self, key: str, path: str, size: int, cond: dict[str, str], meta: dict[str, Any], progress: Progress,
                             expected: Any, reuse: Any, done: dict[str, int]) -> str:
        """A multipart upload (runs on fsspec's loop), recorded in the ledger while it is open
        and aborted if it fails; `done["copied"]` counts the bytes of parts copied in place."""
        part_size = max(REUSE_PART_SIZE if reuse else PART_SIZE, -(-size // 9000))
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

        async def part(number: int, offset: int) -> dict[str, Any]:
            length = min(part_size, size - offset)
            async with gate:
                if any(a <= offset and offset + length <= b for a, b in reuse):
                    resp = await self.fs._call_s3(
                        "upload_part_copy", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": key}, CopySourceRange=f"bytes={offset}-{offset + length - 1}",
                        CopySourceIfMatch=f'"{expected}"',
                    )
                    done["copied"] += length
                    etag = resp["CopyPartResult"]["ETag"]
                else:
                    data = await asyncio.get_running_loop().run_in_executor(None, _read_part, path, offset, length)
                    resp = await self.fs._call_s3("upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                  Body=_ProgressBody(data, progress))
                    etag = resp["ETag"]
                progress.tick()
                return {"PartNumber": number, "ETag": etag}

        try:
            parts = await asyncio.gather(*(part(i + 1, off) for i, off in enumerate(range(0, size, part_size))))
            # The server assembles the object before it answers (S3: up to minutes for a large
            # one), with nothing to report meanwhile.
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
        return await self._shown_etag(key, str(resp["ETag"]), size)

    async def _shown_etag(self, key: str, answered: str, size: int) -> str:
        """The ETag the server shows for the object a multipart upload just completed. S3 shows
        the one CompleteMultipartUpload answered; servers that keep objects as files (`rclone
        serve s3`, gateways) answer a multipart ETag and show the file's MD5 afterwards, so the
        mount's next conditional write (If-Match) would conflict with its own object. One HEAD
        per multipart upload (at least 16 MiB sent) costs little beside it."""
        try:
            head = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
        except Exception:
            return answered  # stored all the same; a later replacement may report a conflict
        shown = str(head.get("ETag", answered))
        if shown.strip('"') != answered.strip('"') and head.get("ContentLength") == size:
            log.info("server_shows_another_etag", key=key, answered=answered.strip('"'), shown=shown.strip('"'))
            return shown
        return answered

    async def delete(self, key: str) -> None:
        self.stats.delete_requests += 1
        await self._run(f"delete {key}", lambda: self.fs._call_s3("delete_object", Bucket=self.bucket, Key=key))  # type: ignore[attr-defined]

    deletes_in_batches = True

    async def delete_many(self, items: list[tuple[str, str | None]]) -> dict[str, str]:
        """DeleteObjects, DELETE_BATCH keys a request. Each key carries its etag: S3 deletes it
        only at that version (a conditional delete; servers that do not know the condition,
        such as moto and rclone's, delete whatever is there)."""
        refused: dict[str, str] = {}
        for i in range(0, len(items), DELETE_BATCH):
            chunk = items[i : i + DELETE_BATCH]
            objects = [{"Key": key, **({"ETag": f'"{etag}"'} if etag else {})} for key, etag in chunk]

            async def delete_objects(objects: list[dict[str, str]] = objects) -> Any:
                return await self.fs._call_s3("delete_objects", Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})  # type: ignore[attr-defined]

            self.stats.delete_requests += 1
            resp = await self._run(f"delete {len(chunk)} objects", delete_objects)  # type: ignore[attr-defined]
            for err in resp.get("Errors", []):
                code = str(err.get("Code", ""))
                if code != "NoSuchKey":
                    refused[str(err.get("Key", ""))] = "changed" if code in ("PreconditionFailed", "ConditionalRequestConflict") else code or "failed"
        return refused

    async def copy(self, src: str, dst: str, size: int | None = None, *, mtime: float | None = None) -> ObjectInfo:
        """A server-side CopyObject (metadata, mtime included, copied too; with `mtime`, the
        copy's `mtime` metadata is that); its answer carries the new etag, so no HEAD follows.
        Objects of 5 GiB or more (or of unknown size) are copied in parts by s3fs."""
        if size is None or size >= 5 << 30:
            info: ObjectInfo = await super().copy(src, dst)  # type: ignore[misc]
            if mtime is not None:
                info = await self.set_mtime(dst, info.etag, mtime) or info  # type: ignore[attr-defined]
            return info
        meta = {"MetadataDirective": "REPLACE", "Metadata": {"mtime": _mtime_text(mtime)}} if mtime is not None else {}

        async def copy_object() -> Any:
            return await self.fs._call_s3("copy_object", Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src}, **meta)

        resp = await self._run(f"copy {src}", copy_object)  # type: ignore[attr-defined]
        self.stats.put_requests += 1
        etag = str(resp.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
        return ObjectInfo(dst, size, etag, mtime if mtime is not None else time.time())

    async def put_marker(self, key: str) -> None:
        marker = key.rstrip("/") + "/"
        await self._run(f"mkdir {key}", lambda: self.fs._call_s3("put_object", Bucket=self.bucket, Key=marker, Body=b""))  # type: ignore[attr-defined]


class S3Store(_S3Writes, FsspecStore):
    """S3 through s3fs: LIST with delimiter page by page, and ranged GETs conditional on the etag
    (`If-Match`), so a block fetched after the object changed fails with ObjectChanged instead of
    mixing old and new bytes."""

    mtime_by_copy = True  # set_mtime is a CopyObject of the object onto itself

    streams = True  # get_blocks reads the body block by block, as its gate allows

    @functools.cached_property
    def _lean(self) -> LeanGets:
        return LeanGets(self.fs, self.bucket)

    async def close(self) -> None:
        if "_lean" in self.__dict__:
            await run_on_loop(self.fs.loop, self._lean.close)

    async def warm_up(self) -> None:
        await super().warm_up()
        await run_on_loop(self.fs.loop, self._lean.prepare)
        client = getattr(self.fs, "_s3", None)
        if client is not None:  # botocore's own retries (503 SlowDown, resets) are invisible to s3fs
            client.meta.events.register("after-call.s3", self._count_resent, unique_id=f"sidecar-resent-{id(self)}")

    def _count_resent(self, parsed: Any = None, **_: Any) -> None:
        self._resent += retry_attempts(parsed)

    @contextlib.asynccontextmanager
    async def rehearsal(self) -> AsyncIterator[None]:
        """Within it, requests for REHEARSAL_KEY are answered inside the SDK (a handler on the
        client's `before-send` event: zeros, as many as the Range asks; a HEAD answers the
        size): no request is sent. The store's counters are reset after it. The worker rehearses
        a first read and a stat with it (`worker.rehearse_read`): botocore builds its state for
        an operation on the operation's first call (event-name aliases and handler lookups,
        shapes, serializer, parser), which the session's first read after start would pay."""
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

    async def probe(self, prefix: str, *, writable: bool, write_probe: bool, max_entries: int) -> Listing | None:
        """The pre-flight check's calls (sidecar.preflight), raw, with one try (the check reports
        what it finds, it does not insist): one LIST page of the folder `prefix` and, for a
        writable storage, a probe object written and deleted (WriteDenied if that is refused).
        Returns the folder's listing when that page held all of it."""
        key_prefix = f"{prefix}/" if prefix else ""

        async def listing() -> Any:
            return await self.fs._call_s3("list_objects_v2", Bucket=self.bucket, Prefix=key_prefix, Delimiter="/", MaxKeys=max_entries)

        async def probe() -> None:
            key = key_prefix + probe_name()
            await self.fs._call_s3("put_object", Bucket=self.bucket, Key=key, Body=PROBE_BODY)
            await self.fs._call_s3("delete_object", Bucket=self.bucket, Key=key)

        retries, self.fs.retries = self.fs.retries, 1
        try:
            page = await run_on_loop(self.fs.loop, listing)
            if writable and write_probe:
                await run_write_probe(self.fs.loop, probe)
        finally:
            self.fs.retries = retries
        if page.get("IsTruncated"):
            return None
        out = Listing(dirs=[p["Prefix"][:-1] for p in page.get("CommonPrefixes", [])])
        for c in page.get("Contents", []):
            if c["Key"].endswith("/") or c["Key"] == key_prefix:
                out.markers.append(c["Key"])
            else:
                out.files.append(ObjectInfo(c["Key"], int(c.get("Size") or 0), str(c.get("ETag", "")).strip('"'), _mtime(c.get("LastModified"))))
        return out

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        key_prefix = f"{prefix}/" if prefix else ""
        complete = True

        progress = Progress()

        async def collect() -> list[dict[str, Any]]:
            nonlocal complete
            out = []
            async for d in self.fs._iterdir(self.bucket, prefix=key_prefix):
                out.append(d)
                if not len(out) % 1000:
                    progress.tick()  # a page: a long listing fails only when a page does not come
                if max_entries is not None and len(out) > max_entries:
                    complete = False
                    break
            return out

        entries = await self._run(f"list {prefix or '/'}", collect, progress=progress)
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
        if key != REHEARSAL_KEY:  # (the rehearsal's GETs are answered inside the SDK)
            body = await self._lean.open(key, start, end, etag)
            if body is not None:
                return body
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"')
        return resp["Body"]

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        broken = body_errors()

        async def fetch() -> bytes:
            for attempt in range(BODY_RETRIES + 1):
                body = await self._open_body(key, start, end, etag)
                try:
                    return await body.read()
                except broken:
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

    fills_buffers = True  # get_blocks takes `buffers` (sidecar.cache.memory: recycled buffers)

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: Callable[[int, bytes], None], object_size: int | None = None,
        gate: Gate | None = None, buffers: Callable[[int], Buffer | bytearray | None] | None = None,
    ) -> None:
        """As the protocol's. With `buffers`, each whole block is read into a `Buffer` of its
        own, which the cache may recycle (sidecar.cache.memory): `buffers(i)`, one recycled for
        block i (its pages in place), or None (a new one)."""
        token = trio.lowlevel.current_trio_token()
        stats = self.stats
        progress = Progress()
        broken = body_errors()

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
                        buffer = None
                        if buffers is not None and want == block_size:
                            buffer = buffers(index)
                            if buffer is None or len(buffer) != want:
                                buffer = Buffer.new(want)
                        if buffer is not None:
                            filled = await _read_into(body, buffer, piece, progress)
                            data: bytes | bytearray | Buffer = buffer
                        else:
                            chunks, filled = [], 0
                            while filled < want:
                                chunk = await body.read(min(want - filled, piece))
                                if not chunk:
                                    break
                                chunks.append(chunk)
                                filled += len(chunk)
                                progress.tick()
                            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                        if filled < want:  # the stream ended early: the cache fails what is missing
                            return
                        token.run_sync_soon(deliver, index, data)
                        index, pos = index + 1, pos + want
                except broken:
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


async def _read_into(body: Any, buffer: Buffer | bytearray, piece: int, progress: Progress) -> int:
    """Reads the body into `buffer` until it is full or the body ends; the bytes read."""
    fill = getattr(body, "fill", None)
    if fill is not None:  # received in place (sidecar.store.httpbody)
        return await fill(buffer, progress.tick)
    view, filled, want = memoryview(buffer), 0, len(buffer)
    try:
        while filled < want:
            chunk = await body.read(min(want - filled, piece))
            if not chunk:
                break
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            progress.tick()
    finally:
        view.release()  # (a view left alive would keep the buffer from being recycled)
    return filled


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
    hold = getattr(body, "hold_back", None)
    if hold is not None:  # (sidecar.store.httpbody: its `close` then drops the connection)
        hold(FOLLOW_RCVBUF)
        return None
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
    session.get_component("event_emitter").register_last("before-call.s3", small_bodies_at_once)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)
    quick_200_check(session)
    fs = s3fs.S3FileSystem(session=session, **kwargs)
    fs.retries = retries
    count_s3fs_retries()
    quick_plain_results()
    return fs
