"""The file system's namespace: inodes, attributes, listings, lookups and directories (a part
of `sidecar.vfs.core.Filesystem`, which holds the state it uses; see that module for the model
and its invariants).

Concurrency: trio thread only. One listing of a folder is in flight at a time (`_listing_flights`);
everyone who needs it waits for that one.
"""

from __future__ import annotations

import dataclasses
import stat as stat_mod
import time
from dataclasses import dataclass, field

import trio

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.errors import BadHandle, NotADirectory, NotFound, ObjectChanged, SidecarError
from sidecar.store.base import DirInfo, Listing, ObjectInfo, ObjectStore
from sidecar.vfs.deletes import PendingDeletes
from sidecar.vfs.inodes import ROOT_INO, InodeTable, Node
from sidecar.log import get_logger
from sidecar.vfs.listings import NAME_MAX, Entry, ListAhead, Listings, parent_key, unusable_name
from sidecar.vfs.reader import Reader
from sidecar.vfs.staging import StagedFile, StagingArea


log = get_logger(__name__)

DIR_TTL_MIN = 30.0  # s a known folder is trusted, whatever the metadata TTL
# entries: a lookup in an unlisted folder lists all of it (every page, once, kept for the TTL) up
# to this many; a bigger folder's names are looked up one by one (HEAD). About 30 MB of listing.
FOLDER_LIST_MAX = 100_000
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
    ref: ObjectRef  # the version it reads (not used while the node is staged)
    writable: bool = False
    # How its reads of `ref` are served; made at the first read: an open whose file the kernel
    # has in its page cache (a training epoch after the first) reads nothing through it.
    reader: Reader | None = None


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


class Namespace:
    """What is where: the names of the mount and their attributes, from listings (positive and
    negative answers cached for the TTL), revalidated against the bucket once stale."""

    # Set by Filesystem.__init__:
    store: ObjectStore
    cache: BlockCache
    inodes: InodeTable
    listings: Listings
    staging: StagingArea | None
    deletes: PendingDeletes
    _ahead: ListAhead
    _ahead_limiter: trio.CapacityLimiter

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

    def attr(self, node: Node) -> Attr:
        if node.is_dir:
            mode = stat_mod.S_IFDIR | (0o555 if self.readonly else 0o755)
            return Attr(node.ino, True, 0, self.mounted_at, mode, self.uid, self.gid, self.dir_ttl)
        mode = stat_mod.S_IFREG | (0o444 if self.readonly else 0o644)
        return Attr(node.ino, False, node.size, node.mtime, mode, self.uid, self.gid, self.ttl)

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

    async def _list(self, node: Node, *, bounded: bool = False) -> dict[str, Entry] | None:
        return await self._list_key(node.key, bounded=bounded)

    async def _list_key(self, key: str, *, bounded: bool = False) -> dict[str, Entry] | None:
        """The folder's entries, from the cache while fresh, else one LIST shared by everyone
        who asks meanwhile (single flight). With `bounded`, returns None (and remembers the
        folder as big) when it holds more than FOLDER_LIST_MAX entries."""
        while True:
            cached = self.listings.fresh(key, trio.current_time())
            if cached is not None:
                return cached
            flight = self._listing_flights.get(key)
            if flight is None:
                break
            await flight.wait()  # someone is listing it: share their answer
            if bounded and self._big.get(key, float("-inf")) > trio.current_time():
                return None
        flight = self._listing_flights[key] = trio.Event()
        try:
            listing = await self.store.list_dir(key, max_entries=FOLDER_LIST_MAX if bounded else None)
            if not listing.complete:
                self._big[key] = trio.current_time() + self.dir_ttl
                return None
            return await self.adopt_listing(key, listing)
        finally:
            del self._listing_flights[key]
            flight.set()

    def _list_ahead(self, node: Node) -> None:
        """A walker went down into `node`: its next sibling folders are listed ahead (ListAhead)."""
        if not node.key:
            return
        parent, _, name = node.key.rpartition("/")
        now = trio.current_time()
        siblings = self.listings.fresh(parent, now)
        if siblings is None:
            return
        for key in self._ahead.next_folders(parent, siblings, name):
            if key not in self._listing_flights and self.listings.fresh(key, now) is None:
                self.cache.spawn(self._list_quietly, key)

    async def _list_quietly(self, key: str) -> None:
        async with self._ahead_limiter:
            try:
                await self._list_key(key, bounded=True)
            except SidecarError as exc:  # the walker lists it itself, and gets the error then
                log.debug("list_ahead_failed", key=key, code=exc.code)

    async def adopt_listing(self, prefix: str, listing: Listing) -> dict[str, Entry]:
        """A complete listing of folder `prefix` answers lookups, getattrs and opens of its
        names while it is fresh, whoever made it (a lookup, readdir, or a prefetch's plan)."""
        entries = self.listings.entries_of(prefix, listing)
        if self.deletes:  # old names of renamed objects, their deletes waiting (sidecar.vfs.deletes)
            for name in [n for n, e in entries.items() if e.info is not None and self.deletes.hides(e.info.key)]:
                del entries[name]
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
                # One listing (every page of it) answers this lookup and every other in the
                # folder while it is fresh (rsync, zarr, an epoch over an image folder): no HEAD
                # per name. A folder over FOLDER_LIST_MAX is remembered as big, and its names are
                # looked up one by one.
                cached = await self._list(parent, bounded=True)
        if cached is not None:
            entry = cached.get(name)
        elif self.listings.absent(key, now):
            entry = None
        else:
            staged = self.staging.by_key.get(key) if self.staging else None
            if staged is not None and staged.state != "conflict":
                found = self._staged_info(staged)
            else:
                found = None if self.deletes.hides(key) else await self.store.stat(key)
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

    async def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory(node.key)
        entries = await self._list(node)
        self._list_ahead(node)
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

    def _reader(self, ref: ObjectRef) -> Reader:
        return Reader(ref, self.cache, self.ranges, self.streams, self.max_readahead_blocks, self.kernel_readahead)

    def _handle(self, fh: int, kind: type) -> FileHandle | DirHandle:
        h = self._handles.get(fh)
        if not isinstance(h, kind):
            raise BadHandle(f"handle {fh}")
        return h

    def statfs(self) -> StatFs:
        # Object stores have no capacity; report a large, constant one so tools that check free
        # space before writing (cp, rsync) proceed, and the usual 255-byte name limit.
        frsize = 4096
        blocks = (1 << 50) // frsize  # 1 PiB
        free = 0 if self.readonly else blocks
        return StatFs(self.cache.block_size, frsize, blocks, free, free, 1 << 32, 1 << 31, NAME_MAX)
