"""A thin pyfuse3.Operations adapter over the filesystem core.

Each handler binds per-request log context, calls the core and translates every error through
the one errno table (`sidecar.errors`). pyfuse3 catches only FUSEError, so nothing else may
escape a handler: anything unexpected is logged with its traceback and answered EIO.

The adapter imposes no timeout of its own: deadlines live where the work is (the store bounds
every backend call, a transfer by its progress), so closing a large file on a slow link is not
cut short while it moves, and a stalled backend still fails the call within its deadline.

Names arrive as bytes. One that is not UTF-8 cannot be an object key: a lookup answers ENOENT,
a create/mkdir/rename to it EINVAL (never a traceback per lookup).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sidecar import passthrough  # (first: it must be loaded before pyfuse3 is)
import pyfuse3
import structlog

from sidecar.errors import InvalidName, NotFound, NotPermitted, SidecarError, errno_for
from sidecar.mtime import Mtime, ns_of
from sidecar.log import get_logger
from sidecar.vfs.core import Attr, Filesystem, opens_for_writing

log = get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Counts(dict):
    def bump(self, name: str) -> None:
        self[name] = self.get(name, 0) + 1


def _translated(fn: F) -> F:
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: "FuseOps", *args: Any) -> Any:
        self.requests.bump(op)
        # The request's log lines name its operation: set in the context of the task serving it
        # (pyfuse3 serves a request at a time per task; the next request sets its own). The
        # mount is bound once, when the FuseOps is made. A `with bound_contextvars` per request
        # cost about half of a cached lookup.
        structlog.contextvars.bind_contextvars(op=op)
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SidecarError as exc:
            code = errno_for(exc)
            if code != errno.ENOENT:  # a lookup of a missing name is normal, not an error
                self.errors.bump(exc.code)
            if code in (errno.ENOENT, errno.ESTALE, errno.EROFS, errno.EEXIST, errno.ENOTEMPTY):
                log.debug("request_failed", code=exc.code, detail=str(exc))
            else:
                log.warning("request_failed", code=exc.code, detail=str(exc))
            raise pyfuse3.FUSEError(code or errno.EIO) from None
        except Exception:
            self.errors.bump("unexpected")
            log.exception("request_crashed")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _existing_name(name: bytes) -> str:
    """A name to look up: not UTF-8 means no such object."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound(repr(name)) from None


def _new_name(name: bytes) -> str:
    """A name to create: not UTF-8 cannot be stored as a key."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"{name!r}: not UTF-8") from None


OPENED_KEPT = 1_000_000  # inodes remembered as opened, for "auto" zero-message opens (then counted again)


class FuseOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem, *, mount_name: str, passthrough_wanted: bool = True) -> None:
        super().__init__()
        self.fs = fs
        self.mount_name = mount_name
        # Every log line of the tasks started from here on (pyfuse3's, the writer's) names the mount.
        structlog.contextvars.bind_contextvars(mount=mount_name)
        self.errors = Counts()  # FUSE requests answered with an error, by reason
        self.requests = Counts()  # FUSE requests served, by operation
        self.bytes_read = 0  # answered to the kernel's reads (not those passed through): bytes_fetched / this is the read amplification
        # Files the kernel reads from the disk cache itself (see sidecar.passthrough).
        self.open_files = passthrough.OpenFiles(fs.cached_file) if passthrough_wanted and passthrough.wanted() else None
        self.zero_message_opens = "off"  # "on": see `open_without_requests`, "auto: ...", else why not
        self._reopens_left: int | None = None  # "auto": files still to be opened again before the switch
        self._opened_before: set[int] = set()  # ("auto": inodes opened read-only so far)
        self._unreleased: dict[int, list[int]] = {}  # inode -> handles open at the switch (no RELEASE comes)

    def switch_after_reopens(self, reopens: int) -> str:
        """Zero-message opens once `reopens` files were opened again for reading (data read
        again and again: epochs), and until then every open asked, passed through where it
        can be (a first pass over the disk cache after a restart is read by the kernel from
        the cache files). The switch is the kernel's for the rest of the connection: an OPEN
        answered ENOSYS, and none sent after it; files open at the switch read on through their
        handles (see `_reopened` for their end). Call once mounted. Returns the state, or why
        not."""
        available = passthrough.zero_message_opens_available()
        if not self.fs.readonly:
            self.zero_message_opens = "not for a writable mount"
        elif available != "yes":
            self.zero_message_opens = available
        else:
            self._reopens_left = reopens
            self.zero_message_opens = f"auto: after {reopens} files opened again"
        return self.zero_message_opens

    def _reopened(self, inode: int) -> bool:
        """Counts a read-only open; True when it is the one that makes the switch."""
        if inode not in self._opened_before:
            if len(self._opened_before) >= OPENED_KEPT:
                self._opened_before.clear()
            self._opened_before.add(inode)
            return False
        assert self._reopens_left is not None
        self._reopens_left -= 1
        if self._reopens_left > 0:
            return False
        self._reopens_left, self._opened_before = None, set()
        self.zero_message_opens = passthrough.zero_message_opens()
        if self.zero_message_opens != "on":
            return False
        # Linux sends no RELEASE once a connection opens alone, not even for the files open now:
        # their handles (and passthrough's backing files) are let go when the kernel forgets
        # their inode, which it does only once no file of it is open.
        self._unreleased = self.fs.open_files_by_inode()
        log.info("zero_message_opens_switched", open_files=sum(map(len, self._unreleased.values())))
        return True

    def open_without_requests(self) -> str:
        """Zero-message opens, for a read-only mount of data read again and again (training
        epochs): OPEN is answered with ENOSYS, on which the kernel opens and closes this mount's
        files without a request (FUSE_NO_OPEN_SUPPORT; FLUSH is ENOSYS already), keeps their
        pages between opens and names the inode in each READ (the protocol hook puts it in the
        handle's place). A file read before is then read from the page cache with no request
        at all. What is given up: passthrough (it is set up in an OPEN's answer), and the check
        an open makes once the metadata TTL passed (the kernel's lookup after the entry's TTL
        makes it instead). Call once mounted, before any open. Returns "on" or why not."""
        if not self.fs.readonly:
            self.zero_message_opens = "not for a writable mount"
        else:
            self.zero_message_opens = passthrough.zero_message_opens()
            if self.zero_message_opens == "on":
                self.open_files = None
        return self.zero_message_opens

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = a.ttl
        e.attr_timeout = a.ttl
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = 128 * 1024
        e.st_blocks = -(-a.size // 512)
        ns = ns_of(a.mtime)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    @_translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(await self.fs.lookup(parent_inode, _existing_name(name)))
        except NotFound as exc:
            if not exc.cacheable_for:
                raise
            missing = pyfuse3.EntryAttributes()  # inode 0: "does not exist", kept for entry_timeout
            missing.st_ino = 0
            missing.entry_timeout = exc.cacheable_for
            return missing

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        try:
            if self._unreleased:
                for ino, _ in inode_list:
                    for fh in self._unreleased.pop(ino, ()):
                        if self.open_files is not None:
                            self.open_files.released(fh)
                        self.fs.release(fh)
            self.fs.forget(inode_list)
            if self.open_files is not None:
                for ino, _ in inode_list:
                    self.open_files.forgotten(ino)
        except Exception:  # forget must never raise
            log.exception("forget_crashed")

    @_translated
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(inode))

    @_translated
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.fs.opendir(inode)

    @_translated
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for name, attr, next_id in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name.encode("utf-8"), self._entry(attr), next_id):
                break
            self.fs.remember(attr.ino)  # readdirplus: the kernel took a reference

    @_translated
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_translated
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writing = opens_for_writing(flags)
        if self.zero_message_opens == "on" or (self._reopens_left is not None and not writing and self._reopened(inode)):
            raise pyfuse3.FUSEError(errno.ENOSYS)  # this open succeeds all the same, and no other is sent
        if writing:
            self._make_way_for_writer(inode)
        fh, keep_cache = await self.fs.open(inode, flags)
        if self.open_files is not None and self.open_files.opened(inode, fh, passable=not writing,
                                                                  page_cached=keep_cache and self.fs.handle_size(fh) <= self.fs.cache.block_size):
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False)  # the kernel reads the cache file
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=False)

    def _make_way_for_writer(self, inode: int) -> None:
        """A writer of an inode the kernel reads from a cache file, which the kernel would
        refuse: sent to a new inode of the key (ESTALE), the readers keep theirs."""
        if not self.fs.readonly and self.open_files is not None and self.open_files.passed_through(inode):
            self.fs.make_way_for_writer(inode)

    @_translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = await self.fs.read(fh, off, size)
        self.bytes_read += len(data)
        return data

    @_translated
    async def release(self, fh: int) -> None:
        if self.open_files is not None:
            self.open_files.released(fh)
        self.fs.release(fh)

    @_translated
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.block_size
        out.f_frsize = st.fragment_size
        out.f_blocks = st.blocks
        out.f_bfree = st.blocks_free
        out.f_bavail = st.blocks_available
        out.f_files = st.files
        out.f_ffree = st.files_free
        out.f_favail = st.files_free
        out.f_namemax = st.name_max
        return out

    @_translated
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self.fs.node(inode)
        return not (mode & os.W_OK and self.fs.readonly)

    @_translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.fs.create(parent_inode, _new_name(name), flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False), self._entry(attr)

    @_translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.fs.write(fh, off, buf)

    @_translated
    async def flush(self, fh: int) -> None:
        if self.fs.readonly:
            # Nothing to store: ENOSYS tells the kernel to stop sending FLUSH on this connection,
            # and every close() saves a round trip to this process (a training epoch's files are
            # each opened, read from the page cache and closed).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        await self.fs.flush(fh)

    @_translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_translated
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        size = attr.st_size if fields.update_size else None
        mtime = Mtime(attr.st_mtime_ns) if fields.update_mtime else None  # to the nanosecond
        if size is not None:
            self._make_way_for_writer(inode)  # (a truncation by path: the kernel retries it on the new inode)
        return self._entry(await self.fs.setattr(inode, size=size, mtime=mtime))

    @_translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, _existing_name(name))

    @_translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.mkdir(parent_inode, _new_name(name)))

    @_translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, _existing_name(name))

    @_translated
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: Any) -> None:
        await self.fs.rename(parent_inode_old, _existing_name(name_old), parent_inode_new, _new_name(name_new), flags)

    # Object stores have no links or special files: refused explicitly (EPERM), never ENOSYS.
    @_translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise NotPermitted("symbolic links are not supported")

    @_translated
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise NotPermitted("hard links are not supported")

    @_translated
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise NotPermitted("special files are not supported")

    # Extended attributes are not stored. ENOSYS (not ENODATA) tells the kernel once for all: it
    # stops asking (it asked for `security.capability` before every write: a round trip per
    # written file) and answers "not supported" itself, as for rclone and mountpoint-s3.
    @_translated
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translated
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)
