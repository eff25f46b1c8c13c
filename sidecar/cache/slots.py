"""A mount's fetch slots: at most N requests in flight, handed out in the order they were asked for.

A stream's read-ahead asks for more GETs than there are slots (a window of sixteen GETs beside
the ones its reader waits for, or a pump that runs ahead of it), and its reader needs them in
block order. A `trio.CapacityLimiter` serves its waiters in the order they called `acquire`, but
tasks started together take their first step in no set order (trio varies it on purpose): the
GET of the blocks the reader needed next could wait behind the ones it needs last, while its
reader waited. Here each waiter carries a ticket, taken when its request was made (its blocks
registered, in block order), and a freed slot goes to the lowest ticket.
"""

from __future__ import annotations

import heapq
import itertools
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

_tickets = itertools.count()


def ticket() -> int:
    """The next ticket: asked later, served later."""
    return next(_tickets)


class FetchSlots:
    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiting: list[tuple[int, int, trio.Event]] = []  # (ticket, tie-break, woken with a slot)
        self._ties = itertools.count()

    @property
    def in_use(self) -> int:
        return self.total - self.free

    @asynccontextmanager
    async def slot(self, number: int | None = None) -> AsyncIterator[None]:
        """Holds a slot for the body; `number`: the request's ticket (default: a new one)."""
        await self._acquire(ticket() if number is None else number)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, number: int) -> None:
        entry = (number, next(self._ties), trio.Event())
        heapq.heappush(self._waiting, entry)
        try:
            # Requests made together arrive here in the order their tasks first run, not in
            # their tickets' order: when free slots went to whoever arrived first, a window of
            # one GET more than the free slots could leave its reader's next GET waiting for
            # another to end. After one checkpoint every task started with this one has queued;
            # the free slots then go to the lowest tickets.
            await trio.lowlevel.checkpoint()
            self._hand_out()
            await entry[2].wait()
        except BaseException:
            if entry[2].is_set():  # handed a slot as it was cancelled: hand it on
                self._release()
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    def _hand_out(self) -> None:
        while self.free > 0 and self._waiting:
            self.free -= 1
            heapq.heappop(self._waiting)[2].set()

    def _release(self) -> None:
        self.free += 1
        self._hand_out()  # (straight to the lowest ticket waiting, if any)
