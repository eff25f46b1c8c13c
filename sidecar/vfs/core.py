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
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat as stat_mod
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from sidecar.cache.blocks import FOLLOWS_PER_HANDLE, BlockCache, Follow, ObjectRef
from sidecar.cache.prefetch import FolderWalk, ReadAhead
from sidecar.errors import (
    BadHandle,
    CrossDevice,
    Exists,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotSupported,
    ObjectChanged,
    ReadOnly,
    SidecarError,
)
from sidecar.store.base import DirInfo, Listing, ObjectInfo, ObjectStore
from sidecar.vfs.inodes import ROOT_INO, InodeTable, Node
from sidecar.vfs.listings import NAME_MAX, Entry, Listings, parent_key, unusable_name
from sidecar.vfs.mtimes import MtimeIndex
from sidecar.vfs.staging import StagedFile, StagingArea, StagingFull
from sidecar.vfs.writer import Writer

__all__ = ["ROOT_INO", "NAME_MAX", "Attr", "Filesystem", "Node", "StatFs"]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
DIR_RENAME_LIMIT = 1000  # objects; a larger directory answers EXDEV and `mv` copies it instead
DIR_TTL_MIN = 30.0  # s a known folder is trusted, whatever the metadata TTL
LOOKUP_LIST_MAX = 1000  # a lookup in an unlisted folder lists it if it fits in one page
# s the kernel may keep a "does not exist" answer (a negative dentry): `cp` and `git` ask twice
# for each new name (stat, then open with O_CREAT); the second answer comes from the kernel.
NEGATIVE_TTL = 1.0


@dataclass
class Attr:
    ino: int
    is_dir: bool
    size: int
    mtime: float
    mode: int
    uid: int
    gid: int
    ttl: float = 0.0  # how long the kernel may cache the entry and its attributes

    @property
    def nlink(self) -> int:
        return 2 if self.is_dir else 1


@dataclass
class FileHandle:
    node: Node
    ref: ObjectRef
    readahead: ReadAhead
    writable: bool = False
    follows: list[Follow] = field(default_factory=list)  # streamed GETs following this reader's runs
    # The last ranges read exactly (a stream may continue one; several, since one reader may
    # read several runs at once):
    exact: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=FOLLOWS_PER_HANDLE))


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[str, Node]] = field(default_factory=list)


@dataclass(frozen=True)
class StatFs:
    block_size: int
    fragment_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    files_free: int
    name_max: int


class Filesystem:
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
        self.root_prefix = root_prefix.strip("/")
        self.ttl = ttl
        self.dir_ttl = max(ttl, DIR_TTL_MIN)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.readonly = readonly
        self.max_readahead_blocks = max_readahead_blocks
        self.inodes = InodeTable(self.root_prefix)
        self.listings = Listings(ttl)
        self.negative_ttl = min(ttl, NEGATIVE_TTL)
        self.mtimes = mtimes or MtimeIndex()
        self.mtime_from_metadata = mtime_from_metadata
        self._listing_flights: dict[str, trio.Event] = {}
        self._walks = FolderWalk()
        self._big: dict[str, float] = {}  # folders too large to list for one lookup -> until
        self.staging = staging
        self.writer = Writer(store, staging, mode=write_mode, delay=writeback_delay, on_stored=self._stored) if staging is not None else None
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = itertools.count(1)
        self.mounted_at = time.time()  # mtime of directories, which object stores do not have

    # -- inodes ------------------------------------------------------------------------------

    def _child_key(self, parent: Node, name: str) -> str:
        return f"{parent.key}/{name}" if parent.key else name

    def node(self, ino: int) -> Node:
        return self.inodes.get(ino)

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference (lookup reply or accepted readdirplus entry)."""
        self.inodes.remember(ino)

    def forget(self, items: list[tuple[int, int]]) -> None:
        """Never raises: the kernel does not wait for an answer."""
        for ino, n in items:
            self.inodes.forget(ino, n)

    @property
    def inode_count(self) -> int:
        return len(self.inodes)

    def _fresh(self, node: Node, now: float) -> bool:
        return node.checked_at + (self.dir_ttl if node.is_dir else self.ttl) > now

    def refresh(self, path: str) -> tuple[list[tuple[int, str]], list[int]]:
        """Forgets cached listings, negative answers and attributes at and below the folder
        `path` (relative to the mount; "" is the whole mount). Returns the kernel entries
        (parent inode, name) and inodes to invalidate, so the kernel forgets them too."""
        base = self._child_key(self.inodes.root, path.strip("/")) if path.strip("/") else self.root_prefix
        self.listings.forget_tree(base)
        self._big.clear()
        entries: list[tuple[int, str]] = []
        inodes: list[int] = []
        # A "does not exist" answer still in force may be held by the kernel too (NEGATIVE_TTL).
        for key in self.listings.forget_absent_under(base, trio.current_time()):
            parent = self.inodes.current(parent_key(key))
            if parent is not None:
                entries.append((parent.ino, key.rpartition("/")[2]))
        for node in self.inodes.nodes():
            if node.key == base or node.key.startswith(base + "/" if base else ""):
                node.checked_at = float("-inf")
                inodes.append(node.ino)
                parent = self.inodes.current(parent_key(node.key)) if node.ino != ROOT_INO else None
                if parent is not None and node.key != base:
                    entries.append((parent.ino, node.key.rpartition("/")[2]))
        return entries, inodes

    # -- attributes --------------------------------------------------------------------------

    def attr(self, node: Node) -> Attr:
        if node.is_dir:
            mode = stat_mod.S_IFDIR | (0o555 if self.readonly else 0o755)
            return Attr(node.ino, True, 0, self.mounted_at, mode, self.uid, self.gid, self.dir_ttl)
        mode = stat_mod.S_IFREG | (0o444 if self.readonly else 0o644)
        return Attr(node.ino, False, node.size, node.mtime, mode, self.uid, self.gid, self.ttl)

    # -- listings ----------------------------------------------------------------------------

    async def warm_up(self) -> str | None:
        """One small listing of the root (one entry), before the mount is announced: the SDK
        client's lazy set-up (its HTTP session, connection pool, TLS context) then happens at
        start, not on the first read of a session. Its answer is not cached: what is created
        in the bucket between the start and the first look is seen. Returns the error code if
        it failed (the mount goes on: a failing backend is the health checks' news)."""
        try:
            await self.store.list_dir(self.node(ROOT_INO).key, max_entries=1)
        except SidecarError as exc:
            return exc.code
        return None

    async def _list(self, node: Node, *, one_page: bool = False) -> dict[str, Entry] | None:
        """The folder's entries, from the cache while fresh, else one LIST shared by everyone
        who asks meanwhile (single flight). With `one_page`, returns None (and remembers the
        folder as big) when it does not fit in LOOKUP_LIST_MAX entries."""
        while True:
            cached = self.listings.fresh(node.key, trio.current_time())
            if cached is not None:
                return cached
            flight = self._listing_flights.get(node.key)
            if flight is None:
                break
            await flight.wait()  # someone is listing it: share their answer
            if one_page and self._big.get(node.key, float("-inf")) > trio.current_time():
                return None
        flight = self._listing_flights[node.key] = trio.Event()
        try:
            listing = await self.store.list_dir(node.key, max_entries=LOOKUP_LIST_MAX if one_page else None)
            if not listing.complete:
                self._big[node.key] = trio.current_time() + self.dir_ttl
                return None
            return await self.adopt_listing(node.key, listing)
        finally:
            del self._listing_flights[node.key]
            flight.set()

    async def adopt_listing(self, prefix: str, listing: Listing) -> dict[str, Entry]:
        """A complete listing of folder `prefix` answers lookups, getattrs and opens of its
        names while it is fresh, whoever made it (a lookup, readdir, or a prefetch's plan)."""
        entries = self.listings.entries_of(prefix, listing)
        if self.mtime_from_metadata:
            await self._learn_mtimes([e.info for e in entries.values() if e.info is not None])
        for name, e in entries.items():
            if e.info is not None:
                entries[name] = Entry(False, self._with_mtime(e.info))
        self._overlay_staged(prefix, entries)
        now = trio.current_time()
        self.listings.store(prefix, entries, now)
        node = self.inodes.current(prefix)
        if node is not None and node.is_dir:
            node.checked_at = now
        return entries

    async def _learn_mtimes(self, infos: list[ObjectInfo]) -> None:
        """`mtime_source: metadata`: the `mtime` metadata of listed versions the index does not
        know yet, one HEAD each (16 at a time), as rclone does without --use-server-modtime.
        Each version is asked once: the index keeps the answer, also across remounts."""
        unknown = [i for i in infos if i.etag and self.mtimes.get(i.key, i.etag) is None]
        limiter = trio.CapacityLimiter(16)

        async def head(info: ObjectInfo) -> None:
            async with limiter:
                found = await self.store.stat(info.key)
            if isinstance(found, ObjectInfo) and found.etag == info.etag:
                self.mtimes.set(info.key, info.etag, found.mtime)

        async with trio.open_nursery() as nursery:
            for info in unknown:
                nursery.start_soon(head, info)

    def _with_mtime(self, info: ObjectInfo) -> ObjectInfo:
        """`info` with the mtime a user set through the mount, if the index knows this version."""
        mtime = self.mtimes.get(info.key, info.etag)
        return info if mtime is None or mtime == info.mtime else dataclasses.replace(info, mtime=mtime)

    def _staged_info(self, f: StagedFile) -> ObjectInfo:
        return ObjectInfo(f.key, f.size, f.base_etag or "", time.time())

    def _overlay_staged(self, prefix: str, entries: dict[str, Entry]) -> None:
        """Files being written that the bucket does not have yet are part of the listing."""
        if self.staging is None:
            return
        base = f"{prefix}/" if prefix else ""
        for key, f in self.staging.by_key.items():
            if key.startswith(base) and "/" not in key[len(base) :] and f.state != "conflict":
                entries[key[len(base) :]] = Entry(False, self._staged_info(f))

    # -- lookups -----------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Attr:
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(parent.key)
        if name in (".", ".."):
            node = parent if name == "." else self.inodes.root if parent.ino == ROOT_INO else None
            if node is None:
                raise NotFound(name)  # the kernel resolves ".." itself
            node.lookups += 1
            return self.attr(node)
        if unusable_name(name) is not None:
            raise NotFound(name)  # such names are never listed, and never stored
        key = self._child_key(parent, name)
        now = trio.current_time()
        cached = self.listings.fresh(parent.key, now)
        entry: Entry | None
        if cached is None and not self.listings.absent(key, now):
            known = self.inodes.current(key)
            if known is not None and self._fresh(known, now):
                known.lookups += 1
                return self.attr(known)
            if self._big.get(parent.key, float("-inf")) <= now:
                # One LIST answers this lookup and every other in the folder while it is fresh
                # (rsync, zarr, `cat *`): no HEAD per name. A folder too big for one page is
                # remembered, and its names are looked up one by one.
                cached = await self._list(parent, one_page=True)
        if cached is not None:
            entry = cached.get(name)
        elif self.listings.absent(key, now):
            entry = None
        else:
            staged = self.staging.by_key.get(key) if self.staging else None
            found = self._staged_info(staged) if staged is not None and staged.state != "conflict" else await self.store.stat(key)
            if isinstance(found, ObjectInfo):
                found = self._with_mtime(found)
            if found is None:
                entry = None
            elif isinstance(found, DirInfo):
                entry = Entry(True, None)
            else:
                entry = Entry(False, found)
        if entry is None:
            # Remembered as absent for the TTL (longer than the kernel keeps it): a refresh
            # finds it there to withdraw from the kernel.
            self.listings.set_absent(key, trio.current_time())
            raise NotFound(key, cacheable_for=self.negative_ttl)
        self.listings.clear_absent(key)
        node = self.inodes.for_entry(key, entry.is_dir, entry.info, trio.current_time())
        node.lookups += 1
        return self.attr(node)

    async def _revalidate(self, node: Node) -> None:
        """Checks `node` against the bucket once its attributes are older than the TTL. A file
        found at another version is superseded (a new inode stands for the new version)."""
        if node.ino == ROOT_INO or node.staged is not None or node.superseded or self._fresh(node, trio.current_time()):
            return
        found = await self.store.stat(node.key, folder_first=node.is_dir)
        now = trio.current_time()
        if found is None or isinstance(found, DirInfo) != node.is_dir:
            self.listings.set_absent(node.key, now)
            self.inodes.supersede(node)
            raise NotFound(node.key)
        if isinstance(found, ObjectInfo) and found.etag != node.etag:
            self.inodes.for_entry(node.key, False, self._with_mtime(found), now)  # supersedes `node`
            return
        if isinstance(found, ObjectInfo):
            node.mtime = self._with_mtime(found).mtime
        node.checked_at = now

    async def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        await self._revalidate(node)
        if node.superseded and node.pins <= 0:
            # Asked by path (no handle holds this version): the kernel looks the name up again.
            raise ObjectChanged(node.key)
        return self.attr(node)  # a handle's own version (fstat)

    # -- directories -------------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory(node.key)
        entries = await self._list(node)
        now = trio.current_time()
        # A snapshot: offsets stay valid while the remote directory changes under a reader.
        # Each node in it is pinned until releasedir, so every inode readdir answers is known.
        snapshot = []
        for name, e in sorted(entries.items()):
            child = self.inodes.for_entry(self._child_key(node, name), e.is_dir, e.info, now)
            self.inodes.pin(child)
            snapshot.append((name, child))
        fh = next(self._next_fh)
        self._handles[fh] = DirHandle(node, snapshot)
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from offset `start`, each with the offset of the next one. The caller reports
        each entry the kernel accepted with `remember(attr.ino)`."""
        h = self._handle(fh, DirHandle)
        assert isinstance(h, DirHandle)
        return [(name, self.attr(node), i + 1) for i, (name, node) in enumerate(h.entries[start:], start)]

    def releasedir(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if isinstance(h, DirHandle):
            for _, node in h.entries:
                self.inodes.unpin(node)

    # -- reading -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Returns (handle, keep_cache). keep_cache is true when this inode was opened before at
        the same etag (an inode is one version, so its page cache is that version's)."""
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(node.key)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
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
        ra = ReadAhead(self.cache.block_size, self.max_readahead_blocks)
        self._handles[fh] = FileHandle(node, ObjectRef(node.key, node.etag, node.size), ra, writable)
        return fh, keep_cache

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
            if not self.cache.has(ref, 0) and not self.cache.prefetch(ref, range(1)):
                break  # no room in the memory budget: the reader fetches its own

    def _handle(self, fh: int, kind: type) -> FileHandle | DirHandle:
        h = self._handles.get(fh)
        if not isinstance(h, kind):
            raise BadHandle(f"handle {fh}")
        return h

    def _changed_remotely(self, node: Node) -> None:
        """A read found `node`'s version gone: the next lookup makes a new inode for the key."""
        self.inodes.supersede(node)
        self.listings.forget_parent(node.key)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handle(fh, FileHandle)
        assert isinstance(h, FileHandle)
        if h.node.staged is not None:  # written in this mount: the local bytes are the truth
            return self.staging.read(h.node.staged, offset, size)  # type: ignore[union-attr]
        ref = h.ref
        if offset >= ref.size or size <= 0:
            return b""
        end = min(offset + size, ref.size)
        bs = self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        ahead = h.readahead.on_read(offset, end - offset)
        # A run that did not start at offset 0 is followed by one streamed GET (ReadAhead.following),
        # never read ahead by the window, even when its blocks are all held (a warm pass).
        following = self.cache.follows and (
            self.cache.follow(h.follows, ref, first, last, may_start=h.readahead.following, after=h.exact) or h.readahead.following
        )
        try:
            if h.readahead.window == 0 and not following and not all(self.cache.has(ref, i) for i in range(first, last + 1)):
                # A random reader: fetch just the bytes asked for, not whole blocks, so a 4 KiB
                # read of a 5 GiB object costs a 4 KiB GET; the range is kept (memory, disk) so
                # the same read again costs nothing.
                h.exact.append((offset, end))
                kept = await self.cache.cached_range(ref, offset, end)
                if kept is not None:
                    return kept
                data = await self.store.get_range(ref.key, offset, end, ref.etag)
                self.cache.keep_range(ref, offset, data)
                return self.cache.count_direct(data)
            # Start the blocks this read needs first, then the read-ahead, so that read-ahead
            # never takes the memory the demand blocks need; `get` waits for room if need be.
            self.cache.prefetch(ref, range(first, last + 1), readahead=False)
            if not following:
                self.cache.prefetch(ref, ahead)
            if first == last:
                block = await self.cache.get(ref, first)
                base = first * bs
                # A view, not a copy: the reply is written from the cached block itself.
                return memoryview(block)[offset - base : end - base]  # type: ignore[return-value]
            parts = []
            for index in range(first, last + 1):
                block = await self.cache.get(ref, index)
                base = index * bs
                parts.append(memoryview(block)[max(offset - base, 0) : min(end - base, len(block))])
            return b"".join(parts)
        except ObjectChanged:
            self._changed_remotely(h.node)
            raise

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if not isinstance(h, FileHandle):
            return
        for follow in h.follows:
            follow.close()
        node = h.node
        if h.writable and node.staged is not None:
            staged = node.staged
            staged.handles -= 1
            if staged.handles <= 0 and (staged.orphan or not staged.dirty and staged.state not in ("conflict", "incomplete")):
                self._unstage(node)
        self.inodes.unpin(node)

    # -- writing -----------------------------------------------------------------------------

    def _require_writable(self, key: str) -> None:
        if self.readonly or self.staging is None:
            raise ReadOnly(key)

    def _storable(self, name: str) -> None:
        """Refuses a new name that could not be stored (or listed back) as a key."""
        reason = unusable_name(name)
        if reason is not None:
            if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise NameTooLong(name)
            raise InvalidName(f"{name!r}: {reason}")

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

    async def create(self, parent_ino: int, name: str, flags: int) -> tuple[int, Attr]:
        parent = self.node(parent_ino)
        key = self._child_key(parent, name)
        self._require_writable(key)
        self._storable(name)
        assert self.staging is not None
        now = trio.current_time()
        node = self.inodes.for_entry(key, False, ObjectInfo(key, 0, "", time.time()), now)
        if node.staged is not None:
            self._staging_call(self.staging.truncate, node.staged, 0)
        else:
            existing = self.staging.by_key.get(key)
            if existing is not None:  # staged for a previous inode of this key
                self.staging.remove(existing)
            node.staged = self.staging.create(key, None, dirty=True)  # even an empty file is stored
        node.size, node.etag = 0, ""
        node.staged.handles += 1
        node.lookups += 1
        self.inodes.pin(node)
        self.listings.add(key, Entry(False, ObjectInfo(key, 0, "", time.time())))
        fh = next(self._next_fh)
        self._handles[fh] = FileHandle(node, ObjectRef(key, "", 0), ReadAhead(self.cache.block_size), True)
        return fh, self.attr(node)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self._handle(fh, FileHandle)
        assert isinstance(h, FileHandle)
        if not h.writable or h.node.staged is None:
            raise BadHandle(f"handle {fh} is not open for writing")
        # A pwrite to the staging file lands in the page cache: cheap enough for the trio
        # thread, and it keeps writes in order without a thread hop per 128 KiB request.
        n = self._staging_call(self.staging.write, h.node.staged, offset, data)  # type: ignore[union-attr]
        h.node.size = h.node.staged.size
        h.node.mtime = time.time()
        return n

    async def flush(self, fh: int) -> None:
        """close(): the writer commits its file. Durable mode: stored before close returns, so
        an acknowledged close means the bytes are in the bucket. Write-back: staged on disk."""
        h = self._handle(fh, FileHandle)
        assert isinstance(h, FileHandle)
        if h.writable and h.node.staged is not None and self.writer is not None:
            await self.writer.commit(h.node.staged)

    async def fsync(self, fh: int) -> None:
        await self.flush(fh)

    async def upload_pending(self, *, only_idle: bool = True) -> int:
        assert self.writer is not None
        return await self.writer.upload_pending(only_idle=only_idle)

    async def setattr(self, ino: int, *, size: int | None = None, mtime: float | None = None) -> Attr:
        """The size (truncate) and the mtime are stored; mode and owner are accepted and not kept.
        An mtime goes into the object's `mtime` metadata: with the upload of a file being
        written, else by a server-side copy of the object onto itself."""
        node = self.node(ino)
        if mtime is not None and not node.is_dir:
            self._require_writable(node.key)
            await self._set_mtime(node, mtime)
        if size is not None:
            if node.is_dir:
                raise IsADirectory(node.key)
            self._require_writable(node.key)
            staged = await self._stage(node, truncate=size == 0)
            self._staging_call(self.staging.truncate, staged, size)  # type: ignore[union-attr]
            node.size = size
            if staged.handles <= 0 and self.writer is not None:  # truncate(2) of a closed file: a commit
                await self.writer.commit(staged)
        elif not node.is_dir:
            await self._revalidate(node)
        return self.attr(node)

    async def _set_mtime(self, node: Node, mtime: float) -> None:
        if node.staged is not None:
            node.staged.mtime = mtime  # sent with its upload (a close follows, or has queued it)
            if not node.staged.dirty:
                await self._store_mtime(node, mtime)
        elif node.etag:
            await self._store_mtime(node, mtime)
        node.mtime = mtime

    async def _store_mtime(self, node: Node, mtime: float) -> None:
        info = await self.store.set_mtime(node.key, node.etag, mtime)
        if info is not None and info.etag and info.etag != node.etag:
            node.etag = info.etag
            if node.staged is not None and self.staging is not None:
                self.staging.mark(node.staged, base_etag=info.etag)
        self.mtimes.set(node.key, node.etag, mtime)
        self.listings.add(node.key, Entry(False, ObjectInfo(node.key, node.size, node.etag, mtime)))

    async def _existing(self, parent: Node, name: str) -> Node | None:
        try:
            attr = await self.lookup(parent.ino, name)
        except NotFound:
            return None
        node = self.node(attr.ino)
        node.lookups -= 1  # this lookup was ours, not the kernel's
        return node

    async def _removable(self, parent_ino: int, name: str, *, is_dir: bool) -> tuple[Node, str]:
        """The node `name` in `parent_ino` for unlink (a file) or rmdir (a directory)."""
        parent = self.node(parent_ino)
        key = self._child_key(parent, name)
        self._require_writable(key)
        node = await self._existing(parent, name)
        if node is None:
            raise NotFound(key)
        if node.is_dir != is_dir:
            raise NotADirectory(key) if is_dir else IsADirectory(key)
        return node, key

    async def unlink(self, parent_ino: int, name: str) -> None:
        node, key = await self._removable(parent_ino, name, is_dir=False)
        remote = node.staged is None or node.staged.base_etag is not None
        if node.staged is not None and node.staged.handles > 0 and self.staging is not None:
            self.staging.orphan(node.staged)  # its open handles keep it until the last is released
        else:
            self._unstage(node)
        if remote:
            await self.store.delete(key)
        self._gone(key)

    def _gone(self, key: str) -> None:
        self.listings.remove(key, trio.current_time())
        node = self.inodes.current(key)
        if node is not None:
            self.inodes.supersede(node)

    async def mkdir(self, parent_ino: int, name: str) -> Attr:
        """A directory is an empty "name/" marker object, as the S3 console makes them."""
        parent = self.node(parent_ino)
        key = self._child_key(parent, name)
        self._require_writable(key)
        self._storable(name)
        if await self._existing(parent, name) is not None:
            raise Exists(key)
        await self.store.put_marker(key)
        self.listings.add(key, Entry(True, None))
        now = trio.current_time()
        # Empty, as far as this mount knows (the name was free): its listing is that, and
        # the names a program then looks up in it (git's object folders) cost no LIST.
        self.listings.store(key, {}, now)
        node = self.inodes.for_entry(key, True, None, now)
        node.lookups += 1
        return self.attr(node)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        node, key = await self._removable(parent_ino, name, is_dir=True)
        self.listings.forget(key)
        if await self._list(node):
            raise NotEmpty(key)
        await self.store.delete(key + "/")
        self.listings.forget(key)
        self._gone(key)

    async def rename(self, parent_old: int, name_old: str, parent_new: int, name_new: str, flags: int = 0) -> None:
        src_parent, dst_parent = self.node(parent_old), self.node(parent_new)
        src_key, dst_key = self._child_key(src_parent, name_old), self._child_key(dst_parent, name_new)
        self._require_writable(src_key)
        if flags & RENAME_EXCHANGE:
            raise NotSupported("rename with RENAME_EXCHANGE")
        self._storable(name_new)
        src = await self._existing(src_parent, name_old)
        if src is None:
            raise NotFound(src_key)
        dst = await self._existing(dst_parent, name_new)
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise Exists(dst_key)
            if dst.is_dir and not src.is_dir:
                raise IsADirectory(dst_key)
            if src.is_dir and not dst.is_dir:
                raise NotADirectory(dst_key)
            if dst.is_dir:
                self.listings.forget(dst.key)
                if await self._list(dst):
                    raise NotEmpty(dst_key)
        if src.is_dir:
            await self._rename_dir(src, dst_key)
        else:
            await self._rename_file(src, dst_key, dst)
        now = trio.current_time()
        # The cached listings learn the move (rsync renames every file it writes: forgetting
        # the folder's listing would cost a LIST per file).
        self.listings.remove(src_key, now)
        if src.is_dir:
            self.listings.add(dst_key, Entry(True, None))
        else:
            self.listings.add(dst_key, Entry(False, ObjectInfo(dst_key, src.size, src.etag, src.mtime)))

    async def _walk(self, prefix: str, limit: int) -> tuple[list[str], list[str]]:
        """Object keys and folder prefixes under `prefix` (itself included), one LIST per folder;
        stops early once more than `limit` were found."""
        files: list[str] = []
        dirs: list[str] = []
        todo = [prefix]
        while todo and len(files) + len(dirs) <= limit:
            d = todo.pop()
            dirs.append(d)
            listing = await self.store.list_dir(d)
            files += [f.key for f in listing.files]
            todo += listing.dirs
            todo += [m.rstrip("/") for m in listing.markers if m.rstrip("/") != d and m.rstrip("/") not in listing.dirs]
        return files, dirs

    async def _rename_file(self, src: Node, dst_key: str, dst: Node | None) -> None:
        """Copy, then delete: from this mount's view the new name appears complete (the copy is
        one server-side request) and only then the old one goes."""
        assert self.staging is not None and self.writer is not None
        if dst is not None and dst.staged is not None:
            self._unstage(dst)
        staged = src.staged
        if staged is not None and (staged.dirty or staged.base_etag is None):
            had_remote = staged.base_etag is not None
            old_key = src.key
            # The destination may exist remotely: the upload replaces the version the lookup
            # above saw (from the folder's listing: no request), or requires the name to be free.
            # Either precondition travels with the upload, so a change meanwhile is a conflict.
            self.staging.rekey(staged, dst_key, base_etag=(dst.etag or None) if dst is not None and not dst.is_dir else None)
            self.inodes.move(src, dst_key)
            if staged.handles <= 0:
                await self.writer.commit(staged)
            if had_remote:
                await self.store.delete(old_key)
            return
        info = await self.store.copy(src.key, dst_key, src.size)
        set_mtime = self.mtimes.get(src.key, src.etag)
        if set_mtime is not None:  # the copy keeps the metadata; the index follows the name
            self.mtimes.set(dst_key, info.etag, set_mtime)
        await self.store.delete(src.key)
        if staged is not None:
            self.staging.rekey(staged, dst_key, base_etag=info.etag, base_size=info.size, changed=[])
        self.inodes.move(src, dst_key)
        src.etag, src.size, src.checked_at = info.etag, info.size, trio.current_time()

    async def _rename_dir(self, src: Node, dst_key: str) -> None:
        """Object by object, up to DIR_RENAME_LIMIT objects (else EXDEV, and `mv` copies the tree
        itself). Every object is copied before any is deleted, so a failure part way leaves the
        tree complete under the old name (plus a partial copy under the new one), never lost."""
        assert self.staging is not None
        prefix = src.key
        if any(k.startswith(prefix + "/") and f.dirty for k, f in self.staging.by_key.items()):
            raise CrossDevice(f"{prefix}: files in it are being written")
        files, dirs = await self._walk(prefix, DIR_RENAME_LIMIT)
        if len(files) + len(dirs) > DIR_RENAME_LIMIT:
            raise CrossDevice(f"{prefix}: more than {DIR_RENAME_LIMIT} objects")
        for d in dirs:  # every folder becomes an explicit marker under the new name
            await self.store.put_marker(dst_key + d[len(prefix) :])
        for key in files:
            await self.store.copy(key, dst_key + key[len(prefix) :])
        for key in files:
            await self.store.delete(key)
        for d in reversed(dirs):
            try:
                await self.store.delete(d + "/")
            except NotFound:
                pass  # an implicit folder (a prefix without a marker)
        for node in self.inodes.under(prefix):  # inodes below move with the directory, as in POSIX
            self.inodes.move(node, dst_key + node.key[len(prefix) :])
        self.listings.forget_tree(prefix)
        self.inodes.move(src, dst_key)

    def statfs(self) -> StatFs:
        # Object stores have no capacity; report a large, constant one so tools that check free
        # space before writing (cp, rsync) proceed, and the usual 255-byte name limit.
        frsize = 4096
        blocks = (1 << 50) // frsize  # 1 PiB
        free = 0 if self.readonly else blocks
        return StatFs(self.cache.block_size, frsize, blocks, free, free, 1 << 32, 1 << 31, NAME_MAX)

