"""The link estimate (sidecar.cache.link) and what it decides: how blocks a reader waits for are
split over GETs (sidecar.cache.blocks) and when a block is fetched beside a followed stream
(sidecar.cache.streams)."""

import os
import random

import pytest
import trio

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.cache.link import KNOWN_AFTER, LinkEstimate
from sidecar.store.memory import MemoryStore
from tests.fshelpers import BS, mounted, path_ino, run

MB = 1e6


def measured(rtt: float, bandwidth: float) -> LinkEstimate:
    """An estimate fed KNOWN_AFTER streams of 8 blocks on a link of `rtt` and `bandwidth`."""
    link = LinkEstimate()
    for i in range(KNOWN_AFTER):
        t = i * 10.0
        per_block = BS / bandwidth
        link.observe_stream(t, t + rtt + per_block, t + rtt + 8 * per_block, BS, 7 * BS)
    return link


def test_a_streamed_get_gives_the_round_trip_and_one_connections_bandwidth():
    link = measured(0.030, 25 * MB)
    assert link.rtt == pytest.approx(0.030, rel=0.01)
    assert link.bandwidth == pytest.approx(25 * MB, rel=0.01)
    assert link.blocks_per_rtt(BS) == pytest.approx(0.030 * 25 * MB / BS, rel=0.02)


def test_nothing_is_decided_before_the_link_was_measured():
    link = LinkEstimate()
    for _ in range(KNOWN_AFTER - 1):
        link.observe_request(0.05, 4096)
    assert link.blocks_per_rtt(BS) is None
    link.observe_request(0.05, 4096)
    assert link.blocks_per_rtt(BS) is not None
    assert link.rtt == pytest.approx(0.05, rel=0.01)


def test_a_large_exact_range_says_nothing_of_the_round_trip():
    link = LinkEstimate()
    link.observe_request(2.0, 8 * BS)  # mostly transfer: no round-trip sample
    assert link.samples == 0


def test_the_estimate_follows_a_link_that_changes():
    link = measured(0.030, 25 * MB)
    for i in range(40):
        t = 1000.0 + i
        link.observe_stream(t, t + 0.2 + BS / (25 * MB), t + 0.2 + 8 * BS / (25 * MB), BS, 7 * BS)
    assert link.rtt == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize("known", [True, False])
def test_blocks_a_reader_waits_for_are_fetched_in_parts_of_a_round_trip(known):
    """Six contiguous blocks the reader waits for (the kernel sent six requests at once): on a
    measured link where one connection brings a block per round trip, six GETs side by side;
    unmeasured, one GET as before. Blocks read ahead are one GET either way."""
    store = MemoryStore()
    data = random.Random(3).randbytes(BS * 16)
    info = store.put("obj", data)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 32)
        if known:
            cache.link = measured(0.040, BS / 0.040)  # one block per round trip
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            ref = ObjectRef("obj", info.etag, len(data))
            cache.prefetch(ref, range(0, 6), readahead=False)
            got = [await cache.get(ref, i) for i in range(6)]
            assert b"".join(got) == data[: 6 * BS]
            waited = store.stats.get_requests
            cache.prefetch(ref, range(8, 14))  # read ahead
            assert b"".join([await cache.get(ref, i) for i in range(8, 14)]) == data[8 * BS : 14 * BS]
            nursery.cancel_scope.cancel()
        return waited, store.stats.get_requests - waited

    waited, ahead = trio.run(main)
    assert (waited, ahead) == ((6, 1) if known else (1, 1))


@pytest.mark.parametrize("known", [True, False])
def test_blocks_asked_far_ahead_of_a_busy_stream_are_fetched_beside_it(known):
    """A run read through one handle, its reads sent together (a large read the kernel split):
    the first is exact, the second starts a stream, the third continues it; the stream brings
    a block per round trip, so the later ones come sooner by GETs of their own. On an
    unmeasured link the stream takes them all (two GETs in all, as before)."""
    store = MemoryStore()
    store.delay = 0.5  # every call waits: the stream's blocks are still pending when the next reads come
    data = random.Random(5).randbytes(BS * 32)
    store.put("cols", data)
    start = BS * 4 + 1000
    offsets = [start + i * BS for i in range(7)]

    async def main():
        async with mounted(store, memory_limit=BS * 32) as fs:
            if known:
                fs.cache.link = measured(0.040, BS / 0.040)
            fh, _ = await fs.open(await path_ino(fs, "cols"), os.O_RDONLY)
            base = store.stats.get_requests
            got = {}

            async def read(off):
                got[off] = bytes(await fs.read(fh, off, BS))

            async with trio.open_nursery() as readers:
                for off in offsets:
                    readers.start_soon(read, off)
                    await trio.testing.wait_all_tasks_blocked()  # each read registered before the next
            assert all(got[off] == data[off : off + BS] for off in offsets)
            fs.release(fh)
            return store.stats.get_requests - base

    gets = run(main)
    # the exact first read, the stream (blocks 5-7: the third read began one block past the
    # stream's first pending block), and a GET each for blocks 8-11
    assert gets == (2 + 4 if known else 2)
