"""Prefetch: warm the disk cache of a mounted storage with folders or files, in the background.

`storage-sidecar prefetch MOUNT [PATH ...]` (or `POST /mounts/{name}/prefetch`, or a mount's
`prefetch` list in the manifest) plans first: every object under the paths is listed and their
sizes added; a plan larger than the disk cache's effective limit is refused with both sizes in
the message (a prefetch that evicts itself would only cost traffic). The plan's listings are
handed to the file system, so later lookups of the prefetched names need no LIST while fresh.
Then the objects are read block by block through the block cache, which writes each block to the
disk tier: files larger than a block PARALLEL_FILES at once, each with parallel ranged GETs (the
memory budget honoured); files of one block, one GET each, at up to three quarters of the mount's
fetch limit at once (a small file's GET waits a round trip for few bytes, so only many at once
fill the link; the last quarter stays free for the readers of the mount). Reads of prefetched data then come from disk: random readers too, since a read whose
blocks are all on disk is served from them instead of a ranged GET.
Progress (files and bytes done of total, errors) is in the worker's stats and so in `status`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

import trio

from sidecar.cache.blocks import BlockCache, ObjectRef
from sidecar.cache.ranges import ExactRanges
from sidecar.errors import SidecarError
from sidecar.log import get_logger
from sidecar.store.base import Listing, ObjectInfo, ObjectStore

log = get_logger(__name__)

MAX_OBJECTS = 1_000_000
PARALLEL_LISTS = 8  # folders listed at once by a plan
PARALLEL_FILES = 4  # files fetched at once (each with its parallel ranged GETs, within the memory budget)


def small_parallel(max_fetches: int) -> int:
    """Files of one block fetched at once: three quarters of the mount's fetch limit."""
    return max(1, max_fetches * 3 // 4)


class PrefetchRefused(Exception):
    pass


@dataclass
class PrefetchProgress:
    state: str = "idle"  # planning, running, done, failed
    paths: list[str] = field(default_factory=list)
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    started: float = 0.0
    finished: float | None = None

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__, errors=self.errors[-20:])


class Prefetcher:
    def __init__(self, store: ObjectStore, cache: BlockCache, root_prefix: str,
                 adopt: Callable[[str, Listing], Awaitable[Any]] | None = None,
                 ranges: ExactRanges | None = None) -> None:
        self.store = store
        self.cache = cache
        self.root = root_prefix.strip("/")
        self.adopt = adopt  # hands each listing to the file system: reads of the data then need no LIST either
        # The mount's kept ranges: a reader may have read a small file whole first, kept as its
        # exact range, which the block cache does not know (a block it holds or is fetching,
        # `cache.get` finds or joins).
        self.ranges = ranges
        self.progress = PrefetchProgress()

    def _key(self, path: str) -> str:
        path = path.strip("/")
        return f"{self.root}/{path}".strip("/") if path else self.root

    async def _list(self, folder: str) -> Listing:
        listing = await self.store.list_dir(folder)
        if self.adopt is not None:
            await self.adopt(folder, listing)
        return listing

    async def plan(self, paths: list[str]) -> list[ObjectInfo]:
        """Every object under `paths`: the folders from the mount's root down to each path are
        listed (which tells a file from a folder, and lets the file system answer the lookups
        of a later read from these listings), then each folder below, one LIST each."""
        found: dict[str, ObjectInfo] = {}
        listed: dict[str, Listing] = {}

        async def listing_of(folder: str) -> Listing:  # each folder listed once per plan
            if folder not in listed:
                listed[folder] = await self._list(folder)
            return listed[folder]

        for path in paths or [""]:
            parts = [p for p in path.strip("/").split("/") if p]
            folder = self.root
            for depth, part in enumerate(parts):
                listing = await listing_of(folder)
                key = f"{folder}/{part}".strip("/")
                match = next((i for i in listing.files if i.key == key), None) if depth == len(parts) - 1 else None
                if match is not None:
                    found[match.key] = match
                    break
                if key not in listing.dirs:
                    raise PrefetchRefused(f"{path}: no such file or folder in the storage")
                folder = key
            else:  # a folder (the root when no path was given): walked
                await self._walk(folder, listing_of, found)
        return sorted(found.values(), key=lambda i: i.key)

    async def _walk(self, top: str, listing_of: Callable[[str], Awaitable[Listing]], found: dict[str, ObjectInfo]) -> None:
        """Every object below `top` into `found`, PARALLEL_LISTS folders listed at once (one
        after another, a tree of 100 folders took as many round trips before the first fetch).
        The first error stops the walk and is raised."""
        gate = trio.CapacityLimiter(PARALLEL_LISTS)
        errors: list[Exception] = []

        async def walk(folder: str, nursery: trio.Nursery) -> None:
            try:
                async with gate:
                    listing = await listing_of(folder)
                for info in listing.files:
                    found[info.key] = info
                if len(found) > MAX_OBJECTS:
                    raise PrefetchRefused(f"more than {MAX_OBJECTS} objects")
            except (PrefetchRefused, SidecarError) as exc:
                errors.append(exc)
                nursery.cancel_scope.cancel()
                return
            for sub in listing.dirs:
                nursery.start_soon(walk, sub, nursery)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(walk, top, nursery)
        if errors:
            raise errors[0]

    async def start(self, paths: list[str], nursery: trio.Nursery) -> PrefetchProgress:
        """Plans now (PrefetchRefused when it cannot be done), then fetches in `nursery`."""
        if self.progress.state in ("planning", "running"):
            raise PrefetchRefused("a prefetch is already running on this mount")
        p = self.progress = PrefetchProgress(state="planning", paths=list(paths), started=trio.current_time())
        try:
            objects = await self.plan(paths)
        except (PrefetchRefused, SidecarError):
            p.state = "failed"
            raise
        p.files_total, p.bytes_total = len(objects), sum(o.size for o in objects)
        disk = self.cache.disk
        if disk is None:
            p.state = "failed"
            raise PrefetchRefused("this mount has no disk cache (--cache-dir): there is nowhere to prefetch to")
        if p.bytes_total > disk.limit:
            p.state = "failed"
            raise PrefetchRefused(f"{p.bytes_total} bytes to prefetch do not fit the disk cache's limit of {disk.limit} bytes")
        p.state = "running"
        log.info("prefetch_started", paths=paths, files=p.files_total, bytes=p.bytes_total)
        nursery.start_soon(self._fetch_all, objects)
        return p

    async def _fetch_all(self, objects: list[ObjectInfo]) -> None:
        p = self.progress
        small = iter([o for o in objects if o.size <= self.cache.block_size])
        large = iter([o for o in objects if o.size > self.cache.block_size])

        async def fetcher(todo: Iterator[ObjectInfo]) -> None:
            for info in todo:  # (the fetchers of a kind share one iterator: each object once)
                await self._one(info)
                p.files_done += 1

        async with trio.open_nursery() as nursery:
            for _ in range(small_parallel(self.cache.max_fetches)):
                nursery.start_soon(fetcher, small)
            for _ in range(PARALLEL_FILES):
                nursery.start_soon(fetcher, large)
        p.state, p.finished = "done", trio.current_time()
        log.info("prefetch_done", files=p.files_done, bytes=p.bytes_done, errors=len(p.errors))

    async def _one(self, info: ObjectInfo) -> None:
        ref = ObjectRef(info.key, info.etag, info.size)
        if info.size <= self.cache.block_size and self.ranges is not None and self.ranges.holds(ref, 0, info.size):
            self.progress.bytes_done += info.size
            return
        window = self.cache.fetch_blocks * 4
        try:
            for lo in range(0, self.cache.blocks_of(ref), window):
                blocks = range(lo, min(lo + window, self.cache.blocks_of(ref)))
                self.cache.prefetch(ref, blocks, readahead=False)
                for index in blocks:
                    data = await self.cache.get(ref, index)
                    self.progress.bytes_done += len(data)
        except SidecarError as exc:
            self.progress.errors.append({"key": info.key, "code": exc.code, "reason": str(exc)})
            log.warning("prefetch_failed", key=info.key, code=exc.code)
