"""The file system's changes: create, write, close, setattr, unlink, mkdir, rmdir, rename (a part
of `sidecar.vfs.core.Filesystem`). Files are written to their staged copy (sidecar.vfs.staging)
and published by the writer (sidecar.vfs.writer) only once committed; a directory rename is a
copy and delete of each object, refused beyond DIR_RENAME_LIMIT (EXDEV: `mv` copies instead).

Concurrency: trio thread only; staging calls that touch the disk run on it too (a pwrite lands
in the page cache), see `_staging_call`.
"""

from __future__ import annotations

import time

import trio

from sidecar.cache.blocks import ObjectRef, carry
from sidecar.errors import (
    BadHandle, CrossDevice, Exists, InvalidName, IsADirectory, NameTooLong, NotADirectory, NotEmpty, NotFound, NotSupported, ReadOnly,
    SidecarError,
)
from sidecar.log import get_logger
from sidecar.store.base import ObjectInfo, ObjectStore, copy_carrying
from sidecar.vfs.deletes import report_refused
from sidecar.vfs.inodes import Node
from sidecar.vfs.listings import NAME_MAX, Entry, unusable_name
from sidecar.vfs.writer import Writer
from sidecar.vfs.namespace import Attr, FileHandle, Namespace


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
DIR_RENAME_LIMIT = 1000  # objects; a larger directory answers EXDEV and `mv` copies it instead
DIR_RENAME_COPIES = 16  # server-side copies of a directory rename in flight at once
MTIME_DELAY = 1.0  # s an mtime that costs a copy waits for a rename to carry it (stores that `mtime_by_copy`)

log = get_logger(__name__)


class Mutations(Namespace):
    """Every change a writable mount accepts (a read-only one refuses each with EROFS)."""

    writer: Writer | None  # set by Filesystem.__init__

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

    async def create(self, parent_ino: int, name: str, flags: int) -> tuple[int, Attr]:
        parent = self.node(parent_ino)
        key = self._child_key(parent, name)
        self._require_writable(key)
        self._storable(name)
        assert self.staging is not None
        await self.deletes.claim(key)
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
        self._handles[fh] = FileHandle(node, ObjectRef(key, "", 0), True)
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
        written, else by the store's metadata update (S3: a copy of the object onto itself,
        deferred MTIME_DELAY for a rename to carry it)."""
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
        if self.store.mtime_by_copy and self._mtimes_flushing:
            # A copy of the object onto itself: deferred MTIME_DELAY, so that a rename right after
            # (rsync sets the time of its temporary file, then renames it) carries it instead.
            self._mtimes_due[node.key] = (node.etag, mtime, trio.current_time() + MTIME_DELAY)
            self._mtimes_wake.set()
            self._remember_mtime(node, mtime)
            return
        await self._store_mtime_now(node, mtime)

    async def store_mtimes(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stores deferred mtimes once due (those no rename carried). Runs beside the writer."""
        self._mtimes_flushing = True
        task_status.started()
        try:
            while True:
                self._mtimes_wake = trio.Event()
                due = min((d for _, _, d in self._mtimes_due.values()), default=float("inf"))
                with trio.move_on_at(due):
                    await self._mtimes_wake.wait()
                await self.flush_mtimes(trio.current_time())
        finally:
            self._mtimes_flushing = False

    async def flush_mtimes(self, until: float = float("inf")) -> None:
        """Stores the deferred mtimes due by `until` (all of them: at the end of the mount)."""
        for key, (etag, mtime, due) in list(self._mtimes_due.items()):
            if due > until or self._mtimes_due.get(key) != (etag, mtime, due):
                continue
            del self._mtimes_due[key]
            node = self.inodes.current(key)
            if node is None or node.etag != etag or node.is_dir:
                continue  # changed, renamed or deleted meanwhile: nothing of this version to store
            try:
                await self._store_mtime_now(node, mtime)
            except SidecarError as exc:
                log.warning("mtime_not_stored", key=key, code=exc.code)

    async def _store_mtime_now(self, node: Node, mtime: float) -> None:
        info = await self.store.set_mtime(node.key, node.etag, mtime)
        if info is not None and info.etag and info.etag != node.etag:
            node.etag = info.etag
            if node.staged is not None and self.staging is not None:
                self.staging.mark(node.staged, base_etag=info.etag)
        self._remember_mtime(node, mtime)

    def _remember_mtime(self, node: Node, mtime: float) -> None:
        """The mount shows `mtime` for this version of the file: in its index and its listing."""
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
        self._mtimes_due.pop(key, None)
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
        await self.deletes.claim_under(key)
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
        await self.deletes.claim(dst_key)
        if src.is_dir:
            await self.deletes.claim_under(src_key)
            await self.deletes.claim_under(dst_key)
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

    async def _rename_file(self, src: Node, dst_key: str, dst: Node | None) -> None:
        """Copy, then delete: from this mount's view the new name appears complete (the copy is
        one server-side request) and only then the old one goes."""
        assert self.staging is not None and self.writer is not None
        if dst is not None and dst.staged is not None:
            self._unstage(dst)
        staged = src.staged
        if staged is not None and (staged.dirty or staged.base_etag is None):
            old_key, old_etag = src.key, staged.base_etag
            # The destination may exist remotely: the upload replaces the version the lookup
            # above saw (from the folder's listing: no request), or requires the name to be free.
            # Either precondition travels with the upload, so a change meanwhile is a conflict.
            self.staging.rekey(staged, dst_key, base_etag=(dst.etag or None) if dst is not None and not dst.is_dir else None)
            self.inodes.move(src, dst_key)
            if staged.handles <= 0:
                await self.writer.commit(staged)
            if old_etag is not None:
                await self._delete_old_name(old_key, old_etag)
            return
        set_mtime = self.mtimes.get(src.key, src.etag)
        deferred = self._mtimes_due.pop(src.key, None)
        carried = deferred[1] if deferred is not None and deferred[0] == src.etag else None
        if self.deletes.active:
            info = await copy_carrying(self.store, src.key, dst_key, src.size, carried)
            self.deletes.add(src.key, src.etag)
        else:
            info = await self.store.rename(src.key, dst_key, src.size, mtime=carried)
        carry(self.cache, ObjectRef(src.key, src.etag, src.size), ObjectRef(dst_key, info.etag, info.size))
        if set_mtime is not None:  # the copy keeps the metadata; the index follows the name
            self.mtimes.set(dst_key, info.etag, set_mtime)
        if staged is not None:
            self.staging.rekey(staged, dst_key, base_etag=info.etag, base_size=info.size, changed=[])
        self.inodes.move(src, dst_key)
        src.etag, src.size, src.checked_at = info.etag, info.size, trio.current_time()

    async def _rename_dir(self, src: Node, dst_key: str) -> None:
        """In one request where the store moves folders (WebDAV); else object by object, up to
        DIR_RENAME_LIMIT objects (else EXDEV, and `mv` copies the tree itself). Every object is copied before any is deleted, so a failure part way leaves the
        tree complete under the old name (plus a partial copy under the new one), never lost."""
        assert self.staging is not None
        prefix = src.key
        if any(k.startswith(prefix + "/") and f.dirty for k, f in self.staging.by_key.items()):
            raise CrossDevice(f"{prefix}: files in it are being written")
        if self.store.moves_folders:  # one request, however much the folder holds
            await self.store.rename_folder(prefix, dst_key)
            self._moved_tree(prefix, dst_key, src)
            return
        files, dirs = await walk_tree(self.store, prefix, DIR_RENAME_LIMIT)
        if len(files) + len(dirs) > DIR_RENAME_LIMIT:
            raise CrossDevice(f"{prefix}: more than {DIR_RENAME_LIMIT} objects")
        for d in dirs:  # every folder becomes an explicit marker under the new name
            await self.store.put_marker(dst_key + d[len(prefix) :])
        await copy_objects(self.store, [(f, dst_key + f.key[len(prefix) :]) for f in files])
        # S3: 1,000 to a request. Markers last (a store without batches deletes in this order);
        # an implicit folder (a prefix without a marker) has none, which is no error.
        old = [(f.key, f.etag or None) for f in files] + [(d + "/", None) for d in reversed(dirs)]
        report_refused(await self.store.delete_many(old))
        self._moved_tree(prefix, dst_key, src)

    async def _delete_old_name(self, key: str, etag: str) -> None:
        """The old name of a renamed object: its delete waits to go with others where the store
        deletes in batches (sidecar.vfs.deletes), else it is deleted now."""
        if self.deletes.active:
            self.deletes.add(key, etag)
        else:
            await self.store.delete(key)

    def _moved_tree(self, prefix: str, dst_key: str, src: Node) -> None:
        for node in self.inodes.under(prefix):  # inodes below move with the directory, as in POSIX
            self.inodes.move(node, dst_key + node.key[len(prefix) :])
        self.listings.forget_tree(prefix)
        self.inodes.move(src, dst_key)


async def walk_tree(store: ObjectStore, prefix: str, limit: int) -> tuple[list[ObjectInfo], list[str]]:
    """Objects and folder prefixes under `prefix` (itself included), one LIST per folder;
    stops early once more than `limit` were found."""
    files: list[ObjectInfo] = []
    dirs: list[str] = []
    todo = [prefix]
    while todo and len(files) + len(dirs) <= limit:
        d = todo.pop()
        dirs.append(d)
        listing = await store.list_dir(d)
        files += listing.files
        todo += listing.dirs
        todo += [m.rstrip("/") for m in listing.markers if m.rstrip("/") != d and m.rstrip("/") not in listing.dirs]
    return files, dirs


async def copy_objects(store: ObjectStore, pairs: list[tuple[ObjectInfo, str]]) -> None:
    """Server-side copies, DIR_RENAME_COPIES at a time (each object's size from its listing: no
    HEAD). The first failure cancels the others and is raised as it is."""
    limiter = trio.CapacityLimiter(DIR_RENAME_COPIES)
    failed: list[SidecarError] = []

    async def copy(f: ObjectInfo, dst: str) -> None:
        async with limiter:
            try:
                await store.copy(f.key, dst, f.size)
            except SidecarError as exc:
                failed.append(exc)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for f, dst in pairs:
            nursery.start_soon(copy, f, dst)
    if failed:
        raise failed[0]
