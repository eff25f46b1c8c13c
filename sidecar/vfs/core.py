"""The filesystem core: the operations, tying together the inode table (`inodes`), the listing
and negative caches (`listings`), the block cache and, for writable mounts, the writer.

It never imports pyfuse3 (nor an SDK), so it is tested without a kernel; `sidecar.fuse_ops`
adapts it.

Model: the mount root is an object-key prefix (the storage URL's path plus the mount's
`source_path`). Directories are key prefixes (and empty "folder/" marker objects); files are
objects. Sizes, mtimes and etags come from the listing, so listing a directory of N objects costs
ceil(N / page size) LIST calls and no HEAD.

Invariants:
- an inode is one version of a key (see `inodes`): a reader never gets another version's pages;
  an open of a superseded inode is ESTALE, which makes the kernel look the name up again;
- an open handle pins (key, etag, size): it reads only blocks of that etag, and a fetch that finds
  the object changed raises ObjectChanged (ESTALE), never a mix of old and new bytes;
- listings and lookups (positive and negative) are fresh for `ttl` seconds of
  `trio.current_time()`; folders, whose only attribute is that they exist, for at least
  DIR_TTL_MIN, so walking a deep tree costs one call per folder, not one per ancestor per step;
- nothing is published that its writer did not close or fsync (see `writer`).

Zero-message opens (a read-only mount's option, see `sidecar.fuse_ops`): the kernel opens and
closes files without asking, and a read names its inode instead of a handle (`ZERO_OPEN_FH`).
The inode is the version, so such reads get the same guarantee; each inode's `Reader` (its read
pattern, its streams) is kept for the most recently read ZERO_OPEN_READERS inodes and while the
kernel holds the inode.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict

import trio

from sidecar.cache.blocks import BlockCache, ObjectRef, adopt
from sidecar.cache.disk import whole_file
from sidecar.cache.ranges import ExactRanges
from sidecar.cache.readahead import KERNEL_WINDOW, FolderWalk
from sidecar.cache.streams import Streams
from sidecar.errors import Exists, IsADirectory, NoSpace, ObjectChanged
from sidecar.store.base import ObjectInfo, ObjectStore
from sidecar.vfs.inodes import ROOT_INO, InodeTable, Node
from sidecar.vfs.listings import LIST_AHEAD, NAME_MAX, Entry, ListAhead, Listings
from sidecar.vfs.mtimes import MtimeIndex
from sidecar.vfs.deletes import DeleteJournal, PendingDeletes
from sidecar.vfs.mutations import Mutations
from sidecar.vfs.namespace import DIR_TTL_MIN, NEGATIVE_TTL, Attr, DirHandle, FileHandle, StatFs
from sidecar.vfs.staging import StagedFile, StagingArea, StagingFull
from sidecar.vfs.writer import Writer

__all__ = ["ROOT_INO", "NAME_MAX", "ZERO_OPEN_FH", "Attr", "Filesystem", "Node", "StatFs", "opens_for_writing"]

ZERO_OPEN_FH = 1 << 63  # a read without an open names its inode: ino | ZERO_OPEN_FH (sidecar/_fusept.c)
ZERO_OPEN_READERS = 256  # inodes read without an open whose read state is kept (least recently read go first)


def opens_for_writing(flags: int) -> bool:
    """Whether an open with `flags` may change the file (the kernel truncates with O_TRUNC)."""
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))


class Filesystem(Mutations):
    """The operations the FUSE adapter calls: the namespace (`Namespace`), the changes
    (`Mutations`), and here the state they share, opening, reading (each handle's `Reader`)
    and the staged copies of files being written."""

    def __init__(
        self,
        store: ObjectStore,
        cache: BlockCache,
        *,
        root_prefix: str = "",
        ttl: float = 5.0,
        uid: int | None = None,
        gid: int | None = None,
        readonly: bool = True,
        max_readahead_blocks: int = 8,
        kernel_readahead: int = KERNEL_WINDOW,
        staging: StagingArea | None = None,
        write_mode: str = "durable",
        writeback_delay: float = 0.0,
        mtimes: MtimeIndex | None = None,
        mtime_from_metadata: bool = False,
    ) -> None:
        if not readonly and staging is None:
            raise ValueError("a writable file system needs a staging area")
        self.store = store
        self.cache = cache
        self.ranges = ExactRanges(cache)
        # One streamed GET can follow a sequential reader where the store reads its body as it goes.
        self.streams = Streams(cache, self.ranges, cache.max_fetches) if getattr(cache.store, "streams", False) else None
        self.root_prefix = root_prefix.strip("/")
        self.ttl = ttl
        self.dir_ttl = max(ttl, DIR_TTL_MIN)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.readonly = readonly
        self.max_readahead_blocks = max_readahead_blocks
        self.kernel_readahead = kernel_readahead  # bytes: the window set on the mount's kernel side
        self.inodes = InodeTable(self.root_prefix)
        self.listings = Listings(ttl)
        self.negative_ttl = min(ttl, NEGATIVE_TTL)
        self.mtimes = mtimes or MtimeIndex()
        self.mtime_from_metadata = mtime_from_metadata
        self._listing_flights: dict[str, trio.Event] = {}
        self._walks = FolderWalk()
        self._ahead = ListAhead()
        self._ahead_limiter = trio.CapacityLimiter(LIST_AHEAD // 2)  # listings ahead of a tree walk in flight
        self._big: dict[str, float] = {}  # folders too large to list for one lookup -> until
        self._mtimes_due: dict[str, tuple[str, float, float]] = {}  # key -> (etag, mtime, when to store it)
        self._mtimes_wake = trio.Event()
        self._mtimes_flushing = False  # `store_mtimes` runs: mtimes that cost a copy may wait for a rename
        self.staging = staging
        self.deletes = PendingDeletes(store, DeleteJournal(staging.directory / "deletes.jsonl") if staging is not None else None)
        self.writer = Writer(store, staging, mode=write_mode, delay=writeback_delay, on_stored=self._stored) if staging is not None else None
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = itertools.count(1)
        self._unopened: OrderedDict[int, FileHandle] = OrderedDict()  # ino -> the handle its reads without an open share
        self.mounted_at = time.time()  # mtime of directories, which object stores do not have

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Returns (handle, keep_cache). keep_cache is true when this inode was opened before at
        the same etag (an inode is one version, so its page cache is that version's)."""
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(node.key)
        writable = opens_for_writing(flags)
        if writable:
            self._require_writable(node.key)
        await self._revalidate(node)
        if node.superseded and node.staged is None:
            raise ObjectChanged(node.key)  # ESTALE: the kernel looks the name up and opens the new inode
        if writable:
            staged = await self._stage(node, truncate=bool(flags & os.O_TRUNC))
            staged.handles += 1
        keep_cache = node.staged is None and node.last_open_etag == node.etag
        node.last_open_etag = node.etag if node.staged is None else None
        self.inodes.pin(node)
        if not writable and node.staged is None:
            self._walk_on(node)
        fh = next(self._next_fh)
        self._handles[fh] = FileHandle(node, ObjectRef(node.key, node.etag, node.size), writable)
        return fh, keep_cache

    def handle_size(self, fh: int) -> int:
        h = self._handles.get(fh)
        return h.ref.size if isinstance(h, FileHandle) else 0

    def cached_file(self, fh: int) -> tuple[str, int] | None:
        """The disk cache's file of exactly the bytes of this read-only handle's version, and its
        size, if it has one, for the kernel to read in its place (`sidecar.passthrough`)."""
        h = self._handles.get(fh)
        disk = self.cache.disk
        if not isinstance(h, FileHandle) or h.writable or h.node.staged is not None or disk is None:
            return None
        path = whole_file(disk, self.cache.storage_id, h.ref.key, h.ref.etag, self.cache.block_size, h.ref.size)
        return (path, h.ref.size) if path is not None else None

    def make_way_for_writer(self, ino: int) -> None:
        """`ino` is read by the kernel from a cache file (`sidecar.passthrough`), which refuses a
        writer's open of it: the version stops standing for its key, its readers keep it, and the
        writer is sent to a new inode of the key (ESTALE: the kernel looks the name up again)."""
        node = self.node(ino)
        self.inodes.supersede(node)
        raise ObjectChanged(node.key)

    def _walk_on(self, node: Node) -> None:
        """A reader going through a folder's files in name order: its next small files (a block
        or less, fetched whole) are fetched ahead from the folder's fresh listing."""
        folder, _, name = node.key.rpartition("/")
        entries = self.listings.fresh(folder, trio.current_time())
        if entries is None:
            return
        for ahead in self._walks.on_open(folder, entries, name):
            info = entries[ahead].info
            if info is None or not 0 < info.size <= self.cache.block_size or (self.staging and info.key in self.staging.by_key):
                continue
            ref = ObjectRef(info.key, info.etag, info.size)
            if self.ranges.holds(ref, 0, info.size) or self.cache.has(ref, 0):
                continue  # kept whole already, as a block or as a random reader's exact range
            if not self.cache.prefetch(ref, range(1)):
                break  # no room in the memory budget: the reader fetches its own

    def _changed_remotely(self, node: Node) -> None:
        """A read found `node`'s version gone: the next lookup makes a new inode for the key."""
        self.inodes.supersede(node)
        self.listings.forget_parent(node.key)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._unopened_handle(fh & ~ZERO_OPEN_FH) if fh & ZERO_OPEN_FH else self._handle(fh, FileHandle)
        assert isinstance(h, FileHandle)
        if h.node.staged is not None:  # written in this mount: the local bytes are the truth
            return self.staging.read(h.node.staged, offset, size)  # type: ignore[union-attr]
        reader = h.reader
        if reader is None:
            reader = h.reader = self._reader(h.ref)
        try:
            return await reader.read(offset, size)
        except ObjectChanged:
            self._changed_remotely(h.node)
            raise

    def _unopened_handle(self, ino: int) -> FileHandle:
        """The handle of an inode read without an open: its version, and the reader that
        follows its read pattern, made at its first read (as an open would be)."""
        h = self._unopened.get(ino)
        if h is not None:
            self._unopened.move_to_end(ino)
            return h
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(node.key)
        h = self._unopened[ino] = FileHandle(node, ObjectRef(node.key, node.etag, node.size))
        if len(self._unopened) > ZERO_OPEN_READERS:
            self._close_unopened(next(iter(self._unopened)))
        if node.staged is None:
            self._walk_on(node)
        return h

    def _close_unopened(self, ino: int) -> None:
        h = self._unopened.pop(ino, None)
        if h is not None and h.reader is not None:
            h.reader.close()

    def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, _ in items:
            self._close_unopened(ino)  # the kernel has no file of it open any more
        super().forget(items)

    async def fsync(self, fh: int) -> None:
        if not fh & ZERO_OPEN_FH:  # (without an open, a file of a read-only mount: nothing to store)
            await super().fsync(fh)

    @property
    def unopened_readers(self) -> int:
        return len(self._unopened)

    @property
    def handle_count(self) -> int:
        return len(self._handles)

    def open_files_by_inode(self) -> dict[int, list[int]]:
        """The file handles open now, by inode."""
        out: dict[int, list[int]] = {}
        for fh, h in self._handles.items():
            if isinstance(h, FileHandle):
                out.setdefault(h.node.ino, []).append(fh)
        return out

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if not isinstance(h, FileHandle):
            return
        if h.reader is not None:
            h.reader.close()
        node = h.node
        if h.writable and node.staged is not None:
            staged = node.staged
            staged.handles -= 1
            if staged.handles <= 0 and (staged.orphan or not staged.dirty and staged.state not in ("conflict", "incomplete")):
                self._unstage(node)
        self.inodes.unpin(node)

    def _unstage(self, node: Node) -> None:
        if node.staged is not None and self.staging is not None:
            self.staging.remove(node.staged, recycle=node.staged.handles <= 0)
        node.staged = None
        self.inodes.release_unused(node)

    def _stored(self, staged: StagedFile, info: ObjectInfo) -> None:
        """The writer stored `staged` as `info`: the inode writing it now stands for `info`."""
        if staged.mtime is not None:
            self.mtimes.set(staged.key, info.etag, staged.mtime)
        info = self._with_mtime(info)
        if not staged.dirty and 0 < staged.size <= self.cache.block_size and staged.size == info.size and self.staging is not None:
            # The stored bytes are known: reading them back (an editor, Jupyter, git) asks nothing.
            adopt(self.cache, ObjectRef(staged.key, info.etag, info.size), 0, self.staging.read(staged, 0, staged.size))
        node = self.inodes.current(staged.key)
        if node is not None and node.staged is staged:
            node.etag, node.size, node.mtime, node.checked_at = info.etag, staged.size, info.mtime, trio.current_time()
            if staged.handles <= 0 and not staged.dirty:
                self._unstage(node)
        elif staged.handles <= 0 and not staged.dirty and self.staging is not None:
            self.staging.remove(staged, recycle=True)
        # The folder's cached listing learns the new object: the next lookups in it (cp -r,
        # rsync) are answered without a request.
        self.listings.add(staged.key, Entry(False, info))

    async def _stage(self, node: Node, *, truncate: bool) -> StagedFile:
        """The node's staged file, created on first write access: empty when truncating, else a
        copy of the object fetched through the block cache."""
        assert self.staging is not None
        if node.staged is not None:
            if truncate:
                self._staging_call(self.staging.truncate, node.staged, 0)
                node.size = 0
            return node.staged
        existing = self.staging.by_key.get(node.key)
        if existing is not None and existing.state != "incomplete":
            node.staged = existing  # staged for an earlier inode of this key (a failed upload)
            node.size = existing.size
            if truncate:
                self._staging_call(self.staging.truncate, existing, 0)
                node.size = 0
            return existing
        if existing is not None:
            raise Exists(f"{node.key}: an incomplete copy is staged; publish or discard it first")
        staged = self.staging.create(node.key, node.etag or None, node.size if node.etag else None)
        try:
            if truncate:
                self._staging_call(self.staging.truncate, staged, 0)
                node.size = 0
            else:
                ref = ObjectRef(node.key, node.etag, node.size)
                self.cache.prefetch(ref, range(0, self.cache.blocks_of(ref)))
                for index in range(self.cache.blocks_of(ref)):
                    data = await self.cache.get(ref, index)
                    self._staging_call(os.pwrite, staged.fd, data, index * self.cache.block_size)
                self.staging.resize(staged, node.size)
        except BaseException:
            self.staging.remove(staged)
            raise
        node.staged = staged
        return staged

    def _staging_call(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except StagingFull:
            raise NoSpace(f"the staging area is full ({self.staging.limit} bytes)") from None  # type: ignore[union-attr]
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT: the staging disk itself is full
                raise NoSpace(f"the staging disk is full: {exc.strerror}") from None
            raise
