"""An in-memory object store for the filesystem-core tests (no server, no kernel)."""

from __future__ import annotations

import hashlib
import time

import trio

from sidecar.errors import BackendUnavailable, NotFound, ObjectChanged
from sidecar.store.base import Buffer, DirInfo, Listing, ObjectInfo, StoreStats, block_pieces


class MemoryStore:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.objects: dict[str, tuple[bytes, ObjectInfo]] = {}
        self.stats = StoreStats()
        self.fail = False  # when set, every call raises BackendUnavailable
        self.delay = 0.0  # seconds each call sleeps (to test deadlines and single flight)
        self.streams = True  # get_blocks honours a gate (as S3's streamed body does)
        self.moves_folders = False
        self.mtime_by_copy = False  # a test may set it: mtimes are then deferred and carried by renames
        self.deletes_in_batches = False  # a test may set it: renames then leave their deletes to a batch

    def put(self, key: str, data: bytes, mtime: float | None = None) -> ObjectInfo:
        etag = hashlib.md5(data + key.encode()).hexdigest()
        info = ObjectInfo(key, len(data), etag, mtime if mtime is not None else time.time())
        self.objects[key] = (data, info)
        return info

    def remove(self, key: str) -> None:
        """Deletes an object behind the file system's back (a remote change)."""
        del self.objects[key]

    async def _call(self) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail:
            self.stats.errors += 1
            raise BackendUnavailable("memory store is down")

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        await self._call()
        self.stats.list_requests += 1
        base = f"{prefix}/" if prefix else ""
        out = Listing()
        dirs: set[str] = set()
        for key, (_, info) in sorted(self.objects.items()):
            if not key.startswith(base):
                continue
            rest = key[len(base) :]
            if "/" in rest:
                dirs.add(base + rest.split("/", 1)[0])
            elif rest == "":
                out.markers.append(key)
            else:
                out.files.append(info)
        out.dirs = sorted(dirs)
        if max_entries is not None and len(out.files) + len(out.dirs) + len(out.markers) > max_entries:
            out.files, out.complete = out.files[:max_entries], False
        return out

    async def stat(self, key: str, *, folder_first: bool = False) -> ObjectInfo | DirInfo | None:
        await self._call()
        self.stats.head_requests += 1
        if folder_first and any(k.startswith(key + "/") for k in self.objects):
            return DirInfo(key)
        if key in self.objects:
            return self.objects[key][1]
        if any(k.startswith(key + "/") for k in self.objects):
            return DirInfo(key)
        return None

    async def _opened(self, key: str, etag: str) -> bytes:
        """The bytes of `key` at version `etag`, for one GET (counted)."""
        await self._call()
        if key not in self.objects:
            raise NotFound(key)
        data, info = self.objects[key]
        if info.etag != etag:
            raise ObjectChanged(key)
        self.stats.get_requests += 1
        return data

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        chunk = (await self._opened(key, etag))[start:end]
        self.stats.bytes_fetched += len(chunk)
        return chunk

    fills_buffers = True  # as S3Store: whole blocks in (recycled) Buffers

    async def get_blocks(self, key, start, end, etag, block_size, on_block, object_size=None, gate=None, buffers=None) -> None:
        """Block by block, as a streamed body is read: with a `gate`, a block not allowed yet is
        waited for, and what is never read is never counted as fetched. With `buffers`, as
        S3Store's: whole blocks in `Buffer`s, recycled ones where `buffers(i)` gives one."""
        data = await self._opened(key, etag)
        for i, lo, hi in block_pieces(start, end, block_size):
            if gate is not None and i >= gate.allowed and not await gate.wait_trio(i):
                return
            chunk: bytes | Buffer = data[lo:hi]
            if buffers is not None and hi - lo == block_size:
                buffer = buffers(i)
                if buffer is None or len(buffer) != block_size:
                    buffer = Buffer.new(block_size)
                buffer[:] = chunk
                chunk = buffer
            self.stats.bytes_fetched += len(chunk)
            on_block(i, chunk)

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        await self._call()
        if key not in self.objects or self.objects[key][1].etag != etag:
            raise ObjectChanged(key)
        self.stats.put_requests += 1  # a server-side copy onto itself
        return self.put(key, self.objects[key][0], mtime=mtime)

    async def put_file(self, key: str, path: str, size: int, *, expected=..., reuse=(), mtime=None) -> ObjectInfo:
        await self._call()
        current = self.objects.get(key)
        if expected is not ... and (current[1].etag if current else None) != expected:
            raise ObjectChanged(key)
        with open(path, "rb") as f:
            data = f.read(size)
        self.stats.put_requests += 1
        # Reused ranges are "copied server-side": checked against the old bytes, not sent.
        reused = 0
        for lo, hi in reuse:
            assert current is not None and current[0][lo:hi] == data[lo:hi], "a reused range differs from the base"
            reused += hi - lo
        self.stats.bytes_stored += len(data) - reused
        return self.put(key, data, mtime=mtime)

    async def delete(self, key: str) -> None:
        await self._call()
        self.stats.delete_requests += 1
        self.objects.pop(key, None)

    async def delete_many(self, items: list[tuple[str, str | None]]) -> dict[str, str]:
        """One call for all, each conditional on its etag (as S3's conditional DeleteObjects)."""
        await self._call()
        self.stats.delete_requests += 1
        refused = {}
        for key, etag in items:
            held = self.objects.get(key)
            if held is not None and etag and held[1].etag != etag:
                refused[key] = "changed"
            else:
                self.objects.pop(key, None)
        return refused

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo:
        await self._call()
        if src not in self.objects:
            raise NotFound(src)
        return self.put(dst, self.objects[src][0])

    async def rename(self, src: str, dst: str, size: int | None = None, *, mtime: float | None = None) -> ObjectInfo:
        info = await self.copy(src, dst, size)
        await self.delete(src)
        if mtime is not None:
            info = self.put(dst, self.objects[dst][0], mtime=mtime)
        return info

    async def put_marker(self, key: str) -> None:
        await self._call()
        self.put(key.rstrip("/") + "/", b"")

    async def warm_up(self) -> None:
        pass

    async def close(self) -> None:
        pass
