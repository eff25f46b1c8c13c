"""The FUSE ceiling of this machine: a trivial pyfuse3 + trio file system serving one file from
memory, replying memoryviews. `python -m benchmarks.ramfs MOUNTPOINT SIZE` mounts it until
SIGTERM; the warm read benchmark compares the sidecar's warm path with it, in the same run."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"data.bin"


class RamFS(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = memoryview(os.urandom(size))

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 300
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink = stat.S_IFDIR | 0o555, 2
        else:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o444, 1, len(self.data)
        return e

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return self._attr(FILE_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)

    async def read(self, fh, off, size):
        return self.data[off : off + size]


async def serve(mountpoint: str, size: int) -> None:
    pyfuse3.init(RamFS(size), mountpoint, {"fsname=ramfs", "ro"})
    print("mounted", flush=True)
    try:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], int(sys.argv[2]))
