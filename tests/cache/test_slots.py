"""A mount's fetch slots (sidecar.cache.slots): N at once, handed out by ticket."""

import trio
import trio.testing

from sidecar.cache.slots import FetchSlots, ticket


def _taker(slots, got, release):
    """A request that notes its ticket once it has a slot and holds the slot until `release`."""

    async def one(number):
        async with slots.slot(number):
            got.append(number)
            await release.wait()

    return one


def test_a_freed_slot_goes_to_the_lowest_ticket_whatever_order_the_waiters_came_in():
    """Read-ahead GETs registered in block order but started as tasks take their first step in
    no set order: the slot must still go to the blocks asked for first."""
    order = []

    async def main():
        slots = FetchSlots(1)  # (one at a time: who got the slot is who appended)
        tickets = [ticket() for _ in range(6)]
        release = trio.Event()
        one = _taker(slots, order, release)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, tickets[0])
            await trio.testing.wait_all_tasks_blocked()
            for number in reversed(tickets[1:]):  # the later ones ask first
                nursery.start_soon(one, number)
                await trio.testing.wait_all_tasks_blocked()
            assert slots.in_use == 1 and order == tickets[:1]
            release.set()
        assert order == tickets

    trio.run(main)


def test_a_waiter_cancelled_gives_up_its_place_and_a_slot_it_was_handed():
    async def main():
        slots = FetchSlots(1)
        got = []
        async with trio.open_nursery() as nursery:
            hold = trio.Event()

            async def holder():
                async with slots.slot():
                    await hold.wait()

            async def waiter(name, scope_box):
                with trio.CancelScope() as scope:
                    scope_box.append(scope)
                    async with slots.slot():
                        got.append(name)

            nursery.start_soon(holder)
            await trio.testing.wait_all_tasks_blocked()
            first, second = [], []
            nursery.start_soon(waiter, "first", first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "second", second)
            await trio.testing.wait_all_tasks_blocked()
            first[0].cancel()  # gives up its place in the queue
            await trio.testing.wait_all_tasks_blocked()
            hold.set()
        assert got == ["second"] and slots.free == 1

    trio.run(main)


def test_requests_started_together_take_the_free_slots_by_ticket_not_by_who_ran_first():
    """A window's GETs started in one go, one more than the free slots: the free slots go to the
    lowest tickets, and the GET left waiting is the one asked for last, whatever order the tasks
    first ran in (trio varies it from run to run: ten runs)."""

    async def main():
        slots = FetchSlots(4)
        tickets = [ticket() for _ in range(5)]
        got: list[int] = []
        release = trio.Event()
        one = _taker(slots, got, release)

        async with trio.open_nursery() as nursery:
            for number in reversed(tickets):  # all started before any runs
                nursery.start_soon(one, number)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(got) == tickets[:4]  # the last ticket waits
            release.set()
        assert got[-1] == tickets[-1]

    for _ in range(10):
        trio.run(main)
