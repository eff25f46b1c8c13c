"""The FUSE ceiling of this machine: a trivial pyfuse3 + trio file system serving one file from
memory, replying memoryviews. `python -m benchmarks.ramfs MOUNTPOINT SIZE` mounts it until
SIGTERM; the warm read benchmark compares the sidecar's warm path with it, in the same run.
`python -m benchmarks.ramfs MOUNTPOINT 0 --writable` mounts an empty writable one instead
(folders and files in memory, nothing else): the floor of creating files through pyfuse3 + trio
here, which `benchmarks.smallfiles` measures `cp -r` against. `python -m benchmarks.ramfs
MOUNTPOINT 0 --tree SPEC.json` mounts a read-only tree of the files SPEC names (relative path ->
size; zeros), whose open keeps the page cache from the second open on, as the sidecar's does: the
floor of a training epoch's opens and reads here (`benchmarks.training`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator

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


class WritableRamFS(pyfuse3.Operations):
    """Folders and files in memory: lookup, create, write, mkdir and what `cp -r` asks besides."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: dict[int, int] = {pyfuse3.ROOT_INODE: stat.S_IFDIR | 0o755}
        self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self.data: dict[int, bytearray] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode = ino, self.modes[ino]
        e.st_nlink = 2 if ino in self.children else 1
        e.st_size = len(self.data.get(ino, b""))
        e.entry_timeout = e.attr_timeout = 300
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        return e

    def _new(self, parent: int, name: bytes, mode: int) -> int:
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        self.modes[ino] = mode
        self.children[parent][name] = ino
        return ino

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.children.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            del self.data[inode][attr.st_size :]
        return self._attr(inode)

    async def mkdir(self, parent_inode, name, mode, ctx):
        ino = self._new(parent_inode, name, stat.S_IFDIR | 0o755)
        self.children[ino] = {}
        return self._attr(ino)

    async def create(self, parent_inode, name, mode, flags, ctx):
        ino = self._new(parent_inode, name, stat.S_IFREG | 0o644)
        self.data[ino] = bytearray()
        return pyfuse3.FileInfo(fh=ino), self._attr(ino)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return bytes(self.data[fh][off : off + size])

    async def write(self, fh, off, buf):
        self.data[fh][off : off + len(buf)] = buf
        return len(buf)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for i, (name, ino) in enumerate(list(self.children[fh].items())[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break


class TreeRamFS(WritableRamFS):
    """A read-only tree of files of given sizes, bytes all zero, from memory."""

    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.opened: set[int] = set()
        self.zeros = memoryview(bytes(max(sizes.values(), default=0)))
        for path, size in sizes.items():
            parent = pyfuse3.ROOT_INODE
            *folders, name = path.encode().split(b"/")
            for folder in folders:
                found = self.children[parent].get(folder)
                if found is None:
                    found = self._new(parent, folder, stat.S_IFDIR | 0o555)
                    self.children[found] = {}
                parent = found
            self.sizes[self._new(parent, name, stat.S_IFREG | 0o444)] = size

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = super()._attr(ino)
        e.st_size = self.sizes.get(ino, 0)
        return e

    async def open(self, inode, flags, ctx):
        keep = inode in self.opened
        self.opened.add(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=keep)

    async def read(self, fh, off, size):
        return self.zeros[off : min(off + size, self.sizes[fh])]


@contextlib.contextmanager
def mounted(mountpoint: str, *args: str) -> Iterator[subprocess.Popen]:
    """This file system mounted at `mountpoint` (`args` as on the command line after it) in a
    process of its own, unmounted and stopped at the end."""
    from benchmarks.link import wait_mounted
    from tests.devservers import stop_process

    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ramfs", mountpoint, *args], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        wait_mounted(mountpoint, proc)
        yield proc
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], check=False, capture_output=True)
        stop_process(proc)


async def serve(mountpoint: str, size: int, writable: bool = False, tree: str | None = None) -> None:
    if tree is not None:
        with open(tree) as f:
            pyfuse3.init(TreeRamFS(json.load(f)), mountpoint, {"fsname=ramfs", "ro"})
    elif writable:
        pyfuse3.init(WritableRamFS(), mountpoint, {"fsname=ramfs"})
    else:
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
    rest = sys.argv[3:]
    trio.run(serve, sys.argv[1], int(sys.argv[2]), "--writable" in rest, rest[rest.index("--tree") + 1] if "--tree" in rest else None)
