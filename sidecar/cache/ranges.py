"""Exact ranges of random readers.

A random read is fetched as exactly the bytes asked for, not whole blocks (a 4 KiB read of a
5 GiB object costs a 4 KiB GET). The range is kept too, in the block cache's memory tier (under
the same budget and LRU as blocks) and on its disk tier, so a second pass over the same reads
(a new handle, a new mount on the kept cache) fetches nothing. A read is answered from what is
kept whenever that covers it, whatever its alignment: one kept range, or kept ranges and held
blocks side by side (a second pass whose reads the kernel cut differently, a read across two
earlier ones). The spans kept of each version are indexed in memory; a new mount learns them
from the disk tier's names (`kept_ranges`), so it finds them as the mount that kept them does.

The ranges fetched of each object version are counted (`misses`): a reader that keeps missing in
a small file is better served by fetching the whole file (sidecar.vfs.reader).
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterator

import trio

from sidecar.cache.blocks import BlockCache, ObjectRef, fetch_block_once, whole_block
from sidecar.cache.disk import kept_ranges, range_name, version_tag


MISSES_KEPT = 10_000  # object versions whose misses are counted (then the count starts again)
SPANS_KEPT = 200_000  # ranges whose offsets are indexed for reads they cover (then the index starts again)
COVER_LOOKBACK = 8  # kept ranges starting at or before a position that are tried as its cover


class ExactRanges:
    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.misses: dict[tuple[str, str], int] = {}  # (key, etag) -> ranges fetched from the backend
        self._spans: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (key, etag) -> kept ranges, by start
        # Found on the disk tier at start, by version tag: moved to `_spans` at the version's first read.
        self._found = kept_ranges(cache.disk, SPANS_KEPT) if cache.disk is not None else {}
        self._span_count = sum(len(spans) for spans in self._found.values())
        # Ranges being fetched now, by version: a read the kernel sends beside the one that
        # fetches its bytes (a page fault's read inside a window still in flight) waits for them.
        self._fetching: dict[tuple[str, str], list[tuple[int, int, trio.Event]]] = {}

    async def read(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of `ref`: kept ones, else one ranged GET (then kept)."""
        kept = await self.cached(ref, start, end)
        if kept is not None:
            return kept
        # A range that is a whole block (a small file read whole) is that block in the node's
        # shared cache: found there, or fetched once for all sidecars and stored there (then not
        # in this mount's disk tier too).
        with self._fetch(ref, start, end):
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
        with self._fetch(ref, start, end):
            async with self.cache.fetch_limiter.slot():
                data = await self._request(ref, start, end)
            self.keep(ref, start, data)
            return data

    @contextlib.contextmanager
    def _fetch(self, ref: ObjectRef, start: int, end: int) -> Iterator[None]:
        """Range [start, end) is being fetched (and kept, unless it is larger than a block)."""
        vid, entry = (ref.key, ref.etag), (start, end, trio.Event())
        self._fetching.setdefault(vid, []).append(entry)
        try:
            yield
        finally:
            entry[2].set()
            fetching = self._fetching[vid]
            fetching.remove(entry)
            if not fetching:
                del self._fetching[vid]

    async def joined(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        """Bytes [start, end) from a range being fetched now that covers them, once it is kept;
        None if no such range (or it failed, or was too large to keep)."""
        for s, e, done in self._fetching.get((ref.key, ref.etag), ()):
            if s <= start and end <= e:
                await done.wait()
                return await self.cached(ref, start, end)
        return None

    def in_flight(self, ref: ObjectRef) -> bool:
        """Whether a range of this version is being fetched (`joined` can answer only then)."""
        return (ref.key, ref.etag) in self._fetching

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
        """The bytes of a kept range: this one, or what is kept that covers it."""
        data = await self._kept(ref, start, end)
        return data if data is not None else await self.covered(ref, start, end)

    async def covered(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        """Bytes [start, end) put together from kept ranges and held blocks that cover them
        all, or None (nothing read) where they do not. A kept range found gone since (evicted)
        is forgotten, and the read is a miss."""
        plan = self._plan(ref, start, end)
        if plan is None:
            return None
        bs = self.cache.block_size
        parts = []
        for s, e, is_block in plan:
            piece = await self.cache.get(ref, s // bs) if is_block else await self._kept(ref, s, e)
            if piece is None or len(piece) != e - s:
                self._forget(ref, s, e)
                return None
            parts.append(memoryview(piece)[max(start, s) - s : min(end, e) - s])
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def _plan(self, ref: ObjectRef, start: int, end: int) -> list[tuple[int, int, bool]] | None:
        """Kept ranges and held blocks that cover [start, end) side by side, each reaching as far
        as any does from where the one before ends: (start, end, is a block) each."""
        spans = self._spans_of(ref)
        if not spans:
            return None
        bs, plan, at = self.cache.block_size, [], start
        while at < end:
            i = bisect.bisect_right(spans, (at, float("inf")))
            best = max(((s, e, False) for s, e in spans[max(0, i - COVER_LOOKBACK) : i] if e > at), key=lambda p: p[1], default=None)
            if (best is None or best[1] < end) and self.cache.has(ref, at // bs):
                block = (at // bs * bs, min(at // bs * bs + bs, ref.size), True)
                best = block if best is None or block[1] > best[1] else best
            if best is None:
                return None
            plan.append(best)
            at = best[1]
        return plan

    def may_cover(self, ref: ObjectRef) -> bool:
        """Whether any range of this version is indexed (`covered` can answer only then)."""
        return bool(self._spans_of(ref))

    def _spans_of(self, ref: ObjectRef) -> list[tuple[int, int]] | None:
        vid = (ref.key, ref.etag)
        spans = self._spans.get(vid)
        if spans is None and self._found:
            spans = self._found.pop(version_tag(self.cache.storage_id, ref.key, ref.etag), None)
            if spans is not None:
                self._spans[vid] = spans
        return spans

    def _forget(self, ref: ObjectRef, start: int, end: int) -> None:
        spans = self._spans.get((ref.key, ref.etag))
        if spans and (start, end) in spans:
            spans.remove((start, end))
            self._span_count -= 1

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
            self._found.clear()
            self._span_count = 0
        spans = self._spans_of(ref)
        if spans is None:
            spans = self._spans[(ref.key, ref.etag)] = []
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
