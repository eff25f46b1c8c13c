"""Followed streams (sidecar.cache.streams): one streamed GET behind a sequential reader."""

import os
import random

import trio
import trio.testing

from sidecar.cache.blocks import BlockCache
from sidecar.cache.disk import DiskTier
from sidecar.store.memory import MemoryStore
from sidecar.vfs.core import Filesystem
from tests.fshelpers import BS, mounted, path_ino, run


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


def test_a_read_inside_an_exact_range_in_flight_waits_for_it_rather_than_fetching_again():
    """A page fault's read that falls inside a window another read of the handle is fetching
    (the kernel sent both before either was answered) gets its bytes from that range once it
    is kept: no second GET, no stream. (Seen in the mapped-copy test under load: such a read
    started a stream that brought a whole block nobody read.)"""
    store = MemoryStore()
    data = random.Random(62).randbytes(BS * 16)
    store.put("f", data)
    window = (BS * 10 + 777, BS)  # a random reader's first read: one exact GET
    inside = (BS * 10 + 777 + 5000, 16384)

    async def main():
        async with mounted(store) as fs:
            fh, _ = await fs.open(await path_ino(fs, "f"), os.O_RDONLY)
            gets = store.stats.get_requests
            store.delay = 0.5
            got = {}

            async def read(name, off, n):
                got[name] = bytes(await fs.read(fh, off, n))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "window", *window)
                await trio.testing.wait_all_tasks_blocked()  # its GET is in flight
                nursery.start_soon(read, "inside", *inside)
            for name, (off, n) in (("window", window), ("inside", inside)):
                assert got[name] == data[off : off + n], name
            assert store.stats.get_requests - gets == 1
            fs.release(fh)

    run(main)
