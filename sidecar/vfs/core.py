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
from sidecar.errors import (
    BadHandle,
    CrossDevice,
    Exists,
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
    UploadFailed,
    WriteConflict,
)
from sidecar.log import get_logger
from sidecar.store.base import DirInfo, Listing, ObjectInfo, ObjectStore
from sidecar.vfs.staging import StagedFile, StagingArea, StagingFull

log = get_logger(__name__)

ROOT_INO = 1
NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
DIR_RENAME_LIMIT = 1000  # objects; a larger directory answers EXDEV and `mv` copies it instead


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
    staged: StagedFile | None = None  # local bytes being written; the truth for reads meanwhile


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
    writable: bool = False


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
    ) -> None:
        if not readonly and staging is None:
            raise ValueError("a writable file system needs a staging area")
        self.staging = staging
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
        self._overlay_staged(node.key, entries)
        now = trio.current_time()
        self._dirs[node.key] = _Dir(entries, now + self.ttl)
        node.checked_at = now
        return entries

    def _overlay_staged(self, prefix: str, entries: dict[str, _Entry]) -> None:
        """Files being written that the bucket does not have yet are part of the listing."""
        if self.staging is None:
            return
        base = f"{prefix}/" if prefix else ""
        for key, f in self.staging.by_key.items():
            if key.startswith(base) and "/" not in key[len(base) :] and f.state != "conflict":
                entries[key[len(base) :]] = _Entry(False, ObjectInfo(key, f.size, f.base_etag or "", time.time()))

    def _parent_key(self, key: str) -> str:
        return key.rpartition("/")[0] if "/" in key else ""

    def _forget_listing(self, key: str) -> None:
        self._dirs.pop(self._parent_key(key), None)

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
            staged = self.staging.by_key.get(key) if self.staging else None
            found = (
                ObjectInfo(key, staged.size, staged.base_etag or "", time.time())
                if staged is not None and staged.state != "conflict"
                else await self.store.stat(key)
            )
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
        if node.ino == ROOT_INO or node.staged is not None or node.checked_at + self.ttl > trio.current_time():
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
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND))
        if writable:
            self._require_writable(node.key)
            staged = await self._stage(node, truncate=bool(flags & os.O_TRUNC))
            staged.handles += 1
        else:
            await self._revalidate(node)
        keep_cache = node.staged is None and node.last_open_etag == node.etag
        node.last_open_etag = node.etag if node.staged is None else None
        fh = next(self._next_fh)
        ra = ReadAhead(self.cache.block_size, self.max_readahead_blocks)
        self._handles[fh] = FileHandle(node, ObjectRef(node.key, node.etag, node.size), ra, writable)
        return fh, keep_cache

    def _handle(self, fh: int, kind: type) -> FileHandle | DirHandle:
        h = self._handles.get(fh)
        if not isinstance(h, kind):
            raise BadHandle(f"handle {fh}")
        return h

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
        if h.readahead.window == 0 and not all(self.cache.has(ref, i) for i in range(first, last + 1)):
            # A random reader: fetch just the bytes asked for, not whole blocks, so a 4 KiB read
            # of a 5 GiB object costs a 4 KiB GET (the kernel page cache keeps what it read).
            try:
                return self.cache.count_direct(await self.store.get_range(ref.key, offset, end, ref.etag))
            except ObjectChanged:
                h.node.checked_at = float("-inf")
                raise
        # Start the blocks this read needs first, then the read-ahead, so that read-ahead never
        # takes the memory the demand blocks need; `get` below waits for room if need be.
        self.cache.prefetch(ref, range(first, last + 1), readahead=False)
        self.cache.prefetch(ref, ahead)
        try:
            if first == last:
                block = await self.cache.get(ref, first)
                base = first * bs
                return bytes(memoryview(block)[offset - base : end - base])  # blocks may be bytearrays
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
        h = self._handles.pop(fh, None)
        if isinstance(h, FileHandle) and h.writable and h.node.staged is not None:
            staged = h.node.staged
            staged.handles -= 1
            if staged.handles <= 0 and not staged.dirty and staged.state != "conflict":
                self._unstage(h.node)

    # -- writing -----------------------------------------------------------------------------

    def _require_writable(self, key: str) -> None:
        if self.readonly or self.staging is None:
            raise ReadOnly(key)

    def _unstage(self, node: Node) -> None:
        if node.staged is not None and self.staging is not None:
            self.staging.remove(node.staged)
        node.staged = None

    async def _stage(self, node: Node, *, truncate: bool) -> StagedFile:
        """The node's staged file, created on first write access: empty when truncating, else a
        copy of the object fetched through the block cache."""
        assert self.staging is not None
        if node.staged is not None:
            if truncate:
                self._staging_call(self.staging.truncate, node.staged, 0)
                node.size = 0
            return node.staged
        await self._revalidate(node)
        staged = self.staging.create(node.key, node.etag or None)
        try:
            if truncate:
                self._staging_call(self.staging.truncate, staged, 0)
                node.size = 0
            else:
                ref = ObjectRef(node.key, node.etag, node.size)
                self.cache.prefetch(ref, range(0, self.cache.blocks_of(ref)))
                for index in range(self.cache.blocks_of(ref)):
                    data = await self.cache.get(ref, index)
                    os.pwrite(staged.fd, data, index * self.cache.block_size)
                staged.size = node.size
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

    async def create(self, parent_ino: int, name: str, flags: int) -> tuple[int, Attr]:
        parent = self.node(parent_ino)
        key = self._child_key(parent, name)
        self._require_writable(key)
        if len(name.encode()) > NAME_MAX:
            raise NameTooLong(name)
        assert self.staging is not None
        now = trio.current_time()
        node = self._node_for(key, _Entry(False, ObjectInfo(key, 0, "", time.time())), now)
        if node.staged is not None:
            self._staging_call(self.staging.truncate, node.staged, 0)
        else:
            existing = self.staging.by_key.get(key)
            if existing is not None:  # staged for a previous inode of this key
                self.staging.remove(existing)
            node.staged = self.staging.create(key, None)
            self._staging_call(self.staging.truncate, node.staged, 0)  # dirty: even an empty file is stored
        node.size, node.etag = 0, ""
        node.staged.handles += 1
        node.lookups += 1
        self._negative.pop(key, None)
        cached = self._dirs.get(parent.key)
        if cached is not None:
            cached.entries[name] = _Entry(False, ObjectInfo(key, 0, "", time.time()))
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
        """close(): a dirty file is stored before close returns, so an acknowledged close means
        the bytes are in the bucket."""
        h = self._handle(fh, FileHandle)
        assert isinstance(h, FileHandle)
        if h.writable and h.node.staged is not None and h.node.staged.dirty:
            await self.upload(h.node.staged)

    async def fsync(self, fh: int) -> None:
        await self.flush(fh)

    async def upload(self, staged: StagedFile) -> ObjectInfo | None:
        """Stores a staged file. Raises UploadFailed (EIO; the file stays staged and is retried
        in the background) or WriteConflict (the object changed remotely since it was staged)."""
        assert self.staging is not None
        while staged.uploading is not None:  # one upload of a file at a time
            await staged.uploading.wait()
        if not staged.dirty:
            return None
        if staged.state == "conflict":
            raise WriteConflict(staged.key)
        staged.uploading = trio.Event()
        generation = staged.generation
        try:
            remote = await self.store.stat(staged.key)
            remote_etag = remote.etag if isinstance(remote, ObjectInfo) else None
            if remote_etag != staged.base_etag:
                self.staging.mark(staged, state="conflict")
                staged.last_error = "the object changed in the bucket since this file was opened for writing; local copy kept"
                log.error("write_conflict", key=staged.key, local_path=str(staged.data_path))
                raise WriteConflict(staged.key)
            info = await self.store.put_file(staged.key, str(staged.data_path), staged.size)
        except (WriteConflict, trio.Cancelled):
            raise
        except SidecarError as exc:
            staged.upload_failures += 1
            staged.last_error = f"{exc.code}: {exc}"
            log.warning("upload_failed", key=staged.key, code=exc.code, failures=staged.upload_failures)
            raise UploadFailed(f"{staged.key}: {exc}") from None
        finally:
            event, staged.uploading = staged.uploading, None
            event.set()
        staged.upload_failures, staged.last_error = 0, None
        self.staging.mark(staged, dirty=staged.generation != generation, base_etag=info.etag)
        log.info("uploaded", key=staged.key, size=info.size)
        node = self._nodes.get(self._by_key.get(staged.key, -1))
        if node is not None:
            node.etag, node.size, node.checked_at = info.etag, staged.size, trio.current_time()
            if staged.handles <= 0 and not staged.dirty:
                self._unstage(node)
        elif staged.handles <= 0 and not staged.dirty:
            self.staging.remove(staged)
        self._forget_listing(staged.key)
        return info

    async def upload_pending(self, *, only_idle: bool = True) -> int:
        """Uploads dirty staged files (those no handle has open, unless `only_idle` is false);
        returns how many are left. Failures stay staged for the next round."""
        assert self.staging is not None
        for staged in list(self.staging.pending()):
            if staged.state == "conflict" or (only_idle and staged.handles > 0):
                continue
            try:
                await self.upload(staged)
            except (UploadFailed, WriteConflict):
                pass
        return len(self.staging.pending())

    async def setattr(self, ino: int, *, size: int | None = None) -> Attr:
        """Only the size is stored (truncate); mode, owner and times are accepted and not kept."""
        node = self.node(ino)
        if size is not None:
            if node.is_dir:
                raise IsADirectory(node.key)
            self._require_writable(node.key)
            staged = await self._stage(node, truncate=size == 0)
            self._staging_call(self.staging.truncate, staged, size)  # type: ignore[union-attr]
            node.size = size
            if staged.handles <= 0:  # truncate(2) of a closed file: store it now
                await self.upload(staged)
        elif not node.is_dir:
            await self._revalidate(node)
        return self.attr(node)

    async def _existing(self, parent: Node, name: str) -> Node | None:
        try:
            attr = await self.lookup(parent.ino, name)
        except NotFound:
            return None
        node = self._nodes[attr.ino]
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
        self._unstage(node)
        if remote:
            await self.store.delete(key)
        self._gone(key)

    def _gone(self, key: str) -> None:
        now = trio.current_time()
        self._negative[key] = now + self.ttl
        cached = self._dirs.get(self._parent_key(key))
        if cached is not None:
            cached.entries.pop(key.rpartition("/")[2], None)
        ino = self._by_key.pop(key, None)
        if ino is not None and ino in self._nodes:
            self._nodes[ino].checked_at = float("-inf")

    async def mkdir(self, parent_ino: int, name: str) -> Attr:
        """A directory is an empty "name/" marker object, as the S3 console makes them."""
        parent = self.node(parent_ino)
        key = self._child_key(parent, name)
        self._require_writable(key)
        if len(name.encode()) > NAME_MAX:
            raise NameTooLong(name)
        if await self._existing(parent, name) is not None:
            raise Exists(key)
        await self.store.put_marker(key)
        self._negative.pop(key, None)
        cached = self._dirs.get(parent.key)
        if cached is not None:
            cached.entries[name] = _Entry(True, None)
        node = self._node_for(key, _Entry(True, None), trio.current_time())
        node.lookups += 1
        return self.attr(node)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        node, key = await self._removable(parent_ino, name, is_dir=True)
        self._dirs.pop(key, None)
        if await self._list(node):
            raise NotEmpty(key)
        await self.store.delete(key + "/")
        self._dirs.pop(key, None)
        self._gone(key)

    async def rename(self, parent_old: int, name_old: str, parent_new: int, name_new: str, flags: int = 0) -> None:
        src_parent, dst_parent = self.node(parent_old), self.node(parent_new)
        src_key, dst_key = self._child_key(src_parent, name_old), self._child_key(dst_parent, name_new)
        self._require_writable(src_key)
        if flags & RENAME_EXCHANGE:
            raise NotSupported("rename with RENAME_EXCHANGE")
        if len(name_new.encode()) > NAME_MAX:
            raise NameTooLong(name_new)
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
                self._dirs.pop(dst.key, None)
                if await self._list(dst):
                    raise NotEmpty(dst_key)
        if src.is_dir:
            await self._rename_dir(src, dst_key, dst)
        else:
            await self._rename_file(src, dst_key, dst)
        for key in (src_key, dst_key):
            self._forget_listing(key)
        self._negative[src_key] = trio.current_time() + self.ttl
        self._negative.pop(dst_key, None)

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

    def _move_node(self, node: Node, new_key: str) -> None:
        old = self._by_key.get(new_key)
        if old is not None and old != node.ino and old in self._nodes:
            self._nodes[old].checked_at = float("-inf")
            del self._by_key[new_key]
        if self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]
        node.key = new_key
        self._by_key[new_key] = node.ino

    async def _rename_file(self, src: Node, dst_key: str, dst: Node | None) -> None:
        """Copy, then delete: from this mount's view the new name appears complete (the copy is
        one server-side request) and only then the old one goes."""
        assert self.staging is not None
        if dst is not None and dst.staged is not None:
            self._unstage(dst)
        staged = src.staged
        if staged is not None and (staged.dirty or staged.base_etag is None):
            had_remote = staged.base_etag is not None
            old_key = src.key
            self.staging.rekey(staged, dst_key)
            # the destination may exist remotely: base it on what is there, we replace it
            remote = await self.store.stat(dst_key)
            self.staging.mark(staged, base_etag=remote.etag if isinstance(remote, ObjectInfo) else None)
            self._move_node(src, dst_key)
            if staged.handles <= 0:
                await self.upload(staged)
            if had_remote:
                await self.store.delete(old_key)
            return
        info = await self.store.copy(src.key, dst_key)
        await self.store.delete(src.key)
        if staged is not None:
            self.staging.rekey(staged, dst_key)
            self.staging.mark(staged, base_etag=info.etag)
        self._move_node(src, dst_key)
        src.etag, src.size, src.checked_at = info.etag, info.size, trio.current_time()

    async def _rename_dir(self, src: Node, dst_key: str, dst: Node | None) -> None:
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
        for node in list(self._nodes.values()):  # inodes below move with the directory, as in POSIX
            if node.key.startswith(prefix + "/"):
                self._move_node(node, dst_key + node.key[len(prefix) :])
        for key in [k for k in self._dirs if k == prefix or k.startswith(prefix + "/")]:
            del self._dirs[key]
        self._move_node(src, dst_key)

    def statfs(self) -> StatFs:
        # Object stores have no capacity; report a large, constant one so tools that check free
        # space before writing (cp, rsync) proceed, and the usual 255-byte name limit.
        frsize = 4096
        blocks = (1 << 50) // frsize  # 1 PiB
        free = 0 if self.readonly else blocks
        return StatFs(self.cache.block_size, frsize, blocks, free, free, 1 << 32, 1 << 31, NAME_MAX)
