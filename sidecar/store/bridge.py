"""The bridge between the mount's trio loop and fsspec's asyncio loop.

fsspec's async file systems (s3fs, adlfs, gcsfs) run their coroutines on fsspec's own asyncio
loop in a dedicated IO thread. `run_on_loop` submits a coroutine there with
`run_coroutine_threadsafe` and waits for the result from trio without occupying a worker thread:
the future's done-callback wakes the trio task through its trio token. Cancelling the trio side
(a deadline) cancels the asyncio task, so an abandoned request does not linger. A transfer ticks
a `Progress` as it moves, and fails only once it has not moved for its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Progress:
    """When a backend call last moved (a response arrived, a chunk of a body, a part of an
    upload). Ticked from the asyncio thread, read from trio: a float store is atomic. `grace`
    counts as movement at the start (for calls that can only report at their end)."""

    def __init__(self, grace: float = 0.0) -> None:
        self.last = time.monotonic() + grace
        self.longest_gap = 0.0  # the longest time without movement, so far

    def tick(self, *_: Any) -> None:
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self.last)
        self.last = max(self.last, now)

    def stalled(self, after: float) -> bool:
        """Whether the call went `after` seconds without moving, at some point or now."""
        return max(self.longest_gap, time.monotonic() - self.last) >= after

    def grant(self, seconds: float) -> None:
        """The next step cannot report progress (a server assembling an object): it counts as
        moving for `seconds` more."""
        self.last = max(self.last, time.monotonic() + seconds)


STALL_AFTER = 5.0  # s without progress: a call counts as stalled (status, metrics, `degraded`)


COMPLETE_RATE = 32 << 20  # bytes/s a server is granted to assemble a multipart object


FAIL_FAST_S = 1.0  # after a timeout, the same call fails at once for this long


MIN_RATE = 1 << 20  # bytes/s: an upload that cannot report progress is given size / MIN_RATE


async def run_on_loop(
    loop: asyncio.AbstractEventLoop, coro_fn: Callable[[], Awaitable[T]], *, stall: float | None = None, progress: Progress | None = None
) -> T:
    """Runs `coro_fn()` on an asyncio loop in another thread and waits for it from trio. With
    `stall`, raises trio.TooSlowError (and cancels the call) once `progress` has not moved for
    `stall` seconds: a transfer may take as long as it needs while it moves."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    async def wrapper() -> T:
        return await coro_fn()

    fut = asyncio.run_coroutine_threadsafe(wrapper(), loop)
    fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
    try:
        await _until_done(done, stall, progress)
    except BaseException:
        fut.cancel()
        raise
    return fut.result()


async def run_in_thread(
    fn: Callable[[], T], limiter: trio.CapacityLimiter, *, stall: float | None = None, progress: Progress | None = None
) -> T:
    """Runs the synchronous `fn()` of a blocking client in a worker thread (at most `limiter`'s
    at once) and waits for it from trio; with `stall`, raises trio.TooSlowError once `progress`
    has not moved for `stall` seconds. A cancelled or stalled call's thread is left to end by
    its client's own timeouts and its result dropped: a thread cannot be interrupted."""
    async with limiter:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[Any] = []

        def deliver(outcome: Any) -> None:
            box.append(outcome)
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # nobody waits any more

        trio.lowlevel.start_thread_soon(fn, deliver)
        await _until_done(done, stall, progress)
        return box[0].unwrap()  # type: ignore[no-any-return]


async def _until_done(done: trio.Event, stall: float | None, progress: Progress | None) -> None:
    """Waits for `done`; with `stall`, raises trio.TooSlowError once `progress` has not moved
    for `stall` seconds."""
    if stall is None or progress is None:
        await done.wait()
        return
    while not done.is_set():
        left = progress.last + stall - time.monotonic()
        if left <= 0:
            raise trio.TooSlowError
        with trio.move_on_after(left):
            await done.wait()


# Errors of a body that broke off mid-way (a reset connection): the read is tried again.
def body_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError]
    try:
        import aiohttp

        errors += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    except ImportError:
        pass
    try:
        from botocore.exceptions import ResponseStreamingError

        errors.append(ResponseStreamingError)
    except ImportError:
        pass
    return tuple(errors)


BODY_RETRIES = 3  # per call, for bodies cut off mid-way


class ProgressCallback:
    """An fsspec callback that ticks a Progress on every update of a transfer."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __getattr__(self, name: str) -> Any:
        return self.progress.tick  # set_size, relative_update, absolute_update, call, ...

    def branched(self, *args: Any, **kwargs: Any) -> "ProgressCallback":
        return self
