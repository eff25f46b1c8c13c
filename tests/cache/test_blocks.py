"""The block cache (sidecar.cache.blocks, sidecar.cache.memory): single flight, runs, the memory budget."""

import os
import random

import pytest
import trio

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.store.memory import MemoryStore
from tests.fshelpers import BS, mounted, path_ino, read_all, run


def test_single_flight_concurrent_readers_one_fetch_per_block():
    store = MemoryStore()
    data = random.Random(3).randbytes(BS * 4)
    store.put("f", data)
    store.delay = 0.5

    async def main():
        async with mounted(store) as fs:
            ino = await path_ino(fs, "f")
            results = {}

            async def reader(i):
                fh, _ = await fs.open(ino, os.O_RDONLY)
                # a stream from the start (a kernel-sized read at 0): block reads, not direct ones
                results[i] = bytes(await fs.read(fh, 0, BS))

            async with trio.open_nursery() as n:
                for i in range(16):
                    n.start_soon(reader, i)
            assert all(r == data[:BS] for r in results.values())
            assert fs.cache.stats.single_flight_joins >= 15

    run(main)
    assert store.stats.get_requests <= 2  # the block and its read-ahead (one ranged GET), at most two


def test_blocks_asked_for_together_are_one_request():
    """The kernel splits one large read into block-sized requests that arrive together: blocks
    started within the coalescing delay are fetched as one ranged GET per contiguous run."""
    from sidecar.cache.blocks import ObjectRef

    store = MemoryStore()
    data = random.Random(8).randbytes(BS * 12)
    info = store.put("chunked", data)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 16)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            ref = ObjectRef("chunked", info.etag, len(data))
            for index in (2, 0, 1, 3, 7, 8):  # out of order, in two contiguous runs
                cache.prefetch(ref, range(index, index + 1), readahead=False)
            got = [await cache.get(ref, i) for i in (0, 1, 2, 3, 7, 8)]
            nursery.cancel_scope.cancel()
        assert b"".join(got[:4]) == data[: 4 * BS] and b"".join(got[4:]) == data[7 * BS : 9 * BS]

    run(main, mock_clock=False)
    assert store.stats.get_requests == 2  # blocks 0-3 and 7-8


def test_a_whole_small_object_is_fetched_at_once_and_larger_runs_wait_to_be_merged():
    """Blocks of a larger object wait the coalescing delay to be merged with requests arriving
    together; a run that is the whole object (a small file) has nothing to merge with and is
    fetched at once (`cat` of 1,000 small files paid 2 ms each). No clock moves here."""
    store = MemoryStore()
    small = store.put("small", b"s" * 4096)
    large = store.put("large", b"l" * (3 * BS))

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 8)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            cache.prefetch(ObjectRef("small", small.etag, 4096), range(0, 1), readahead=False)
            cache.prefetch(ObjectRef("large", large.etag, 3 * BS), range(0, 1), readahead=False)
            await trio.testing.wait_all_tasks_blocked()
            assert store.stats.get_requests == 1  # the small one, before any time passed
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock())


def test_memory_budget_holds_with_many_readers():
    store = MemoryStore()
    for i in range(8):
        store.put(f"f{i}", random.Random(i).randbytes(BS * 16))
    store.delay = 0.01
    peak = 0

    async def main():
        nonlocal peak
        async with mounted(store, memory_limit=BS * 6) as fs:
            async def reader(i):
                assert await read_all(fs, f"f{i}", chunk=BS // 4) == store.objects[f"f{i}"][0]

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, fs.cache.memory_bytes)
                    await trio.sleep(0.001)

            async with trio.open_nursery() as n:
                n.start_soon(watch)
                async with trio.open_nursery() as readers:
                    for i in range(8):
                        readers.start_soon(reader, i)
                n.cancel_scope.cancel()

    run(main)
    assert 0 < peak <= BS * 6


def test_block_cache_rejects_budget_below_one_block():
    with pytest.raises(ValueError):
        BlockCache(MemoryStore(), block_size=BS, memory_limit=BS - 1)


def test_object_ref_blocks():
    cache = BlockCache(MemoryStore(), block_size=10, memory_limit=10)
    assert cache.blocks_of(ObjectRef("k", "e", 0)) == 0
    assert cache.blocks_of(ObjectRef("k", "e", 10)) == 1
    assert cache.blocks_of(ObjectRef("k", "e", 11)) == 2


def test_an_evicted_block_nobody_holds_becomes_the_next_blocks_buffer():
    """MemoryBudget.reserve_block: the least recently used block, a bytearray of the block size
    that nothing else references, is handed to the new reservation instead of being freed; one
    that a view still reads (a reply in flight), one pinned for its disk write, or an entry of
    another kind is evicted or skipped as before. The budget never goes over."""
    from sidecar.cache.memory import MemoryBudget

    budget = MemoryBudget(3 * BS, buffer_size=BS)
    a, b, c = bytearray(b"a" * BS), bytearray(b"b" * BS), bytearray(b"c" * BS)
    for name, data in (("a", a), ("b", b), ("c", c)):
        budget.add(("k", "e", name), data)
    del data
    view = memoryview(b)[10:20]  # a reply of b's bytes, still being written
    budget.pin(("k", "e", "c"))  # c waits for its disk write
    ida = id(a)
    del a  # only the tier holds a now
    ok, got = budget.reserve_block(BS)
    assert ok and got is not None and id(got) == ida
    assert budget.used == 3 * BS and ("k", "e", "a") not in budget.entries
    del got
    ok, got = budget.reserve_block(BS)  # b is next: a view holds it, so it is freed, not reused
    assert (ok, got) == (True, None)
    assert ("k", "e", "b") not in budget.entries and bytes(view) == b"b" * 10
    assert budget.used == 3 * BS
    ok, got = budget.reserve_block(BS)  # only c is left, and it is pinned
    assert (ok, got) == (False, None) and budget.used == 3 * BS
    budget.add(("k", "e", ("range", 0, 10)), b"0123456789")
    assert budget.reserve_block(5) == (False, None)  # not a block: try_reserve, as before


def test_blocks_on_the_local_disk_give_their_buffers_back_once_served_even_with_room():
    """A block whose bytes are on the local disk (read from it, or written since it was
    fetched) costs a local read to get again: once a reader got it and SERVED_KEEP blocks after
    it, its buffer is the next block's, though the budget has room. Not before it was served
    (read ahead, not yet asked for), not while a view of it lives, not before its disk write is
    done, never one that is not on the disk; a disk read (`aligned`) takes only a `Buffer` (a
    bytearray cannot be read into with O_DIRECT), a fetch from the store either kind."""
    from sidecar.cache.memory import SERVED_KEEP, Buffer, MemoryBudget

    budget = MemoryBudget(1000 * BS, buffer_size=BS)
    ids = [("k", "e", i) for i in range(SERVED_KEEP + 6)]
    for mid in ids:
        budget.add(mid, Buffer.new(BS), from_disk=True)
    fetched, unwritten = ("k", "e", "fetched"), ("k", "e", "unwritten")
    budget.add(fetched, bytearray(BS))  # from the store, its disk write done
    budget.add(unwritten, bytearray(BS))  # from the store, still being written
    budget.pin(unwritten)
    budget.add(("k", "e", "nowhere"), bytearray(BS))  # never written (no disk tier took it)
    budget.add(("k", "e", "unserved"), Buffer.new(BS), from_disk=True)
    assert budget.reserve_block(BS, aligned=True) == (True, None)  # none served yet: a new one
    budget.release(BS)
    for mid in (("k", "e", "nowhere"), unwritten, fetched):
        budget.get(mid)
    budget.mark_local(fetched)
    view = memoryview(budget.get(ids[0]))[:10]  # served, and a reply of it still being written
    for mid in ids[1:]:
        budget.get(mid)
    used = budget.used
    ok, got = budget.reserve_block(BS)  # a fetch from the store: the oldest free one, a bytearray
    assert ok and type(got) is bytearray and fetched not in budget.entries
    assert ("k", "e", "nowhere") in budget.entries and ("k", "e", "nowhere") not in budget.served
    ok, got = budget.reserve_block(BS, aligned=True)  # a disk read: not the one being written
    assert ok and type(got) is Buffer and unwritten in budget.entries
    assert ids[0] in budget.entries and ids[1] not in budget.entries  # 0: kept (its view), 1: reused
    assert budget.used == used and bytes(view) == bytes(10)
    del view
    budget.unpin([unwritten])
    budget.mark_local(unwritten)
    ok, got = budget.reserve_block(BS, aligned=True)  # the bytearray is passed over for a Buffer
    assert ok and type(got) is Buffer and ids[0] not in budget.entries and unwritten in budget.entries
    while len(budget.served) > SERVED_KEEP + 1:
        ok, got = budget.reserve_block(BS, aligned=True)
        assert ok and type(got) is Buffer
    ok, got = budget.reserve_block(BS)  # the store's fetch takes the bytearray, now on disk
    assert ok and type(got) is bytearray and unwritten not in budget.entries
    assert len(budget.served) == SERVED_KEEP and ("k", "e", "unserved") in budget.entries
    assert budget.reserve_block(BS, aligned=True) == (True, None)  # SERVED_KEEP left: kept
    budget.release(BS)
    full = MemoryBudget(2 * BS, buffer_size=BS)  # full: a Buffer evicted serves a fetch from the store too
    full.add(("k", "e", 0), Buffer.new(BS), from_disk=True)
    full.add(("k", "e", 1), bytearray(BS))
    ok, got = full.reserve_block(BS)
    assert ok and type(got) is Buffer and full.used == 2 * BS


def test_blocks_read_through_a_small_budget_reuse_the_evicted_blocks_buffers():
    """Read through a cache whose memory holds three blocks: the later blocks are fetched into
    the buffers of evicted ones, and every byte is right, also those of a block a reader still
    holds a view of (as a FUSE reply being written) while the blocks after it arrive."""
    store = MemoryStore()
    data = random.Random(30).randbytes(BS * 12)
    info = store.put("big", data)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 3)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            ref = ObjectRef("big", info.etag, len(data))
            held = memoryview(await cache.get(ref, 0))
            for i in range(1, 12):
                assert await cache.get(ref, i) == data[i * BS : (i + 1) * BS]
            assert held == data[:BS]
            nursery.cancel_scope.cancel()
        return cache.stats.buffers_recycled

    assert run(main, mock_clock=False) >= 8


async def _held_then_written(cache, ref, n, release):
    """`disk_writes.none_left` does not return while the writes of `ref`'s first `n` blocks are
    held (none of them is on disk yet), and does once `release()` let them go: then all are."""
    from sidecar.cache import blocks

    with trio.move_on_after(0.5) as waited:
        await cache.disk_writes.none_left()
    assert waited.cancelled_caught and not any(blocks.on_disk(cache, ref, i) for i in range(n))
    release()
    with trio.fail_after(5):
        await cache.disk_writes.none_left()
    assert all(blocks.on_disk(cache, ref, i) for i in range(n))


def test_written_waits_for_the_disk_writes_still_going_out(tmp_path, monkeypatch):
    """`disk_writes.none_left` (what an exiting worker waits for, bounded) returns only once every disk write
    begun has ended: the blocks a read fetched are then on disk."""
    import threading

    from sidecar.cache import blocks
    from sidecar.cache.disk import DiskTier

    store = MemoryStore()
    data = random.Random(9).randbytes(BS * 3)
    info = store.put("f", data)
    release = threading.Event()
    real = blocks.store_on_disk

    def slow_store_on_disk(*args):
        release.wait(10)
        real(*args)

    monkeypatch.setattr(blocks, "store_on_disk", slow_store_on_disk)

    async def main():
        disk = DiskTier(tmp_path, limit=BS * 100)
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 16, disk=disk)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            await cache.disk_writes.none_left()  # nothing begun: at once
            ref = ObjectRef("f", info.etag, len(data))
            for i in range(3):
                assert bytes(await cache.get(ref, i)) == data[i * BS : (i + 1) * BS]
            await _held_then_written(cache, ref, 3, release.set)
            nursery.cancel_scope.cancel()

    run(main, mock_clock=False)


def test_a_run_whose_request_is_still_open_counts_as_a_disk_write_going_out(tmp_path):
    """A run's readers have its blocks as they arrive, before its request ends (a body's end,
    the connection given back): `disk_writes.none_left` (what a stopping worker waits for,
    bounded) must not return meanwhile, or the worker exits before the run's blocks are
    written and a new mount fetches them again. Once the request ends they are on disk."""
    from sidecar.cache.disk import DiskTier

    data = random.Random(10).randbytes(BS * 3)
    ended = trio.Event()

    class SlowEnd(MemoryStore):
        async def get_blocks(self, *args, **kwargs):
            await super().get_blocks(*args, **kwargs)
            await ended.wait()  # every block delivered; the request not over yet

    store = SlowEnd()
    info = store.put("f", data)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 16, disk=DiskTier(tmp_path, limit=BS * 100))
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            ref = ObjectRef("f", info.etag, len(data))
            cache.prefetch(ref, range(3))
            for i in range(3):
                assert bytes(await cache.get(ref, i)) == data[i * BS : (i + 1) * BS]
            await _held_then_written(cache, ref, 3, ended.set)
            nursery.cancel_scope.cancel()

    run(main, mock_clock=False)
