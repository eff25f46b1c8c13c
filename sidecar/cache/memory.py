"""The block cache's one memory budget.

It covers the memory tier's entries (blocks, and exact ranges of random readers), kept least
recently used first, *and* the reservations of fetches in flight: a fetch reserves its block's
size before it starts, evicting entries to make room, so the bytes in memory never exceed
`limit`, however many readers there are. An entry waiting for its disk write is pinned (never
evicted before it: the write holds its bytes anyway, and evicted it would be memory outside the
budget).

Recycled buffers: a whole block fetched from a store that fills buffers (S3) arrives in a
`Buffer` of the block size (a mapping of its own, populated in one call: sidecar.store.base).
When one is evicted to make room for another such block and nothing else holds it (no reply,
disk write or reader has a view of it: its reference count says so), it becomes that block's
buffer (`reserve_block`) rather than being freed. A new one costs the kernel its pages: faulted
in and zeroed page by page (a bytearray), they were a large part of a cold read's CPU
(benchmarks/results/HISTORY.md). The budget is unchanged: the buffer moves from the tier to the
reservation.

Blocks read back from the disk tier come in `Buffer`s too (the disk reads them with O_DIRECT,
sidecar.cache.disk), recycled the same way; one from a store serves for a disk read and the
other way round. And earlier: a block whose bytes are on the
local disk (read from it, or written to it since it was fetched) costs a local read to get
again, so once a reader has been served from it and SERVED_KEEP blocks after it, its buffer is
the next block's even while the budget has room. Without that, every block of a mount's first
`limit` bytes was a new allocation: after a restart its page faults cost as much as the page
cache the direct reads avoid, and a cold read paid them for its first 256 MiB.

Concurrency: trio thread only. `reserve` waits for room; whoever frees room (a release, an
unpin) wakes the waiters.
"""

from __future__ import annotations

import itertools
import sys
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import trio

from sidecar.store.base import Buffer

EntryId = tuple[str, str, Any]  # (key, etag, block index or ("range", start, end))
SERVED_TRIES = 8  # served blocks looked at per reservation
SERVED_KEEP = 16  # blocks on the local disk kept after they served a reader, before their buffers are reused


RECYCLED = (bytearray, Buffer)


class MemoryBudget:
    def __init__(self, limit: int, buffer_size: int = 0) -> None:
        self.limit = limit
        self.buffer_size = buffer_size  # the size of a recycled buffer (a whole block); 0: none are
        self.entries: OrderedDict[EntryId, bytes] = OrderedDict()
        self.held = 0  # bytes of `entries`
        self.reserved = 0  # bytes reserved by fetches in flight
        self.unwritten: dict[EntryId, int] = {}  # pinned entries, with their pin counts
        self._room = trio.Event()  # set (and replaced) whenever room may have been freed
        self.local: set[EntryId] = set()  # entries whose bytes are on the local disk (read from it, or written)
        self.served: OrderedDict[EntryId, None] = OrderedDict()  # entries a reader got, by when it first did

    @property
    def used(self) -> int:
        return self.held + self.reserved

    def get(self, mid: EntryId) -> bytes | None:
        """An entry, marked as the most recently used (None if not held)."""
        data = self.entries.get(mid)
        if data is not None:
            self.entries.move_to_end(mid)
            self.was_served(mid)
        return data

    def was_served(self, mid: EntryId) -> None:
        """A reader got entry `mid` (from the tier, or as its fetch completed)."""
        if mid in self.entries and mid not in self.served:
            self.served[mid] = None

    def mark_local(self, mid: EntryId) -> None:
        """Entry `mid`'s bytes are now on the local disk too (its write is done)."""
        if mid in self.entries:
            self.local.add(mid)

    def peek(self, mid: EntryId) -> bytes | None:
        """An entry, its place in the LRU order left as it is."""
        return self.entries.get(mid)

    def add(self, mid: EntryId, data: bytes, *, from_disk: bool = False) -> None:
        self.entries[mid] = data
        self.held += len(data)
        if from_disk:
            self.local.add(mid)

    def _pop(self, mid: EntryId) -> Any:
        data = self.entries.pop(mid)
        self.held -= len(data)
        self.local.discard(mid)
        self.served.pop(mid, None)
        return data

    def keep(self, mid: EntryId, data: bytes) -> None:
        """Adds an entry if there is room for it (evicting others); else forgets it."""
        if mid not in self.entries and self.evict_for(len(data)):
            self.add(mid, data)

    def evict_for(self, need: int) -> bool:
        """Evicts least recently used entries, except pinned ones, until `need` more bytes fit
        the budget; whether they do."""
        over = self.used + need - self.limit
        if over > 0:
            victims = []
            for mid, data in self.entries.items():
                if over <= 0:
                    break
                if mid not in self.unwritten:
                    victims.append(mid)
                    over -= len(data)
            for mid in victims:
                self._pop(mid)
        return self.used + need <= self.limit

    def pin(self, mid: EntryId) -> None:
        """Keeps entry `mid` until `unpin` (its disk write is done)."""
        self.unwritten[mid] = self.unwritten.get(mid, 0) + 1

    def unpin(self, mids: Iterable[EntryId]) -> None:
        for mid in mids:
            left = self.unwritten.pop(mid, 1) - 1
            if left:
                self.unwritten[mid] = left
        self._wake()  # they can be evicted now: a fetch waiting for room may go on

    def could_reserve(self, n: int, share: float = 1.0) -> bool:
        """Whether `n` more bytes fit within `share` of the budget besides what cannot be evicted
        (reservations, and entries pinned until their disk write)."""
        pinned = sum(len(self.entries.get(mid, b"")) for mid in self.unwritten)
        return self.reserved + pinned + n <= self.limit * share

    def try_reserve(self, n: int) -> bool:
        if self.evict_for(n):
            self.reserved += n
            return True
        return False

    async def reserve(self, n: int) -> None:
        while not self.try_reserve(n):
            await self.room()

    async def room(self) -> None:
        """Waits until room may have been freed (a release, an unpin)."""
        await self._room.wait()

    def reserve_block(self, n: int, aligned: bool = False) -> tuple[bool, Any]:
        """`try_reserve` for a block of `n` bytes, and a buffer to fill it in: an evicted block's
        that nobody else holds, if the room came from one (else None: the caller makes one).
        `aligned`: a block read from disk, whose buffer must be a `Buffer`. A served block on the
        local disk gives up its buffer first (SERVED_KEEP)."""
        if n != self.buffer_size:
            return self.try_reserve(n), None
        kinds = (Buffer,) if aligned else RECYCLED
        # The oldest served blocks past SERVED_KEEP, the first one on the local disk that
        # nothing else holds (one still held, by its reply or its run, or still being written,
        # is tried again later; one that cannot become such a buffer is passed for good)
        for mid in list(itertools.islice(self.served, max(0, min(SERVED_TRIES, len(self.served) - SERVED_KEEP)))):
            if mid in self.unwritten:
                continue
            data = self.entries.get(mid)
            if mid not in self.local or type(data) not in RECYCLED or len(data) != n:
                del self.served[mid]
                continue
            # (refcount 3: the tier's, `data` and getrefcount's argument)
            if type(data) in kinds and sys.getrefcount(data) == 3:
                self._pop(mid)
                self.reserved += n  # (its n bytes are the room)
                return True, data
            del data
        while self.used + n > self.limit:
            victim = next((mid for mid in self.entries if mid not in self.unwritten), None)
            if victim is None:
                return False, None
            data = self._pop(victim)
            # (refcount 2: `data` and getrefcount's argument; a view of it anywhere holds one more)
            if type(data) in kinds and len(data) == n and sys.getrefcount(data) == 2:
                self.reserved += n
                return True, data
            del data
        self.reserved += n
        return True, None

    def release(self, n: int) -> None:
        self.reserved -= n
        self._wake()

    def clear(self) -> None:
        """Forgets every entry not pinned (tests: a cache as after a restart)."""
        for mid in [m for m in self.entries if m not in self.unwritten]:
            self._pop(mid)

    def _wake(self) -> None:
        self._room.set()
        self._room = trio.Event()
