"""How one open handle's reads are served: the read strategy, chosen in one place.

A `Reader` belongs to one file handle (one version of one object, `ObjectRef`). Each read is
served by one of three strategies (a file written in this mount is read from its staged copy
before any of these, by the file system):

- **exact**: a random reader (no read-ahead window, not followed, blocks not held) gets exactly
  the bytes asked for, one ranged GET, kept for a second pass (`ExactRanges`);
- **followed**: a sequential run that did not start at offset 0 is read through the block cache
  with one streamed GET behind it (`Streams.follow`), never read ahead by the window;
- **window**: any other read goes through the block cache: the blocks it needs first, then the
  read-ahead window (`ReadAhead`), as parallel ranged GETs.

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

from sidecar.cache.blocks import BlockCache, ObjectRef, on_disk
from sidecar.cache.ranges import ExactRanges
from sidecar.cache.readahead import KERNEL_WINDOW, ReadAhead
from sidecar.cache.streams import FOLLOWS_PER_HANDLE, FollowedStream, Streams


WHOLE_AFTER = 8  # exact misses in one object version before a small file is fetched whole
WHOLE_MAX = 256 << 20  # bytes: larger files are never fetched whole for a random reader
DISK_WINDOW = 64  # blocks read ahead of a reader whose next blocks are on the local disk


class Strategy(Enum):
    EXACT = "exact"
    FOLLOWED = "followed"
    WINDOW = "window"


class Reader:
    def __init__(self, ref: ObjectRef, cache: BlockCache, ranges: ExactRanges, streams: Streams | None, max_readahead_blocks: int = 8,
                 kernel_window: int = KERNEL_WINDOW) -> None:
        self.ref = ref
        self.cache = cache
        self.ranges = ranges
        self.streams = streams  # None: the store cannot stream a gated body
        self.readahead = ReadAhead(cache.block_size, max_readahead_blocks, kernel_window)
        self.max_readahead_blocks = max_readahead_blocks
        self.followed: list[FollowedStream] = []  # streamed GETs following this reader's runs
        # The last ranges read exactly (a stream may continue one; several, since one reader may
        # read several runs at once):
        self.exact: deque[tuple[int, int]] = deque(maxlen=FOLLOWS_PER_HANDLE)
        self.whole = False  # the whole file was asked for: reads go through the block cache
        self.whole_limit = min(WHOLE_MAX, cache.memory.limit // 2)

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

    async def read(self, offset: int, size: int) -> bytes:
        ref = self.ref
        if offset >= ref.size or size <= 0:
            return b""
        end = min(offset + size, ref.size)
        strategy, ahead = self.strategy(offset, end)
        if strategy is Strategy.EXACT:
            self.exact.append((offset, end))
            return await self.ranges.read(ref, offset, end)
        return await self._blocks(offset, end, ahead)

    async def _blocks(self, offset: int, end: int, ahead: range) -> bytes:
        """Through the block cache: the blocks this read needs are started first, then the
        read-ahead, so read-ahead never takes the memory the demand blocks need (`get` waits for
        room if need be)."""
        cache, ref, bs = self.cache, self.ref, self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        cache.prefetch(ref, range(first, last + 1), readahead=False)
        if ahead:
            cache.prefetch(ref, ahead)
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

    def close(self) -> None:
        for stream in self.followed:
            stream.close()
