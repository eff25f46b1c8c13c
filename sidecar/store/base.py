"""The `ObjectStore` protocol: three calls are all the read path needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import EllipsisType
from dataclasses import dataclass, field
from typing import Protocol


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
    sdk_retries: int = 0  # retries inside the SDK (s3fs: transient errors, throttling, 5xx)
    calls: int = 0  # backend calls, with their summed and longest duration
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return dict(self.__dict__)


class ObjectStore(Protocol):
    stats: StoreStats
    name: str  # identifies the storage in cache keys

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        """Everything directly under `prefix` ("" for the bucket root), all pages; with
        `max_entries`, at most about that many (`complete` says whether that was all)."""

    async def stat(self, key: str) -> ObjectInfo | DirInfo | None:
        """The object `key`, else the directory `key/` if any object lies under it, else None."""

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes [start, end) of `key`; raises ObjectChanged if its etag is no longer `etag`."""

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: "Callable[[int, bytes], None]",
        object_size: int | None = None,
    ) -> None:
        """Streams bytes [start, end) of `key` with one request, calling `on_block(i, data)` (on the
        trio thread) for each consecutive `block_size` piece as soon as it has arrived."""

    async def put_file(
        self, key: str, path: str, size: int, *, expected: "str | None | EllipsisType" = ..., reuse: "Sequence[tuple[int, int]]" = ()
    ) -> ObjectInfo:
        """Stores the local file `path` as `key` (multipart when large); returns the new object.

        `expected`: the etag the object must still have (None: it must not exist; `...`: no
        condition); otherwise ObjectChanged and nothing is stored. `reuse`: ranges of the file
        that hold the same bytes as the object `expected` names at the same offsets; a store
        that can copy them server-side (S3 UploadPartCopy) does not send them again."""

    async def delete(self, key: str) -> None: ...

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo:
        """A server-side copy of `src` (of `size` bytes, when known) to `dst`."""

    async def put_marker(self, key: str) -> None:
        """Creates the empty "folder/" marker object of a directory."""

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        """Stores `mtime` as the object's `mtime` metadata (rclone's convention), if the store
        can without sending the bytes again; returns the object after the change, or None."""

    async def warm_up(self) -> None:
        """Prepares the client before the first request (optional)."""

    async def close(self) -> None: ...
