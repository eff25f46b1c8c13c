"""Shared helpers of the file system and cache tests: a Filesystem over a store, in a trio run,
with no kernel and no server (sidecar.store.memory)."""

import os
from contextlib import asynccontextmanager

import trio
import trio.testing

from sidecar.cache.blocks import BlockCache
from sidecar.errors import errno_for
from sidecar.vfs.core import ROOT_INO, Filesystem
from sidecar.vfs.staging import StagingArea

BS = 64 * 1024  # the tests' block size: small, so a few blocks make a multi-block object


def run(fn, *, mock_clock=True):
    clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
    return trio.run(fn, clock=clock)


@asynccontextmanager
async def mounted(store, *, prefix="", ttl=5.0, memory_limit=BS * 16, disk=None):
    """A read-only Filesystem over `store`, its block cache running."""
    cache = BlockCache(store, block_size=BS, memory_limit=memory_limit, disk=disk)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        yield Filesystem(store, cache, root_prefix=prefix, ttl=ttl, uid=1000, gid=100)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def writable(store, staging_dir, *, limit=1 << 30):
    """A writable Filesystem over `store`, staging in `staging_dir` up to `limit` bytes."""
    cache = BlockCache(store, block_size=BS, memory_limit=BS * 8)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        yield Filesystem(store, cache, readonly=False, staging=StagingArea(staging_dir, limit), ttl=5)
        nursery.cancel_scope.cancel()


async def path_ino(fs, path):
    ino = ROOT_INO
    for part in [p for p in path.split("/") if p]:
        ino = (await fs.lookup(ino, part)).ino
    return ino


async def read_all(fs, path, chunk=4096 * 7):
    ino = await path_ino(fs, path)
    fh, _ = await fs.open(ino, os.O_RDONLY)
    out, off = [], 0
    while True:
        data = await fs.read(fh, off, chunk)
        if not data:
            break
        out.append(data)
        off += len(data)
    fs.release(fh)
    return b"".join(out)


async def names(fs, path=""):
    """{name: Attr} of a folder, through opendir/readdir."""
    fh = await fs.opendir(await path_ino(fs, path))
    entries = fs.readdir(fh, 0)
    fs.releasedir(fh)
    return {name: attr for name, attr, _ in entries}


async def write_file(fs, parent, name, data):
    fh, attr = await fs.create(parent, name, os.O_WRONLY)
    fs.write(fh, 0, data)
    await fs.flush(fh)
    fs.release(fh)
    return attr.ino


def errno_of(excinfo):
    return errno_for(excinfo.value)
