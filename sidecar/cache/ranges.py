"""Exact ranges of random readers.

A random read is fetched as exactly the bytes asked for, not whole blocks (a 4 KiB read of a
5 GiB object costs a 4 KiB GET). The range is kept too, in the block cache's memory tier (under
the same budget and LRU as blocks) and on its disk tier, so a second pass over the same reads
(a new handle, a new mount on the kept cache) fetches nothing. A range is found again by its
exact offsets: random readers repeat theirs.
"""

from __future__ import annotations

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.cache.disk import range_name


class ExactRanges:
    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache

    async def read(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of `ref`: kept ones, else one ranged GET (then kept)."""
        kept = await self.cached(ref, start, end)
        if kept is not None:
            return kept
        data = await self.cache.store.get_range(ref.key, start, end, ref.etag)
        self.keep(ref, start, data)
        self.cache.stats.direct_reads += 1
        return data

    async def cached(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        cache = self.cache
        rid = (ref.key, ref.etag, ("range", start, end))
        data = cache.memory.entries.get(rid)
        if data is not None:
            cache.memory.entries.move_to_end(rid)
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

    def keep(self, ref: ObjectRef, start: int, data: bytes) -> None:
        """Keeps a range a random reader fetched (memory now, disk in the background)."""
        cache = self.cache
        if not data or len(data) > cache.block_size:
            return
        end = start + len(data)
        rid = (ref.key, ref.etag, ("range", start, end))
        cache.memory.keep(rid, data)
        cache.write_behind(rid, range_name(cache.storage_id, ref.key, ref.etag, start, end), data)

    def kept(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        """A range kept in memory, without counting a hit."""
        return self.cache.memory.entries.get((ref.key, ref.etag, ("range", start, end)))
