"""The deletes of renamed-away names, waiting to go together (sidecar.vfs.deletes), against the
in-memory store with batch deletes (no kernel; trio's clock jumps over the waits)."""

import pytest
import trio
import trio.testing

from sidecar.errors import NotFound
from sidecar.store.memory import MemoryStore
from sidecar.vfs import deletes as deletes_mod
from sidecar.vfs.core import ROOT_INO
from tests.fshelpers import names, read_all, writable, write_file


def batch_store(n=5):
    store = MemoryStore()
    store.deletes_in_batches = True
    for i in range(n):
        store.put(f".f{i}.tmp", b"data %d" % i)
    return store


def run_with_deletes(store, tmp_path, body):
    """Runs `await body(fs)` on a writable file system over `store` whose waiting deletes are
    sent as a mount's are (its `deletes.run` task); it ends, as a kill would, without sending
    what still waits. trio's clock jumps over the waits."""

    async def main():
        async with writable(store, tmp_path / "staging") as fs:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.deletes.run)
                await body(fs)
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def settled(fs):
    """Waits (on trio's clock) until no delete waits."""
    while len(fs.deletes):
        await trio.sleep(0.1)


def test_old_names_are_hidden_then_deleted_in_one_request(tmp_path):
    store = batch_store()

    async def main(fs):
        for i in range(5):
            await fs.rename(ROOT_INO, f".f{i}.tmp", ROOT_INO, f"f{i}")
        assert all(f".f{i}.tmp" in store.objects for i in range(5))  # not deleted yet...
        fs.listings.forget("")  # the next listing is the store's, old names and all
        assert sorted(await names(fs)) == [f"f{i}" for i in range(5)]  # ...but hidden
        fs.listings.forget("")
        with pytest.raises(NotFound):
            await fs.lookup(ROOT_INO, ".f0.tmp")
        assert store.stats.delete_requests == 0
        await settled(fs)
        assert sorted(store.objects) == [f"f{i}" for i in range(5)]
        assert store.stats.delete_requests == 1
        assert await read_all(fs, "f3") == b"data 3"

    run_with_deletes(store, tmp_path, main)


def test_a_file_created_at_a_waiting_name_is_never_deleted(tmp_path):
    store = batch_store(1)

    async def main(fs):
        await fs.rename(ROOT_INO, ".f0.tmp", ROOT_INO, "f0")
        await write_file(fs, ROOT_INO, ".f0.tmp", b"new")  # its delete goes first, alone
        assert store.objects[".f0.tmp"][0] == b"new" and store.stats.delete_requests == 1
        await trio.sleep(deletes_mod.DELETE_MAX_AGE + 1)
        assert store.objects[".f0.tmp"][0] == b"new" and store.objects["f0"][0] == b"data 0"
        assert store.stats.delete_requests == 1

    run_with_deletes(store, tmp_path, main)


def test_a_rename_onto_a_waiting_name_is_never_deleted(tmp_path):
    store = batch_store(2)

    async def main(fs):
        await fs.rename(ROOT_INO, ".f0.tmp", ROOT_INO, "f0")
        await fs.rename(ROOT_INO, ".f1.tmp", ROOT_INO, ".f0.tmp")
        await settled(fs)
        assert sorted(store.objects) == [".f0.tmp", "f0"] and store.objects[".f0.tmp"][0] == b"data 1"

    run_with_deletes(store, tmp_path, main)


def test_a_failed_batch_is_retried_and_its_names_stay_hidden(tmp_path):
    store = batch_store(3)

    async def main(fs):
        for i in range(3):
            await fs.rename(ROOT_INO, f".f{i}.tmp", ROOT_INO, f"f{i}")
        store.fail = True
        await trio.sleep(deletes_mod.DELETE_IDLE + 0.5)  # the batch was tried, and failed
        assert len(fs.deletes) == 3 and all(f".f{i}.tmp" in store.objects for i in range(3))
        store.fail = False
        fs.listings.forget("")
        assert sorted(await names(fs)) == ["f0", "f1", "f2"]
        await settled(fs)
        assert sorted(store.objects) == ["f0", "f1", "f2"]

    run_with_deletes(store, tmp_path, main)


def test_deletes_left_by_a_kill_are_sent_by_the_next_start_if_the_version_is_the_same(tmp_path):
    """The journal: a mount that ends without sending its deletes (a kill) leaves them to the
    next; an old name another client wrote meanwhile (another version) is left alone."""
    store = batch_store(3)

    async def first(fs):  # ends as a kill would: nothing was sent
        for i in range(3):
            await fs.rename(ROOT_INO, f".f{i}.tmp", ROOT_INO, f"f{i}")

    async def second(fs):
        await settled(fs)

    run_with_deletes(store, tmp_path, first)
    assert sorted(store.objects) == [".f0.tmp", ".f1.tmp", ".f2.tmp", "f0", "f1", "f2"]
    store.put(".f1.tmp", b"another client's")
    run_with_deletes(store, tmp_path, second)
    assert sorted(store.objects) == [".f1.tmp", "f0", "f1", "f2"] and store.objects[".f1.tmp"][0] == b"another client's"
    assert not (tmp_path / "staging" / "deletes.jsonl").exists()


def test_without_a_batch_request_a_rename_deletes_at_once(tmp_path):
    store = batch_store(1)
    store.deletes_in_batches = False

    async def main(fs):
        await fs.rename(ROOT_INO, ".f0.tmp", ROOT_INO, "f0")
        assert sorted(store.objects) == ["f0"] and store.stats.delete_requests == 1

    run_with_deletes(store, tmp_path, main)
