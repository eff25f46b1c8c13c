"""What every store does around each backend call, whatever its client: a deadline (a transfer:
a deadline without progress), counting, stall detection, and every backend error turned into a
domain error (sidecar.store.classify), so nothing above the store sees a client's exceptions.

A store says how a call runs (`_submit`: on fsspec's asyncio loop, or in a thread for a
synchronous client) and calls `_run` for each request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from sidecar.errors import BackendTimeout, NotFound, ObjectChanged
from sidecar.store.base import ObjectInfo, StoreStats, copy_carrying
from sidecar.store.bridge import FAIL_FAST_S, STALL_AFTER, Progress
from sidecar.store.classify import domain_error
from sidecar.store.patches import retry_attempts

T = TypeVar("T")


class CallingStore:
    """The part of a store that runs, bounds and counts its backend calls."""

    def __init__(self, name: str, deadline: float = 30.0) -> None:
        self.name = name
        self.deadline = deadline
        self.stats = StoreStats()
        self._inflight: set[Progress] = set()
        self._timed_out: dict[str, float] = {}  # call -> when it last timed out
        self._resent = 0  # requests the SDK's client sent again (S3: counted from each answer)
        self.sdk_retried = 0  # retries the SDK's wrapper made (s3fs: counted from its log, sidecar.store.patches)

    def stalled_calls(self, after: float = STALL_AFTER) -> int:
        """Backend calls in flight that have not moved for `after` seconds (a stalling backend
        shows here long before the calls time out). Those that ended are `stats.stalls`."""
        now = time.monotonic()
        return sum(1 for p in list(self._inflight) if now - p.last > after)

    async def warm_up(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        return None  # kept in the mount's own mtime index only

    moves_folders = False  # an object store: a folder is moved object by object (sidecar.vfs.mutations)

    mtime_by_copy = False

    async def rename(self, src: str, dst: str, size: int | None = None, *, mtime: float | None = None) -> ObjectInfo:
        """A copy, then the delete of `src`: the new name is complete before the old one goes."""
        info = await copy_carrying(self, src, dst, size, mtime)  # type: ignore[arg-type]
        await self.delete(src)  # type: ignore[attr-defined]
        return info

    deletes_in_batches = False

    async def delete_many(self, items: list[tuple[str, str | None]]) -> dict[str, str]:
        """One delete per object, where the store has no batch request."""
        for key, _ in items:
            try:
                await self.delete(key)  # type: ignore[attr-defined]
            except NotFound:
                pass
        return {}

    async def rename_folder(self, src: str, dst: str) -> None:
        from sidecar.errors import NotSupported

        raise NotSupported(f"rename of folder {src}: object by object")

    async def _submit(self, call: Callable[[], Any], progress: Progress | None) -> Any:
        """Runs one call of the store's client; with `progress`, raises trio.TooSlowError once it
        has not moved for the deadline."""
        raise NotImplementedError

    async def _run(self, what: str, call: Callable[[], Any], *, progress: Progress | None = None) -> Any:
        """One backend call. Without `progress` it must finish within the mount's deadline; with
        it (transfers, which tick it as they move) it fails only after making no progress for
        that long, however large it is."""
        deadline = self.deadline
        failed_at = self._timed_out.get(what)
        if failed_at is not None and time.monotonic() - failed_at < FAIL_FAST_S:
            # The kernel retries a failed read-ahead at once with a synchronous read of the same
            # pages: the same call again right after a timeout fails at once, not a second
            # deadline later.
            self.stats.errors += 1
            raise BackendTimeout(f"{what}: timed out {time.monotonic() - failed_at:.1f} s ago")
        started = trio.current_time()
        watched = progress or Progress()
        self._inflight.add(watched)
        try:
            if progress is None:
                with trio.fail_after(deadline):
                    return await self._submit(call, None)
            return await self._submit(call, progress)
        except trio.TooSlowError:
            self.stats.errors += 1
            self.stats.stalls += 1  # no progress for the deadline: a stall, however short the deadline
            watched.longest_gap = -1.0  # counted here, not again below
            self._timed_out[what] = time.monotonic()
            if len(self._timed_out) > 1024:
                self._timed_out.clear()
            raise BackendTimeout(f"{what}: no answer within {deadline:g} s" if progress is None else f"{what}: no progress for {deadline:g} s") from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            self._resent += retry_attempts(getattr(exc, "response", None))
            err = domain_error(exc, what)
            if not isinstance(err, (NotFound, ObjectChanged)):
                self.stats.errors += 1
            raise err from None
        finally:
            self._inflight.discard(watched)
            if watched.longest_gap >= 0 and watched.stalled(STALL_AFTER):
                self.stats.stalls += 1
            took = trio.current_time() - started
            self.stats.calls += 1
            self.stats.latency_sum_s += took
            self.stats.latency_max_s = max(self.stats.latency_max_s, took)
            self.stats.sdk_retries = self.sdk_retried + self._resent

    def _fetched(self, data: bytes) -> bytes:
        self.stats.get_requests += 1
        self.stats.bytes_fetched += len(data)
        return data
