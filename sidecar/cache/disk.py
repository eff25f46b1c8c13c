"""Disk tier of the block cache: checksummed block files under a hard byte limit, LRU eviction.

Layout: `<dir>/<2 hex>/<sha256 hex>` per block, each file a 16-byte header
(magic, crc32 of the data, data length) followed by the data. A block is written to a temp file
in the same directory and renamed, so a reader never sees a half-written block; a block whose
checksum does not match is deleted and counted as corrupt (the caller refetches it).

Invariant: `used` (bytes of all block files, temp files included) never exceeds `limit`. Space is
reserved under `_lock` before a file is written, and eviction of least-recently-used blocks makes
the room. All methods are blocking (file I/O) and are called from worker threads; `_lock` guards
`_index` and `used` and is never held across file I/O except unlinks during eviction.

The index is rebuilt from the directory at start (ordered by access time), so a cache survives a
daemon restart and a block is reused while its object's etag still matches.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
import threading

try:  # the same CRC-32 values as zlib's, at tens of GiB/s instead of ~1-2 (checked by a test)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    from zlib import crc32
from collections import OrderedDict
from pathlib import Path

MAGIC = b"SSCB"
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.12 names it
MAP_MIN = 256 << 10  # blocks (and kept ranges) from this size are mapped; smaller ones are read
_HEADER = struct.Struct("<4sIQ")  # magic, crc32, length


def _mapped(fd: int, size: int) -> memoryview | None:
    """The block in file `fd`, mapped rather than read: the block is the page cache's pages
    themselves. A read copied it into fresh anonymous memory, which cost a page fault and a
    zeroed page per 4 KiB besides the copy (warm reads: 1.3-1.5 CPU-s per GiB before, 0.6-0.8
    after); the FUSE reply is written from the mapping. Safe because a block file is never
    written in place (a new block is a new file renamed over the name, eviction unlinks it),
    so a mapping holds its bytes while a view of it lives. The pages are populated here, in
    the disk thread, with MADV_POPULATE_READ: a disk read error is an OSError (the block is
    refetched), not a SIGBUS on the event loop. A page the kernel reclaims later and cannot
    read back would still be a SIGBUS; the daemon then restarts the mount."""
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        m.madvise(_POPULATE_READ)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14, the pages fault in on use
            m.close()
            raise
    data = _checked(m, size)
    if data is None:
        m.close()  # (no view of it is left)
    return data


def _checked(content: bytes | mmap.mmap, size: int) -> memoryview | None:
    """The data of a block file's `content` (`size` bytes) if its header and CRC hold."""
    magic, crc, length = _HEADER.unpack_from(content)
    data = memoryview(content)[_HEADER.size :]
    if magic == MAGIC and length == size - _HEADER.size and crc32(data) == crc:
        return data
    data.release()
    return None


def block_name(storage: str, key: str, etag: str, index: int, block_size: int) -> str:
    raw = f"{storage}\0{key}\0{etag}\0{index}\0{block_size}".encode()
    return hashlib.sha256(raw).hexdigest()


def range_name(storage: str, key: str, etag: str, start: int, end: int) -> str:
    """The name of an exact byte range kept for a random reader (never a block's name)."""
    raw = f"{storage}\0{key}\0{etag}\0range\0{start}\0{end}".encode()
    return hashlib.sha256(raw).hexdigest()


class DiskTier:
    def __init__(self, directory: str | os.PathLike[str], limit: int) -> None:
        self.dir = Path(directory)
        self.configured_limit = limit
        self.used = 0
        self.corrupt = 0
        self.evictions = 0
        self.errors = 0  # blocks that could not be read or written (the reader refetched them)
        self._index: OrderedDict[str, int] = OrderedDict()
        self._pending: set[str] = set()  # reserved, still being written
        self._lock = threading.Lock()
        # Cached blocks are the bucket's data: readable by the daemon's user only.
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self._load()
        # The effective limit: the flag, or what the file system can hold (free space plus what
        # the cache already uses), whichever is smaller, so a small disk is never filled.
        st = os.statvfs(self.dir)
        self.limit = min(limit, st.f_bavail * st.f_frsize + self.used)
        self._evict_locked(0)

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / name

    def _load(self) -> None:
        found: list[tuple[float, str, int]] = []
        self.limit = self.configured_limit
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith(".tmp"):
                    f.unlink(missing_ok=True)  # a write interrupted by a crash
                    continue
                st = f.stat()
                found.append((st.st_atime, f.name, st.st_size))
        found.sort()
        for _, name, size in found:
            self._index[name] = size
            self.used += size
        self._evict_locked(0)  # the limit may have been lowered since the last run

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        """Whether the block is on disk (written and not being written). A cheap index lookup."""
        with self._lock:
            return name in self._index and name not in self._pending

    def _evict_locked(self, need: int) -> bool:
        for name in list(self._index):
            if self.used + need <= self.limit:
                break
            if name in self._pending:
                continue
            size = self._index.pop(name)
            self._path(name).unlink(missing_ok=True)
            self.used -= size
            self.evictions += 1
        return self.used + need <= self.limit

    def get(self, name: str) -> bytes | memoryview | None:
        with self._lock:
            if name not in self._index or name in self._pending:
                return None
            self._index.move_to_end(name)
        data: bytes | memoryview | None = None
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:
            self._drop(name)
            return None
        try:
            size = os.fstat(fd).st_size
            if _HEADER.size <= size <= _HEADER.size + self.limit:
                if size >= MAP_MIN:
                    data = _mapped(fd, size)
                elif (small := _checked(os.pread(fd, size, 0), size)) is not None:
                    data = bytes(small)
        finally:
            os.close(fd)
        if data is not None:
            return data
        self.corrupt += 1
        self._drop(name)
        return None

    def _drop(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self.used -= size
                self._path(name).unlink(missing_ok=True)

    def put(self, name: str, data: bytes) -> bool:
        size = _HEADER.size + len(data)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return True
            if size > self.limit or not self._evict_locked(size):
                return False
            # Reserve before writing: concurrent writers can never push usage past the limit.
            self._index[name] = size
            self._pending.add(name)
            self.used += size
        path = self._path(name)
        tmp = path.parent / f".tmp{threading.get_ident()}-{name}"
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(_HEADER.pack(MAGIC, crc32(data), len(data)))
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._pending.discard(name)
            self._drop(name)
            return False
        with self._lock:
            self._pending.discard(name)
        return True

    def disk_bytes(self) -> int:
        """Bytes actually on disk under the cache directory (for tests and status)."""
        return tree_bytes(self.dir)


def tree_bytes(directory: str | os.PathLike[str]) -> int:
    """Sizes of all files below `directory`; files that vanish meanwhile count as 0."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total
