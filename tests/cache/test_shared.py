"""The node's shared block cache (sidecar.cache.shared): only a reader of a version finds and
decrypts its blocks; nothing that fails authentication is ever returned; the budget holds for
several processes at once."""

import multiprocessing
import os
import random
import sqlite3

import pytest

from sidecar.cache.shared import DB_NAME, TEMP_MAX_AGE, SharedBlocks, VersionId, block_file_name, seal

BS = 64 * 1024


def version(**changes):
    fields = dict(provider="s3", endpoint="https://s3.example.org", bucket="raw-data", key="images/cat-0001.png",
                  etag="0123456789abcdef0123456789abcdef", size=3 * BS, mtime="2026-12-01T10:00:00Z")
    fields.update(changes)
    return VersionId(**fields)


def block_files(folder):
    return [p for p in folder.rglob("*") if p.is_file() and p.name != DB_NAME and not p.name.startswith(DB_NAME)]


def test_a_stored_block_is_read_back_by_a_reader_of_the_same_version(tmp_path):
    data = random.Random(1).randbytes(BS)
    one, two = SharedBlocks(tmp_path, 1 << 20), SharedBlocks(tmp_path, 1 << 20)  # two sidecars
    assert one.put(version(), BS, 2, data)
    assert two.get(version(), BS, 2) == data
    assert two.hits == 1


@pytest.mark.parametrize("other", [dict(etag="ffffffffffffffffffffffffffffffff"), dict(size=3 * BS + 1), dict(mtime="2026-12-02T10:00:00Z"),
                                   dict(bucket="other-bucket"), dict(endpoint="https://elsewhere.example.org"), dict(key="images/cat-0002.png"),
                                   dict(provider="gcs")])
def test_another_version_bucket_or_endpoint_never_finds_the_blocks(tmp_path, other):
    """A reader that saw another version (or the same key in another bucket or service) derives
    another name, so it finds nothing; and the stored file, put under its name, does not
    authenticate for it either."""
    shared = SharedBlocks(tmp_path, 1 << 20)
    data = random.Random(2).randbytes(BS)
    shared.put(version(), BS, 0, data)
    assert block_file_name(version(**other), BS, 0) != block_file_name(version(), BS, 0)
    assert shared.get(version(**other), BS, 0) is None
    (stored,) = block_files(tmp_path)
    forged = tmp_path / block_file_name(version(**other), BS, 0)[:2] / block_file_name(version(**other), BS, 0)
    forged.parent.mkdir(exist_ok=True)
    forged.write_bytes(stored.read_bytes())
    assert shared.get(version(**other), BS, 0) is None and shared.rejected == 1


def test_flipped_cut_foreign_or_misplaced_blocks_are_never_returned(tmp_path):
    shared = SharedBlocks(tmp_path, 1 << 20)
    rnd = random.Random(3)
    blocks = [rnd.randbytes(BS) for _ in range(3)]
    for i, data in enumerate(blocks):
        shared.put(version(), BS, i, data)
    path = lambda i: tmp_path / block_file_name(version(), BS, i)[:2] / block_file_name(version(), BS, i)  # noqa: E731

    content = bytearray(path(0).read_bytes())
    content[len(content) // 2] ^= 0x01
    path(0).write_bytes(bytes(content))
    assert shared.get(version(), BS, 0) is None  # one flipped bit

    path(1).write_bytes(path(1).read_bytes()[:-100])
    assert shared.get(version(), BS, 1) is None  # cut short

    # block 2's valid content under block 1's name: bound to its place
    path(1).write_bytes(path(2).read_bytes())
    assert shared.get(version(), BS, 1) is None

    # written by a process without the key, in the right format
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sidecar.cache.shared import _HEAD, FORMAT, MAGIC

    nonce = os.urandom(12)
    path(2).write_bytes(_HEAD.pack(MAGIC, FORMAT, nonce) + AESGCM(AESGCM.generate_key(256)).encrypt(nonce, b"poison" * 100, None))
    assert shared.get(version(), BS, 2) is None
    assert shared.rejected == 4 and shared.hits == 0


def test_the_folder_shows_neither_names_nor_bytes(tmp_path):
    shared = SharedBlocks(tmp_path, 1 << 20)
    data = b"patient-record " * 1000
    shared.put(version(), BS, 0, data[:BS])
    everything = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    names = " ".join(str(p) for p in tmp_path.rglob("*"))
    for secret in ("cat-0001", "raw-data", "s3.example.org", "0123456789abcdef"):
        assert secret not in names and secret.encode() not in everything
    assert b"patient-record" not in everything


def test_the_budget_evicts_the_least_recently_used_blocks(tmp_path):
    one = SharedBlocks(tmp_path, limit=4 * (BS + 100))
    two = SharedBlocks(tmp_path, limit=4 * (BS + 100))
    rnd = random.Random(4)
    data = [rnd.randbytes(BS) for _ in range(6)]
    for i in range(4):
        one.put(version(), BS, i, data[i])
    assert two.get(version(), BS, 0) == data[0]  # block 0 used again (by the other sidecar)
    two.touch()
    one.put(version(), BS, 4, data[4])
    one.put(version(), BS, 5, data[5])
    assert one.used() <= 4 * (BS + 100)
    assert [i for i in range(6) if one.get(version(), BS, i) is not None] == [0, 3, 4, 5]
    assert len(block_files(tmp_path)) == 4 and one.evictions == 2


def _writer(folder, seed, limit):
    shared = SharedBlocks(folder, limit)
    rnd = random.Random(seed)
    for i in range(40):
        shared.put(version(key=f"k{seed}"), BS, i, rnd.randbytes(BS))


def test_the_budget_holds_with_several_processes_writing_at_once(tmp_path):
    limit = 10 * (BS + 100)
    SharedBlocks(tmp_path, limit)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, seed, limit)) for seed in range(3)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    shared = SharedBlocks(tmp_path, limit)
    files = block_files(tmp_path)
    assert shared.used() <= limit and 0 < len(files) <= 10
    rows = sqlite3.connect(tmp_path / DB_NAME).execute("SELECT name FROM blocks").fetchall()
    assert sorted(n for (n,) in rows) == sorted(p.name for p in files)  # the index and the folder agree
    found = 0
    for seed in range(3):  # every block left authenticates and is the writer's
        rnd = random.Random(seed)
        for i in range(40):
            expected = rnd.randbytes(BS)
            got = shared.get(version(key=f"k{seed}"), BS, i)
            assert got is None or got == expected
            found += got is not None
    assert found == len(files)


def test_a_writer_killed_midway_leaves_nothing_that_is_read_and_its_temporary_file_is_swept(tmp_path):
    shared = SharedBlocks(tmp_path, 1 << 20)
    name = block_file_name(version(), BS, 0)
    (tmp_path / name[:2]).mkdir()
    left = tmp_path / name[:2] / ".tmp-0123456789abcdef"
    left.write_bytes(b"half a blo")  # what a writer killed before its rename leaves
    assert shared.get(version(), BS, 0) is None
    assert shared.sweep() == 0  # young: it may be a writer at work
    os.utime(left, (0, os.path.getmtime(left) - TEMP_MAX_AGE - 1))
    assert shared.sweep() == 1 and not left.exists()


def test_a_block_left_without_its_budget_row_is_swept_once_old(tmp_path):
    """A writer killed between its rename and its budget transaction leaves a whole block no
    row accounts for (never evicted): the sweep removes it once old, and keeps accounted ones."""
    shared = SharedBlocks(tmp_path, 1 << 20)
    rnd = random.Random(7)
    assert shared.put(version(key="kept"), BS, 0, rnd.randbytes(BS))
    name, content = seal(version(key="orphan"), BS, 0, rnd.randbytes(BS))
    (tmp_path / name[:2]).mkdir(exist_ok=True)
    orphan = tmp_path / name[:2] / name
    orphan.write_bytes(content)
    assert shared.sweep() == 0  # young: its writer may be about to account for it
    for f in block_files(tmp_path):
        os.utime(f, (0, os.path.getmtime(f) - TEMP_MAX_AGE - 1))
    assert shared.sweep() == 1 and not orphan.exists()
    assert shared.get(version(key="kept"), BS, 0) is not None


def test_a_run_larger_than_the_budget_keeps_the_budget(tmp_path):
    """Blocks stored together (one fetched run) are one budget transaction: older blocks go
    first, and if the run alone exceeds the limit, its own blocks go too."""
    shared = SharedBlocks(tmp_path, limit=3 * (BS + 100))
    rnd = random.Random(6)
    shared.put(version(key="old"), BS, 0, rnd.randbytes(BS))
    assert shared.put_many(version(), BS, [(i, rnd.randbytes(BS)) for i in range(5)]) == 5
    assert shared.used() <= 3 * (BS + 100) and len(block_files(tmp_path)) == 3
    assert shared.get(version(key="old"), BS, 0) is None  # the oldest went first


def test_a_failing_shared_cache_costs_a_fetch_not_the_read(tmp_path):
    """A mount with no disk tier of its own and a shared cache that fails (a full or unreadable
    node folder): the block is fetched, the failure is counted on the shared cache."""
    import trio

    from sidecar.cache.blocks import BlockCache, ObjectRef
    from sidecar.store.memory import MemoryStore

    store = MemoryStore()
    data = random.Random(7).randbytes(4 * BS)
    info = store.put("obj", data)
    shared = SharedBlocks(tmp_path, 1 << 30)

    def broken(*args):
        raise PermissionError("the node folder is not ours")

    shared.get = broken  # type: ignore[method-assign]
    shared.put_many = broken  # type: ignore[method-assign]

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=16 * BS)
        cache.shared = shared
        cache.version_of = lambda ref: version(key=ref.key, etag=ref.etag, size=ref.size)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            ref = ObjectRef("obj", info.etag, len(data))
            cache.prefetch(ref, range(0, 4))
            got = b"".join([await cache.get(ref, i) for i in range(4)])
            with trio.fail_after(10):  # the write to the shared cache comes after the reader's bytes
                while shared.errors < 5:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return got

    assert trio.run(main) == data
    assert shared.errors == 5  # a read of each of the 4 blocks and the run's write


def test_a_claimed_block_is_waited_for_until_stored_and_claims_are_taken_in_order(tmp_path):
    one, two = SharedBlocks(tmp_path, 1 << 20), SharedBlocks(tmp_path, 1 << 20)  # two sidecars
    mine, rest = one.claim(version(), BS, [1])
    assert list(mine) == [1] and rest == []
    theirs, rest = two.claim(version(), BS, [0, 1, 2])
    assert list(theirs) == [0] and rest == [1, 2]  # up to the first block another fetches
    assert two.waiting(version(), BS, [1]) == ([], [])  # claimed, not stored: wait
    one.put(version(), BS, 1, random.Random(8).randbytes(BS))
    one.release(version(), BS, mine)
    assert two.waiting(version(), BS, [1]) == ([1], [])  # stored: read it
    again, rest = SharedBlocks(tmp_path, 1 << 20).claim(version(), BS, [1, 2])
    assert again == {} and rest == [1, 2]  # stored already: nothing to claim
    two.release(version(), BS, theirs)
    assert not list((tmp_path / "claims").iterdir())


@pytest.mark.parametrize("call", ["claim", "waiting"])
def test_a_block_stored_between_the_look_and_the_lock_is_read_not_fetched_again(tmp_path, call):
    """The fetcher stores its block and lets go of its claim just after another sidecar looked
    for the block and just before that one takes the claim's lock: the other reads the block,
    it does not fetch it again. (Before, it took the free lock for a fetcher that failed and
    fetched the block again: a race that would explain the 25 GETs for 24 files two sidecars
    made once under load, reading the same small files at once.)"""
    one, two = SharedBlocks(tmp_path, 1 << 20), SharedBlocks(tmp_path, 1 << 20)
    mine, _ = one.claim(version(), BS, [1])
    lock = two._try_lock

    def late(path):  # the fetcher finishes right before this lock
        if mine:
            one.put(version(), BS, 1, random.Random(9).randbytes(BS))
            one.release(version(), BS, mine)
        return lock(path)

    two._try_lock = late
    if call == "claim":
        assert two.claim(version(), BS, [1, 2]) == ({}, [1, 2])  # nothing to claim: wait, then read it
    assert two.waiting(version(), BS, [1]) == ([1], [])
    assert two.get(version(), BS, 1) == random.Random(9).randbytes(BS)
    assert not list((tmp_path / "claims").iterdir())


def _claim_and_hang(folder, ready):
    shared = SharedBlocks(folder, 1 << 20)
    shared.claim(version(), BS, [0])
    ready.set()
    multiprocessing.Event().wait(60)


def test_the_claim_of_a_killed_fetcher_is_free_at_once(tmp_path):
    """A sidecar killed while it fetches a claimed block: the kernel lets go of its lock, and
    the others see the block free (to fetch themselves) instead of waiting for it."""
    ready = multiprocessing.Event()
    child = multiprocessing.get_context("fork").Process(target=_claim_and_hang, args=(tmp_path, ready))
    child.start()
    try:
        assert ready.wait(30)
        other = SharedBlocks(tmp_path, 1 << 20)
        assert other.waiting(version(), BS, [0]) == ([], [])
        child.kill()
        child.join(30)
        assert other.waiting(version(), BS, [0]) == ([], [0])
    finally:
        child.kill()
        child.join(30)


@pytest.mark.parametrize("other_stores_them", [True, False])
def test_blocks_another_sidecar_claimed_are_waited_for(tmp_path, other_stores_them):
    """Blocks another sidecar of the node is fetching (claimed) are not fetched again: the read
    waits and takes them from the folder once stored; if that sidecar lets go without storing
    them (its fetch failed), the read fetches them itself."""
    import trio

    from sidecar.cache.blocks import BlockCache, ObjectRef
    from sidecar.store.memory import MemoryStore

    store = MemoryStore()
    data = random.Random(9).randbytes(4 * BS)
    info = store.put("obj", data)
    v = version(key="obj", etag=info.etag, size=len(data))
    other = SharedBlocks(tmp_path, 1 << 30)
    claimed, _ = other.claim(v, BS, [0, 1, 2, 3])
    assert len(claimed) == 4

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=16 * BS)
        cache.shared = SharedBlocks(tmp_path, 1 << 30)
        cache.version_of = lambda ref: v
        got = []
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)

            async def read():
                ref = ObjectRef("obj", info.etag, len(data))
                cache.prefetch(ref, range(0, 4))
                got.append(b"".join([await cache.get(ref, i) for i in range(4)]))

            nursery.start_soon(read)
            await trio.sleep(0.2)  # (the read is waiting: nothing can complete it but the other sidecar)
            assert not got and store.stats.get_requests == 0
            if other_stores_them:
                other.put_many(v, BS, [(i, data[i * BS : (i + 1) * BS]) for i in range(4)])
            other.release(v, BS, claimed)
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return got[0], cache.stats

    got, stats = trio.run(main)
    assert got == data
    assert store.stats.get_requests == (0 if other_stores_them else 1)
    assert stats.shared_hits == (4 if other_stores_them else 0)
