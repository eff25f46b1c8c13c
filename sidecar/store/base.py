"""The `ObjectStore` protocol: three calls are all the read path needs."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Sequence
from types import EllipsisType
from dataclasses import dataclass, field
from typing import Protocol


class Buffer(mmap.mmap):
    """A block's buffer: anonymous memory at a page boundary, as O_DIRECT wants it (a disk
    cache reads into it and writes from it directly). Compares as its bytes (a bytearray's
    would)."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return memoryview(self) == other

    @classmethod
    def new(cls, n: int) -> "Buffer":
        # Private (Python maps anonymous memory shared by default, pages of a shmem file), and
        # populated in one call: faulted in page by page as a body arrived, a new block's pages
        # were a large part of its receiving thread's CPU, and a bytearray zeroed them again
        # (benchmarks/results/HISTORY.md).
        return cls(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # full object key, no leading slash
    size: int
    etag: str  # cache identity: S3/Azure etag, GCS generation
    mtime: float  # seconds since the epoch


@dataclass(frozen=True)
class DirInfo:
    key: str  # full prefix without its trailing slash


@dataclass
class Listing:
    """One directory level: objects directly under a prefix and the sub-prefixes."""

    files: list[ObjectInfo] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # full prefixes, no trailing slash
    markers: list[str] = field(default_factory=list)  # keys of empty "folder/" marker objects
    complete: bool = True  # False: the listing stopped at `max_entries` (more pages exist)


@dataclass
class StoreStats:
    """Request counters, for status, metrics, tests and benchmarks."""

    get_requests: int = 0
    bytes_fetched: int = 0
    list_requests: int = 0
    head_requests: int = 0
    put_requests: int = 0
    delete_requests: int = 0
    bytes_stored: int = 0  # bytes sent in uploads
    bytes_copied: int = 0  # bytes of uploads copied server-side from the previous version
    errors: int = 0
    retries: int = 0  # our own retries: bodies cut off mid-way, read again
    sdk_retries: int = 0  # requests the SDK sent again (botocore's retries of 5xx, throttling, resets; s3fs's own)
    stalls: int = 0  # calls that went STALL_AFTER seconds without progress (timeouts included), counted as they end
    calls: int = 0  # backend calls, with their summed and longest duration
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return dict(self.__dict__)


GATE_IDLE_S = 5.0  # a streamed GET whose reader has not come back for this long is closed


class Gate:
    """Backpressure for one streamed GET (`get_blocks(..., gate=...)`): the stream reads block
    `i` of its range from the body only once `allowed > i`, so it never runs further ahead of
    its reader than the reader asked for (TCP holds the rest back). When the gate is closed, or
    nobody opens it for `idle` seconds, the stream stops there and the rest is never read.

    Opened and closed from trio; waited on from trio (`wait_trio`) or from an SDK's asyncio loop
    in another thread (`wait_asyncio`). `allowed` and `closed` are plain values written by one
    side and read by the other; the waiter publishes its wake-up callable, then checks again,
    so a change made between its check and its wait is never missed."""

    def __init__(self, idle: float = GATE_IDLE_S) -> None:
        self.allowed = 0
        self.closed = False
        self.idle = idle
        self._wake: Callable[[], object] | None = None

    def open_to(self, n: int) -> None:
        if n > self.allowed:
            self.allowed = n
            self._poke()

    def close(self) -> None:
        self.closed = True
        self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the waiter's loop has closed: nobody to wake
                pass

    def _blocked(self, i: int) -> bool:
        return i >= self.allowed and not self.closed

    async def wait_asyncio(self, i: int) -> bool:
        """On an asyncio loop: waits until block `i` may be read; False: stop the stream."""
        import asyncio

        loop = asyncio.get_running_loop()
        while self._blocked(i):
            event = asyncio.Event()
            self._wake = lambda: loop.call_soon_threadsafe(event.set)
            try:
                if self._blocked(i):
                    await asyncio.wait_for(event.wait(), self.idle)
            except asyncio.TimeoutError:
                return False
            finally:
                self._wake = None
        return i < self.allowed

    async def wait_trio(self, i: int) -> bool:
        """The same on trio (a trio-native store)."""
        import trio

        while self._blocked(i):
            event = trio.Event()
            self._wake = event.set
            try:
                with trio.move_on_after(self.idle) as waited:
                    await event.wait()
                if waited.cancelled_caught:
                    return False
            finally:
                self._wake = None
        return i < self.allowed


async def copy_carrying(store: ObjectStore, src: str, dst: str, size: int | None, mtime: float | None) -> ObjectInfo:
    """A server-side copy; with `mtime` (stores that `mtime_by_copy`), the copy stores it as the
    new object's `mtime` metadata (the other stores' `copy` takes no mtime)."""
    if mtime is None:
        return await store.copy(src, dst, size)
    return await store.copy(src, dst, size, mtime=mtime)  # type: ignore[call-arg]


def block_pieces(start: int, end: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """(i, lo, hi) of the consecutive pieces of [start, end) that `get_blocks` hands over: each
    ends at a multiple of `block_size` (or at `end`), so a range that starts inside a block
    (a stream that continues an exact read) gives that block's tail first."""
    i, lo = 0, start
    while lo < end:
        hi = min((lo // block_size + 1) * block_size, end)
        yield i, lo, hi
        i, lo = i + 1, hi


class ObjectStore(Protocol):
    stats: StoreStats
    # True: `get_blocks` reads its body as it goes and honours a `gate` (one GET can follow a
    # sequential reader through a long range, reading only what the reader wants)
    streams: bool
    name: str  # identifies the storage in cache keys

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        """Everything directly under `prefix` ("" for the bucket root), all pages; with
        `max_entries`, at most about that many (`complete` says whether that was all)."""

    async def probe(self, prefix: str, *, writable: bool, write_probe: bool, max_entries: int) -> Listing | None:
        """The pre-flight check's calls (sidecar.preflight), raising what the backend raises; the
        folder's listing when it fitted in `max_entries`."""

    async def stat(self, key: str, *, folder_first: bool = False) -> ObjectInfo | DirInfo | None:
        """The object `key`, else the directory `key/` if any object lies under it, else None.
        With `folder_first`, the directory wins over an object of the same name, as it does in
        listings (a folder being checked again must not turn into the object beside it)."""

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes [start, end) of `key`; raises ObjectChanged if its etag is no longer `etag`."""

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: "Callable[[int, bytes], None]",
        object_size: int | None = None, gate: Gate | None = None,
    ) -> None:
        """Streams bytes [start, end) of `key` with one request, calling `on_block(i, data)` (on the
        trio thread) for each consecutive piece (`block_pieces`: each ends at a multiple of
        `block_size`) as soon as it has arrived. With a `gate` (stores that `stream`), piece i is
        read only once the gate allows it, and the stream ends early where the gate says stop."""

    async def put_file(
        self, key: str, path: str, size: int, *, expected: "str | None | EllipsisType" = ..., reuse: "Sequence[tuple[int, int]]" = ()
    ) -> ObjectInfo:
        """Stores the local file `path` as `key` (multipart when large); returns the new object.

        `expected`: the etag the object must still have (None: it must not exist; `...`: no
        condition); otherwise ObjectChanged and nothing is stored. `reuse`: ranges of the file
        that hold the same bytes as the object `expected` names at the same offsets; a store
        that can copy them server-side (S3 UploadPartCopy) does not send them again."""

    async def delete(self, key: str) -> None: ...

    deletes_in_batches: bool  # True: `delete_many` sends many keys in one request (S3 DeleteObjects)

    async def delete_many(self, items: list[tuple[str, str | None]]) -> dict[str, str]:
        """Deletes the objects `(key, etag)`, each only at that version where the server can say
        so (etag None: any version). Returns the keys not deleted, with the reason's code
        ("changed": the object is another version now); a key already gone counts as deleted.
        A failure of the whole call raises."""

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo:
        """A server-side copy of `src` (of `size` bytes, when known) to `dst`."""

    async def rename(self, src: str, dst: str, size: int | None = None, *, mtime: float | None = None) -> ObjectInfo:
        """Moves the object `src` to `dst` (replacing it): a copy, then the delete of `src`; or
        one request where the server moves (WebDAV's MOVE). With `mtime` (stores that
        `mtime_by_copy`), the copy stores it as the new object's `mtime` metadata. Returns the
        object at `dst`."""

    # True: storing an mtime costs a copy of the object onto itself (S3), so it is worth
    # deferring a moment and carrying with a rename's copy (sidecar.vfs.mutations)
    mtime_by_copy: bool

    moves_folders: bool  # True: `rename_folder` moves a whole folder in one request

    async def rename_folder(self, src: str, dst: str) -> None:
        """Moves the folder `src` with all it holds to `dst` (stores that `moves_folders`)."""

    async def put_marker(self, key: str) -> None:
        """Creates the empty "folder/" marker object of a directory."""

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        """Stores `mtime` as the object's `mtime` metadata (rclone's convention), if the store
        can without sending the bytes again; returns the object after the change, or None."""

    async def warm_up(self) -> None:
        """Prepares the client before the first request (optional)."""

    async def close(self) -> None: ...
