"""Followed streams: one streamed GET behind one sequential reader.

A run that did not start at offset 0 (a Parquet column chunk, an HDF5 dataset read from some
offset) is read by one GET whose range covers the run's blocks, but whose body is read only as
far as its reader has asked (the `Gate`); the rest waits in TCP and, when the reader jumps
elsewhere, is never read. One request per run instead of one per block, and what is fetched
beyond what was read stays within the last block read (plus what the socket's small receive
buffer held: the store's `_hold_back`). The blocks a stream brings go through the block cache
like any other (its memory budget, its waiters, its disk tier).

Bounds: at most `max_streams` per mount (the least recently read one is closed for a new one,
so a new reader never waits for an idle stream's connection) and FOLLOWS_PER_HANDLE per handle
(one reader may read several runs at once: pyarrow pre-buffers a row group's column chunks in
parallel through one descriptor).

Concurrency: trio thread only; a stream's body is read in the cache's nursery.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from sidecar.cache.blocks import BlockCache, BlockFetch, ObjectRef
from sidecar.cache.ranges import ExactRanges
from sidecar.cache.readahead import FOLLOW_MAX
from sidecar.store.base import Gate

FOLLOWS_PER_HANDLE = 8  # streams one file handle keeps open (runs it reads at once)
GAP_WORTH = 16  # held bytes of a stream's first block, from 1/GAP_WORTH of a block, are worth a GET for the bytes before them


class FollowedStream:
    """One stream: blocks [start, end) of `ref`, registered (fetched by it) up to `registered`."""

    def __init__(self, ref: ObjectRef, start: int, end: int, gap: int = 0, head: bytes = b"") -> None:
        self.ref, self.start, self.end = ref, start, end
        # The first block's bytes from `gap` on, already held (a kept exact range): the stream
        # starts after them, and its first `gap` bytes (if any) come from a GET of their own.
        self.gap, self.head = gap, head
        self.registered = start  # blocks [start, registered) are fetched by this stream (or held)
        self.asked = start  # blocks [start, asked) were asked of the run (some fetched beside the stream)
        self.fetches: dict[int, BlockFetch] = {}  # registered blocks not delivered yet
        self.gate = Gate()
        self.closed = False
        # The first block is put together from two requests when there is a gap:
        self.gap_bytes: bytes | None = None  # the gap's GET's answer
        self.first_piece: bytes | None = None  # the stream's first piece of the block
        self.gap_pending = bool(gap)  # the gap's GET has not ended yet

    def reaches(self, index: int) -> bool:
        """Whether a read of block `index` continues this stream: within what it registered or
        was asked for, and within its range."""
        return self.start <= index <= max(self.registered, self.asked) and index < self.end

    def close(self) -> None:
        """Stops the stream after the blocks registered so far (their waiters still get them)."""
        self.closed = True
        self.gate.close()


class Streams:
    """The streams of one mount, over its block cache (which they fill)."""

    def __init__(self, cache: BlockCache, ranges: ExactRanges, max_streams: int) -> None:
        self.cache = cache
        self.ranges = ranges
        self.max_streams = max_streams
        self._open: OrderedDict[FollowedStream, None] = OrderedDict()  # least recently read first

    def __len__(self) -> int:
        return len(self._open)

    def follow(self, streams: list[FollowedStream], ref: ObjectRef, first: int, last: int, *, may_start: bool,
               after: Iterable[tuple[int, int]] = ()) -> bool:
        """Follows a sequential reader: if blocks [first, last] continue one of the handle's
        `streams`, that stream is extended to them; else, with `may_start` (the handle's
        read-ahead saw the run begin), a new stream starts at the first of them not held, its
        range ending before the next held block. `after`: the exact ranges the reader read
        before; a new stream that starts in the last block of one starts where it ended (a
        Parquet column chunk's first read is exact, and its block's head would otherwise be
        fetched twice). False: the read is not followed (nothing needed, or no memory for even
        one block: the caller fetches as usual)."""
        streams[:] = [s for s in streams if not s.closed]
        per_rtt = self.cache.link.blocks_per_rtt(self.cache.block_size)
        reach = float("inf") if per_rtt is None else max(1.0, per_rtt)
        for s in streams:
            if s.ref != ref or not s.reaches(first):
                continue
            if s.fetches and first - min(s.fetches) > reach:
                # The reader asks further ahead than the stream has brought (the kernel's
                # read-ahead, or a large read it split, sends several requests at once): a GET
                # of their own brings these blocks sooner than the stream would.
                s.asked = max(s.asked, last + 1)
                return False
            if first <= s.registered:
                streams.remove(s)
                streams.append(s)  # the most recently read last
                self._open.move_to_end(s)  # (a stream not closed is in both)
                # No block ahead of the reader: TCP keeps the next bytes coming while the reader
                # turns round, and what a run fetches past its end is at most its last block.
                self._register(s, last + 1, last + 1)
                return True
            s.close()  # the reader went on past it (its last blocks came from GETs of their own)
            break
        if not may_start:
            return False
        s = self._new(ref, first, last, after)
        if s is None or not self._register(s, last + 1, last + 1):
            return False
        while len(self._open) >= self.max_streams:
            self._open.popitem(last=False)[0].close()  # the mount's least recently read stream
        self._open[s] = None
        self.cache.spawn(self._run, s)
        if len(streams) >= FOLLOWS_PER_HANDLE:
            streams.pop(0).close()  # the handle's least recently read
        streams.append(s)
        return True

    def _new(self, ref: ObjectRef, first: int, last: int, after: Iterable[tuple[int, int]]) -> FollowedStream | None:
        cache = self.cache
        start, blocks = first, cache.blocks_of(ref)
        while start <= last and cache.has(ref, start):
            start += 1
        if start > last:
            return None
        end = start + 1
        span = max(1, FOLLOW_MAX // cache.block_size)  # the Range header's extent; read as asked
        while end < min(blocks, start + span) and not cache.has(ref, end):
            end += 1
        return FollowedStream(ref, start, end, *self._head(ref, start, after))

    def _head(self, ref: ObjectRef, index: int, after: Iterable[tuple[int, int]]) -> tuple[int, bytes]:
        """(gap, head): a kept range of `after` that ends inside block `index` gives the block's
        bytes [gap, gap + len(head)); gap > 0 when the range began inside the block too (an HDF5
        chunk smaller than a block), and only if the range is worth an extra small GET for the
        gap. (0, b""): no such range, the stream reads the whole block."""
        bs = self.cache.block_size
        base = index * bs
        for lo, hi in after:
            if not (lo < base + bs and base < hi < min(base + bs, ref.size)):
                continue
            data = self.ranges.kept(ref, lo, hi)
            if data is None or (lo > base and (hi - lo) * GAP_WORTH < bs):
                continue
            return (lo - base, bytes(data)) if lo > base else (0, bytes(data[base - lo :]))
        return 0, b""

    def _register(self, s: FollowedStream, want_end: int, ahead_from: int) -> bool:
        """Registers the stream's blocks up to `want_end` (as far as memory allows) and opens its
        gate that far; False if not even one block had room."""
        while s.registered < min(want_end, s.end):
            index = s.registered
            if not self.cache.held(s.ref, index):  # held ones: read past
                fetch = self.cache.reserve_fetch(s.ref, index, ahead=index >= ahead_from)
                if fetch is None:
                    break
                s.fetches[index] = fetch
            s.registered += 1
        s.gate.open_to(s.registered - s.start)
        return s.registered > s.start

    # -- one stream's request ---------------------------------------------------------------------

    async def _run(self, s: FollowedStream) -> None:
        ref, bs = s.ref, self.cache.block_size
        error: BaseException = OSError(f"{ref.key}: the backend sent fewer bytes than asked")
        try:
            # Streams have their own bound (`max_streams`): one waiting for its reader never
            # holds up demand reads.
            start, end = s.start * bs + s.gap + len(s.head), min(s.end * bs, ref.size)
            if s.gap:
                self.cache.spawn(self._fetch_gap, s)  # beside the stream; it never raises
            extra = {"buffers": lambda i: _buffer(s.fetches.get(s.start + i))} if self.cache.fills_buffers else {}
            await self.cache.store.get_blocks(ref.key, start, end, ref.etag, bs, lambda i, data: self._on_block(s, i, data),
                                              object_size=ref.size, gate=s.gate, **extra)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else OSError("fetch cancelled")
            if not isinstance(exc, Exception):
                raise
        finally:
            s.close()
            self._open.pop(s, None)
            # Whatever did not arrive fails; the first block, if the stream brought its part,
            # is the gap's GET's to complete (the stream may end first: its reader went quiet
            # while waiting for that very block).
            for index, fetch in list(s.fetches.items()):
                if not (index == s.start and s.gap_pending and s.first_piece is not None):
                    del s.fetches[index]
                    self.cache.complete(ref, index, fetch, None, error)

    def _on_block(self, s: FollowedStream, i: int, data: bytes) -> None:
        if i == 0 and (s.head or s.gap):
            s.first_piece = data
            if s.gap_bytes is not None or not s.gap:
                self._deliver(s, 0, (s.gap_bytes or b"") + s.head + data)
            return
        self._deliver(s, i, data)

    async def _fetch_gap(self, s: FollowedStream) -> None:
        """The first block's bytes before the held head, in a GET of their own."""
        base = s.start * self.cache.block_size
        try:
            s.gap_bytes = await self.cache.store.get_range(s.ref.key, base, base + s.gap, s.ref.etag)
        except Exception as exc:  # the first block fails; the stream's other blocks do not
            fetch = s.fetches.pop(s.start, None)
            if fetch is not None:
                self.cache.complete(s.ref, s.start, fetch, None, exc)
            return
        finally:
            s.gap_pending = False
        if s.first_piece is not None:
            self._deliver(s, 0, s.gap_bytes + s.head + s.first_piece)

    def _deliver(self, s: FollowedStream, i: int, data: bytes) -> None:
        index = s.start + i
        fetch = s.fetches.pop(index, None)
        if fetch is not None:
            self.cache.complete(s.ref, index, fetch, data, None)
            # Block by block: the stream goes at its reader's pace, and a block held back for a
            # pack would be pinned in memory meanwhile.
            self.cache.keep_on_disk(s.ref, index, data)


def _buffer(fetch: BlockFetch | None) -> bytearray | None:
    """The recycled buffer a registered block is to be filled in (read from the store's thread:
    a dict lookup and an attribute, each whole under the GIL)."""
    return None if fetch is None else fetch.buffer
