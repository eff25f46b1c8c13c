"""Copy mode: a storage (or a folder of it) downloaded into its mount path as ordinary files.

For tools that need a real local file system, small reference data, or repeated random access.
Runs in the mount's worker process instead of a FUSE mount (`mode: copy`).

- Plan: every object under the storage's folder is listed; a copy larger than its limit is
  refused before anything is downloaded, with both sizes in the reason.
- Download: objects in parallel (COPY_FILES at a time), each large one as parallel ranged GETs
  (the block cache's fetch size, FETCH_PARALLEL in flight), into `.NAME.sidecar-partial` files
  renamed into place once complete and verified (size; and the MD5 where the etag is one).
- Resume: `.storage-sidecar-copy.json` in the mount path records each finished file with its
  etag, size and the local mtime it was given; a restarted copy skips those whose local file is
  unchanged, and downloads only what is missing.
- Writes to the copied folder stay local (status says so); `storage-sidecar push NAME` uploads
  files that are new or changed since the copy, if the storage is writable.
Errors are per file (reason codes), never the end of the copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from sidecar.errors import BackendUnavailable, SidecarError
from sidecar.log import get_logger
from sidecar.store.base import ObjectInfo, ObjectStore
from sidecar.vfs.listings import unusable_name

log = get_logger(__name__)

STATE_FILE = ".storage-sidecar-copy.json"
COPY_FILES = 16  # files downloaded at once (each a connection of its own: object stores scale so)
FETCH_PARALLEL = 8
FILE_ATTEMPTS = 3  # per file, for transient backend errors


class CopyRefused(Exception):
    pass


@dataclass
class CopyProgress:
    state: str = "planning"  # planning, copying, copied, failed
    files_total: int = 0
    files_done: int = 0
    files_skipped: int = 0  # already complete from an earlier run
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_downloaded: int = 0
    retries: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    note: str = "writes to this folder stay local; `storage-sidecar push` uploads them"

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__, errors=self.errors[-20:])


class Copier:
    def __init__(self, store: ObjectStore, prefix: str, dest: str | os.PathLike[str], *, limit: int, fetch_size: int = 8 << 20) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.dest = Path(dest)
        self.limit = limit
        self.fetch_size = fetch_size
        self.progress = CopyProgress()
        self._state: dict[str, dict[str, Any]] = {}

    # -- the record of finished files --------------------------------------------------------

    def _load_state(self) -> None:
        try:
            doc = json.loads((self.dest / STATE_FILE).read_text())
            self._state = doc.get("files", {}) if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            self._state = {}

    def _save_state(self) -> None:
        tmp = self.dest / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"prefix": self.prefix, "files": self._state}))
        os.replace(tmp, self.dest / STATE_FILE)

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def _complete(self, rel: str, info: ObjectInfo) -> bool:
        rec = self._state.get(rel)
        if not rec or rec.get("etag") != info.etag or rec.get("size") != info.size:
            return False
        try:
            st = os.stat(self.dest / rel)
        except OSError:
            return False
        return st.st_size == info.size and abs(st.st_mtime - rec.get("mtime", -1)) < 1e-3

    # -- plan ----------------------------------------------------------------------------------

    async def plan(self) -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        todo = [self.prefix]
        while todo:
            listing = await self.store.list_dir(todo.pop())
            found += listing.files
            todo += listing.dirs
        usable = []
        for info in found:
            rel = self._rel(info.key)
            parts = rel.split("/")
            if any(unusable_name(p) for p in parts):
                self.progress.errors.append({"key": info.key, "code": "unusable_name", "reason": "the key cannot be a local path"})
                continue
            usable.append(info)
        return usable

    # -- copy ------------------------------------------------------------------------------------

    async def run(self) -> CopyProgress:
        p = self.progress
        self.dest.mkdir(parents=True, exist_ok=True)
        self._load_state()
        objects = await self.plan()
        p.files_total, p.bytes_total = len(objects), sum(o.size for o in objects)
        if p.bytes_total > self.limit:
            p.state = "failed"
            raise CopyRefused(f"the folder holds {p.bytes_total} bytes, more than the copy limit of {self.limit} bytes; "
                              "mount it instead, or raise the limit")
        p.state = "copying"
        log.info("copy_started", files=p.files_total, bytes=p.bytes_total, dest=str(self.dest))
        todo = []
        for info in objects:
            if self._complete(self._rel(info.key), info):
                p.files_done += 1
                p.files_skipped += 1
                p.bytes_done += info.size
            else:
                todo.append(info)
        limiter = trio.CapacityLimiter(COPY_FILES)
        async with trio.open_nursery() as nursery:
            for info in todo:
                nursery.start_soon(self._one, info, limiter)
        self._save_state()
        p.state = "copied" if not p.errors else "copied_with_errors"
        log.info("copy_done", files=p.files_done, downloaded=p.bytes_downloaded, errors=len(p.errors))
        return p

    async def _one(self, info: ObjectInfo, limiter: trio.CapacityLimiter) -> None:
        rel = self._rel(info.key)
        final = self.dest / rel
        partial = final.with_name(f".{final.name}.sidecar-partial")
        async with limiter:
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                for attempt in range(FILE_ATTEMPTS):
                    got = [0]  # this attempt's bytes, taken back from the progress if it fails
                    try:
                        md5 = await self._download(info, partial, got)
                        break
                    except BackendUnavailable:  # a timeout or a broken connection: try the file again
                        self.progress.bytes_done -= got[0]
                        self.progress.bytes_downloaded -= got[0]
                        if attempt == FILE_ATTEMPTS - 1:
                            raise
                        self.progress.retries += 1
                        await trio.sleep(0.5 * 2**attempt)
                if os.path.getsize(partial) != info.size:
                    raise OSError(f"got {os.path.getsize(partial)} of {info.size} bytes")
                if md5 is not None and len(info.etag) == 32 and "-" not in info.etag and md5 != info.etag:
                    raise OSError("the MD5 of the bytes is not the object's etag")
                os.replace(partial, final)
                mtime = info.mtime or os.stat(final).st_mtime
                os.utime(final, (mtime, mtime))
                self._state[rel] = {"etag": info.etag, "size": info.size, "mtime": os.stat(final).st_mtime}
                self.progress.files_done += 1
                if self.progress.files_done % 50 == 0:
                    self._save_state()
            except (SidecarError, OSError) as exc:
                code = exc.code if isinstance(exc, SidecarError) else "local_error"
                self.progress.errors.append({"key": info.key, "code": code, "reason": str(exc)[:300]})
                log.warning("copy_file_failed", key=info.key, code=code)
                try:
                    partial.unlink()
                except OSError:
                    pass

    async def _download(self, info: ObjectInfo, path: Path, got: list[int]) -> str | None:
        """Parallel ranged GETs into `path`; the MD5 of the bytes (small objects only)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if info.size <= self.fetch_size:
                data = await self.store.get_range(info.key, 0, info.size, info.etag) if info.size else b""

                def write_and_hash() -> str:  # off the event loop: both release the GIL, and other files keep flowing
                    os.pwrite(fd, data, 0)
                    return hashlib.md5(data).hexdigest()

                md5 = await trio.to_thread.run_sync(write_and_hash)
                self._count(len(data), got)
                return md5
            gate = trio.CapacityLimiter(FETCH_PARALLEL)

            async def part(lo: int) -> None:
                async with gate:
                    data = await self.store.get_range(info.key, lo, min(lo + self.fetch_size, info.size), info.etag)
                await trio.to_thread.run_sync(os.pwrite, fd, data, lo)
                self._count(len(data), got)

            async with trio.open_nursery() as nursery:
                for lo in range(0, info.size, self.fetch_size):
                    nursery.start_soon(part, lo)
            return None
        finally:
            os.close(fd)

    def _count(self, n: int, got: list[int]) -> None:
        got[0] += n
        self.progress.bytes_done += n
        self.progress.bytes_downloaded += n

    # -- push ------------------------------------------------------------------------------------

    async def push(self) -> dict[str, Any]:
        """Uploads files that are new or changed locally since they were copied."""
        self._load_state()
        sent, failed = [], []
        for root, dirs, files in os.walk(self.dest):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name == STATE_FILE or name.endswith(".sidecar-partial") or name.startswith(f"{STATE_FILE}."):
                    continue
                path = Path(root) / name
                rel = str(path.relative_to(self.dest))
                st = path.stat()
                rec = self._state.get(rel)
                if rec and rec.get("size") == st.st_size and abs(rec.get("mtime", -1) - st.st_mtime) < 1e-3:
                    continue  # as copied
                key = f"{self.prefix}/{rel}" if self.prefix else rel
                try:
                    info = await self.store.put_file(key, str(path), st.st_size, expected=rec.get("etag") if rec else None)
                    self._state[rel] = {"etag": info.etag, "size": st.st_size, "mtime": st.st_mtime}
                    sent.append(rel)
                except SidecarError as exc:
                    failed.append({"path": rel, "code": exc.code, "reason": str(exc)[:300]})
        self._save_state()
        return {"pushed": sent, "failed": failed}
