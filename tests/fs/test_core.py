"""Filesystem core and block cache against the in-memory store: no kernel, no server."""

import dataclasses
import errno
import os
import random
import threading
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.cache.disk import DiskTier, block_name
from sidecar.cache.readahead import ReadAhead
from sidecar.errors import NotFound, ObjectChanged, SidecarError, errno_for
from sidecar.store.memory import MemoryStore
from sidecar.vfs.core import ROOT_INO, Filesystem
from sidecar.vfs.staging import StagingArea

BS = 64 * 1024


def run(fn, *, mock_clock=True):
    clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
    return trio.run(fn, clock=clock)


@asynccontextmanager
async def mounted(store, *, prefix="", ttl=5.0, memory_limit=BS * 16, disk=None):
    cache = BlockCache(store, block_size=BS, memory_limit=memory_limit, disk=disk)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        yield Filesystem(store, cache, root_prefix=prefix, ttl=ttl, uid=1000, gid=100)
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
    fh = await fs.opendir(await path_ino(fs, path))
    entries = fs.readdir(fh, 0)
    fs.releasedir(fh)
    return {name: attr for name, attr, _ in entries}


def test_directories_from_prefixes_and_markers_with_sizes_from_listing():
    store = MemoryStore()
    store.put("data/a.txt", b"hello", mtime=1_700_000_000)
    store.put("data/sub/b.bin", b"x" * 10)
    store.put("data/empty/", b"")  # folder marker
    store.put("other/c", b"not mounted")

    async def main():
        async with mounted(store, prefix="data") as fs:
            top = await names(fs)
            assert set(top) == {"a.txt", "sub", "empty"}
            assert top["a.txt"].size == 5 and top["a.txt"].mtime == 1_700_000_000
            assert top["sub"].is_dir and top["empty"].is_dir
            assert top["a.txt"].uid == 1000 and top["a.txt"].gid == 100
            assert top["a.txt"].mode & 0o777 == 0o444
            assert await names(fs, "empty") == {}
            assert store.stats.head_requests == 0  # sizes came from the listing
            assert await read_all(fs, "sub/b.bin") == b"x" * 10

    run(main)


def test_unrepresentable_names_are_skipped_with_one_warning(monkeypatch):
    from sidecar.vfs import listings

    warnings = []
    monkeypatch.setattr(listings.log, "warning", lambda event, **kw: warnings.append((event, kw["key"], kw["reason"])))

    store = MemoryStore()
    store.put("ok", b"1")
    store.put("a//b", b"2")
    store.put("x" * 256, b"3")
    store.put("dup", b"file")
    store.put("dup/inner", b"dir wins")
    store.put("./dot", b"4")

    async def main():
        async with mounted(store) as fs:
            listed = await names(fs)
            assert await names(fs, "a") == {}  # "a//b": the empty segment cannot be shown
            await trio.sleep(6)  # past the TTL: listed again, warned no more
            await names(fs)
            await names(fs, "a")
            assert store.stats.list_requests == 4
            return listed

    listed = run(main)
    assert sorted(k for _, k, _ in warnings) == sorted(["a//", "x" * 256, "dup", "./"])  # once each
    assert {e for e, _, _ in warnings} == {"object_skipped"}
    assert set(listed) == {"ok", "a", "dup"}
    assert listed["dup"].is_dir
    assert sorted(listed) == ["a", "dup", "ok"]


def test_lookup_counts_and_forget_drop_inodes():
    store = MemoryStore()
    store.put("f", b"1")

    async def main():
        async with mounted(store) as fs:
            a1 = await fs.lookup(ROOT_INO, "f")
            a2 = await fs.lookup(ROOT_INO, "f")
            assert a1.ino == a2.ino
            assert fs.node(a1.ino).lookups == 2
            fs.forget([(a1.ino, 1)])
            assert fs.node(a1.ino).lookups == 1
            fs.forget([(a1.ino, 1)])
            assert fs.inode_count == 1
            fs.forget([(999, 1), (ROOT_INO, 5)])  # unknown inodes and the root: never raise
            # readdir entries not accepted by the kernel are dropped at releasedir
            fh = await fs.opendir(ROOT_INO)
            (name, attr, _), = fs.readdir(fh, 0)
            fs.releasedir(fh)
            assert fs.inode_count == 1

    run(main)


@pytest.mark.parametrize("seed", range(20))
def test_two_directory_handles_and_lookups_forgets_never_answer_an_unknown_inode(seed):
    """A randomized kernel: opendir/readdir/releasedir on two handles of one folder, lookups,
    forgets of what it was given, and remote changes; every inode answered must be in the table
    until the kernel forgets it (the bug: releasedir dropped nodes another handle still listed)."""
    rng = random.Random(seed)
    store = MemoryStore()
    for i in range(8):
        store.put(f"d/f{i}", b"x" * i)

    async def main():
        async with mounted(store, ttl=0.5) as fs:
            d = await path_ino(fs, "d")
            kernel: dict[int, int] = {d: 1}  # what the "kernel" holds: ino -> lookup count
            handles: list[int] = []
            for step in range(300):
                op = rng.random()
                if op < 0.2 or not handles:
                    handles.append(await fs.opendir(d))
                elif op < 0.45:
                    fh = rng.choice(handles)
                    start = rng.randrange(0, 9)
                    for name, attr, _ in fs.readdir(fh, start):
                        assert attr.ino in fs.inodes, f"step {step}: readdir answered unknown inode {attr.ino}"
                        if rng.random() < 0.5:  # the kernel accepted the readdirplus entry
                            fs.remember(attr.ino)
                            kernel[attr.ino] = kernel.get(attr.ino, 0) + 1
                elif op < 0.6:
                    fs.releasedir(handles.pop(rng.randrange(len(handles))))
                elif op < 0.75:
                    try:
                        attr = await fs.lookup(d, f"f{rng.randrange(10)}")
                    except Exception:
                        continue
                    kernel[attr.ino] = kernel.get(attr.ino, 0) + 1
                elif op < 0.9 and kernel:
                    ino = rng.choice(list(kernel))
                    if ino == d:
                        continue
                    n = kernel.pop(ino)
                    fs.forget([(ino, n)])
                else:
                    i = rng.randrange(10)
                    if rng.random() < 0.5:
                        store.put(f"d/f{i}", rng.randbytes(3))
                    elif f"d/f{i}" in store.objects:
                        store.remove(f"d/f{i}")
                    await trio.sleep(0.3)
                for ino in kernel:  # everything the kernel holds is known to the table
                    assert ino in fs.inodes, f"step {step}: the kernel holds {ino}, the table lost it"
            for fh in handles:
                fs.releasedir(fh)
            for ino, n in kernel.items():
                if ino != d:
                    fs.forget([(ino, n)])
            fs.forget([(d, 1)])
            assert fs.inode_count == 1  # nothing leaks once every reference is given back

    run(main)


def test_readdir_offsets_stable_while_directory_changes():
    store = MemoryStore()
    for i in range(10):
        store.put(f"f{i:02d}", b"x")

    async def main():
        async with mounted(store, ttl=0) as fs:
            fh = await fs.opendir(ROOT_INO)
            first = fs.readdir(fh, 0)[:4]
            store.remove("f00")
            store.put("a-new", b"y")
            rest = fs.readdir(fh, first[-1][2])
            fs.releasedir(fh)
            seen = [n for n, _, _ in first] + [n for n, _, _ in rest]
            assert seen == [f"f{i:02d}" for i in range(10)]  # no entry lost or repeated
            assert [off for _, _, off in first + rest] == list(range(1, 11))

    run(main)


def test_metadata_ttl_and_negative_cache():
    store = MemoryStore()
    store.put("a", b"1")

    async def main():
        async with mounted(store, ttl=5) as fs:
            with pytest.raises(SidecarError) as err:
                await fs.lookup(ROOT_INO, "missing")
            assert errno_for(err.value) == errno.ENOENT
            heads = store.stats.head_requests
            store.put("missing", b"now here")
            with pytest.raises(NotFound):
                await fs.lookup(ROOT_INO, "missing")  # negative entry still fresh
            assert store.stats.head_requests == heads
            await trio.sleep(5.1)
            lists = store.stats.list_requests
            assert (await fs.lookup(ROOT_INO, "missing")).size == 8
            # the lookup listed the folder (one LIST, no HEAD): the listings after it are cached
            assert store.stats.list_requests == lists + 1 and store.stats.head_requests == heads
            await names(fs)
            await names(fs)
            assert store.stats.list_requests == lists + 1

    run(main)


def test_replaced_object_seen_after_ttl_never_mixed():
    store = MemoryStore()
    old = bytes(random.Random(1).randbytes(BS * 3))
    new = bytes(random.Random(2).randbytes(BS * 3 + 5))
    store.put("obj", old)

    async def main():
        async with mounted(store, ttl=2) as fs:
            ino = await path_ino(fs, "obj")
            fh, keep = await fs.open(ino, os.O_RDONLY)
            assert keep is False
            assert await fs.read(fh, 0, 100) == old[:100]
            store.put("obj", new)
            # the open handle pins the old etag: a block it has not read yet cannot be mixed in
            with pytest.raises(ObjectChanged) as err:
                await fs.read(fh, BS * 2, 100)
            assert errno_for(err.value) == errno.ESTALE
            fs.release(fh)
            await trio.sleep(2.1)
            # An inode is one version: the old one is stale (the kernel then looks the name up
            # again), and the name now leads to a new inode with the new size.
            with pytest.raises(ObjectChanged):
                await fs.getattr(ino)
            new_ino = await path_ino(fs, "obj")
            assert new_ino != ino and (await fs.getattr(new_ino)).size == len(new)
            assert await read_all(fs, "obj") == new
            store.remove("obj")
            await trio.sleep(2.1)
            with pytest.raises(SidecarError) as err:
                await fs.getattr(new_ino)
            assert errno_for(err.value) == errno.ENOENT

    run(main)


def test_a_new_version_gets_a_new_inode_and_open_handles_keep_theirs():
    """The kernel caches pages per inode: a reader of the old version must never share an inode
    with a reader of the new one (DESIGN: versions and the page cache)."""
    store = MemoryStore()
    old, new_small = random.Random(3).randbytes(BS * 3), random.Random(4).randbytes(BS + 7)
    store.put("obj", old)

    async def main():
        async with mounted(store, ttl=1) as fs:
            ino = await path_ino(fs, "obj")
            fh_old, _ = await fs.open(ino, os.O_RDONLY)
            assert await fs.read(fh_old, 0, 10) == old[:10]
            store.put("obj", new_small)  # replaced by a smaller object
            await trio.sleep(1.1)
            # a second reader opening through the kernel's cached dentry gets ESTALE (the kernel
            # retries with a fresh lookup), never the old inode with the new bytes
            with pytest.raises(ObjectChanged):
                await fs.open(ino, os.O_RDONLY)
            ino_new = await path_ino(fs, "obj")
            assert ino_new != ino
            fh_new, keep = await fs.open(ino_new, os.O_RDONLY)
            assert keep is False
            assert await fs.read(fh_new, 0, BS + 7) == new_small
            # the old handle's inode still has the old size (no silent EOF at the new size),
            # and bytes it has not read yet are an error, never the new version's
            assert (await fs.getattr(ino)).size == len(old)
            with pytest.raises(ObjectChanged):
                await fs.read(fh_old, BS * 2, 100)
            fs.release(fh_old)
            fs.release(fh_new)
            fs.forget([(ino, 1)])
            assert ino not in fs.inodes  # dropped once no handle and no kernel reference holds it

    run(main)


def test_keep_cache_only_when_etag_unchanged():
    store = MemoryStore()
    store.put("k", b"one")

    async def main():
        async with mounted(store, ttl=1) as fs:
            ino = await path_ino(fs, "k")
            fh, keep = await fs.open(ino, os.O_RDONLY)
            fs.release(fh)
            fh, keep2 = await fs.open(ino, os.O_RDONLY)
            fs.release(fh)
            store.put("k", b"two!")
            await trio.sleep(1.1)
            with pytest.raises(ObjectChanged):  # that inode is the old version
                await fs.open(ino, os.O_RDONLY)
            fh, keep3 = await fs.open(await path_ino(fs, "k"), os.O_RDONLY)
            fs.release(fh)
            assert (keep, keep2, keep3) == (False, True, False)

    run(main)


@pytest.mark.parametrize("size", [0, 1, BS - 1, BS, BS + 1, BS * 5 + 17])
def test_reads_at_every_boundary(size):
    store = MemoryStore()
    data = random.Random(size).randbytes(size)
    store.put("f", data)

    async def main():
        async with mounted(store) as fs:
            assert await read_all(fs, "f") == data
            ino = await path_ino(fs, "f")
            fh, _ = await fs.open(ino, os.O_RDONLY)
            rng = random.Random(7)
            for _ in range(50):
                off = rng.randrange(0, size + 10)
                n = rng.randrange(1, BS * 2 + 3)
                assert await fs.read(fh, off, n) == data[off : off + n]

    run(main)


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


def test_sequential_reader_prefetches_random_reader_does_not():
    store = MemoryStore()
    store.put("big", random.Random(4).randbytes(BS * 64))

    async def main():
        async with mounted(store, memory_limit=BS * 32) as fs:
            await read_all(fs, "big", chunk=BS)  # kernel-sized reads from offset 0: a stream
            assert fs.cache.stats.prefetches > 10
            assert fs.cache.memory_bytes <= BS * 32
            store.stats.bytes_fetched = 0
            fs.cache.memory.clear()
            fs.cache.stats.direct_reads = 0
            ino = await path_ino(fs, "big")
            fh, _ = await fs.open(ino, os.O_RDONLY)
            rng = random.Random(5)
            for _ in range(20):
                await fs.read(fh, rng.randrange(BS, BS * 63), 4096)
            await trio.sleep(1)
            # random reads fetch what they read: read amplification 1, no whole blocks
            assert store.stats.bytes_fetched == 20 * 4096
            assert fs.cache.stats.direct_reads == 20

    run(main)


def test_random_reads_are_kept_so_a_second_pass_fetches_nothing(tmp_path):
    """Exact ranges of a random reader are kept in memory and on disk: the same reads again, by
    a new handle or a new mount on the kept disk cache, make no request."""
    store = MemoryStore()
    data = random.Random(6).randbytes(BS * 64)
    store.put("big", data)
    rng = random.Random(7)
    offsets = [rng.randrange(0, BS * 63) for _ in range(30)]

    async def one_pass(fs):
        ino = await path_ino(fs, "big")
        fh, _ = await fs.open(ino, os.O_RDONLY)
        for off in offsets:
            assert bytes(await fs.read(fh, off, 4096)) == data[off : off + 4096]
        fs.release(fh)

    async def first():
        async with mounted(store, disk=DiskTier(tmp_path, limit=BS * 100)) as fs:
            await one_pass(fs)
            gets = store.stats.get_requests
            await one_pass(fs)  # a new handle: from memory
            assert store.stats.get_requests == gets
            assert fs.cache.stats.range_hits == len(offsets)
            with trio.fail_after(10):
                while len(fs.cache.disk) < len(offsets):
                    await trio.sleep(0.01)

    run(first, mock_clock=False)
    assert store.stats.get_requests == len(offsets)
    assert store.stats.bytes_fetched == len(offsets) * 4096  # still exactly what was read

    async def again():
        async with mounted(store, disk=DiskTier(tmp_path, limit=BS * 100)) as fs:
            await one_pass(fs)  # a new mount: from disk
            assert fs.cache.stats.range_hits == len(offsets)

    run(again, mock_clock=False)
    assert store.stats.get_requests == len(offsets)


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


KiB, MiB = 1024, 1024 * 1024


def test_window_opens_at_once_for_a_stream_from_offset_0_and_doubles():
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    windows = []
    for off in range(0, 64 * MiB, 128 * KiB):  # `cat`: kernel-sized reads from the start
        ra.on_read(off, 128 * KiB)
        windows.append(ra.window)
    assert windows[0] == 4  # several blocks at once: parallel ranged GETs from the first read
    assert windows == sorted(windows) and max(windows) >= 64


def test_random_reads_never_open_the_window_even_when_close_together():
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    rng = random.Random(1)
    for _ in range(2000):
        assert list(ra.on_read(rng.randrange(0, 1 << 30), 4 * KiB)) == []
        assert ra.window == 0
    # near misses: each read starts a little after the previous one ended (a gap), as a random
    # reader of a small object does; the old rule (within 1 MiB = sequential) opened the window
    off = 10 * MiB
    for _ in range(50):
        assert list(ra.on_read(off, 4 * KiB)) == [] and ra.window == 0
        off += 4 * KiB + 8 * KiB


def test_kernel_read_ahead_requests_out_of_order_still_count_as_sequential():
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    order = [0, 2, 1, 3, 5, 4, 6, 8, 7, 9]  # 128 KiB requests overtaking each other
    for i in order:
        ra.on_read(i * 128 * KiB, 128 * KiB)
    assert ra.window >= 4


def test_a_run_elsewhere_gets_a_window_proportional_to_what_it_read():
    """A column chunk of a Parquet file: what is fetched beyond its end stays a fraction of it."""
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    start = 300 * MiB
    ra.on_read(start, MiB)
    assert ra.window == 0  # one read is no evidence
    ra.on_read(start + MiB, MiB)
    ra.on_read(start + 2 * MiB, MiB)
    assert ra.window == 1
    for i in range(3, 32):
        ra.on_read(start + i * MiB, MiB)
    assert ra.window == 4  # an eighth of the 32 MiB read in this run
    assert list(ra.on_read(7 * MiB, 4 * KiB)) == [] and ra.window == 0  # a jump closes it


def test_a_run_elsewhere_is_followed_by_one_streamed_get_that_reads_only_what_is_asked(tmp_path):
    """Column chunks of a Parquet file read in block-sized requests at unaligned offsets: each
    run costs its first read (exact) and one streamed GET that reads only as far as the reader
    plus its lead, stopped when the reader jumps to the next run. A new mount on the kept disk
    cache reads the same runs with no request."""
    store = MemoryStore()
    data = random.Random(10).randbytes(BS * 64)
    store.put("cols", data)
    runs = [(BS * 10 + 777, 9 * BS), (BS * 40 + 123, 5 * BS), (BS * 3, 3 * BS)]

    async def read_runs(fs, per_run):
        fh, _ = await fs.open(await path_ino(fs, "cols"), os.O_RDONLY)
        for start, length in runs:
            with trio.fail_after(10):  # blocks wait in memory for their disk write: a new stream needs room
                while fs.cache.memory.unwritten:
                    await trio.sleep(0.01)
            gets, fetched = store.stats.get_requests, store.stats.bytes_fetched
            off = start
            while off < start + length:
                n = min(BS, start + length - off)
                assert bytes(await fs.read(fh, off, n)) == data[off : off + n]
                off += n
            per_run.append((store.stats.get_requests - gets, store.stats.bytes_fetched - fetched, length))
        fs.release(fh)

    async def first():
        per_run = []
        async with mounted(store, memory_limit=BS * 16, disk=DiskTier(tmp_path, limit=BS * 100)) as fs:
            await read_runs(fs, per_run)
            await trio.sleep(0.2)  # a stream that was not stopped would read on meanwhile
            for gets, fetched, length in per_run:
                assert gets == 2  # the first read, exact, then one stream for the rest of the run
            # every stream stopped within the lead of where its reader left it
            assert store.stats.bytes_fetched <= sum(length for _, length in runs) + len(runs) * 2 * BS
            with trio.fail_after(10):
                while len(fs.cache.disk) < (1 + 9) + (1 + 5) + (1 + 2):  # per run: its first read, kept as a range, and the stream's blocks
                    await trio.sleep(0.01)

    run(first, mock_clock=False)

    async def again():
        per_run = []
        async with mounted(store, memory_limit=BS * 16, disk=DiskTier(tmp_path, limit=BS * 100)) as fs:
            await read_runs(fs, per_run)
        assert [gets for gets, _, _ in per_run] == [0, 0, 0]  # all from the kept disk cache

    run(again, mock_clock=False)


def test_a_stream_continues_an_exact_first_read_where_it_ended_not_at_its_blocks_start():
    """Two runs read at once through one handle (pyarrow pre-buffers a row group's column
    chunks in parallel), each starting in the middle of a block: the first read of each is
    exact, and its stream starts where that read ended, the block's head taken from the kept
    range. Each run is fetched once, plus only the rest of its last block."""
    store = MemoryStore()
    data = random.Random(12).randbytes(BS * 64)
    store.put("cols", data)
    runs = [(BS * 10 + BS // 2, 4 * BS), (BS * 30 + BS // 4, 3 * BS)]

    async def main():
        async with mounted(store, memory_limit=BS * 16) as fs:
            fh, _ = await fs.open(await path_ino(fs, "cols"), os.O_RDONLY)
            for step in range(4):  # the runs' reads interleaved, as the kernel sends them
                for start, length in runs:
                    off = start + step * BS
                    if off < start + length:
                        assert bytes(await fs.read(fh, off, BS)) == data[off : off + BS]
            assert store.stats.get_requests == 2 * len(runs)  # per run: its first read, then one stream
            rests = sum(-(start + length) % BS for start, length in runs)
            assert store.stats.bytes_fetched == sum(length for _, length in runs) + rests
            fs.release(fh)

    run(main, mock_clock=False)


def test_a_stream_after_an_exact_read_inside_a_block_fetches_only_the_blocks_missing_head():
    """HDF5 chunks smaller than a block, read one after another: the first chunk's exact read
    lies inside a block; the stream that follows the next starts where it ended and fetches the
    block's first bytes apart (one small GET), rather than the whole block again."""
    store = MemoryStore()
    data = random.Random(13).randbytes(BS * 16)
    store.put("chunks", data)
    chunk = BS * 5 // 8  # 40 KiB, a 64 KiB block: the first chunk lies inside block 4
    start = BS * 4 + BS // 4

    async def main():
        async with mounted(store, memory_limit=BS * 16) as fs:
            fh, _ = await fs.open(await path_ino(fs, "chunks"), os.O_RDONLY)
            for i in range(4):  # four chunks, each one read
                off = start + i * chunk
                assert bytes(await fs.read(fh, off, chunk)) == data[off : off + chunk]
            assert store.stats.get_requests == 3  # the first chunk, the gap before it, the stream
            end = start + 4 * chunk
            assert store.stats.bytes_fetched == end - BS * 4 + (-end % BS)  # each byte once, to the block's end
            fs.release(fh)

    run(main, mock_clock=False)


def test_a_slow_gap_get_still_completes_the_first_block_after_its_stream_went_idle():
    """The stream ends when its reader is quiet for the idle time, and a reader waiting for the
    first block, whose head is still being fetched apart, is quiet: that block is left to the
    gap's GET, not failed with the stream."""
    data = random.Random(15).randbytes(BS * 16)

    class SlowGap(MemoryStore):
        async def get_range(self, key, start, end, etag):
            if start % BS == 0:  # the gap before an exact read inside a block
                await trio.sleep(30)  # (autojump clock) well past the stream's idle time
            return await super().get_range(key, start, end, etag)

    store = SlowGap()
    store.put("chunks", data)
    chunk, start = BS * 5 // 8, BS * 4 + BS // 4

    async def main():
        async with mounted(store, memory_limit=BS * 16) as fs:
            fh, _ = await fs.open(await path_ino(fs, "chunks"), os.O_RDONLY)
            for off in (start, start + chunk):
                assert bytes(await fs.read(fh, off, chunk)) == data[off : off + chunk]
            (follow,) = fs._handles[fh].reader.followed
            assert follow.closed and follow.gap  # the stream had ended before the gap arrived
            fs.release(fh)

    run(main)


def test_a_followed_reader_that_stops_closes_its_stream_after_the_idle_time():
    store = MemoryStore()
    data = random.Random(11).randbytes(BS * 32)
    store.put("obj", data)

    async def main():
        async with mounted(store, memory_limit=BS * 16) as fs:
            fh, _ = await fs.open(await path_ino(fs, "obj"), os.O_RDONLY)
            for i in range(3):
                await fs.read(fh, BS * (5 + i), BS)
            (follow,) = fs._handles[fh].reader.followed
            assert not follow.closed
            await trio.sleep(follow.gate.idle + 1)  # the reader leaves the file open, unread
            assert follow.closed and not follow.fetches
            assert store.stats.bytes_fetched == 3 * BS  # the three reads, nothing ahead of them
            assert bytes(await fs.read(fh, BS * 8, BS)) == data[BS * 8 : BS * 9]  # reads on: a new stream
            fs.release(fh)

    run(main)


def test_more_followed_readers_than_streams_close_the_oldest_stream_instead_of_waiting():
    """Streams are bounded per mount (max_fetches). A reader whose run starts when all are taken
    (by readers that went quiet, each stream waiting for its reader up to the idle time) closes
    the least recently read one; it never waits for the idle time."""
    store = MemoryStore()
    data = random.Random(12).randbytes(BS * 32)
    store.put("obj", data)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 16, max_fetches=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            fs = Filesystem(store, cache, ttl=30.0)
            ino = await path_ino(fs, "obj")
            handles = []
            for i in range(3):  # three readers, each a run of two reads elsewhere in the object
                fh, _ = await fs.open(ino, os.O_RDONLY)
                start = BS * (3 + 9 * i)
                with trio.fail_after(1):  # far less than a stream's idle time
                    for off in (start, start + BS):
                        assert bytes(await fs.read(fh, off, BS)) == data[off : off + BS]
                handles.append(fh)
            first, last = (fs._handles[fh].reader.followed for fh in (handles[0], handles[2]))
            assert first[0].closed and not last[0].closed  # the oldest stream gave way
            assert len(fs.streams) <= 2
            for fh in handles:
                fs.release(fh)
            nursery.cancel_scope.cancel()

    run(main)


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


def test_disk_tier_survives_restart_and_detects_corruption(tmp_path):
    store = MemoryStore()
    data = random.Random(9).randbytes(BS * 4 + 3)
    store.put("f", data)

    first_disk = DiskTier(tmp_path, limit=BS * 100)

    async def main():
        async with mounted(store, disk=first_disk) as fs:
            assert await read_all(fs, "f", chunk=BS) == data  # a stream: block reads
            with trio.fail_after(10):  # the disk writes happen after the readers were served
                while len(first_disk) < 5:
                    await trio.sleep(0.01)

    run(main, mock_clock=False)
    gets = store.stats.get_requests
    assert 1 <= gets <= 5
    # the stream's blocks are one pack file: corrupt the last block in it
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 1 and files[0].name.startswith("pack-")
    raw = bytearray(files[0].read_bytes())
    raw[-1] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    disk = DiskTier(tmp_path, limit=BS * 100)

    async def again():
        async with mounted(store, disk=disk) as fs:
            assert await read_all(fs, "f", chunk=BS) == data  # a stream: block reads

    run(again)
    assert store.stats.get_requests == gets + 1  # only the corrupt block was fetched again
    assert disk.corrupt == 1


def test_a_big_block_on_disk_is_served_mapped_and_a_view_outlives_its_files_replacement(tmp_path):
    """Blocks from MAP_MIN up are served as a mapping of their file (no copy into new memory).
    A reader holding one keeps its bytes when the block is evicted and a new version is written
    under the same name (files are replaced, never written in place); corruption is still found."""
    disk = DiskTier(tmp_path, limit=64 << 20)
    rnd = random.Random(3)
    old, new = rnd.randbytes(1 << 20), rnd.randbytes(1 << 20)
    assert disk.put("b", old)
    held = disk.get("b")
    assert isinstance(held, memoryview) and held == old
    disk._drop("b")  # evicted (unlinked) while the view lives...
    assert disk.put("b", new)  # ...and written again with other bytes
    assert held == old and disk.get("b") == new
    small = rnd.randbytes(1000)
    assert disk.put("s", small) and disk.get("s") == small
    path = next(p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > (1 << 20))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert disk.get("b") is None and disk.corrupt == 1
    assert held == old


MIB = 1 << 20  # blocks from MAP_MIN up are served mapped


def test_a_runs_blocks_are_one_pack_file_served_block_by_block_and_kept_across_restarts(tmp_path):
    """put_many writes a fetched run as one file (one inode, one rename, instead of one per
    block); each block is still served alone (mapped at its page-aligned offset, or read when
    small), survives a restart, and a view of one outlives the pack's eviction."""
    rnd = random.Random(21)
    blocks = [(f"{i:02x}" * 32, rnd.randbytes(MIB if i < 5 else 1000)) for i in range(6)]
    disk = DiskTier(tmp_path, limit=64 << 20)
    assert disk.put_many(blocks) == 6
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].name == "pack-" + blocks[0][0]
    assert disk.used == files[0].stat().st_size == disk.disk_bytes()
    held = disk.get(blocks[2][0])
    assert isinstance(held, memoryview) and held == blocks[2][1]  # mapped, not copied
    assert disk.get(blocks[5][0]) == blocks[5][1]
    assert disk.put_many(blocks[:2]) == 2  # held already: not written again
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 1

    kept = DiskTier(tmp_path, limit=64 << 20)
    assert len(kept) == 6 and kept.used == disk.used
    for name, data in blocks:
        assert kept.get(name) == data
    kept._drop(blocks[0][0])  # one block out (as if corrupt): the pack stays for the others
    assert files[0].exists() and kept.get(blocks[1][0]) == blocks[1][1]
    assert kept.put("ee" * 32, b"later")  # the most recently used
    kept.limit = kept.used - 1  # the least recently used block must go...
    assert kept._evict_locked(0)
    assert not files[0].exists() and all(kept.get(name) is None for name, _ in blocks)  # ...with its whole pack
    assert kept.get("ee" * 32) == b"later"
    assert kept.evictions == 5 and kept.used == kept.disk_bytes()
    assert held == blocks[2][1]  # the unlinked pack's mapping still holds its bytes


def test_a_corrupt_or_cut_pack_costs_only_its_bad_blocks(tmp_path):
    rnd = random.Random(22)
    blocks = [(f"{i:02x}" * 32, rnd.randbytes(MIB)) for i in range(4)]
    disk = DiskTier(tmp_path, limit=64 << 20)
    assert disk.put_many(blocks) == 4
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    raw = bytearray(path.read_bytes())
    raw[len(raw) - MIB // 2] ^= 0xFF  # in the last block's data
    path.write_bytes(bytes(raw[: len(raw) - 10]))  # ...and the file cut short
    (path.parent / ".tmp1-pack-x").write_bytes(b"half")  # a write a crash interrupted
    again = DiskTier(tmp_path, limit=64 << 20)
    assert not (path.parent / ".tmp1-pack-x").exists()
    assert len(again) == 3  # the cut block is not indexed
    for name, data in blocks[:3]:
        assert again.get(name) == data
    path.write_bytes(bytes(raw))  # the whole file, with the flipped byte
    third = DiskTier(tmp_path, limit=64 << 20)
    assert third.get(blocks[3][0]) is None and third.corrupt == 1
    assert [third.get(name) == data for name, data in blocks[:3]] == [True] * 3
    for name, _ in blocks[:3]:
        third._drop(name)
    assert not path.exists() and third.used == 0  # the last block dropped takes the pack


def test_warm_sequential_reader_gets_blocks_read_ahead_from_disk(tmp_path):
    """On a kept disk cache, a sequential reader's next blocks are read from disk into memory
    ahead of it (disk threads, no request): most of its reads are memory hits."""
    store = MemoryStore()
    data = random.Random(5).randbytes(BS * 12)
    store.put("f", data)
    disk = DiskTier(tmp_path, limit=BS * 100)

    async def fill():
        async with mounted(store, disk=disk) as fs:
            assert await read_all(fs, "f", chunk=BS) == data
            with trio.fail_after(10):
                while len(disk) < 12:
                    await trio.sleep(0.01)

    run(fill, mock_clock=False)
    gets = store.stats.get_requests
    kept = DiskTier(tmp_path, limit=BS * 100)

    async def warm():
        async with mounted(store, disk=kept, memory_limit=BS * 16) as fs:
            ino = await path_ino(fs, "f")
            fh, _ = await fs.open(ino, os.O_RDONLY)
            out = []
            for off in range(0, len(data), BS):
                out.append(bytes(await fs.read(fh, off, BS)))
                await trio.sleep(0.01)  # the reader consumes its data; the read-ahead runs meanwhile
            fs.release(fh)
            assert b"".join(out) == data
            return fs.cache.stats

    stats = run(warm, mock_clock=False)
    assert store.stats.get_requests == gets  # all from disk
    assert stats.disk_hits == 12
    assert stats.memory_hits >= 8, stats  # read ahead: in memory before the reader asked


def test_blocks_waiting_for_their_disk_write_stay_in_the_memory_budget(tmp_path):
    """A fetched block is written to disk after its run: until then the write holds its bytes,
    so it is not evicted (evicted, it would be memory outside the budget, and the next fetches
    would take its room). With the disk stuck, a sequential reader stops at the budget."""
    store = MemoryStore()
    data = random.Random(14).randbytes(BS * 24)
    store.put("f", data)
    release = threading.Event()

    class StuckDisk(DiskTier):
        def put_many(self, items):
            release.wait(30)
            return super().put_many(items)

    disk = StuckDisk(tmp_path, limit=BS * 100)

    async def main():
        async with mounted(store, memory_limit=BS * 4, disk=disk) as fs:
            got = []

            async def reader():
                got.append(await read_all(fs, "f", chunk=BS))

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                await trio.sleep(10)  # (autojump clock) until every task waits
                try:
                    assert not got  # the reader waits for room...
                    assert store.stats.bytes_fetched <= BS * 4  # ...and nothing beyond the budget was fetched
                    assert fs.cache.memory_bytes <= BS * 4
                finally:
                    release.set()
            assert got == [data]

    run(main)


def test_disk_limit_never_exceeded(tmp_path):
    store = MemoryStore()
    for i in range(6):
        store.put(f"f{i}", random.Random(i).randbytes(BS * 8))
    limit = BS * 10 + 500
    disk = DiskTier(tmp_path, limit=limit)
    peak = 0

    async def main():
        nonlocal peak
        async with mounted(store, disk=disk) as fs:
            async with trio.open_nursery() as n:
                async def watch():
                    nonlocal peak
                    while True:
                        peak = max(peak, await trio.to_thread.run_sync(disk.disk_bytes))
                        await trio.sleep(0.01)

                n.start_soon(watch)
                for i in range(6):
                    assert await read_all(fs, f"f{i}") == store.objects[f"f{i}"][0]
                await trio.sleep(0.5)
                n.cancel_scope.cancel()

    run(main, mock_clock=False)
    assert 0 < peak <= limit
    assert disk.used <= limit and disk.disk_bytes() <= limit
    assert disk.evictions > 0


def test_block_cache_rejects_budget_below_one_block():
    with pytest.raises(ValueError):
        BlockCache(MemoryStore(), block_size=BS, memory_limit=BS - 1)


def test_backend_failure_is_an_error_not_a_hang():
    store = MemoryStore()
    store.put("f", b"abc")

    async def main():
        async with mounted(store) as fs:
            ino = await path_ino(fs, "f")
            fh, _ = await fs.open(ino, os.O_RDONLY)
            store.fail = True
            with pytest.raises(SidecarError) as err:
                await fs.read(fh, 0, 3)
            assert errno_for(err.value) == errno.EIO
            store.fail = False
            assert await fs.read(fh, 0, 3) == b"abc"  # a failed fetch is not cached

    run(main)


def test_readonly_open_for_write_is_erofs_and_statfs_sane():
    store = MemoryStore()
    store.put("f", b"abc")

    async def main():
        async with mounted(store) as fs:
            ino = await path_ino(fs, "f")
            with pytest.raises(SidecarError) as err:
                await fs.open(ino, os.O_WRONLY)
            assert errno_for(err.value) == errno.EROFS
            st = fs.statfs()
            assert st.name_max == 255 and st.blocks > 0 and st.fragment_size == 4096

    run(main)


def test_object_ref_blocks():
    cache = BlockCache(MemoryStore(), block_size=10, memory_limit=10)
    assert cache.blocks_of(ObjectRef("k", "e", 0)) == 0
    assert cache.blocks_of(ObjectRef("k", "e", 10)) == 1
    assert cache.blocks_of(ObjectRef("k", "e", 11)) == 2


@pytest.mark.parametrize("ttl", [0.0, 5.0])
def test_deep_walk_costs_one_call_per_folder(ttl):
    """A walk down 50 nested folders, resolving each path from the root as the kernel does
    when its entries have expired: at most one backend call per folder, never one per ancestor
    per step (before: 1,275 HEADs at depth 50 with metadata_ttl 0)."""
    depth = 50
    store = MemoryStore()
    store.put("/".join(f"d{i}" for i in range(depth)) + "/leaf.txt", b"x")

    async def main():
        async with mounted(store, ttl=ttl) as fs:
            for d in range(1, depth + 1):
                await path_ino(fs, "/".join(f"d{i}" for i in range(d)))
                await trio.sleep(0.2)  # a 10 s walk: the 5 s TTL expires part way (0 s: at once)
            return store.stats.head_requests + store.stats.list_requests

    calls = run(main)
    assert calls <= depth, calls


def test_disk_tier_error_that_is_not_oserror_costs_a_refetch(tmp_path):
    store = MemoryStore()
    data = random.Random(9).randbytes(BS * 4)
    store.put("obj", data)
    disk = DiskTier(tmp_path / "cache", BS * 64)
    etag = store.objects["obj"][1].etag
    for i in range(4):  # indexed, so reads ask the disk first
        assert disk.put(block_name(store.name, "obj", etag, i, BS), data[i * BS : (i + 1) * BS])

    def broken(*args):
        raise ValueError("a bug in the disk tier")

    disk.get = broken
    disk.put = disk.put_many = broken

    async def main():
        async with mounted(store, disk=disk) as fs:
            # kernel-sized reads from offset 0: blocks through the fetch path, which asks the
            # disk first (a read error), then stores what it fetched (write errors)
            assert await read_all(fs, "obj", chunk=2 * BS) == data  # served from the backend
            with trio.fail_after(10):
                while disk.errors < 2:  # the disk writes after the fetch fail too, quietly
                    await trio.sleep(0.01)

    run(main, mock_clock=False)


def test_disk_limit_is_capped_by_free_space(tmp_path, monkeypatch):
    real = os.statvfs

    class Small:
        f_bavail, f_frsize = 100, 4096  # 400 KiB free

    monkeypatch.setattr(os, "statvfs", lambda p: Small if str(p).startswith(str(tmp_path)) else real(p))
    disk = DiskTier(tmp_path / "cache", 10 << 30)
    assert disk.configured_limit == 10 << 30 and disk.limit == 400 * 1024
    assert oct(os.stat(tmp_path / "cache").st_mode & 0o777) == "0o700"


def test_lookups_are_answered_from_one_listing_single_flight():
    store = MemoryStore()
    for i in range(300):
        store.put(f"d/f{i:03d}", b"x")
    for i in range(1200):
        store.put(f"big/f{i:04d}", b"y")

    async def main():
        async with mounted(store, ttl=60) as fs:
            d = await path_ino(fs, "d")
            big = await path_ino(fs, "big")
            store.stats.list_requests = store.stats.head_requests = 0
            store.delay = 0.05  # every call takes a while: concurrent lookups overlap

            async def look(parent, name):
                await fs.lookup(parent, name)

            async with trio.open_nursery() as n:
                for i in range(300):
                    n.start_soon(look, d, f"f{i:03d}")
            # 300 concurrent lookups in an unlisted folder: one LIST between them, no HEAD
            assert (store.stats.list_requests, store.stats.head_requests) == (1, 0)
            with pytest.raises(NotFound):
                await fs.lookup(d, "absent")  # answered by the listing too
            assert (store.stats.list_requests, store.stats.head_requests) == (1, 0)
            # a folder too big for one page: one partial LIST, then a HEAD per name
            for i in range(5):
                await fs.lookup(big, f"f{i:04d}")
            assert (store.stats.list_requests, store.stats.head_requests) == (2, 5)

    run(main)


def test_mtime_set_through_the_mount_is_stored_and_shown_after_a_remount(tmp_path):
    from sidecar.vfs.mtimes import MtimeIndex

    store = MemoryStore()
    store.put("f.txt", b"data", mtime=1_000_000.0)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 4)
        async with trio.open_nursery() as n:
            await n.start(cache.run)
            fs = Filesystem(store, cache, readonly=False, staging=StagingArea(tmp_path / "staging"),
                            mtimes=MtimeIndex(tmp_path / "mtimes.db"))
            ino = (await fs.lookup(ROOT_INO, "f.txt")).ino
            assert (await fs.getattr(ino)).mtime == 1_000_000.0
            await fs.setattr(ino, mtime=1_234_567_890.5)  # touch -d / rsync -t
            assert store.objects["f.txt"][1].mtime == 1_234_567_890.5  # stored with the object
            fs.mtimes.close()
            # a new mount with the same cache folder: the listing shows the time that was set
            store.objects["f.txt"] = (store.objects["f.txt"][0], dataclasses.replace(store.objects["f.txt"][1], mtime=2_000_000.0))
            fs2 = Filesystem(store, cache, readonly=True, mtimes=MtimeIndex(tmp_path / "mtimes.db"))
            assert (await fs2.lookup(ROOT_INO, "f.txt")).mtime == 1_234_567_890.5
            n.cancel_scope.cancel()

    run(main)


def test_prefetch_plan_walks_folders_takes_files_and_refuses_missing_paths():
    from sidecar.cache.warmup import Prefetcher, PrefetchRefused

    store = MemoryStore()
    for key in ("data/a/one.bin", "data/a/deep/two.bin", "data/b.bin", "data/c/three.bin", "other/x.bin"):
        store.put(key, b"x" * 10)
    adopted = []

    async def adopt(folder, listing):
        adopted.append(folder)

    async def main():
        p = Prefetcher(store, BlockCache(store, block_size=BS, memory_limit=BS * 4), "data", adopt=adopt)
        keys = lambda infos: [i.key for i in infos]  # noqa: E731
        assert keys(await p.plan(["a"])) == ["data/a/deep/two.bin", "data/a/one.bin"]
        assert keys(await p.plan(["b.bin", "/a/deep/"])) == ["data/a/deep/two.bin", "data/b.bin"]
        assert keys(await p.plan([])) == ["data/a/deep/two.bin", "data/a/one.bin", "data/b.bin", "data/c/three.bin"]
        for missing in (["nope"], ["a/nope"], ["b.bin/x"]):
            with pytest.raises(PrefetchRefused):
                await p.plan(missing)

    run(main)
    assert "data" in adopted and "data/a" in adopted and "data/a/deep" in adopted  # the file system gets every listing


def test_a_reader_going_through_a_folder_in_name_order_gets_the_next_files_fetched_ahead():
    """`cat *`, a data loader, zarr: files opened one after another in name order. From the
    third in a row the next FOLDER_AHEAD small files are fetched ahead (each once); a reader
    opening them in any other order fetches only what it reads."""
    from sidecar.cache.readahead import FOLDER_AHEAD

    store = MemoryStore()
    files = {f"d/f{i:03d}": random.Random(i).randbytes(3000 + i) for i in range(40)}
    for key, data in files.items():
        store.put(key, data)
    store.put("d/big", b"x" * (BS * 3))  # more than a block: never fetched ahead

    async def in_order():
        async with mounted(store) as fs:
            await names(fs, "d")
            listed = store.stats.list_requests
            for i in range(3):
                assert await read_all(fs, f"d/f{i:03d}") == files[f"d/f{i:03d}"]
            await trio.sleep(1)  # the fetches ahead land
            assert store.stats.get_requests == 3 + FOLDER_AHEAD  # f000..f002, then f003.. ahead
            for i in range(3, 40):
                assert await read_all(fs, f"d/f{i:03d}") == files[f"d/f{i:03d}"]
            assert await read_all(fs, "d/big") == b"x" * (BS * 3)
            assert store.stats.list_requests == listed
            return store.stats.get_requests

    gets = run(in_order)
    big_gets = gets - 40
    assert 1 <= big_gets <= 3  # each small file fetched once, `big` by its own reads

    store.stats.get_requests = 0

    async def shuffled():
        order = list(range(40))
        random.Random(5).shuffle(order)
        async with mounted(store) as fs:
            await names(fs, "d")
            for n, i in enumerate(order[:12], 1):
                assert await read_all(fs, f"d/f{i:03d}") == files[f"d/f{i:03d}"]
                await trio.sleep(1)
                assert store.stats.get_requests == n  # nothing ahead

    run(shuffled)


def test_the_folder_walk_policy():
    from sidecar.cache.readahead import FolderWalk

    w = FolderWalk(ahead=4, streak=2)
    listing = {f"n{i:02d}": None for i in range(12)}
    assert w.on_open("d", listing, "n00") == []
    assert w.on_open("d", listing, "n01") == ["n02", "n03", "n04", "n05"]  # the second in a row
    assert w.on_open("d", listing, "n02") == []  # still 3 ahead: topped up in batches
    assert w.on_open("d", listing, "n04") == ["n06", "n07", "n08"]  # one name skipped: still a walk
    assert w.on_open("d", listing, "n09") == []  # a jump: the walk starts again
    assert w.on_open("d", listing, "n10") == ["n11"]  # the end of the folder
    assert w.on_open("d", listing, "zz") == []  # not in the listing
    assert w.on_open("e", {"a": None, "b": None}, "a") == [] and w.on_open("e", {"a": None, "b": None}, "b") == []


def test_the_listing_caches_stay_bounded_over_a_long_session(monkeypatch):
    """Millions of missing names looked up and thousands of folders walked in one session: the
    "does not exist" answers and the cached listings stay within their bounds (the expired
    ones go first, then the oldest) and the newest answers are still served."""
    from sidecar.vfs import listings as lmod

    monkeypatch.setattr(lmod, "NEGATIVE_MAX", 100)
    monkeypatch.setattr(lmod, "FOLDERS_MAX", 50)
    ls = lmod.Listings(ttl=5.0)
    now = 0.0
    for i in range(1000):
        now += 0.01  # all still in force: the oldest go
        ls.set_absent(f"k{i}", now)
        ls.store(f"d{i}", {}, now)
        assert len(ls._negative) <= 100 and len(ls._dirs) <= 50
    assert ls.absent("k999", now) and ls.fresh("d999", now) == {}
    assert not ls.absent("k0", now) and ls.fresh("d0", now) is None  # forgotten: asked again
    now += 10  # all expired: the next insertion beyond the bound clears them
    for i in range(101):
        ls.set_absent(f"late{i}", now)
    assert len(ls._negative) <= 100 and all(k.startswith("late") for k in ls._negative)
