"""The write path of the filesystem core against the in-memory store (no kernel)."""

import errno
import json
import os
import random

import pytest
import trio
import trio.testing

from sidecar.cache.blocks import BlockCache
from sidecar.errors import BackendUnavailable, NoSpace, NotFound, SidecarError
from tests.conftest import wait_for
from tests.fshelpers import BS, errno_of, writable, write_file
from sidecar.store.memory import MemoryStore
from sidecar.vfs import mutations
from sidecar.vfs.core import ROOT_INO, Filesystem
from sidecar.vfs.staging import StagingArea

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
            assert fs.staging.by_key == {} and [p.name for p in tmp_path.iterdir()] in ([], ["journal.jsonl"])
            assert StagingArea(tmp_path).recover() == []  # the journal says nothing is left
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
            with pytest.raises(SidecarError) as err:
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
            with pytest.raises(SidecarError) as err:
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
            with pytest.raises(SidecarError) as err:
                fs.write(fh, 100, b"y")
            assert errno_of(err) == errno.ENOSPC

    trio.run(main)


def test_recovery_publishes_committed_files_and_keeps_uncommitted_ones_incomplete(tmp_path):
    store = MemoryStore()
    staging = StagingArea(tmp_path)
    closed = staging.create("closed.txt", None)
    staging.write(closed, 0, b"closed by its writer, upload pending")
    staging.mark(closed, committed=True)
    half = staging.create("half.txt", None)
    staging.write(half, 0, b"25 of 70 MiB")  # the sidecar dies while this is being written
    os.close(closed.fd)
    os.close(half.fd)

    async def main():
        async with writable(store, tmp_path) as fs:
            found = {x.key: x.state for x in fs.staging.recover()}
            assert found == {"closed.txt": "dirty", "half.txt": "incomplete"}
            assert "closed.txt" in await names(fs)  # visible before it is stored
            assert await fs.upload_pending() == 1  # the incomplete one stays
            assert store.objects["closed.txt"][0] == b"closed by its writer, upload pending"
            assert "half.txt" not in store.objects  # never published by itself
            assert fs.writer.unsynced()["incomplete"] == 1
            await fs.writer.publish("half.txt")  # a person's explicit decision
            assert store.objects["half.txt"][0] == b"25 of 70 MiB"
            assert fs.staging.pending() == []

    trio.run(main)


def test_incomplete_files_are_dropped_after_the_keep_period(tmp_path):
    staging = StagingArea(tmp_path)
    f = staging.create("old.txt", None)
    staging.write(f, 0, b"x")
    f.created = 1.0  # staged in 1970
    staging._write_meta(f)
    os.close(f.fd)
    assert StagingArea(tmp_path).recover(keep_incomplete_s=86400) == []
    assert list(tmp_path.iterdir()) == []


def test_full_staging_disk_is_enospc_not_a_traceback(tmp_path, monkeypatch):
    async def main():
        async with writable(MemoryStore(), tmp_path) as fs:
            fh, _ = await fs.create(ROOT_INO, "f", os.O_WRONLY)

            def full(*args):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(os, "pwrite", full)
            with pytest.raises(SidecarError) as err:
                fs.write(fh, 0, b"data")
            assert errno_of(err) == errno.ENOSPC

    trio.run(main)


def _partial(store, tmp_path, edit):
    big = bytes(random.Random(5).randbytes(40 << 20))
    store.put("big.bin", big)

    async def main():
        async with writable(store, tmp_path) as fs:
            ino = (await fs.lookup(ROOT_INO, "big.bin")).ino
            fh, _ = await fs.open(ino, os.O_RDWR)
            expected = edit(fs, fh, big)
            before = store.stats.bytes_stored
            await fs.flush(fh)
            fs.release(fh)
            return expected, store.stats.bytes_stored - before

    expected, sent = trio.run(main)
    assert store.objects["big.bin"][0] == expected
    return sent


def test_append_and_in_place_edit_send_only_what_changed(tmp_path):
    import sidecar.vfs.writer as writer_mod

    def append(fs, fh, big):
        fs.write(fh, len(big), b"y" * 1024)
        return big + b"y" * 1024

    def edit(fs, fh, big):
        fs.write(fh, 20 << 20, b"0123456789abcdef")
        return big[: 20 << 20] + b"0123456789abcdef" + big[(20 << 20) + 16 :]

    assert writer_mod.REUSE_MIN <= 40 << 20
    for change, changed_bytes in ((append, 1024), (edit, 16)):
        store = MemoryStore()
        sent = _partial(store, tmp_path / change.__name__, change)
        # the memory store checks every reused range against the old bytes and counts only
        # what was sent: exactly the changed bytes (S3 sends the 8 MiB parts holding them)
        assert sent == changed_bytes, (change.__name__, sent)


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
            with pytest.raises(SidecarError) as err:
                await fs.mkdir(ROOT_INO, "d")
            assert errno_of(err) == errno.EEXIST
            sub = await fs.mkdir(d.ino, "sub")
            await write_file(fs, sub.ino, "f", b"1")
            with pytest.raises(SidecarError) as err:
                await fs.rmdir(ROOT_INO, "d")
            assert errno_of(err) == errno.ENOTEMPTY
            await fs.rename(ROOT_INO, "d", ROOT_INO, "e")
            assert sorted(store.objects) == ["e/", "e/sub/", "e/sub/f"]
            assert fs.node(sub.ino).key == "e/sub"  # inodes move with their directory
            monkeypatch.setattr(mutations, "DIR_RENAME_LIMIT", 2)
            with pytest.raises(SidecarError) as err:
                await fs.rename(ROOT_INO, "e", ROOT_INO, "g")
            assert errno_of(err) == errno.EXDEV  # mv falls back to copying
            with pytest.raises(SidecarError) as err:
                await fs.rename(ROOT_INO, "e", ROOT_INO, "h", mutations.RENAME_EXCHANGE)
            assert errno_of(err) == errno.ENOTSUP
            await write_file(fs, ROOT_INO, "x", b"2")
            with pytest.raises(SidecarError) as err:
                await fs.rename(ROOT_INO, "x", ROOT_INO, "e", 0)
            assert errno_of(err) == errno.EISDIR
            with pytest.raises(SidecarError) as err:
                await fs.rename(ROOT_INO, "e", ROOT_INO, "x", mutations.RENAME_NOREPLACE)
            assert errno_of(err) == errno.EEXIST

    trio.run(main)


def test_a_directory_rename_whose_copy_fails_deletes_nothing(tmp_path):
    """The copies of a directory rename run in parallel; one failing stops the rename with its
    own error (EIO, not a group of errors) and no object of the old tree is deleted."""
    store = MemoryStore()
    for i in range(40):
        store.put(f"d/f{i:02d}", b"%d" % i)
    copy = store.copy

    async def flaky_copy(src, dst, size=None):
        if src == "d/f17":
            raise BackendUnavailable("copy refused")
        await trio.sleep(0.01)
        return await copy(src, dst, size)

    store.copy = flaky_copy

    async def main():
        async with writable(store, tmp_path) as fs:
            with pytest.raises(SidecarError) as err:
                await fs.rename(ROOT_INO, "d", ROOT_INO, "e")
            assert errno_of(err) == errno.EIO
            assert {f"d/f{i:02d}" for i in range(40)} <= set(store.objects)  # the whole old tree
            assert store.stats.delete_requests == 0

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
                with pytest.raises(SidecarError) as err:
                    await call
                assert errno_of(err) == errno.EROFS
            n.cancel_scope.cancel()
        assert list(store.objects) == ["f"]

    trio.run(main)


def test_writeback_close_before_and_after_the_write_stores_the_last_bytes(tmp_path):
    """`echo x > f` in a shell: the file is closed once right after it is created (dup2, then
    close), written, and closed again. The empty upload the first close starts must not hide the
    second close: the object ends up with the written bytes."""
    store = MemoryStore()

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 8)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            fs = Filesystem(store, cache, readonly=False, staging=StagingArea(tmp_path), ttl=5, write_mode="writeback")
            await nursery.start(fs.writer.run)
            store.delay = 0.2  # the first (empty) upload is still running when the write comes
            fh, _ = await fs.create(ROOT_INO, "out.txt", os.O_WRONLY)
            await fs.flush(fh)  # close of the first descriptor: a commit of 0 bytes
            await trio.sleep(0.05)
            fs.write(fh, 0, b"result\n")
            await fs.flush(fh)  # the last close
            fs.release(fh)
            with trio.fail_after(10):
                while fs.staging.pending():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert store.objects["out.txt"][0] == b"result\n"

    trio.run(main)


def test_staging_journal_survives_a_torn_line_and_compacts(tmp_path):
    staging = StagingArea(tmp_path)
    a = staging.create("a.txt", None, dirty=True)
    staging.write(a, 0, b"committed")
    staging.mark(a, committed=True)
    with open(staging.journal_path, "ab") as j:  # a crash in the middle of the next append
        j.write(b'\n{"id": "' + a.id.encode() + b'", "key": "a.txt", "state": "confl')
    os.close(a.fd)
    again = StagingArea(tmp_path)
    found = {f.key: (f.state, f.committed) for f in again.recover()}
    assert found == {"a.txt": ("dirty", True)}
    lines = [json.loads(x) for x in again.journal_path.read_text().split("\n") if x.strip()]
    assert [d["key"] for d in lines] == ["a.txt"]  # compacted: the torn line is gone
    # many changes of one file: the journal is rewritten, never grows without bound
    f = again.by_key["a.txt"]
    for i in range(3000):
        again.mark(f, committed=bool(i % 2))
    assert len([x for x in again.journal_path.read_text().split("\n") if x.strip()]) <= 1010  # 4 per live file + 1000
    assert {x.key for x in StagingArea(tmp_path).recover()} == {"a.txt"}


def test_spare_data_files_are_taken_by_create_and_never_outlive_a_restart(tmp_path):
    """The worker's staging area keeps empty data files ready (created by a thread, off the
    request path). A spare is what `create` takes; one never taken is in no journal line and
    `recover` deletes it; one deleted meanwhile (another instance's recover) is not used."""
    staging = StagingArea(tmp_path, spares=2)
    first = staging.create("a.txt", None, dirty=True)  # no spare yet: made on the spot; the thread starts
    wait_for(lambda: len(staging._spares) == 2, timeout=10, what="two spares")
    spare_ids = {sid for sid, _ in staging._spares}
    second = staging.create("b.txt", None)
    assert second.id in spare_ids and second.data_path.exists()
    staging.write(second, 0, b"kept")
    staging.mark(second, committed=True)
    wait_for(lambda: len(staging._spares) == 2, timeout=10, what="the spare taken is replaced")
    assert {p.stem for p in tmp_path.glob("*.data")} == {first.id, second.id} | {sid for sid, _ in staging._spares}
    # a restart: the spares are gone, the staged files are kept
    found = {f.key: f for f in StagingArea(tmp_path).recover()}
    assert set(found) == {"a.txt", "b.txt"} and os.pread(found["b.txt"].fd, 10, 0) == b"kept"
    assert {p.stem for p in tmp_path.glob("*.data")} == {first.id, second.id}
    # the first instance's spares were deleted by that recover: it does not write into them
    third = staging.create("c.txt", None)
    assert third.data_path.exists() and os.fstat(third.fd).st_nlink == 1


class _ListSnapshotFirst(MemoryStore):
    """A store whose LIST answers what the bucket held when it was asked, after `gate` opens:
    a slow LIST on a real backend, during which this mount's own writes complete."""

    gate: trio.Event | None = None

    async def list_dir(self, prefix, *, max_entries=None):
        listing = await super().list_dir(prefix, max_entries=max_entries)
        if self.gate is not None:
            await self.gate.wait()
        return listing


def test_the_mounts_own_changes_during_a_listing_are_not_lost_by_it(tmp_path):
    """A file stored, and another deleted, by this mount while a LIST of their folder is in flight:
    the listing that comes back predates both, and must not hide the new file nor bring back the
    deleted one while it is cached (seen with git in write-back mode: "invalid object")."""
    store = _ListSnapshotFirst()
    store.put("d/old.txt", b"old")
    store.put("d/gone.txt", b"gone")

    async def main():
        async with writable(store, tmp_path) as fs:
            d = (await fs.lookup(ROOT_INO, "d")).ino
            await fs.lookup(d, "gone.txt")
            fs.listings.forget("d")  # its listing expired (the TTL)
            store.gate = trio.Event()
            async with trio.open_nursery() as nursery:
                async def look_up_another_name():
                    with pytest.raises(NotFound):
                        await fs.lookup(d, "other.txt")  # lists d: the LIST waits at the gate

                nursery.start_soon(look_up_another_name)
                await trio.testing.wait_all_tasks_blocked()
                await write_file(fs, d, "new.txt", b"new")  # stored and closed meanwhile
                await fs.unlink(d, "gone.txt")
                assert "d/new.txt" in store.objects and "d/gone.txt" not in store.objects
                store.gate.set()
            store.gate = None
            assert (await fs.lookup(d, "new.txt")).size == 3  # from the cached listing: no request
            with pytest.raises(NotFound):
                await fs.lookup(d, "gone.txt")
            assert sorted(name for name, _, _ in fs.readdir(await fs.opendir(d), 0)) == ["new.txt", "old.txt"]

    trio.run(main)


def test_a_new_folder_is_known_empty_and_costs_no_listing(tmp_path):
    """A folder this mount just made holds nothing: looking names up in it (git checks its new
    object folders) and writing into it costs no LIST."""
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            d = (await fs.mkdir(ROOT_INO, "objects")).ino
            before = store.stats.list_requests
            with pytest.raises(NotFound):
                await fs.lookup(d, "ab")
            await write_file(fs, d, "f.txt", b"x")
            assert (await fs.lookup(d, "f.txt")).size == 1
            assert [name for name, _, _ in fs.readdir(await fs.opendir(d), 0)] == ["f.txt"]
            assert store.stats.list_requests == before
            assert "objects/" in store.objects and store.objects["objects/f.txt"][0] == b"x"

    trio.run(main)


def test_the_staging_areas_used_bytes_follow_every_change(tmp_path):
    """`used` (checked against the limit on every growing write) is kept as a running sum: it
    must equal the sum of the staged files' sizes after any mix of creates, writes, truncates,
    renames (onto a staged key too) and removals."""
    rnd = random.Random(7)
    staging = StagingArea(tmp_path)
    keys = [f"k{i}" for i in range(6)]
    for _ in range(400):
        op, key = rnd.choice(["create", "write", "truncate", "rekey", "remove"]), rnd.choice(keys)
        f = staging.by_key.get(key)
        if op == "create" and f is None:
            staging.create(key, None, dirty=True)
        elif f is not None and op == "write":
            staging.write(f, rnd.randrange(0, 5000), os.urandom(rnd.randrange(1, 3000)))
        elif f is not None and op == "truncate":
            staging.truncate(f, rnd.randrange(0, 9000))
        elif f is not None and op == "rekey":
            staging.rekey(f, rnd.choice(keys))
        elif f is not None and op == "remove":
            staging.remove(f)
        assert staging.used == sum(x.size for x in staging.by_key.values())
    assert staging.used > 0


def test_a_stored_files_data_file_is_recycled_as_a_spare_and_never_outlives_a_restart(tmp_path):
    """A staged file no handle has open any more, once stored, gives its emptied data file to
    the spares (no unlink now, no inode allocation at the next create). Whoever still holds the
    removed file gets EBADF, never the bytes of the file that reuses it; after a crash the
    journal knows it as removed and `recover` deletes it."""
    staging = StagingArea(tmp_path, spares=2)
    f = staging.create("a.txt", None, dirty=True)
    staging.write(f, 0, b"stored already")
    staging.mark(f, dirty=False, committed=True)
    wait_for(lambda: len(staging._spares) == 2, timeout=10, what="two spares")
    staging.remove(f, recycle=True)
    assert f.fd == -1
    wait_for(lambda: f.id in {sid for sid, _ in staging._spares}, timeout=10, what="the recycled file among the spares")
    assert f.data_path.exists() and f.data_path.stat().st_size == 0  # emptied by the spare thread
    with pytest.raises(OSError) as err:
        os.pwrite(f.fd, b"late", 0)
    assert err.value.errno == errno.EBADF
    taken = [staging.create(f"n{i}", None, dirty=True) for i in range(3)]
    assert f.id in {t.id for t in taken}  # reused, under a new key, empty
    reused = next(t for t in taken if t.id == f.id)
    assert reused.size == 0 and os.pread(reused.fd, 100, 0) == b""
    # a restart: only the live files are kept (a recycled spare not taken is deleted)
    g = staging.create("b.txt", None, dirty=True)
    staging.mark(g, dirty=False, committed=True)
    staging.remove(g, recycle=True)
    found = {x.key for x in StagingArea(tmp_path).recover()}
    assert found == {"n0", "n1", "n2"}
    assert not g.data_path.exists()


@pytest.mark.parametrize("mode", ["durable", "writeback"])
def test_a_file_whose_write_failed_is_not_published_by_its_close(tmp_path, mode):
    """ENOSPC in the middle of a file: its close fails too (EIO), the file is kept `incomplete`,
    nothing is stored; a truncate that cuts the hole off makes it whole again, and its next
    close publishes what is left."""
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path, limit=100) as fs:
            fs.write_mode = mode
            if fs.writer is not None:
                fs.writer.mode = mode
            fh, _ = await fs.create(ROOT_INO, "big", os.O_WRONLY)
            fs.write(fh, 0, b"x" * 100)
            with pytest.raises(SidecarError) as err:
                fs.write(fh, 100, b"y" * 50)
            assert errno_of(err) == errno.ENOSPC
            with pytest.raises(SidecarError) as err:
                await fs.flush(fh)
            assert errno_of(err) == errno.EIO and err.value.code == "incomplete_write"
            staged = fs.staging.by_key["big"]
            assert staged.state == "incomplete" and "offset 100 failed" in staged.last_error
            assert await fs.upload_pending(only_idle=False) == 1  # never by itself
            assert "big" not in store.objects
            fs.release(fh)
            assert "big" not in store.objects and [f.state for f in fs.staging.pending()] == ["incomplete"]
            # the writer cuts the hole off: whole again, and its close publishes
            await fs.setattr((await fs.lookup(ROOT_INO, "big")).ino, size=100)
            await fs.upload_pending(only_idle=False)
            assert store.objects["big"][0] == b"x" * 100

    trio.run(main)


def test_a_failed_write_rewritten_makes_the_file_whole_again(tmp_path, monkeypatch):
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            fh, _ = await fs.create(ROOT_INO, "f", os.O_WRONLY)
            fs.write(fh, 0, b"abcd")
            real = os.pwrite
            monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
            with pytest.raises(OSError):
                fs.write(fh, 4, b"efgh")
            monkeypatch.setattr(os, "pwrite", real)
            fs.write(fh, 8, b"ijkl")  # another range: the hole stays
            with pytest.raises(SidecarError) as err:
                await fs.flush(fh)
            assert errno_of(err) == errno.EIO
            fs.write(fh, 4, b"efgh")  # the writer retries the failed write
            await fs.flush(fh)
            fs.release(fh)
            assert store.objects["f"][0] == b"abcdefghijkl"

    trio.run(main)


def test_publish_stores_an_incomplete_file_as_it_is(tmp_path):
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path, limit=10) as fs:
            fh, _ = await fs.create(ROOT_INO, "f", os.O_WRONLY)
            fs.write(fh, 0, b"0123456789")
            with pytest.raises(NoSpace):
                fs.write(fh, 10, b"more")
            fs.release(fh)
            await fs.writer.publish("f")
            assert store.objects["f"][0] == b"0123456789"

    trio.run(main)


def test_an_unlinked_open_file_keeps_working_for_its_handles_and_is_never_stored(tmp_path):
    """As on a local disk: a file unlinked while open is read and written through its handles
    (sqlite's -shm mapping is written back after sqlite deleted it), and never stored."""
    store = MemoryStore()

    async def main():
        async with writable(store, tmp_path) as fs:
            fh, attr = await fs.create(ROOT_INO, "scratch", os.O_RDWR)
            fs.write(fh, 0, b"before")
            staged = fs.staging.by_key["scratch"]
            await fs.unlink(ROOT_INO, "scratch")
            assert fs.write(fh, 6, b" after") == 6  # the late write-back of a mapping lands
            assert await fs.read(fh, 0, 100) == b"before after"
            await fs.flush(fh)
            assert "scratch" not in store.objects and "scratch" not in await names(fs)
            assert fs.staging.pending() == []
            fs.release(fh)
            assert staged.fd == -1  # let go with its last handle
            assert "scratch" not in store.objects

    trio.run(main)
