"""What holds a mount path whenever its storage is not served there (sidecar.holder).

Without it, the mount path is a plain folder of the container's disk: programs would see an
empty directory and their writes would *succeed* there, then be hidden by the next successful
mount and lost. The placeholder is a FUSE file system holding one file,
`STORAGE-NOT-MOUNTED.txt`, that says why; every change fails with EROFS and every other name is
ENOENT. The mount's worker mounts on top of it, and when that mount goes the placeholder is
what the path shows again, with no moment in between.

It is not mounted `ro`, and its root is writable by its owner in mode bits: fusermount3 lets an
unprivileged user mount only on a folder they may write to, and the worker's mount goes on top
of this one. Every operation that would change something answers EROFS itself.

It imports only pyfuse3, trio and logging (sidecar.process: no SDK, no read stack).

Protocol with the daemon (sidecar.protocol): the first stdin line is its `PlaceholderConfig`;
it answers `Mounted` or `Failed`; `ShowMessage` changes what its file says; stdin closed,
SIGTERM or SIGINT: unmount, exit.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from typing import Any

from sidecar import passthrough  # noqa: F401 (first: it must be loaded before pyfuse3 is)
import pyfuse3
import trio

from sidecar import log
from sidecar.mounttable import HELPER_FSNAME_PREFIX, UnsafeMountPath
from sidecar.mounthelper import HelperError
from sidecar.process import clear_stale_mount, command_lines, emit, fuse_init, prepare_mountpoint, read_config_line
from sidecar.protocol import Failed, Mounted, PlaceholderConfig, ShowMessage

logger = log.get_logger("sidecar.placeholder")

README = "STORAGE-NOT-MOUNTED.txt"
FSNAME_PREFIX = "fsname=storage-sidecar-placeholder:"
README_INO = pyfuse3.ROOT_INODE + 1


class PlaceholderOps(pyfuse3.Operations):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.since = time.time()

    def text(self) -> bytes:
        return self.message.encode()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 0  # the message changes: never cached by the kernel
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFDIR | 0o755, 2, 0
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o444, 1, len(self.text())
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = int(self.since * 1e9)
        return e

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == README.encode():
            return self._attr(README_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, README_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, README.encode(), self._attr(README_INO), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != README_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.text()[off : off + size]

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return not mode & os.W_OK

    async def _refuse(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    create = mkdir = mknod = symlink = link = rename = unlink = rmdir = setattr = write = _refuse
    setxattr = removexattr = _refuse

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_namemax = 255
        return out


def message_for(name: str, text: str) -> str:
    return (
        f"The storage mount {name!r} is not mounted here.\n\n{text}\n\n"
        "This folder is read-only until the storage is mounted, so nothing written here can be lost.\n"
        "`storage-sidecar status` shows the state of every mount.\n"
    )


async def serve(cfg: PlaceholderConfig) -> int:
    ops = PlaceholderOps(message_for(cfg.name, cfg.message))
    if cfg.mount_helper:
        mountpath = cfg.mountpath
    else:
        clear_stale_mount(cfg.mountpath)
        try:
            mountpath = prepare_mountpoint(cfg.root, cfg.mountpath)
        except UnsafeMountPath as exc:
            emit(Failed("mount_path_unsafe", str(exc)))
            return 1
    opts = {FSNAME_PREFIX + cfg.name, "subtype=storage-sidecar", "default_permissions"}
    if cfg.allow_other:
        opts.add("allow_other")
    try:
        _helper_conn = fuse_init(ops, mountpath, opts, cfg.mount_helper, name=HELPER_FSNAME_PREFIX + cfg.name, readonly=False)
    except (RuntimeError, OSError, HelperError) as exc:
        emit(Failed("mount_failed", str(exc)))
        return 1

    async def commands() -> None:
        async for cmd in command_lines():
            if isinstance(cmd, ShowMessage):
                ops.message = message_for(cfg.name, cmd.text)
        pyfuse3.terminate()  # the daemon went away: do not outlive it

    async def signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for _ in received:
                pyfuse3.terminate()
                return

    try:
        emit(Mounted(mountpath=mountpath))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commands)
            nursery.start_soon(signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
    return 0


def main() -> None:
    try:
        cfg = PlaceholderConfig.from_dict(read_config_line())
    except (TypeError, ValueError) as exc:
        emit(Failed("bad_config", str(exc)))
        sys.exit(2)
    log.configure(cfg.log_level)
    try:
        rc = trio.run(serve, cfg)
    except Exception as exc:
        logger.exception("placeholder_failed", mount=cfg.name)
        emit(Failed("internal", str(exc)))
        rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    main()
