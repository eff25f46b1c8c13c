"""Disk tier of the block cache: checksummed block files under a hard byte limit, LRU eviction.

Layout: `<dir>/<2 hex>/<sha256 hex>.<crc32 hex>` per entry written alone (an exact range of a
random reader, a block), the file holding the data only: its checksum is in its name, so a 4 KiB
range is one page on disk (with a header in the file it was two pages, read for each such range
after a restart). A file is written to a temp file in the
same directory and renamed, so a reader never sees a half-written one; one whose checksum does
not match is deleted and counted as corrupt (the caller refetches it). Files of another format
(an earlier version's) are deleted at start.

Packs: entries written together that are not blocks of one object version (`put_many`) go into
one file, `<dir>/<2 hex>/pack-<first entry's name>`: a table page (PACK_MAGIC, count, then per
entry its name, offset and length) followed by each entry as a 16-byte header (magic, crc32 of
the data, data length) and its data, each at a page-aligned offset so it can be mapped alone.
One file instead of one per entry: the file system's per-file work (inode allocation, directory
entries, rename) was most of what writing the cache cost, far more than copying the bytes (on an
ext4 without a journal, allocating an inode scans recently deleted ones). A pack is written once
and renamed into place; it is evicted whole when its least recently used entry is, and an entry
dropped from it (corrupt) leaves the others until the last goes.

Segments: the blocks of an object version go into one file per `slots` blocks of it, as many
as the object has (at most a share of the disk limit, SEGMENT_SHARE, and SEGMENT_MAX when the
object's size is not told), `<dir>/<2 hex>/seg-<slot 0's name>-<slots>`: slot i holds block
`first + i` at offset i x slot size (the block size rounded up to pages), its data alone, written
in place as it arrives. So a segment of the whole object is the object's bytes at their own
offsets, a file the kernel can read in place of the mounted one (FUSE passthrough,
`sidecar.passthrough`), and after a restart a sequential reader reads one large file as it would a
local copy (files of 8 MiB, the packs these replaced for blocks, read back markedly slower once
the page cache was dropped: benchmarks/results/HISTORY.md). Data at a page boundary can also be
read with O_DIRECT straight into a block's buffer (`get` with `direct`): after a restart, when the
page cache does not hold a segment, a block read that way costs no page-cache page. Its table is
the file beside it, `<segment>.t` (SEG_MAGIC, slot count, slot size, then each slot's block name,
and its data's length and crc32 once written; read at start, one read per segment), so that
nothing but the object's bytes is in the segment. The segment file is created before its table
is renamed into place, and a slot's table entry is written after its data, so a crash leaves
slots whose table length or checksum does not hold, which are not indexed or are dropped when
read, or a segment without a table, deleted at start. A slot is written once (a block dropped as
corrupt is written again with the same bytes). A segment is evicted whole, never while a slot of
it is being written. An object of one block is not a segment but an entry written alone: its
file is the object's bytes too. (Segments with their table in front, SEG_MAGIC "SSC2", are
deleted at start as any file of another format.)

Invariant: `used` (bytes of all block files, temp files included) never exceeds `limit`. Space is
reserved under `_lock` before a file is written, and eviction of least-recently-used blocks makes
the room. All methods are blocking (file I/O) and are called from worker threads; `_lock` guards
`_index` and `used` and is never held across file I/O except unlinks during eviction.

The index is rebuilt from the directory at start (ordered by access time), so a cache survives a
daemon restart and a block is reused while its object's etag still matches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import itertools
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

import structlog

from sidecar.cache.memory import Buffer
from sidecar.cache.staging import staging

log = structlog.get_logger()

MAGIC = b"SSCB"
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.12 names it
MAP_MIN = 256 << 10  # blocks (and kept ranges) from this size are mapped; smaller ones are read
_HEADER = struct.Struct("<4sIQ")  # magic, crc32, length
PACK_PREFIX = "pack-"
PACK_MAGIC = b"SSCP"
_PACK = struct.Struct("<4sI")  # magic, number of blocks
_ENTRY = struct.Struct("<64sQQ")  # block name, offset of its header, its data's length
PAGE = mmap.ALLOCATIONGRANULARITY
PACK_MAX = (PAGE - _PACK.size) // _ENTRY.size  # blocks per pack (the table is one page)


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


EVICT_BATCH = 64  # index entries looked at per step of an eviction


SEG_PREFIX = "seg-"
SEG_MAGIC = b"SSC3"
SEG_TABLE = ".t"  # a segment's table file: its name and this
_SEG = struct.Struct("<4sIQ")  # magic, number of slots, bytes per slot
_SLOT = struct.Struct("<64sII")  # a slot's block name, its data's length and crc32 once written (length 0: not yet)
SEGMENT_MAX = 64  # blocks per segment when the object's size is not told
SEGMENT_SLOTS_MAX = 4096  # blocks per segment in any case
SEGMENT_SHARE = 8  # a segment holds at most this fraction of the disk limit


class _Pack:
    __slots__ = ("name", "size", "live", "writers", "counted", "ready")

    def __init__(self, name: str, size: int, live: set[str]) -> None:
        self.name, self.size = name, size  # its file's name and bytes
        self.live = live  # its blocks still indexed
        self.writers = 0  # threads writing slots of it (a segment): never evicted meanwhile
        self.counted: set[str] = set()  # a segment's slots whose bytes `size` counts
        self.ready: threading.Event | None = None  # a segment: set once its file exists


def segment_slots(limit: int, block_size: int, size: int | None) -> int:
    """Blocks per segment of an object of `size` bytes (None: not known) under a disk `limit`."""
    most = max(1, limit // (SEGMENT_SHARE * block_size))
    if size is None:
        return min(SEGMENT_MAX, most)
    return max(1, min(SEGMENT_SLOTS_MAX, most, -(-size // block_size)))


def segment_layout(slots: int, block_size: int) -> tuple[int, int]:
    """A segment's table bytes and bytes per slot."""
    return _segment_table(slots), _page_up(block_size)


def _segment_table(slots: int) -> int:
    return _page_up(_SEG.size + slots * _SLOT.size)


def _read_in(fd: int, size: int, offset: int) -> None:
    """Waits, with the GIL released, until a block's pages are in the page cache. CPython's
    `mmap.madvise` keeps the GIL while MADV_POPULATE_READ waits for the disk, so populating a
    block that is not in the page cache (a new mount after the page cache was dropped) stopped
    every other thread meanwhile, the event loop serving the mount included. A block whose
    last page is in the page cache is taken as read (a one-byte read that may not wait:
    RWF_NOWAIT). Otherwise the kernel is asked to read the whole block (WILLNEED: one request,
    in order) and a one-byte read of its last page waits for it (os.preadv releases the GIL);
    a page of it still on its way is then waited for by the mapping, briefly."""
    last = offset + size - 1
    try:
        os.preadv(fd, [_ONE_BYTE], last, os.RWF_NOWAIT)
        return
    except BlockingIOError:
        pass
    except OSError:  # a file system without RWF_NOWAIT
        pass
    try:
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        os.preadv(fd, [_ONE_BYTE], last)
    except OSError:
        pass  # the mapping's own read reports it


_ONE_BYTE = bytearray(1)


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # Linux 6.5, the same number on every architecture
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_cachestat_ok = True


def cached_pages(fd: int, offset: int, size: int) -> int | None:
    """How many pages of [offset, offset + size) of `fd` the page cache holds, asked without
    touching them: cachestat(2), else mincore(2) on a mapping never read; None where it cannot
    be told. (A one-byte read that may not wait, RWF_NOWAIT, answers too, but starts the
    read-ahead it finds missing: the device's whole read-ahead window, 8 MiB here, into the
    page cache.)"""
    global _cachestat_ok
    if _cachestat_ok:
        stat = _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CacheStatRange(offset, size)), ctypes.byref(stat), 0) == 0:
            return stat.nr_cache
        _cachestat_ok = False  # (ENOSYS: a kernel before 6.5)
    try:
        # (private and writable only for ctypes to take its address: never written, never read)
        m = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except (OSError, ValueError):
        return None
    try:
        vec = ctypes.create_string_buffer(-(-size // PAGE))
        view = ctypes.c_char.from_buffer(m)  # (its address; never read)
        try:
            if _libc.mincore(ctypes.addressof(view), size, vec) != 0:
                return None
        finally:
            del view
        return sum(b & 1 for b in vec.raw)
    finally:
        m.close()


def _resident(fd: int, offset: int, size: int) -> bool:
    """Whether the page cache holds every page of [offset, offset + size) of `fd`; True where
    it cannot be told."""
    pages = cached_pages(fd, offset, size)
    return pages is None or pages >= -(-size // PAGE)


def _read_direct(fd: int, offset: int, size: int, buffers: list[Buffer | None], crcs: list[int]) -> list[Buffer | None]:
    """Blocks of `size` bytes each, contiguous from `offset` in `fd` (opened with O_DIRECT: a
    file system that cannot read directly refuses that with EINVAL), read with one request into `buffers` (a new one where a buffer is not a `Buffer` of `size`
    bytes); each one whose checksum does not hold (or that came short) is None."""
    bufs = [b if type(b) is Buffer and len(b) == size else Buffer.new(size) for b in buffers]
    total = size * len(bufs)
    area = staging(total)  # (huge pages: the disk gets requests several times larger)
    if area is None:
        got = os.preadv(fd, bufs, offset)
    else:
        got = os.preadv(fd, [area[:total]], offset)
        for i, buf in enumerate(bufs):
            if got >= (i + 1) * size:
                buf[:] = area[i * size : (i + 1) * size]
    return [buf if got >= (i + 1) * size and crc32(buf) == crc else None for i, (buf, crc) in enumerate(zip(bufs, crcs))]


def _mapped(fd: int, size: int, offset: int = 0, crc: int | None = None) -> memoryview | None:
    """The block in file `fd`, mapped rather than read: the block is the page cache's pages
    themselves. A read copied it into fresh anonymous memory, which cost a page fault and a
    zeroed page per 4 KiB besides the copy (warm reads: 1.3-1.5 CPU-s per GiB before, 0.6-0.8
    after); the FUSE reply is written from the mapping. Safe because what a view maps is never
    written with other bytes (a file is renamed into place whole, eviction unlinks it; a
    segment's slot is written before it is indexed, or again with the same bytes), so a mapping
    holds its bytes while a view of it lives. The pages are populated here, in
    the disk thread, with MADV_POPULATE_READ: a disk read error is an OSError (the block is
    refetched), not a SIGBUS on the event loop. A page the kernel reclaims later and cannot
    read back would still be a SIGBUS; the daemon then restarts the mount."""
    _read_in(fd, size, offset)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)
    try:
        m.madvise(_POPULATE_READ)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14, the pages fault in on use
            m.close()
            raise
    data = _checked(m, size, crc)
    if data is None:
        m.close()  # (no view of it is left)
    return data


def _checked(content: bytes | mmap.mmap, size: int, crc: int | None = None) -> memoryview | None:
    """The data of an entry's `content` (`size` bytes) if it holds: with `crc` (a file written
    alone, its checksum in its name) the bytes themselves, else a header and the data."""
    if crc is not None:
        data = memoryview(content)
        ok = crc32(data) == crc
    else:
        magic, crc, length = _HEADER.unpack_from(content)
        data = memoryview(content)[_HEADER.size :]
        ok = magic == MAGIC and length == size - _HEADER.size and crc32(data) == crc
    if ok:
        return data
    data.release()
    return None


def block_name(storage: str, key: str, etag: str, index: int, block_size: int) -> str:
    raw = f"{storage}\0{key}\0{etag}\0{index}\0{block_size}".encode()
    return hashlib.sha256(raw).hexdigest()


RANGE_MARK = "r"  # the first letter of a kept range's name (a block's is a hex digit)
_OFFSET_DIGITS = 12  # hex digits of a range's start and of its length in its name


def version_tag(storage: str, key: str, etag: str) -> str:
    """What names one object version in the names of its kept ranges (39 hex digits)."""
    return hashlib.sha256(f"{storage}\0{key}\0{etag}\0range".encode()).hexdigest()[:39]


def range_name(storage: str, key: str, etag: str, start: int, end: int) -> str:
    """The name of an exact byte range kept for a random reader (never a block's name): the
    mark, the version's tag, the start and the length, so that a new mount over the disk
    cache learns from the names alone which ranges of a version it holds (`kept_ranges`)."""
    if 0 <= start < 16**_OFFSET_DIGITS and 0 < end - start < 16**_OFFSET_DIGITS:
        return f"{RANGE_MARK}{version_tag(storage, key, etag)}{start:012x}{end - start:012x}"
    raw = f"{storage}\0{key}\0{etag}\0range\0{start}\0{end}".encode()  # (found by its exact offsets only)
    return hashlib.sha256(raw).hexdigest()


def kept_ranges(tier: DiskTier, most: int) -> dict[str, list[tuple[int, int]]]:
    """The ranges the tier holds, by version tag, sorted by start: the `most` most recently
    used of them."""
    with tier._lock:
        names = [name for name in reversed(tier._index) if name[0] == RANGE_MARK]
    out: dict[str, list[tuple[int, int]]] = {}
    for name in names[:most]:
        start, size = int(name[40:52], 16), int(name[52:64], 16)
        out.setdefault(name[1:40], []).append((start, start + size))
    for spans in out.values():
        spans.sort()
    return out


class DiskTier:
    def __init__(self, directory: str | os.PathLike[str], limit: int) -> None:
        self.dir = Path(directory)
        self.configured_limit = limit
        self.used = 0
        self.corrupt = 0
        self.evictions = 0
        self.errors = 0  # blocks that could not be read or written (the reader refetched them)
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> bytes (0 for a packed block)
        self._pending: set[str] = set()  # reserved, still being written
        self._packed: dict[str, tuple[str, int, int]] = {}  # packed block -> (pack, offset, bytes)
        self._packs: dict[str, _Pack] = {}
        self._crc: dict[str, int] = {}  # an entry written alone (its checksum in its file's name), a segment's block -> its checksum
        self.direct_ok = True  # whether this file system reads with O_DIRECT (until EINVAL says not)
        self.direct_reads = 0  # blocks read with O_DIRECT
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
        """The file of a block, a pack or a segment (beside its first block's name)."""
        for prefix in (PACK_PREFIX, SEG_PREFIX):
            if name.startswith(prefix):
                return self.dir / name[len(prefix) : len(prefix) + 2] / name
        return self.dir / name[:2] / f"{name}.{self._crc.get(name, 0):08x}"

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
        segments = []
        for _, name, size in found:
            if name.startswith(PACK_PREFIX):
                self._load_pack(name, size)
            elif name.startswith(SEG_PREFIX):
                if name.endswith(SEG_TABLE):
                    load_segment(self, name[: -len(SEG_TABLE)])
                else:
                    segments.append(name)
            else:
                load_single(self, name, size)
        for name in segments:
            if name not in self._packs:  # (no table: created when a crash came, or of another format)
                self._path(name).unlink(missing_ok=True)
        self._evict_locked(0)  # the limit may have been lowered since the last run

    def _load_pack(self, pack: str, size: int) -> None:
        path = self._path(pack)
        try:
            with open(path, "rb") as f:
                table = f.read(PAGE)
            magic, count = _PACK.unpack_from(table)
            if magic != PACK_MAGIC or count > PACK_MAX:
                raise ValueError("not a pack")
            entries = [_ENTRY.unpack_from(table, _PACK.size + i * _ENTRY.size) for i in range(count)]
        except (OSError, ValueError, struct.error):
            path.unlink(missing_ok=True)  # not ours, or cut short: its blocks are fetched again
            return
        live = set()
        for raw, offset, length in entries:
            name = raw.decode("ascii", "replace")
            if name in self._index or offset % PAGE or offset + _HEADER.size + length > size:
                continue
            self._index[name] = 0
            self._packed[name] = (pack, offset, _HEADER.size + length)
            live.add(name)
        if live:
            self._packs[pack] = _Pack(pack, size, live)
            self.used += size
        else:
            path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        """Whether the block is on disk (written and not being written). A cheap index lookup."""
        with self._lock:
            return name in self._index and name not in self._pending

    def _evict_locked(self, need: int) -> bool:
        # The least recently used first, a few at a time: a copy of the whole index per call
        # (each write of a block makes one) held the GIL for a time that grew with the cache:
        # in a first epoch over 20,000 small files it was the disk threads' largest cost and
        # stalled the event loop with them. Entries passed over (being written) stay at the
        # front, so the next batch starts after them.
        skipped = 0
        while self.used + need > self.limit:
            batch = list(itertools.islice(self._index, skipped, skipped + EVICT_BATCH))
            if not batch:
                break
            for name in batch:
                if self.used + need <= self.limit:
                    break
                if name not in self._index:  # (a pack evicted before it)
                    continue
                self._evict_one_locked(name)
                skipped += name in self._index  # (being written: passed over)
        return self.used + need <= self.limit

    def _evict_one_locked(self, name: str) -> None:
        """Evicts `name` (with the rest of its pack) unless it is being written."""
        if name in self._pending:
            return
        where = self._packed.get(name)
        if where is not None:  # the whole pack goes
            pack = self._packs[where[0]]
            if not pack.writers:
                self.evictions += len(pack.live)
                for other in list(pack.live):
                    self._forget_locked(other)
            return
        self._forget_locked(name)
        self.evictions += 1

    def _forget_locked(self, name: str) -> None:
        """Takes `name` out of the index; its file (or its pack, once it holds no other indexed
        block) is unlinked and its bytes no longer count."""
        size = self._index.pop(name, None)
        where = self._packed.pop(name, None)
        if where is not None:
            self._crc.pop(name, None)
            pack = self._packs[where[0]]
            pack.live.discard(name)
            _drop_pack_if_unused(self, pack)
        elif size is not None:
            self._path(name).unlink(missing_ok=True)
            self._crc.pop(name, None)
            self.used -= size

    def get(self, name: str, buffer: Buffer | None = None, *, direct: bool = False) -> bytes | memoryview | Buffer | None:
        """An entry's bytes, checked. `direct`: a segment's whole block (a multiple of pages)
        that the page cache does not hold is read with O_DIRECT into `buffer` (or a new
        `Buffer`) and that buffer returned; else the page cache's pages are mapped (a large
        entry) or copied (a small one)."""
        with self._lock:
            if name not in self._index or name in self._pending:
                return None
            self._index.move_to_end(name)
            where = self._packed.get(name)
            crc = self._crc.get(name)  # (None for a pack's entry: a header holds it)
            path = self._path(where[0] if where else name)
        data: bytes | memoryview | None = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._drop(name)
            return None
        try:
            offset, size = (where[1], where[2]) if where else (0, os.fstat(fd).st_size)
            if (direct and self.direct_ok and where is not None and crc is not None and size >= MAP_MIN and size % PAGE == 0
                    and not _resident(fd, offset, size)):
                try:
                    direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct_ok = False  # (tmpfs, some FUSE file systems): the page cache, as below
                    data = _mapped(fd, size, offset, crc)
                else:
                    try:
                        (data,) = _read_direct(direct_fd, offset, size, [buffer], [crc])
                    finally:
                        os.close(direct_fd)
                    self.direct_reads += data is not None
            elif size <= _HEADER.size + self.limit and (crc is not None or size >= _HEADER.size):
                if size >= MAP_MIN:
                    data = _mapped(fd, size, offset, crc)
                elif (small := _checked(os.pread(fd, size, offset), size, crc)) is not None:
                    data = bytes(small)
        finally:
            os.close(fd)
        if data is not None:
            return data
        self.corrupt += 1
        self._drop(name)
        return None

    def will_need(self, names: list[str]) -> None:
        """Tells the kernel these blocks are about to be read: each is read ahead at once, in
        large requests, instead of by the page faults of its mapping (a fault reads around
        itself in the disk's read-ahead size, 128 KiB by default, and waits for it). One
        request per block: the kernel reads ahead at most the device's largest request
        (`max_sectors_kb`) per call, so a call for a whole pack would read its first block
        only. Best effort."""
        spans: dict[Path, list[tuple[int, int]]] = {}
        with self._lock:
            for name in names:
                if name in self._pending:
                    continue
                where = self._packed.get(name)
                if where is not None:
                    spans.setdefault(self._path(where[0]), []).append((where[1], where[2]))
                elif name in self._index:
                    spans.setdefault(self._path(name), []).append((0, self._index[name]))
        for file, parts in spans.items():
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue  # gone meanwhile: `get` finds out
            try:
                for offset, length in parts:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _drop(self, name: str) -> None:
        with self._lock:
            self._forget_locked(name)

    def put(self, name: str, data: bytes) -> bool:
        size, crc = len(data), crc32(data)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return True
            if size > self.limit or not self._evict_locked(size):
                return False
            # Reserve before writing: concurrent writers can never push usage past the limit.
            self._index[name] = size
            self._crc[name] = crc
            self._pending.add(name)
            self.used += size
            path = self._path(name)
        tmp = path.parent / f".tmp{threading.get_ident()}-{name}"
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
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

    def put_many(self, items: list[tuple[str, bytes]]) -> int:
        """Stores several blocks (a fetched run) in one pack file; returns how many are now on
        disk (those already there included). One block, or a run too long for one table, is
        stored as `put` stores it."""
        if len(items) == 1 or len(items) > PACK_MAX:
            return sum(self.put(name, data) for name, data in items)
        reserved = None
        with self._lock:
            new, seen = [], set()
            for name, data in items:
                if name in self._index:
                    self._index.move_to_end(name)
                elif name not in seen:
                    seen.add(name)
                    new.append((name, data))
            stored = len(items) - len(new)
            if len(new) > 1:
                reserved = self._reserve_pack_locked(new)
        if len(new) <= 1:
            return stored + (self.put(*new[0]) if new else 0)
        if reserved is None:
            return stored
        pack, offsets = reserved
        path = self._path(pack.name)
        tmp = path.parent / f".tmp{threading.get_ident()}-{pack.name}"
        table = bytearray(PAGE)
        _PACK.pack_into(table, 0, PACK_MAGIC, len(new))
        for i, ((name, data), offset) in enumerate(zip(new, offsets)):
            _ENTRY.pack_into(table, _PACK.size + i * _ENTRY.size, name.encode("ascii"), offset, len(data))
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.pwrite(fd, table, 0)
                for (_, data), offset in zip(new, offsets):
                    os.pwritev(fd, [_HEADER.pack(MAGIC, crc32(data), len(data)), data], offset)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                for name, _ in new:
                    self._pending.discard(name)
                    self._forget_locked(name)
            return stored
        with self._lock:
            for name, _ in new:
                self._pending.discard(name)
        return stored + len(new)

    def put_blocks(self, storage: str, key: str, etag: str, block_size: int, blocks: list[tuple[int, bytes]], size: int | None = None) -> int:
        """Stores blocks of one object version (index, bytes) in their segments (the object's
        `size` told: as few as the limit allows); returns how many are now on disk. The one
        block of a one-block object, as an entry alone; with a disk limit too small for
        segments, a pack (`put_many`)."""
        slots = segment_slots(self.limit, block_size, size)
        if size is not None and size <= block_size:
            return sum(self.put(block_name(storage, key, etag, index, block_size), data) for index, data in blocks)
        if slots == 1:
            return self.put_many([(block_name(storage, key, etag, index, block_size), data) for index, data in blocks])
        by_segment: dict[int, list[tuple[int, bytes]]] = {}
        for index, data in blocks:
            by_segment.setdefault(index // slots, []).append((index, data))
        identity = (storage, key, etag, block_size)
        return sum(write_segment(self, identity, slots, segment * slots, items) for segment, items in by_segment.items())

    def _reserve_pack_locked(self, new: list[tuple[str, bytes]]) -> tuple[_Pack, list[int]] | None:
        """Lays out a pack of the blocks `new` and reserves its room (evicting if need be); its
        blocks are indexed as pending until it is written. The pack and its blocks' offsets;
        None: it cannot fit."""
        offsets, end = [], PAGE
        for _, data in new:
            offsets.append(end)
            end = _page_up(end + _HEADER.size + len(data))
        size = offsets[-1] + _HEADER.size + len(new[-1][1])
        if size > self.limit or not self._evict_locked(size):
            return None
        pack = _Pack(PACK_PREFIX + new[0][0], size, {name for name, _ in new})
        for (name, data), offset in zip(new, offsets):
            self._index[name] = 0
            self._packed[name] = (pack.name, offset, _HEADER.size + len(data))
            self._pending.add(name)
        self._packs[pack.name] = pack
        self.used += size
        return pack, offsets

    def disk_bytes(self) -> int:
        """Bytes actually on disk under the cache directory (for tests and status)."""
        return tree_bytes(self.dir)


def get_resident(tier: DiskTier, name: str) -> bytes | None:
    """A checked entry of less than MAP_MIN bytes (a small file, a kept range) that the page
    cache holds whole, read without waiting for the disk, so the event loop may call it: a
    thread hop costs more than such a read (100-170 µs of CPU against a few µs). None where it
    is not one (missing, larger, not all in the page cache, or not as written): the caller
    reads it from a thread, which also counts what is wrong with it."""
    with tier._lock:
        if name not in tier._index or name in tier._pending:
            return None
        where = tier._packed.get(name)
        crc = tier._crc.get(name)
        size = where[2] if where else tier._index[name]
        if crc is None or not 0 < size < MAP_MIN:
            return None
        tier._index.move_to_end(name)
        path = tier._path(where[0] if where else name)
    offset = where[1] if where else 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        pages = cached_pages(fd, offset, size)
        if pages is None or pages < -(-size // PAGE):
            return None
        data = os.pread(fd, size, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size and crc32(data) == crc else None


def writing(tier: DiskTier) -> int:
    """Entries indexed whose bytes are still being written."""
    return len(tier._pending)


def whole_file(tier: DiskTier, storage: str, key: str, etag: str, block_size: int, size: int) -> str | None:
    """The file that holds exactly the bytes of this object version, at their offsets, if
    the disk tier has one (an entry alone, the only block or a random reader's range of all
    of it, or a segment of every block, all written): the kernel may read it in place of
    the mounted file. From the index alone: no file is looked at (the caller opens it)."""
    if size <= 0:
        return None
    whole = range_name(storage, key, etag, 0, size)
    with tier._lock:
        if whole in tier._index and whole not in tier._pending and whole not in tier._packed:
            names = [whole]
        else:
            names = [block_name(storage, key, etag, index, block_size) for index in range(-(-size // block_size))]
            if any(name not in tier._index or name in tier._pending for name in names):
                return None
        where = tier._packed.get(names[0])
        if where is None:
            if len(names) != 1 or tier._index[names[0]] != size:
                return None
            path = tier._path(names[0])
        else:
            segment, last = where[0], tier._packed.get(names[-1], ("", 0, 0))
            if where[1] != 0 or last[1] + last[2] != size or any(tier._packed.get(name, ("",))[0] != segment for name in names):
                return None
            path = tier._path(segment)
        for name in names:
            tier._index.move_to_end(name)
    return str(path)


def block_cached(tier: DiskTier, name: str) -> bool:
    """Whether the page cache holds a segment's block (its last page); True for any other
    entry, or where that cannot be told."""
    with tier._lock:
        where = tier._packed.get(name)
        if where is None or name not in tier._crc:
            return True
        path = tier._path(where[0])
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        return _resident(fd, where[1], where[2])
    finally:
        os.close(fd)


def read_direct(tier: DiskTier, names: list[str], buffers: list[Buffer | None]) -> list[Buffer | None] | None:
    """Whole blocks `names`, contiguous slots of one segment that the page cache holds none
    of, read with one O_DIRECT request into `buffers` (new ones where a buffer is not a
    `Buffer` of the block's size), each checked (None: corrupt, dropped); None if they are
    not such blocks (the caller reads them one by one)."""
    with tier._lock:
        where = [tier._packed.get(name) for name in names]
        crcs = [tier._crc.get(name) for name in names]
        if (not tier.direct_ok or any(w is None or c is None or name not in tier._index or name in tier._pending for name, w, c in zip(names, where, crcs))
                or len({w[0] for w in where}) != 1):  # type: ignore[index]
            return None
        for name in names:
            tier._index.move_to_end(name)
        path = tier._path(where[0][0])  # type: ignore[index]
    spans = [(w[1], w[2]) for w in where]  # type: ignore[index]
    offset = spans[0][0]
    if any(size % PAGE or size < MAP_MIN or at != offset + i * size for i, (at, size) in enumerate(spans)) or len({size for _, size in spans}) != 1:
        return None
    size = spans[0][1]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            tier.direct_ok = False
        return None
    try:
        if cached_pages(fd, offset, size * len(names)) != 0:
            return None  # (some in the page cache, or not known: mapped, one by one)
        out = _read_direct(fd, offset, size, buffers, crcs)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    for name, data in zip(names, out):
        if data is not None:
            tier.direct_reads += 1
        else:
            tier.corrupt += 1
            tier._drop(name)
    return out


def write_segment(tier: DiskTier, identity: tuple[str, str, str, int], slots: int, first: int, items: list[tuple[int, bytes]]) -> int:
    """Writes blocks `items` (index, bytes) into their slots of the segment whose slot 0 is block
    `first`, creating it if need be; how many of them are now on disk."""
    storage, key, etag, block_size = identity
    # The names of the blocks written, and slot 0's: all of a segment's (thousands for a large
    # object) only to create it. Computed for each block written, they made a cold read's CPU
    # grow with the square of the object's blocks.
    names = {i: block_name(storage, key, etag, i, block_size) for i in {first, *(index for index, _ in items)}}
    crcs = {index: crc32(data) for index, data in items}
    table, slot = segment_layout(slots, block_size)
    name = f"{SEG_PREFIX}{names[first]}-{slots}"  # (a limit changed since: another layout, another file)
    with tier._lock:
        fresh: dict[int, bytes] = {}
        for index, data in items:
            if names[index] in tier._index:
                tier._index.move_to_end(names[index])
            else:
                fresh.setdefault(index, data)
        new = list(fresh.items())
        stored = len(items) - len(new)
        pack = tier._packs.get(name)
        if not new:
            return stored
        create = pack is None
        if create:
            pack = _Pack(name, table, set())
            pack.ready = threading.Event()
        # A slot's room is its block's pages, not the whole slot: a small object's one block (a
        # training image, a zarr chunk) is its bytes on disk, the rest of its slot a hole.
        # Counted as whole slots, a cache of many small files evicted them long before their
        # bytes reached the limit (a shuffled epoch asked the server again for them).
        need = (table if create else 0) + sum(_page_up(len(data)) for i, data in new if names[i] not in pack.counted)
        pack.writers += 1  # (not evicted to make its own room)
        if need > tier.limit or not tier._evict_locked(need):
            pack.writers -= 1
            return stored
        tier._packs[name] = pack
        for index, data in new:
            block = names[index]
            tier._index[block] = 0
            tier._packed[block] = (name, (index - first) * slot, len(data))
            tier._crc[block] = crcs[index]
            tier._pending.add(block)
            if block not in pack.counted:
                pack.counted.add(block)
                pack.size += _page_up(len(data))
        tier.used += need
    ok = False
    path = tier._path(name)
    try:
        if create:
            _create_segment(path, [block_name(storage, key, etag, first + i, block_size) for i in range(slots)], table, slot)
        elif pack.ready is not None:  # (None: found at start)
            pack.ready.wait(30)  # until its creator has renamed it into place
        fd = os.open(path, os.O_WRONLY)
        try:
            for index, data in new:
                os.pwrite(fd, data, (index - first) * slot)
        finally:
            os.close(fd)
        fd = os.open(table_path(path), os.O_WRONLY)
        try:
            for index, data in new:
                os.pwrite(fd, struct.pack("<II", len(data), crcs[index]), _SEG.size + (index - first) * _SLOT.size + 64)
        finally:
            os.close(fd)
        ok = True
    except OSError as exc:  # a full or failing disk: the blocks are forgotten below, counted and said
        with tier._lock:
            tier.errors += 1
        log.warning("disk_cache_write_failed", error=type(exc).__name__, detail=str(exc)[:200], errors=tier.errors)
    finally:
        if create:
            assert pack.ready is not None
            pack.ready.set()
        _segment_written(tier, pack, [names[index] for index, _ in new], ok)
    return stored + (len(new) if ok else 0)


def table_path(segment: Path) -> Path:
    return segment.with_name(segment.name + SEG_TABLE)


def _unlink_segment(path: Path) -> None:
    table_path(path).unlink(missing_ok=True)  # (first: a table never stands without its segment)
    path.unlink(missing_ok=True)


def _create_segment(path: Path, names: list[str], table: int, slot: int) -> None:
    """A new segment's file (empty: its slots are holes until written), then its table, renamed
    into place."""
    head = bytearray(table)
    _SEG.pack_into(head, 0, SEG_MAGIC, len(names), slot)
    for i, block in enumerate(names):
        _SLOT.pack_into(head, _SEG.size + i * _SLOT.size, block.encode("ascii"), 0, 0)
    tmp = path.parent / f".tmp{threading.get_ident()}-{path.name}"
    try:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        except FileNotFoundError:  # its folder is made with its first segment, not looked at for each
            path.parent.mkdir(exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, head, 0)
        finally:
            os.close(fd)
        os.replace(tmp, table_path(path))
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _segment_written(tier: DiskTier, pack: _Pack, blocks: list[str], ok: bool) -> None:
    """Ends a write into segment `pack`: its blocks are live (or forgotten, `ok` False), and a
    segment left with no live block goes."""
    with tier._lock:
        pack.writers -= 1
        for block in blocks:
            tier._pending.discard(block)
            if ok:
                pack.live.add(block)
            else:  # (not `_forget_locked`: the first of them would drop the pack under the rest)
                tier._index.pop(block, None)
                tier._packed.pop(block, None)
                tier._crc.pop(block, None)
        _drop_pack_if_unused(tier, pack)


def _drop_pack_if_unused(tier: DiskTier, pack: _Pack) -> None:
    """A pack or segment with no indexed block and no writer goes: its file and its bytes."""
    if not pack.live and not pack.writers and tier._packs.get(pack.name) is pack:
        del tier._packs[pack.name]
        path = tier._path(pack.name)
        if pack.name.startswith(SEG_PREFIX):
            _unlink_segment(path)
        else:
            path.unlink(missing_ok=True)
        tier.used -= pack.size


def load_single(tier: DiskTier, name: str, size: int) -> None:
    """Indexes an entry written alone found at start (`<name>.<crc32 hex>`); a file of another
    format is deleted."""
    block, _, crc = name.rpartition(".")
    if len(block) == 64 and len(crc) == 8 and all(c in "0123456789abcdef" for c in crc) and block not in tier._index:
        tier._index[block] = size
        tier._crc[block] = int(crc, 16)
        tier.used += size
    else:
        (tier.dir / name[:2] / name).unlink(missing_ok=True)


def load_segment(tier: DiskTier, name: str) -> None:
    """Indexes a segment found at start: the slots its table says were written (their checksum
    is checked when a block is read); a file that is not a segment of ours is deleted."""
    path = tier._path(name)
    live: set[str] = set()
    try:
        with open(table_path(path), "rb") as f:
            head = f.read(PAGE)
            magic, slots, slot = _SEG.unpack_from(head)
            if magic != SEG_MAGIC or not name.endswith(f"-{slots}") or not 0 < slots <= SEGMENT_SLOTS_MAX or slot % PAGE or slot < PAGE:
                raise ValueError("not a segment")
            table = _segment_table(slots)
            head += f.read(table - len(head))
        if len(head) != table or os.stat(path).st_size > slots * slot:
            raise ValueError("not a segment")
    except (OSError, ValueError, struct.error):
        _unlink_segment(path)
        return
    pack = _Pack(name, table, live)
    for i in range(slots):
        raw, length, crc = _SLOT.unpack_from(head, _SEG.size + i * _SLOT.size)
        block = raw.decode("ascii", "replace")
        if not 0 < length <= slot or block in tier._index:
            continue
        tier._index[block] = 0
        tier._packed[block] = (name, i * slot, length)
        tier._crc[block] = crc
        live.add(block)
        pack.counted.add(block)
        pack.size += _page_up(length)
    if live:
        tier._packs[name] = pack
        tier.used += pack.size
    else:
        _unlink_segment(path)


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
