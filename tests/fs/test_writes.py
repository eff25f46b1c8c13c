"""The write path of the filesystem core against the in-memory store (no kernel)."""

import errno
import os
from contextlib import asynccontextmanager

import pytest
import trio

from sidecar.cache.blocks import BlockCache
from sidecar.errors import errno_for
from sidecar.store.memory import MemoryStore
from sidecar.vfs import core
from sidecar.vfs.core import ROOT_INO, Filesystem
from sidecar.vfs.staging import StagingArea

BS = 64 * 1024


@asynccontextmanager
async def writable(store, staging_dir, *, limit=1 << 30):
    cache = BlockCache(store, block_size=BS, memory_limit=BS * 8)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        yield Filesystem(store, cache, readonly=False, staging=StagingArea(staging_dir, limit), ttl=5)
        nursery.cancel_scope.cancel()


def errno_of(excinfo):
    return errno_for(excinfo.value)


async def write_file(fs, parent, name, data):
    fh, attr = await fs.create(parent, name, os.O_WRONLY)
    fs.write(fh, 0, data)
    await fs.flush(fh)
    fs.release(fh)
    return attr.ino


def test_close_stores_and_staging_empties(tmp_path):
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            fh, attr = await fs.create(ROOT_INO, "a.txt", os.O_WRONLY)
            fs.write(fh, 0, b"hello")
            fs.write(fh, 10, b"world")  # a hole is zeros
            assert "a.txt" not in store.objects  # nothing is stored before close
            await fs.flush(fh)
            assert store.objects["a.txt"][0] == b"hello\0\0\0\0\0world"
            fs.release(fh)
            assert fs.staging.by_key == {} and list(tmp_path.iterdir()) == []
            assert (await fs.getattr(attr.ino)).size == 15

    trio.run(main)


def test_write_racing_an_upload_is_not_lost(tmp_path):
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            fh, _ = await fs.create(ROOT_INO, "r", os.O_WRONLY)
            fs.write(fh, 0, b"first")
            store.delay = 0.2
            async with trio.open_nursery() as n:
                n.start_soon(fs.flush, fh)
                await trio.sleep(0.05)
                fs.write(fh, 5, b"+second")  # while the upload of "first" runs
            assert fs.staging.by_key["r"].dirty  # the upload did not clear the newer write
            await fs.flush(fh)
            assert store.objects["r"][0] == b"first+second"

    trio.run(main)


def test_failed_upload_stays_staged_and_is_retried(tmp_path):
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            fh, _ = await fs.create(ROOT_INO, "f", os.O_WRONLY)
            fs.write(fh, 0, b"data")
            store.fail = True
            with pytest.raises(Exception) as err:
                await fs.flush(fh)
            assert errno_of(err) == errno.EIO
            fs.release(fh)
            assert [f.key for f in fs.staging.pending()] == ["f"]
            assert await fs.upload_pending() == 1  # still down
            store.fail = False
            assert await fs.upload_pending() == 0
            assert store.objects["f"][0] == b"data"

    trio.run(main)


def test_conflict_is_kept_not_uploaded(tmp_path):
    store = MemoryStore()
    store.put("c", b"v1")

    async def main():
        async with writable(store, tmp_path) as fs:
            ino = (await fs.lookup(ROOT_INO, "c")).ino
            fh, _ = await fs.open(ino, os.O_RDWR)
            fs.write(fh, 0, b"V2")
            store.put("c", b"remote v3")
            with pytest.raises(Exception) as err:
                await fs.flush(fh)
            assert errno_of(err) == errno.EIO
            assert store.objects["c"][0] == b"remote v3"
            (staged,) = fs.staging.pending()
            assert staged.state == "conflict" and open(staged.data_path, "rb").read() == b"V2"
            assert await fs.upload_pending(only_idle=False) == 1  # never uploaded over the newer one

    trio.run(main)


def test_staging_limit_gives_enospc(tmp_path):
    async def main():
        async with writable(MemoryStore(), tmp_path, limit=100) as fs:
            fh, _ = await fs.create(ROOT_INO, "big", os.O_WRONLY)
            fs.write(fh, 0, b"x" * 100)
            with pytest.raises(Exception) as err:
                fs.write(fh, 100, b"y")
            assert errno_of(err) == errno.ENOSPC

    trio.run(main)


def test_recovery_after_a_crash(tmp_path):
    store = MemoryStore()
    staging = StagingArea(tmp_path)
    f = staging.create("recovered.txt", None)
    staging.write(f, 0, b"left behind")
    os.close(f.fd)  # the process "dies" here

    async def main():
        async with writable(store, tmp_path) as fs:
            found = fs.staging.recover()
            assert [x.key for x in found] == ["recovered.txt"]
            assert "recovered.txt" in await names(fs)  # visible before it is stored
            assert await fs.upload_pending() == 0
            assert store.objects["recovered.txt"][0] == b"left behind"

    trio.run(main)


async def names(fs, ino=ROOT_INO):
    fh = await fs.opendir(ino)
    out = [n for n, _, _ in fs.readdir(fh, 0)]
    fs.releasedir(fh)
    return out


def test_mkdir_rmdir_and_directory_rename(tmp_path, monkeypatch):
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            d = await fs.mkdir(ROOT_INO, "d")
            assert "d/" in store.objects
            with pytest.raises(Exception) as err:
                await fs.mkdir(ROOT_INO, "d")
            assert errno_of(err) == errno.EEXIST
            sub = await fs.mkdir(d.ino, "sub")
            await write_file(fs, sub.ino, "f", b"1")
            with pytest.raises(Exception) as err:
                await fs.rmdir(ROOT_INO, "d")
            assert errno_of(err) == errno.ENOTEMPTY
            await fs.rename(ROOT_INO, "d", ROOT_INO, "e")
            assert sorted(store.objects) == ["e/", "e/sub/", "e/sub/f"]
            assert fs.node(sub.ino).key == "e/sub"  # inodes move with their directory
            monkeypatch.setattr(core, "DIR_RENAME_LIMIT", 2)
            with pytest.raises(Exception) as err:
                await fs.rename(ROOT_INO, "e", ROOT_INO, "g")
            assert errno_of(err) == errno.EXDEV  # mv falls back to copying
            with pytest.raises(Exception) as err:
                await fs.rename(ROOT_INO, "e", ROOT_INO, "h", core.RENAME_EXCHANGE)
            assert errno_of(err) == errno.ENOTSUP
            await write_file(fs, ROOT_INO, "x", b"2")
            with pytest.raises(Exception) as err:
                await fs.rename(ROOT_INO, "x", ROOT_INO, "e", 0)
            assert errno_of(err) == errno.EISDIR
            with pytest.raises(Exception) as err:
                await fs.rename(ROOT_INO, "e", ROOT_INO, "x", core.RENAME_NOREPLACE)
            assert errno_of(err) == errno.EEXIST

    trio.run(main)


def test_readonly_core_refuses_every_mutation(tmp_path):
    store = MemoryStore()
    store.put("f", b"1")

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 2)
        async with trio.open_nursery() as n:
            await n.start(cache.run)
            fs = Filesystem(store, cache)
            ino = (await fs.lookup(ROOT_INO, "f")).ino
            for call in (
                fs.create(ROOT_INO, "g", os.O_WRONLY), fs.mkdir(ROOT_INO, "d"), fs.unlink(ROOT_INO, "f"),
                fs.rmdir(ROOT_INO, "f"), fs.rename(ROOT_INO, "f", ROOT_INO, "h"), fs.setattr(ino, size=0), fs.open(ino, os.O_WRONLY),
            ):
                with pytest.raises(Exception) as err:
                    await call
                assert errno_of(err) == errno.EROFS
            n.cancel_scope.cancel()
        assert list(store.objects) == ["f"]

    trio.run(main)
