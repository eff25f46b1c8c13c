"""Exact ranges of random readers.

A random read is fetched as exactly the bytes asked for, not whole blocks (a 4 KiB read of a
5 GiB object costs a 4 KiB GET). The range is kept too, in the block cache's memory tier (under
the same budget and LRU as blocks) and on its disk tier, so a second pass over the same reads
(a new handle, a new mount on the kept cache) fetches nothing. A range is found again by its
exact offsets (random readers repeat theirs), and, within the mount that fetched it, for any read
it covers, whatever its alignment (a second pass whose reads the kernel cut differently); a
range of the whole object (a small file read whole) also by a new mount over the disk cache.

The ranges fetched of each object version are counted (`misses`): a reader that keeps missing in
a small file is better served by fetching the whole file (sidecar.vfs.reader).
"""

from __future__ import annotations

import bisect
import time

from sidecar.cache.blocks import BlockCache, ObjectRef, fetch_block_once, whole_block
from sidecar.cache.disk import range_name


MISSES_KEPT = 10_000  # object versions whose misses are counted (then the count starts again)
SPANS_KEPT = 200_000  # ranges whose offsets are indexed for reads they cover (then the index starts again)
COVER_LOOKBACK = 8  # kept ranges starting at or before a read that are tried as its cover


class ExactRanges:
    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.misses: dict[tuple[str, str], int] = {}  # (key, etag) -> ranges fetched from the backend
        self._spans: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (key, etag) -> kept ranges, by start
        self._span_count = 0

    async def read(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of `ref`: kept ones, else one ranged GET (then kept)."""
        kept = await self.cached(ref, start, end)
        if kept is not None:
            return kept
        # A range that is a whole block (a small file read whole) is that block in the node's
        # shared cache: found there, or fetched once for all sidecars and stored there (then not
        # in this mount's disk tier too).
        block = whole_block(self.cache, ref, start, end)
        if block is not None and self.cache.shared is not None:
            data, in_shared = await fetch_block_once(self.cache, ref, block, lambda: self._get(ref, start, end))
            self.keep(ref, start, data, on_disk=not in_shared)
            return data
        data = await self._get(ref, start, end)
        self.keep(ref, start, data)
        return data

    async def fetch_piece(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) (at most a block) of what a reader is about to read (a copy's
        middle, sidecar.vfs.reader): one ranged GET under the mount's fetch limit, kept like a
        random read's range, not counted as a random reader's miss. A kept one costs nothing."""
        kept = await self.cached(ref, start, end)
        if kept is not None:
            return kept
        async with self.cache.fetch_limiter:
            data = await self._request(ref, start, end)
        self.keep(ref, start, data)
        return data

    async def _request(self, ref: ObjectRef, start: int, end: int) -> bytes:
        asked = time.monotonic()
        data = await self.cache.store.get_range(ref.key, start, end, ref.etag)
        self.cache.link.observe_request(time.monotonic() - asked, len(data))
        self.cache.stats.direct_reads += 1
        return data

    async def _get(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """One ranged GET, counted as a miss of the object version."""
        data = await self._request(ref, start, end)
        if len(self.misses) >= MISSES_KEPT:
            self.misses.clear()
        vid = (ref.key, ref.etag)
        self.misses[vid] = self.misses.get(vid, 0) + 1
        return data

    async def cached(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        """The bytes of a kept range: this one, or one this mount kept that covers it."""
        data = await self._kept(ref, start, end)
        if data is None:
            cover = self._cover(ref, start, end) or self._whole_kept(ref, start, end)
            if cover is not None:
                whole = await self._kept(ref, *cover)
                if whole is not None:
                    return whole[start - cover[0] : end - cover[0]]
        return data

    def _cover(self, ref: ObjectRef, start: int, end: int) -> tuple[int, int] | None:
        spans = self._spans.get((ref.key, ref.etag))
        if not spans:
            return None
        i = bisect.bisect_right(spans, (start, float("inf")))
        for s, e in reversed(spans[max(0, i - COVER_LOOKBACK) : i]):
            if s <= start and end <= e and (s, e) != (start, end):
                return s, e
        return None

    def _whole_kept(self, ref: ObjectRef, start: int, end: int) -> tuple[int, int] | None:
        """The whole object as one kept range (a small file a random reader read whole), which
        a new mount over the disk cache finds by name without knowing the spans kept before."""
        whole = (0, ref.size)
        if ref.size > self.cache.block_size or (start, end) == whole:
            return None  # (`keep` keeps no range over a block: no name to look up for a large file's miss)
        return whole if self.holds(ref, *whole) else None

    async def _kept(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        cache = self.cache
        rid = (ref.key, ref.etag, ("range", start, end))
        data = cache.memory.get(rid)
        if data is not None:
            cache.stats.range_hits += 1
            return data
        if cache.disk is None:
            return None
        name = range_name(cache.storage_id, ref.key, ref.etag, start, end)
        if name not in cache.disk:
            return None
        (data,) = await cache.disk_read([name])
        if data is None or len(data) != end - start:
            return None
        cache.stats.range_hits += 1
        cache.memory.keep(rid, data)
        return data

    def keep(self, ref: ObjectRef, start: int, data: bytes, on_disk: bool = True) -> None:
        """Keeps a range a random reader fetched (memory now, and with `on_disk` the disk tier in
        the background)."""
        cache = self.cache
        if not data or len(data) > cache.block_size:
            return
        end = start + len(data)
        rid = (ref.key, ref.etag, ("range", start, end))
        if self._span_count >= SPANS_KEPT:
            self._spans.clear()
            self._span_count = 0
        spans = self._spans.setdefault((ref.key, ref.etag), [])
        at = bisect.bisect_left(spans, (start, end))
        if at == len(spans) or spans[at] != (start, end):
            spans.insert(at, (start, end))
            self._span_count += 1
        cache.memory.keep(rid, data)
        if on_disk:
            cache.write_behind(rid, range_name(cache.storage_id, ref.key, ref.etag, start, end), data)

    def kept(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        """A range kept in memory, without counting a hit."""
        return self.cache.memory.peek((ref.key, ref.etag, ("range", start, end)))

    def holds(self, ref: ObjectRef, start: int, end: int) -> bool:
        """Whether range [start, end) is kept, in memory or on disk (no read, no hit counted)."""
        if (ref.key, ref.etag, ("range", start, end)) in self.cache.memory.entries:
            return True
        disk = self.cache.disk
        return disk is not None and range_name(self.cache.storage_id, ref.key, ref.etag, start, end) in disk
