"""How one open handle's reads are served: the read strategy, chosen in one place.

A `Reader` belongs to one file handle (one version of one object, `ObjectRef`). Each read is
served by one of three strategies (a file written in this mount is read from its staged copy
before any of these, by the file system):

- **exact**: a random reader (no read-ahead window, not followed, blocks not held) gets exactly
  the bytes asked for, one ranged GET, kept for a second pass (`ExactRanges`);
- **followed**: a sequential run that did not start at offset 0 is read through the block cache
  with one streamed GET behind it (`Streams.follow`), never read ahead by the window;
- **window**: any other read goes through the block cache: the blocks it needs first, then the
  read-ahead window (`ReadAhead`), as parallel ranged GETs; a stream's window, once open all the
  way, is pumped: each GET's end starts the next (`ReadAhead.top_up`), within PUMP_SHARE of the
  memory budget besides what cannot be evicted.
- **fill**: a copy out of a memory mapping (`ReadAhead.copy`: the kernel read around its first
  and its last page, and the reader walks on from the first) gets the bytes between the two
  fetched at once, as parallel exact ranges of at most a block (`Fill`), each kept like a random
  read's; its reads are answered from them. Blocks would fetch the bytes already read around
  each end again, and a stream would bring the middle through one connection.

A random reader that keeps missing in a small file (sqlite, DuckDB, HDF5 metadata: many small
reads one after another, each a round trip) is better served whole: once WHOLE_AFTER ranges of
the object version were fetched exactly and it is at most `whole_limit` (half the memory budget,
at most WHOLE_MAX), the whole file is fetched at once as parallel ranged GETs (at most
WHOLE_AFTER requests of the reader's own, then a few large ones), and its reads go through the
block cache from then on. A sparse reader of a large file stays exact (4 KiB reads in 1 GiB
fetch 4 KiB each).

The handle's `ReadAhead` classifies the reader; the streams it follows and the exact ranges it
read (a stream may continue one) are the handle's own.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

import trio

from sidecar.cache.blocks import BlockCache, BlockFetch, ObjectRef, fetching, on_disk
from sidecar.cache.ranges import ExactRanges
from sidecar.cache.readahead import KERNEL_WINDOW, ReadAhead
from sidecar.cache.streams import FOLLOWS_PER_HANDLE, FollowedStream, Streams


WHOLE_AFTER = 8  # exact misses in one object version before a small file is fetched whole
WHOLE_MAX = 256 << 20  # bytes: larger files are never fetched whole for a random reader
PUMP_SHARE = 0.75  # of the memory budget a stream's pump may fill with what cannot be evicted
DISK_WINDOW = 64  # blocks read ahead of a reader whose next blocks are on the local disk


class Strategy(Enum):
    EXACT = "exact"
    FOLLOWED = "followed"
    WINDOW = "window"
    FILL = "fill"


class Fill:
    """Bytes [start, end) of one object version, fetched as pieces of at most a block side by
    side; a read waits only for the pieces it needs."""

    def __init__(self, start: int, end: int, piece: int, backward: bool = False) -> None:
        self.start, self.end, self.piece, self.backward = start, end, piece, backward
        self.bounds = [(lo, min(lo + piece, end)) for lo in range(start, end, piece)]
        self.data: list[bytes | None] = [None] * len(self.bounds)
        self.errors: list[BaseException | None] = [None] * len(self.bounds)
        self.done = [trio.Event() for _ in self.bounds]
        self.released, self.released_from = 0, len(self.bounds)  # pieces before the one, and from the other on, are let go

    def covers(self, offset: int, end: int) -> bool:
        return self.start <= offset and end <= self.end

    async def read(self, offset: int, end: int) -> bytes | None:
        """The bytes; None if a piece they need was let go (the reader went back)."""
        first, last = (offset - self.start) // self.piece, (end - 1 - self.start) // self.piece
        if first < self.released or last >= self.released_from:
            return None
        parts = []
        for i in range(first, last + 1):
            await self.done[i].wait()
            error, data = self.errors[i], self.data[i]
            if error is not None:
                raise error
            assert data is not None
            lo = self.bounds[i][0]
            parts.append(memoryview(data)[max(offset - lo, 0) : min(end - lo, len(data))])
        # Pieces more than one behind the reader (below it, or above a copy that runs backwards)
        # are let go: they stay kept as ranges, under the memory budget, not held here beside it.
        behind = range(last + 2, self.released_from) if self.backward else range(self.released, first - 1)
        for j in behind:
            self.data[j] = None
        if self.backward:
            self.released_from = min(self.released_from, last + 2)
        else:
            self.released = max(self.released, first - 1)
        return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[return-value]

    def let_go(self, i: int) -> bool:
        """Whether piece `i` was let go (a piece that arrives after is not held)."""
        return i < self.released or i >= self.released_from


class Reader:
    def __init__(self, ref: ObjectRef, cache: BlockCache, ranges: ExactRanges, streams: Streams | None, max_readahead_blocks: int = 8,
                 kernel_window: int = KERNEL_WINDOW) -> None:
        self.ref = ref
        self.cache = cache
        self.ranges = ranges
        self.streams = streams  # None: the store cannot stream a gated body
        self.readahead = ReadAhead(cache.block_size, max_readahead_blocks, kernel_window, cache.fetch_blocks)
        self.max_readahead_blocks = max_readahead_blocks
        self.followed: list[FollowedStream] = []  # streamed GETs following this reader's runs
        # The last ranges read exactly (a stream may continue one; several, since one reader may
        # read several runs at once):
        self.exact: deque[tuple[int, int]] = deque(maxlen=FOLLOWS_PER_HANDLE)
        self.whole = False  # the whole file was asked for: reads go through the block cache
        self.whole_limit = min(WHOLE_MAX, cache.memory.limit // 2)
        self.fill: Fill | None = None  # the middle of the copy being read, if any
        self.past_copy = -1  # where the last copy's far end, as the kernel read it, ends
        self.closed = False

    def strategy(self, offset: int, end: int) -> tuple[Strategy, range]:
        """Records the read [offset, end) and picks its strategy; with WINDOW, the blocks to read
        ahead. A run that did not start at 0 is followed even when no stream could be started
        (no memory for one, or its blocks all held: a warm pass): it is never read ahead by the
        window."""
        bs = self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        # Ahead of a reader whose read-ahead reaches blocks on the local disk, a window of
        # DISK_WINDOW blocks keeps it from waiting (a disk read is a millisecond, not a round
        # trip), and its blocks' buffers are reused sooner (sidecar.cache.memory: SERVED_KEEP).
        # (The first block not yet asked for: behind a cold reader the blocks just fetched are
        # on disk too, and its window must stay the link's.)
        self.readahead.max_blocks = (min(DISK_WINDOW, self.max_readahead_blocks)
                                     if on_disk(self.cache, self.ref, max(last + 1, self.readahead.requested_end)) else self.max_readahead_blocks)
        ahead = self.readahead.on_read(offset, end - offset)
        if self.fill is not None and not self.fill.covers(offset, end):
            self.fill = None  # the reader went on past it: its pieces stay kept as ranges
        copy = self.readahead.copy
        # A stream that already follows the copy's first end (the kernel read that end in
        # several requests) brings the middle sooner than new GETs would.
        if self.fill is None and copy is not None and not self.whole and not self._streamed(first):
            self._start_fill(copy.lo, copy.hi, copy.backward)
            self.past_copy = copy.past
        if self.fill is not None:
            return Strategy.FILL, range(0)
        if offset == self.past_copy:  # the kernel's read-ahead past a copy's end: just that
            self.past_copy = end
            return Strategy.EXACT, range(0)
        if self.streams is not None:
            if self.streams.follow(self.followed, self.ref, first, last, may_start=self.readahead.following, after=self.exact):
                return Strategy.FOLLOWED, range(0)
            if self.readahead.following:
                return Strategy.FOLLOWED, range(0)
        if self.readahead.window == 0 and not all(self.cache.has(self.ref, i) for i in range(first, last + 1)):
            if not self.whole and self._dense():
                self.whole = True
                return Strategy.WINDOW, range(0, self.cache.blocks_of(self.ref))
            return (Strategy.WINDOW, ahead) if self.whole else (Strategy.EXACT, range(0))
        return Strategy.WINDOW, ahead

    def _dense(self) -> bool:
        """Whether this small file has been missed often enough to be fetched whole."""
        return self.ref.size <= self.whole_limit and self.ranges.misses.get((self.ref.key, self.ref.etag), 0) >= WHOLE_AFTER

    def _streamed(self, index: int) -> bool:
        """Whether one of the handle's open streams reaches block `index`."""
        return any(not s.closed and s.reaches(index) for s in self.followed)

    def _start_fill(self, start: int, end: int, backward: bool) -> None:
        fill = self.fill = Fill(start, end, self.cache.block_size, backward)
        self.cache.stats.fills += 1
        for i in range(len(fill.bounds)):
            self.cache.spawn(self._fetch_piece, fill, i)

    async def _fetch_piece(self, fill: Fill, i: int) -> None:
        lo, hi = fill.bounds[i]
        bs = self.cache.block_size
        data: bytes | None = None
        try:
            if all(self.cache.has(self.ref, b) for b in range(lo // bs, (hi - 1) // bs + 1)):
                data = bytes(await self._blocks(lo, hi, range(0)))  # read before, as blocks
            else:
                data = await self.ranges.fetch_piece(self.ref, lo, hi)
        except Exception as exc:  # the reads that need this piece get the error
            fill.errors[i] = exc
        finally:
            if data is None and fill.errors[i] is None:
                fill.errors[i] = OSError(f"{self.ref.key}: fetch cancelled")
            elif not fill.let_go(i):  # (else the reader is past it: kept as a range only)
                fill.data[i] = data
            fill.done[i].set()

    async def read(self, offset: int, size: int) -> bytes:
        ref = self.ref
        if offset >= ref.size or size <= 0:
            return b""
        end = min(offset + size, ref.size)
        bs = self.cache.block_size
        # A copy under way answers what it covers from its pieces itself (it lets them go); a
        # read outside it (the kernel asking again for a page of the window around its far end)
        # may be answered by a range like any other.
        outside = self.fill is None or not self.fill.covers(offset, end)
        if outside and self.ranges.in_flight(ref) and (joined := await self.ranges.joined(ref, offset, end)) is not None:
            return joined  # inside a range another read is fetching: no request, no stream of its own
        if (outside and self.ranges.may_cover(ref)
                and not all(self.cache.has(ref, i) for i in range(offset // bs, (end - 1) // bs + 1))):
            # What a random reader or a copy kept answers before any block is fetched or any
            # stream started.
            kept = await self.ranges.covered(ref, offset, end)
            if kept is not None:
                return kept
        strategy, ahead = self.strategy(offset, end)
        if strategy is Strategy.EXACT:
            self.exact.append((offset, end))
            return await self.ranges.read(ref, offset, end)
        if strategy is Strategy.FILL:
            assert self.fill is not None
            data = await self.fill.read(offset, end)
            return data if data is not None else await self.ranges.read(ref, offset, end)
        data = await self._blocks(offset, end, ahead)
        self.readahead.answered(offset)
        return data

    async def _blocks(self, offset: int, end: int, ahead: range) -> bytes:
        """Through the block cache: the blocks this read needs are started first, then the
        read-ahead, so read-ahead never takes the memory the demand blocks need (`get` waits for
        room if need be)."""
        cache, ref, bs = self.cache, self.ref, self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        cache.prefetch(ref, range(first, last + 1), readahead=False)
        if ahead:
            cache.prefetch(ref, ahead)
            if self._pumped():
                self._pump(ahead)
        if first == last:
            block = await cache.get(ref, first)
            base = first * bs
            # A view, not a copy: the reply is written from the cached block itself.
            return memoryview(block)[offset - base : end - base]  # type: ignore[return-value]
        parts = []
        for index in range(first, last + 1):
            block = await cache.get(ref, index)
            base = index * bs
            parts.append(memoryview(block)[max(offset - base, 0) : min(end - base, len(block))])
        return b"".join(parts)

    def _pumped(self) -> bool:
        """A stream open all the way on the link's window (not the disk's, DISK_WINDOW)."""
        return self.readahead.pumping and self.readahead.max_blocks == self.max_readahead_blocks

    def _pump(self, ahead: range) -> None:
        """Watches the end of each GET's worth of `ahead` (a stream's window, just requested):
        when one ends, the next GETs start at once (`ReadAhead.top_up`), as a direct client with
        so many connections would, rather than when the reader has read past it. GETs started
        together end together, and the reader reads them in order: topped up only as it read, the
        window's GETs ran in waves, fewer in flight between them."""
        step = self.cache.fetch_blocks
        for index in range(min(ahead.start + step, ahead.stop) - 1, ahead.stop, step):
            fetch = fetching(self.cache, self.ref, index)
            if fetch is not None:
                self.cache.spawn(self._ended, fetch)

    async def _ended(self, fetch: BlockFetch) -> None:
        await fetch.done.wait()
        if self.closed or fetch.error is not None or not self._pumped():
            return
        ra = self.readahead
        in_flight = sum(fetching(self.cache, self.ref, i) is not None for i in range(ra.position, ra.requested_end))
        # Never at the expense of what the budget must hold (other readers' fetches, blocks
        # waiting for their disk write): a GET whose room is not there would be split.
        room = self.cache.memory.could_reserve(self.cache.fetch_blocks * self.cache.block_size, PUMP_SHARE)
        more = ra.top_up(in_flight) if room else range(0)
        if more:
            self.cache.prefetch(self.ref, more)
            self._pump(more)

    def close(self) -> None:
        self.closed = True
        for stream in self.followed:
            stream.close()
