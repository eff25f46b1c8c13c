"""The block cache's one memory budget.

It covers the memory tier's entries (blocks, and exact ranges of random readers), kept least
recently used first, *and* the reservations of fetches in flight: a fetch reserves its block's
size before it starts, evicting entries to make room, so the bytes in memory never exceed
`limit`, however many readers there are. An entry waiting for its disk write is pinned (never
evicted before it: the write holds its bytes anyway, and evicted it would be memory outside the
budget).

Recycled buffers: a whole block fetched from a store that fills buffers (S3) arrives in a
`bytearray` of the block size. When one is evicted to make room for another such block and
nothing else holds it (no reply, disk write or reader has a view of it: its reference count
says so), it becomes that block's buffer (`reserve_block`) rather than being freed. A 1 MiB
allocation is a mapping of its own (worker.return_freed_blocks), and the kernel faulted in and
zeroed each new one page by page: a fifth of a cold read's CPU (perf). The budget is unchanged:
the buffer moves from the tier to the reservation.

Concurrency: trio thread only. `reserve` waits for room; whoever frees room (a release, an
unpin) wakes the waiters.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import trio

EntryId = tuple[str, str, Any]  # (key, etag, block index or ("range", start, end))


class MemoryBudget:
    def __init__(self, limit: int, buffer_size: int = 0) -> None:
        self.limit = limit
        self.buffer_size = buffer_size  # the size of a recycled buffer (a whole block); 0: none are
        self.entries: OrderedDict[EntryId, bytes] = OrderedDict()
        self.held = 0  # bytes of `entries`
        self.reserved = 0  # bytes reserved by fetches in flight
        self.unwritten: dict[EntryId, int] = {}  # pinned entries, with their pin counts
        self._room = trio.Event()  # set (and replaced) whenever room may have been freed

    @property
    def used(self) -> int:
        return self.held + self.reserved

    def get(self, mid: EntryId) -> bytes | None:
        """An entry, marked as the most recently used (None if not held)."""
        data = self.entries.get(mid)
        if data is not None:
            self.entries.move_to_end(mid)
        return data

    def peek(self, mid: EntryId) -> bytes | None:
        """An entry, its place in the LRU order left as it is."""
        return self.entries.get(mid)

    def add(self, mid: EntryId, data: bytes) -> None:
        self.entries[mid] = data
        self.held += len(data)

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
                self.held -= len(self.entries.pop(mid))
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

    def try_reserve(self, n: int) -> bool:
        if self.evict_for(n):
            self.reserved += n
            return True
        return False

    async def reserve(self, n: int) -> None:
        while not self.try_reserve(n):
            await self._room.wait()

    def reserve_block(self, n: int) -> tuple[bool, bytearray | None]:
        """`try_reserve` for a block of `n` bytes, and a buffer to fill it in: an evicted block's
        that nobody else holds, if the room came from one (else None: the caller makes one)."""
        if n != self.buffer_size:
            return self.try_reserve(n), None
        while self.used + n > self.limit:
            victim = next((mid for mid in self.entries if mid not in self.unwritten), None)
            if victim is None:
                return False, None
            data = self.entries.pop(victim)
            # (refcount 2: `data` and getrefcount's argument; a view of it anywhere holds one more)
            if type(data) is bytearray and len(data) == n and sys.getrefcount(data) == 2:
                self.held -= n
                self.reserved += n
                return True, data
            self.held -= len(data)
            del data
        self.reserved += n
        return True, None

    async def reserve_buffer(self, n: int) -> bytearray | None:
        """`reserve` for a block: waits for room; a recycled buffer or None."""
        while True:
            ok, buffer = self.reserve_block(n)
            if ok:
                return buffer
            await self._room.wait()

    def release(self, n: int) -> None:
        self.reserved -= n
        self._wake()

    def clear(self) -> None:
        """Forgets every entry not pinned (tests: a cache as after a restart)."""
        for mid in [m for m in self.entries if m not in self.unwritten]:
            self.held -= len(self.entries.pop(mid))

    def _wake(self) -> None:
        self._room.set()
        self._room = trio.Event()
