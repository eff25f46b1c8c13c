"""Read-ahead policies (sidecar.cache.readahead): the window, the folder walk."""

import random

import trio

from sidecar.cache.readahead import EARLY_RUN, ReadAhead
from sidecar.store.memory import MemoryStore
from tests.fshelpers import BS, mounted, names, read_all, run

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


def test_a_stream_stays_a_stream_when_the_kernel_sends_a_request_several_blocks_early():
    """The order a worker saw `cat` of 256 MiB arrive in (1 MiB requests, kernel 6.18): block
    14 before 11-13, and so on through the file. Each early request used to end the stream (the
    run restarted elsewhere, followed by one GET, then one GET per block: 180 GETs and a
    quarter of the speed)."""
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    order = list(range(11)) + [14, 15, 16, 17, 18, 19, 11, 12, 13] + [24, 25, 20, 21, 22, 23] + list(range(26, 40))
    windows = []
    for i in order:
        ra.on_read(i * MiB, MiB)
        windows.append(ra.window)
    assert min(windows[1:]) >= 4 and windows[-1] == 128  # never closed, and opened fully


def test_a_streams_tolerance_is_the_kernels_window_on_the_mount():
    """A mount whose kernel reads ahead 1 MiB cannot have sent a read 4 MiB past the last one
    as part of the same window: there the jump starts a new run."""
    narrow = ReadAhead(block_size=MiB, max_blocks=128, kernel_window=MiB)
    wide = ReadAhead(block_size=MiB, max_blocks=128, kernel_window=8 * MiB)
    for ra in (narrow, wide):
        for i in range(6):
            ra.on_read(i * MiB, MiB)
        ra.on_read(10 * MiB, MiB)
    assert wide.window > 0 and narrow.window == 0


def test_a_run_elsewhere_is_not_continued_by_a_read_a_few_blocks_past_its_end():
    """A Parquet reader skipping a column chunk: its next chunk starts a new run (with a stream
    from offset 0 the same jump is the kernel's read-ahead overtaking itself)."""
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    for i in range(8):
        ra.on_read(300 * MiB + i * MiB, MiB)
    assert ra.window == 1
    ra.on_read(312 * MiB, MiB)
    assert ra.window == 0


def test_a_large_read_far_past_the_last_one_is_not_sequential():
    ra = ReadAhead(block_size=MiB, max_blocks=128)
    for off in (500 * MiB, 40 * MiB, 100 * MiB, 7 * MiB, 300 * MiB, 18 * MiB):  # 1 MiB reads at random
        ra.on_read(off, MiB)
        assert ra.window == 0


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


def test_a_walk_in_natural_order_is_followed_too():
    """zarr opens its chunks "0.0", "0.1", ..., "0.9", "0.10", ..., "0.11", "1.0": numbers in the
    names counted up, which is not name order ("0.10" sorts before "0.2")."""
    from sidecar.cache.readahead import FolderWalk, counted_up

    listing = {f"{i}.{j}": None for i in range(3) for j in range(12)}
    assert [counted_up(n, listing) for n in ("0.9", "0.11", "2.11", "x")] == ["0.10", "1.0", None, None]
    assert counted_up("img009.png", {"img010.png": None}) == "img010.png"  # zero-padded: same width
    w = FolderWalk(ahead=4, streak=2)
    got = [w.on_open("z", listing, f"0.{j}") for j in range(12)] + [w.on_open("z", listing, "1.0")]
    assert got[1] == ["0.2", "0.3", "0.4", "0.5"]  # the second counted up in a row
    assert got[3] == ["0.6", "0.7"] and got[7] == ["0.10", "0.11"] and got[9] == ["1.0", "1.1"]  # 4 ahead, in batches
    assert got[10] == [] and got[11] == ["1.2", "1.3"] and got[12] == []
    listing["new"] = None  # the mount adds its own new files to the listing it keeps
    assert w.on_open("z", listing, "new") == []
    names = list(listing)
    import random

    random.Random(1).shuffle(names)
    shuffled = FolderWalk(ahead=4, streak=2)
    assert sum(len(shuffled.on_open("t", listing, n)) for n in names) <= 8  # a shuffled reader gets (almost) nothing ahead


def test_a_stream_reads_ahead_at_most_twice_what_it_read_until_it_is_long():
    """A large read from offset 0 (DuckDB's first column chunk starts at byte 4) arrives as eight
    requests at once: doubling per request opened a window of 128 blocks for a run of eight
    (what was fetched past the read was sixteen times the read). A stream's window stays within
    twice what it read until it has read EARLY_RUN blocks, then opens to the maximum at once."""
    ra = ReadAhead(MiB, max_blocks=128)
    ahead = [ra.on_read(i * MiB, MiB) for i in range(8)]
    assert ra.window <= 16 and max(r.stop for r in ahead if r) <= 8 + 16
    for i in range(8, EARLY_RUN + 2):
        ra.on_read(i * MiB, MiB)
    assert ra.window == 128


def test_a_shuffled_reader_over_many_folders_rarely_sorts_a_folder(monkeypatch):
    """A training epoch: 20,000 names in 100 folders (more than FOLDERS are remembered) opened
    in a shuffled order. Sorting a folder's listing for most opens cost more than the open: a
    folder is sorted only once its last opens rose in name order. Nothing is fetched ahead."""
    import random

    from sidecar.cache import readahead
    from sidecar.cache.readahead import FOLDERS, FolderWalk

    sorts = []
    monkeypatch.setattr(readahead, "sorted", lambda names: sorts.append(1) or list(builtins_sorted(names)), raising=False)
    folders = {f"class{f:03d}": {f"img{i:06d}.bin": None for i in range(f, 20_000, 100)} for f in range(100)}
    assert len(folders) > FOLDERS
    opens = [(f, n) for f, names in folders.items() for n in names]
    random.Random(5).shuffle(opens)
    w = FolderWalk()
    fetched = sum(len(w.on_open(f, folders[f], n)) for f, n in opens)
    assert len(sorts) < len(opens) // 10, len(sorts)  # before: 7,477 of the 20,000 opens; now ~1,000
    assert fetched <= 16
    sorts.clear()
    walker = FolderWalk()
    got = [walker.on_open("class000", folders["class000"], n) for n in sorted(folders["class000"])[:10]]
    assert len(sorts) == 1 and got[2] == sorted(folders["class000"])[3:3 + readahead.FOLDER_AHEAD]


builtins_sorted = sorted


def test_a_copy_out_of_a_mapping_is_seen_from_its_two_ends():
    """A copy out of a mapping faults in its first page, then its last, then walks the middle:
    the kernel's read around each fault, then its read-ahead after the first. The read that
    continues the first while the reads since lie one window further on names that window."""
    for window in (128 * KiB, 1 * MiB, 8 * MiB):  # 8 MiB: each window comes as 1 MiB requests
        ra = ReadAhead(block_size=MiB, max_blocks=128, kernel_window=window)
        piece = min(window, MiB)
        head, tail = 40 * MiB + 12288, 52 * MiB + 4096  # where the kernel read around the two faults
        for off in range(head, head + window, piece):
            ra.on_read(off, piece)
            assert ra.copy is None
        for off in range(tail, tail + window, piece):
            ra.on_read(off, piece)
            assert ra.copy is None
        ra.on_read(head + window, piece)
        assert ra.copy == (head + window, tail, tail + window, False), window
        ra.on_read(head + window + piece, piece)  # the copy's next read: the same copy, not a new one
        assert ra.copy is None


def test_a_copy_out_of_a_mapping_that_runs_backwards_is_seen_too():
    """glibc's memcpy runs backwards at some alignments: after the two ends, the faults come
    down from the last page's window."""
    ra = ReadAhead(block_size=MiB, max_blocks=128, kernel_window=MiB)
    head, tail = 40 * MiB + 12288, 52 * MiB + 4096
    ra.on_read(head, MiB)
    ra.on_read(tail, MiB)
    ra.on_read(tail - 516 * KiB, 516 * KiB)  # the window around the next fault down, less what is cached
    assert ra.copy == (head + MiB, tail, -1, True)
    ra.on_read(tail - 2 * 516 * KiB, 516 * KiB)
    assert ra.copy is None


def test_other_readers_are_not_copies():
    ra = ReadAhead(block_size=MiB, max_blocks=128, kernel_window=MiB)
    # small reads (a database's pages): page X, a page ahead, page X + 1
    ra.on_read(10 * MiB, 4 * KiB)
    ra.on_read(12 * MiB, 4 * KiB)
    ra.on_read(10 * MiB + 4 * KiB, 4 * KiB)
    assert ra.copy is None
    # the far read is further than COPY_GAP ahead
    ra.on_read(100 * MiB, MiB)
    ra.on_read(200 * MiB, MiB)
    ra.on_read(101 * MiB, MiB)
    assert ra.copy is None
    # what lies ahead is a run longer than one read-around (two readers of one handle): not a copy
    ra.on_read(300 * MiB, MiB)
    for i in range(3):
        ra.on_read(310 * MiB + i * MiB, MiB)
    ra.on_read(301 * MiB, MiB)
    assert ra.copy is None
    # two runs read at once (pyarrow's column chunks), each read smaller than the kernel's window
    ra = ReadAhead(block_size=MiB, max_blocks=128, kernel_window=8 * MiB)
    for i in range(4):
        ra.on_read(500 * MiB + i * MiB, MiB)
        ra.on_read(510 * MiB + i * MiB, MiB)
        assert ra.copy is None
    # a plain sequential reader
    for i in range(20):
        ra.on_read(400 * MiB + i * MiB, MiB)
        assert ra.copy is None


def test_a_full_window_is_topped_up_a_get_at_a_time():
    """A stream whose window is open all the way asks for one more GET's worth (`step` blocks) each
    time the reader has read one: topped up only at half the window, its GETs started in waves of
    eight and ended together, and fewer were in flight between the waves."""
    ra = ReadAhead(MiB, max_blocks=128, step=8)
    for i in range(EARLY_RUN + 4):
        ra.on_read(i * MiB, MiB)
        ra.answered(i * MiB)
    assert ra.window == 128
    top_ups = [ra.on_read(i * MiB, MiB) for i in range(EARLY_RUN + 4, EARLY_RUN + 4 + 64)]
    sizes = [len(r) for r in top_ups if r]
    assert sizes and set(sizes) == {8}, sizes
    assert len(sizes) == 8  # one per GET's worth read


def test_a_stream_answered_before_it_goes_on_opens_its_window_without_the_early_cap():
    """The early cap is for one large read the kernel split: its requests all arrive before any is
    answered. A reader that goes on reading after its first blocks were answered (`cat`, `cp`) is
    consuming a stream, and its window doubles per block from there: open all the way after a
    few blocks, rather than after EARLY_RUN."""
    split = ReadAhead(MiB, max_blocks=128)
    for i in range(6):
        split.on_read(i * MiB, MiB)
    assert split.window <= 12
    stream = ReadAhead(MiB, max_blocks=128)
    stream.on_read(0, MiB)
    stream.on_read(MiB, MiB)
    stream.answered(0)
    for i in range(2, 7):
        stream.on_read(i * MiB, MiB)
    assert stream.window == 128


def test_a_pumping_stream_keeps_a_window_in_flight_up_to_two_windows_ahead():
    """`top_up` (called as a stream's GETs end): GET-sized steps while fewer than a window minus
    one GET are in flight, never past PUMP_AHEAD windows ahead of the reader; nothing for a
    reader that is not a stream with its window open."""
    from sidecar.cache.readahead import PUMP_AHEAD

    random_reader = ReadAhead(MiB, max_blocks=16, step=4)
    random_reader.on_read(40 * MiB, 4 * KiB)
    assert not random_reader.pumping and random_reader.top_up(0) == range(0)
    ra = ReadAhead(MiB, max_blocks=16, step=4)
    for i in range(8):
        ra.on_read(i * MiB, MiB)
        ra.answered(i * MiB)
    assert ra.pumping and ra.position == 8
    end = ra.requested_end
    assert ra.top_up(16) == range(0)  # a window in flight: nothing more
    assert ra.top_up(10) == range(end, end + 4)  # room for one GET
    assert ra.top_up(0) == range(end + 4, end + 16)  # all ended: three more GETs
    while ra.top_up(0):  # the reader reads nothing meanwhile: it stops two windows ahead of it
        pass
    assert ra.requested_end <= ra.position + PUMP_AHEAD * 16 and ra.requested_end > ra.position + PUMP_AHEAD * 16 - 4


def test_a_closed_readers_gets_that_end_start_no_others():
    """The pump lives as long as its reader: GETs of a stream's window that end after its file
    was closed start nothing more."""
    from sidecar.cache.blocks import BlockCache, ObjectRef
    from sidecar.cache.ranges import ExactRanges
    from sidecar.vfs.reader import Reader

    release, started = trio.Event(), []

    class Held(MemoryStore):
        async def get_blocks(self, key, start, end, *args, **kwargs):
            started.append(start // BS)
            if start >= 8 * BS:  # the window's far GETs stay in flight until the file is closed
                await release.wait()
            await super().get_blocks(key, start, end, *args, **kwargs)

    store = Held()
    data = random.Random(12).randbytes(BS * 64)
    info = store.put("f", data)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 64, fetch_size=2 * BS)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            reader = Reader(ObjectRef("f", info.etag, len(data)), cache, ExactRanges(cache), None, max_readahead_blocks=8)
            for i in range(4):
                assert bytes(await reader.read(i * BS, BS)) == data[i * BS : (i + 1) * BS]
            assert reader.readahead.pumping
            await trio.sleep(1)  # (the mock clock's: the runs merged for COALESCE_S are started)
            before = len(started)
            assert max(started) >= 8  # a held GET is in flight
            reader.close()
            release.set()
            await trio.sleep(1)
            assert len(started) == before, started[before:]
            nursery.cancel_scope.cancel()

    run(main)
