"""The filesystem core: plain async methods over an `ObjectStore` and a `BlockCache`.

It never imports pyfuse3, so it is tested without a kernel; `sidecar.fuse_ops` adapts it.

Model: the mount root is an object-key prefix (the storage URL's path plus the mount's
`source_path`). Directories are key prefixes (and empty "folder/" marker objects); files are
objects. Sizes, mtimes and etags come from the listing, so listing a directory of N objects costs
ceil(N / page size) LIST calls and no HEAD.

Invariants:
- an inode's key never changes; a key maps to at most one inode (`_by_key`);
- the kernel's lookup count of an inode is `Node.lookups`: +1 for each lookup reply and each
  accepted readdirplus entry, -n on forget; a node whose count reaches zero is dropped (the root
  never is);
- directory listings and lookups (positive and negative) are cached for `ttl` seconds of
  `trio.current_time()`, and the kernel's entry/attr timeouts equal `ttl`;
- an open handle pins (key, etag, size): it reads only blocks of that etag, and a fetch that finds
  the object changed raises ObjectChanged (ESTALE), never a mix of old and new bytes.
"""

from __future__ import annotations

import itertools
import os
import stat as stat_mod
import time
from dataclasses import dataclass, field

import trio

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.cache.prefetch import ReadAhead
from sidecar.errors import BadHandle, IsADirectory, NotADirectory, NotFound, ObjectChanged, ReadOnly
from sidecar.log import get_logger
from sidecar.store.base import DirInfo, Listing, ObjectInfo, ObjectStore

log = get_logger(__name__)

ROOT_INO = 1
NAME_MAX = 255


@dataclass
class Attr:
    ino: int
    is_dir: bool
    size: int
    mtime: float
    mode: int
    uid: int
    gid: int

    @property
    def nlink(self) -> int:
        return 2 if self.is_dir else 1


@dataclass
class Node:
    ino: int
    key: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str = ""
    lookups: int = 0
    checked_at: float = float("-inf")  # trio time of the last listing/HEAD that confirmed it
    last_open_etag: str | None = None


@dataclass
class _Entry:
    is_dir: bool
    info: ObjectInfo | None  # None for directories


@dataclass
class _Dir:
    entries: dict[str, _Entry]
    expires: float


@dataclass
class FileHandle:
    node: Node
    ref: ObjectRef
    readahead: ReadAhead


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
    ) -> None:
        self.store = store
        self.cache = cache
        self.root_prefix = root_prefix.strip("/")
        self.ttl = ttl
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.readonly = readonly
        self.max_readahead_blocks = max_readahead_blocks
        root = Node(ROOT_INO, self.root_prefix, True, lookups=1)
        self._nodes: dict[int, Node] = {ROOT_INO: root}
        self._by_key: dict[str, int] = {self.root_prefix: ROOT_INO}
        self._next_ino = itertools.count(ROOT_INO + 1)
        self._dirs: dict[str, _Dir] = {}
        self._negative: dict[str, float] = {}  # key -> expiry of a cached "does not exist"
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = itertools.count(1)
        self._warned: set[str] = set()
        self.mounted_at = time.time()  # mtime of directories, which object stores do not have

    # -- inode table -------------------------------------------------------------------------

    def _child_key(self, parent: Node, name: str) -> str:
        return f"{parent.key}/{name}" if parent.key else name

    def node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino}") from None

    def _node_for(self, key: str, entry: _Entry, now: float) -> Node:
        ino = self._by_key.get(key)
        node = self._nodes.get(ino) if ino is not None else None
        if node is not None and node.is_dir != entry.is_dir:
            # Type changed remotely (a file became a folder or back): a new inode.
            self._drop_node(node)
            node = None
        if node is None:
            node = Node(next(self._next_ino), key, entry.is_dir)
            self._nodes[node.ino] = node
            self._by_key[key] = node.ino
        if entry.info is not None:
            node.size, node.mtime, node.etag = entry.info.size, entry.info.mtime, entry.info.etag
        node.checked_at = now
        return node

    def _drop_node(self, node: Node) -> None:
        if node.ino == ROOT_INO:
            return
        self._nodes.pop(node.ino, None)
        if self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference (lookup reply or accepted readdirplus entry)."""
        self.node(ino).lookups += 1

    def forget(self, items: list[tuple[int, int]]) -> None:
        """Never raises: the kernel does not wait for an answer."""
        for ino, n in items:
            node = self._nodes.get(ino)
            if node is None or ino == ROOT_INO:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                self._drop_node(node)

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    # -- attributes --------------------------------------------------------------------------

    def attr(self, node: Node) -> Attr:
        if node.is_dir:
            mode = stat_mod.S_IFDIR | (0o555 if self.readonly else 0o755)
        else:
            mode = stat_mod.S_IFREG | (0o444 if self.readonly else 0o644)
        mtime = node.mtime if not node.is_dir else self.mounted_at
        return Attr(node.ino, node.is_dir, node.size if not node.is_dir else 0, mtime, mode, self.uid, self.gid)

    # -- listings ----------------------------------------------------------------------------

    def _warn_once(self, key: str, reason: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("object_skipped", key=key, reason=reason)

    def _valid_name(self, name: str, key: str) -> bool:
        if name == "":
            self._warn_once(key, "empty path segment ('//' in the key)")
        elif name in (".", ".."):
            self._warn_once(key, "'.' or '..' as a path segment")
        elif "/" in name:
            self._warn_once(key, "empty path segment ('//' in the key)")
        elif len(name.encode()) > NAME_MAX:
            self._warn_once(key, f"name longer than {NAME_MAX} bytes")
        else:
            return True
        return False

    def _entries_of(self, prefix: str, listing: Listing) -> dict[str, _Entry]:
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, _Entry] = {}
        for d in listing.dirs:
            name = d[len(base) :]
            if self._valid_name(name, d + "/"):
                entries[name] = _Entry(True, None)
        for marker in listing.markers:
            # "folder/sub/" listed inside "folder/" is a directory that may hold nothing else.
            name = marker[len(base) :].rstrip("/")
            if name and self._valid_name(name, marker):
                entries.setdefault(name, _Entry(True, None))
        for info in listing.files:
            name = info.key[len(base) :]
            if not self._valid_name(name, info.key):
                continue
            if name in entries:
                self._warn_once(info.key, "an object with the same name as a folder (the folder is shown)")
                continue
            entries[name] = _Entry(False, info)
        return entries

    async def _list(self, node: Node) -> dict[str, _Entry]:
        now = trio.current_time()
        cached = self._dirs.get(node.key)
        if cached is not None and cached.expires > now:
            return cached.entries
        listing = await self.store.list_dir(node.key)
        entries = self._entries_of(node.key, listing)
        now = trio.current_time()
        self._dirs[node.key] = _Dir(entries, now + self.ttl)
        node.checked_at = now
        return entries

    # -- operations --------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Attr:
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(parent.key)
        if name in (".", ".."):
            node = parent if name == "." else self._nodes[ROOT_INO] if parent.ino == ROOT_INO else None
            if node is None:
                raise NotFound(name)  # the kernel resolves ".." itself
            node.lookups += 1
            return self.attr(node)
        key = self._child_key(parent, name)
        now = trio.current_time()
        cached_dir = self._dirs.get(parent.key)
        entry: _Entry | None
        if cached_dir is not None and cached_dir.expires > now:
            entry = cached_dir.entries.get(name)
        elif self._negative.get(key, float("-inf")) > now:
            entry = None
        else:
            ino = self._by_key.get(key)
            known = self._nodes.get(ino) if ino is not None else None
            if known is not None and known.checked_at + self.ttl > now:
                known.lookups += 1
                return self.attr(known)
            if len(name.encode()) > NAME_MAX:
                raise NotFound(name)
            found = await self.store.stat(key)
            if found is None:
                entry = None
            elif isinstance(found, DirInfo):
                entry = _Entry(True, None)
            else:
                entry = _Entry(False, found)
        if entry is None:
            self._negative[key] = trio.current_time() + self.ttl
            raise NotFound(key)
        self._negative.pop(key, None)
        node = self._node_for(key, entry, trio.current_time())
        node.lookups += 1
        return self.attr(node)

    async def _revalidate(self, node: Node) -> None:
        if node.ino == ROOT_INO or node.checked_at + self.ttl > trio.current_time():
            return
        found = await self.store.stat(node.key)
        now = trio.current_time()
        if found is None or isinstance(found, DirInfo) != node.is_dir:
            self._negative[node.key] = now + self.ttl
            raise NotFound(node.key)
        if isinstance(found, ObjectInfo):
            node.size, node.mtime, node.etag = found.size, found.mtime, found.etag
        node.checked_at = now

    async def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        await self._revalidate(node)
        return self.attr(node)

    async def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory(node.key)
        entries = await self._list(node)
        now = trio.current_time()
        # A snapshot: offsets stay valid while the remote directory changes under a reader.
        snapshot = [(name, self._node_for(self._child_key(node, name), e, now)) for name, e in sorted(entries.items())]
        fh = next(self._next_fh)
        self._handles[fh] = DirHandle(node, snapshot)
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[str, Attr, int]]:
        """Entries from offset `start`, each with the offset of the next one. The caller reports
        each entry the kernel accepted with `remember(attr.ino)`."""
        h = self._handle(fh, DirHandle)
        return [(name, self.attr(node), i + 1) for i, (name, node) in enumerate(h.entries[start:], start)]

    def releasedir(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if isinstance(h, DirHandle):
            for _, node in h.entries:  # entries the kernel never took a reference to
                if node.lookups <= 0:
                    self._drop_node(node)

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Returns (handle, keep_cache). keep_cache is true when the object's etag is the one
        seen at the previous open, so the kernel may keep its page cache."""
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(node.key)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise ReadOnly(node.key)
        await self._revalidate(node)
        keep_cache = node.last_open_etag == node.etag
        node.last_open_etag = node.etag
        fh = next(self._next_fh)
        ra = ReadAhead(self.cache.block_size, self.max_readahead_blocks)
        self._handles[fh] = FileHandle(node, ObjectRef(node.key, node.etag, node.size), ra)
        return fh, keep_cache

    def _handle(self, fh: int, kind: type) -> FileHandle | DirHandle:
        h = self._handles.get(fh)
        if not isinstance(h, kind):
            raise BadHandle(f"handle {fh}")
        return h

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handle(fh, FileHandle)
        assert isinstance(h, FileHandle)
        ref = h.ref
        if offset >= ref.size or size <= 0:
            return b""
        end = min(offset + size, ref.size)
        bs = self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        # Start the blocks this read needs first, then the read-ahead, so that read-ahead never
        # takes the memory the demand blocks need; `get` below waits for room if need be.
        self.cache.prefetch(ref, range(first, last + 1), readahead=False)
        self.cache.prefetch(ref, h.readahead.on_read(offset, end - offset))
        try:
            if first == last:
                block = await self.cache.get(ref, first)
                base = first * bs
                return block[offset - base : end - base]
            parts = []
            for index in range(first, last + 1):
                block = await self.cache.get(ref, index)
                base = index * bs
                parts.append(memoryview(block)[max(offset - base, 0) : min(end - base, len(block))])
            return b"".join(parts)
        except ObjectChanged:
            h.node.checked_at = float("-inf")  # the next getattr/open sees the new version
            self._dirs.pop(h.node.key.rpartition("/")[0] if "/" in h.node.key else "", None)
            raise

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    def statfs(self) -> StatFs:
        # Object stores have no capacity; report a large, constant one so tools that check free
        # space before writing (cp, rsync) proceed, and the usual 255-byte name limit.
        frsize = 4096
        blocks = (1 << 50) // frsize  # 1 PiB
        free = 0 if self.readonly else blocks
        return StatFs(self.cache.block_size, frsize, blocks, free, free, 1 << 32, 1 << 31, NAME_MAX)
