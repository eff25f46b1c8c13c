"""The block cache: objects read in fixed-size blocks through a memory tier and a disk tier.

A block is identified by (storage, object key, etag, index): a changed object has a new etag and
so never serves old bytes.

Concurrency protocol (all on the trio thread unless noted):
- `_inflight` maps a block id to its `BlockFetch`; a second reader of the same block waits on that
  fetch's event instead of starting another (single flight).
- Fetches run in the cache's own nursery (`run`), not in the reader's task, so a reader that is
  interrupted does not cancel a fetch others wait for, and the disk write happens after the
  waiters have been woken.
- One memory budget (`memory_limit`) covers the memory tier *and* the blocks being fetched:
  a fetch reserves its block size first, evicting least-recently-used blocks to make room. A
  demand read waits for room; a prefetch that finds no room is simply not started.
- A run of contiguous blocks is fetched as parallel streamed ranged GETs of `fetch_size` each (at
  most `max_fetches` in flight per mount); each block completes (wakes its waiters) as soon as
  its bytes have arrived, not when the whole GET has. Blocks a reader waits for are split finer,
  by what one connection brings in a round trip (`fetch_parts`, `sidecar.cache.link`).
- Blocks read from disk complete one by one as each is read; a disk run's parts take the disk
  threads in block order.
- Disk reads and writes run in worker threads (`trio.to_thread`, bounded by `_disk_limiter`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from sidecar.cache.disk import DiskTier, block_cached, block_name, get_resident, read_direct
from sidecar.cache.link import LinkEstimate
from sidecar.cache.memory import MemoryBudget
from sidecar.cache.shared import SharedBlocks, VersionId
from sidecar.cache.slots import FetchSlots, ticket
from sidecar.log import get_logger
from sidecar.store.base import ObjectStore

log = get_logger(__name__)


@dataclass(frozen=True)
class ObjectRef:
    key: str
    etag: str
    size: int


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    prefetches: int = 0
    prefetch_skipped: int = 0
    single_flight_joins: int = 0
    direct_reads: int = 0  # random reads served with an exact ranged GET, not through blocks
    range_hits: int = 0  # random reads answered from a range fetched before (memory or disk)
    shared_hits: int = 0  # blocks read from the node's shared cache (sidecar.cache.shared)
    buffers_recycled: int = 0  # blocks fetched into an evicted block's buffer (sidecar.cache.memory)
    fills: int = 0  # copies out of a memory mapping whose middle was fetched at once (sidecar.vfs.reader)
    disk_hits_resident: int = 0  # small disk entries (blocks, kept ranges) the page cache held, read without a thread hop

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class BlockFetch:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    buffer: Any = None  # a recycled one to fill with the block (MemoryBudget.reserve_block)
    ticket: int = field(default_factory=ticket)  # its place in the queue for a fetch slot (sidecar.cache.slots)


DISK_THREADS = 4  # disk reads and writes at once
DIRECT_RUN = 4  # blocks read from disk with one O_DIRECT request (4 MiB: a virtio disk's largest request)
DISK_RUN_BLOCKS = 16  # blocks read from disk per thread hop: a hop per 1 MiB block cost more than the read (mapped)
COALESCE_S = 0.002  # backend runs started this close together are merged into one request
CLAIM_WAIT_S = 5.0  # longest a run waits for blocks another sidecar of the node is fetching (then fetches them too)
CLAIM_POLL_S = 0.02  # how often it looks whether they are stored


class BlockCache:
    def __init__(
        self,
        store: ObjectStore,
        *,
        block_size: int = 1024 * 1024,
        memory_limit: int = 256 * 1024 * 1024,
        disk: DiskTier | None = None,
        storage_id: str | None = None,
        fetch_size: int = 8 * 1024 * 1024,
        max_fetches: int = 16,
    ) -> None:
        if memory_limit < block_size:
            raise ValueError("memory_limit must hold at least one block")
        self.store = store
        self.block_size = block_size
        self.memory_limit = memory_limit
        self.disk = disk
        self.storage_id = storage_id or store.name
        self.stats = CacheStats()
        # blocks: (key, etag, index); exact ranges of random readers: (key, etag, ("range", start, end))
        # A store that fills buffers (S3's streamed GETs) gets the evicted blocks' to fill again.
        self.fills_buffers = bool(getattr(store, "fills_buffers", False))
        self.memory = MemoryBudget(memory_limit, block_size)
        self._inflight: dict[tuple[str, str, int], BlockFetch] = {}
        self._nursery: trio.Nursery | None = None
        self._disk_limiter = trio.CapacityLimiter(DISK_THREADS)
        self._disk_turns = trio.Semaphore(DISK_THREADS)  # disk runs' parts, started in block order
        # Object stores scale by connections: a run of blocks is fetched as several ranged GETs
        # of `fetch_size` in flight at once, at most `max_fetches` per mount.
        self.fetch_blocks = max(1, fetch_size // block_size)
        self.fetch_limiter = FetchSlots(max_fetches)
        self.max_fetches = max_fetches
        # Blocks a reader waits for are fetched in parts of what one connection brings in a
        # round trip instead (sidecar.cache.link): several short GETs beat one long one.
        self.link = LinkEstimate()
        self.shared: SharedBlocks | None = None  # the node's shared cache, and who a ref is in it:
        self.version_of: Callable[[ObjectRef], VersionId] | None = None
        # Backend runs wait COALESCE_S before they start, merged with the runs started meanwhile:
        # the kernel splits one large read (a Parquet column chunk read at once) into 1 MiB
        # requests that arrive together, each a run of its own; merged, they are one GET.
        self._pending: list[Pending] = []  # reserved backend blocks not started yet
        self._flush_scheduled = False
        # Disk writes going out: an exiting worker waits for them (bounded), else the blocks a
        # read fetched last are fetched again after the restart.
        self.disk_writes = Outstanding()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The cache's fetch service; start with `await nursery.start(cache.run)`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def memory_bytes(self) -> int:
        return self.memory.used


    def blocks_of(self, ref: ObjectRef) -> int:
        return -(-ref.size // self.block_size)

    def block_range(self, ref: ObjectRef, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(start + self.block_size, ref.size)

    def has(self, ref: ObjectRef, index: int) -> bool:
        """In memory, being fetched, or on disk: reading it through the cache costs no request."""
        bid = (ref.key, ref.etag, index)
        return bid in self.memory.entries or bid in self._inflight or on_disk(self, ref, index)

    async def get(self, ref: ObjectRef, index: int) -> bytes:
        """The bytes of block `index` of `ref` (shorter than block_size for the last block)."""
        bid = (ref.key, ref.etag, index)
        data = self.memory.get(bid)
        if data is not None:
            self.stats.memory_hits += 1
            return data
        fetch = self._inflight.get(bid)
        if fetch is not None:
            self.stats.single_flight_joins += 1
        else:
            fetch = self._start(ref, index)
        await fetch.done.wait()
        if fetch.error is not None:
            raise fetch.error
        assert fetch.data is not None
        self.memory.was_served(bid)
        return fetch.data

    def prefetch(self, ref: ObjectRef, indices: range, *, readahead: bool = True) -> int:
        """Starts fetching blocks `indices` (contiguous) in the background, as few requests as
        possible, for as many blocks as the memory budget has room for; never waits. Returns
        the number of blocks started. `readahead=False` marks blocks a reader is about to wait
        for (not counted as prefetches)."""
        run: list[int] = []
        run_on_disk = False
        started = 0
        buffers: dict[int, Any] = {}

        def start_run() -> int:  # disk runs are read DISK_RUN_BLOCKS per thread hop
            return self._start_run(ref, run, part_blocks=DISK_RUN_BLOCKS if run_on_disk else None, waited=not readahead, buffers=buffers)

        for index in indices:
            if index >= self.blocks_of(ref):
                break
            bid = (ref.key, ref.etag, index)
            if bid in self.memory.entries or bid in self._inflight:
                started += start_run()
                run = []
                continue
            # Blocks on disk are read ahead too (into memory, by a disk thread, while the reader
            # is being answered): a warm sequential reader never waits for the disk. A run is
            # all disk or all backend, so a disk read never waits behind a network stream.
            from_disk = on_disk(self, ref, index)
            if run and from_disk != run_on_disk:
                started += start_run()
                run = []
            ok, buffer = self._reserve_block(ref, index, on_disk=from_disk)
            if not ok:
                self.stats.prefetch_skipped += readahead
                break
            if buffer is not None:
                buffers[index] = buffer
            run.append(index)
            run_on_disk = from_disk
        started += start_run()
        if readahead:
            self.stats.prefetches += started
        return started

    def _reserve_block(self, ref: ObjectRef, index: int, *, on_disk: bool = False) -> tuple[bool, Any]:
        """Reserves a block's memory, with a recycled buffer for it where one is free and will
        be filled: by a store that fills buffers, or (`on_disk`) by a direct read of the disk
        tier."""
        if not (on_disk or self.fills_buffers):
            return self.memory.try_reserve(self._block_len(ref, index)), None
        ok, buffer = self.memory.reserve_block(self._block_len(ref, index), aligned=on_disk)
        self.stats.buffers_recycled += buffer is not None
        return ok, buffer

    def _block_len(self, ref: ObjectRef, index: int) -> int:
        start, end = self.block_range(ref, index)
        return end - start

    def _start_run(self, ref: ObjectRef, run: list[int], *, reserved: bool = True, part_blocks: int | None = None, waited: bool = False,
                   buffers: dict[int, Any] | None = None) -> int:
        """Registers fetches for the contiguous blocks `run` and starts them as parallel ranged
        GETs of at most `fetch_blocks` blocks each (`part_blocks`: disk reads, DISK_RUN_BLOCKS
        per thread hop). Reserved backend runs start after COALESCE_S, merged with the runs
        registered meanwhile (`_flush_pending`); `waited`: a reader waits for these blocks."""
        if not run:
            return 0
        if self._nursery is None:
            raise RuntimeError("BlockCache.run is not started")
        # A run that is the whole object (a small file: a zarr chunk, an image) has nothing to
        # merge with: it starts at once rather than COALESCE_S later (a reader of many small
        # files one after another would pay the delay for each).
        whole = run[0] == 0 and run[-1] + 1 >= self.blocks_of(ref)
        if part_blocks is None and reserved and COALESCE_S > 0 and not whole:
            for index in run:  # backend blocks: merged with other runs of the next COALESCE_S
                fetch = BlockFetch(buffer=buffers.pop(index, None) if buffers else None)
                self._inflight[(ref.key, ref.etag, index)] = fetch
                self._pending.append((ref, index, fetch, waited))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._nursery.start_soon(self._flush_pending)
            return len(run)
        step = part_blocks or self.fetch_blocks
        parts = []
        for lo in range(0, len(run), step):
            fetches = [BlockFetch(buffer=buffers.pop(index, None) if buffers else None) for index in run[lo : lo + step]]
            for index, fetch in zip(run[lo : lo + step], fetches):
                self._inflight[(ref.key, ref.etag, index)] = fetch
            parts.append((run[lo], fetches))
        if part_blocks is not None:  # from disk: the parts take the disk threads in block order
            self._nursery.start_soon(self._disk_parts_in_order, ref, parts, reserved)
        else:
            for first, fetches in parts:
                self._nursery.start_soon(self._fetch_run, ref, first, fetches, reserved)
        return len(run)

    async def _disk_parts_in_order(self, ref: ObjectRef, parts: list[tuple[int, list[BlockFetch]]], reserved: bool) -> None:
        """Trio starts tasks in no set order: a part a reader needs next could wait behind later ones."""
        for first, fetches in parts:
            await self._disk_turns.acquire()
            self._nursery.start_soon(self._fetch_run, ref, first, fetches, reserved, self._disk_turns.release)  # type: ignore[union-attr]

    async def _flush_pending(self) -> None:
        """Starts the pending backend blocks as contiguous runs (`fetch_parts`)."""
        await trio.sleep(COALESCE_S)
        pending, self._pending, self._flush_scheduled = self._pending, [], False
        assert self._nursery is not None
        for part in fetch_parts(pending, self.fetch_blocks, self.link.waited_part(self.block_size, self.fetch_blocks)):
            self._nursery.start_soon(self._fetch_run, part[0][0], part[0][1], [p[2] for p in part], True)

    # -- for those who fetch blocks themselves (sidecar.cache.streams) ---------------------------

    def held(self, ref: ObjectRef, index: int) -> bool:
        """In memory or being fetched (not counting the disk tier)."""
        bid = (ref.key, ref.etag, index)
        return bid in self.memory.entries or bid in self._inflight

    def reserve_fetch(self, ref: ObjectRef, index: int, *, ahead: bool) -> BlockFetch | None:
        """A fetch of block `index`, its memory reserved and its waiters registered, for the
        caller to `complete`; None when the budget has no room. `ahead`: fetched before its
        reader asked (counted as a prefetch)."""
        ok, buffer = self._reserve_block(ref, index)
        if not ok:
            return None
        fetch = BlockFetch(buffer=buffer)
        self._inflight[(ref.key, ref.etag, index)] = fetch
        self.stats.misses += 1
        self.stats.prefetches += ahead
        return fetch

    def complete(self, ref: ObjectRef, index: int, fetch: BlockFetch, data: bytes | None, error: BaseException | None) -> None:
        """Ends a fetch of `reserve_fetch`: its bytes (or its error) to its waiters."""
        self._complete(ref, index, fetch, data, error, True)

    def keep_on_disk(self, ref: ObjectRef, index: int, data: bytes) -> None:
        """Writes a block to the disk tier (and the node's shared cache) in the background (its
        memory entry kept meanwhile)."""
        self.write_behind((ref.key, ref.etag, index), block_name(self.storage_id, ref.key, ref.etag, index, self.block_size), data, block=(ref, index))

    def write_behind(self, mid: Any, name: str, data: bytes, block: tuple[ObjectRef, int] | None = None) -> None:
        """Writes memory entry `mid` to the disk tier as `name` in the background; the entry is
        pinned until then. With `block` (a version, an index), `data` is that whole block, also
        written to the node's shared cache. Nothing without either tier."""
        share = block if block is not None and block[0].etag and self.shared is not None else None
        if (self.disk is not None or share is not None) and self._nursery is not None:
            self.memory.pin(mid)
            self.disk_writes.begin()  # (now: a wait for none left must not end before the task begins)
            self._nursery.start_soon(self._disk_put_many, [(name, data)], [mid], share[0] if share else None, [share[1]] if share else None, True,
                                     block[0] if block is not None else None)

    def spawn(self, fn: Any, *args: Any) -> None:
        """Runs `fn(*args)` in the cache's nursery (fetches outlive the reader that started them)."""
        if self._nursery is None:
            raise RuntimeError("BlockCache.run is not started")
        self._nursery.start_soon(fn, *args)

    def _start(self, ref: ObjectRef, index: int) -> BlockFetch:
        self._start_run(ref, [index], reserved=False)
        return self._inflight[(ref.key, ref.etag, index)]

    def _complete(self, ref: ObjectRef, index: int, fetch: BlockFetch, data: bytes | None, error: BaseException | None, held: bool,
                  from_disk: bool = False) -> None:
        """Finishes one block's fetch: wakes its waiters and moves its memory reservation (if
        `held`) into the memory tier, or releases it on error. Idempotent."""
        if fetch.done.is_set():
            return
        fetch.buffer = None  # (the block's bytes, if they came in it, are `data`)
        bid = (ref.key, ref.etag, index)
        n = self._block_len(ref, index)
        if data is not None and len(data) != n:
            data, error = None, OSError(f"short read of {ref.key} block {index}: {len(data)} of {n} bytes")
        if data is not None:
            fetch.data = data
            self.memory.add(bid, data, from_disk=from_disk)
        else:
            fetch.error = error
        if held:
            self.memory.release(n)
        if self._inflight.get(bid) is fetch:
            del self._inflight[bid]
        fetch.done.set()

    async def _fetch_run(self, ref: ObjectRef, first: int, fetches: list[BlockFetch], reserved: bool, done: Callable[[], None] | None = None) -> None:
        names = [block_name(self.storage_id, ref.key, ref.etag, first + i, self.block_size) for i in range(len(fetches))]
        to_disk: list[tuple[str, bytes]] = []
        pinned: list[tuple[str, str, Any]] = []  # their memory entries, kept until written
        held = reserved
        error: BaseException = OSError(f"{ref.key}: the backend sent fewer bytes than asked")
        # Counted from now, not from the write: the readers have the run's blocks as they arrive,
        # before its request ends, and a worker told to stop meanwhile would give up waiting
        # for a write not begun yet (a new mount then fetched the run again).
        self.disk_writes.begin()
        try:
            if not held:  # a run of one demand block
                fetches[0].buffer = await reserve_demand(self, ref, first)
                held = True
            # Blocks already on disk are served from there (read in one thread hop for the whole
            # run); the rest are fetched in one stream.
            missing = await complete_from_disk(self, ref, first, fetches, names, held)
            if missing and self.shared is not None and ref.etag:
                missing = await from_shared(self, ref, first, fetches, missing, held)
            if missing and self.shared is not None and ref.etag:
                missing = await fetch_claimed(self, ref, first, fetches, names, missing, held, to_disk, pinned)
            if missing:
                await get_run(self, ref, first, fetches, names, missing, held, to_disk, pinned)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else OSError("fetch cancelled")
            if not isinstance(exc, Exception):
                self.disk_writes.end()
                raise
        finally:
            # Whatever did not arrive fails, so no waiter is left hanging.
            for i, fetch in enumerate(fetches):
                self._complete(ref, first + i, fetch, None, error, held)
            # The run holds no block while its disk write waits (each BlockFetch holds its data): a
            # block evicted meanwhile would be memory outside the budget. Its waiters have theirs.
            fetches.clear()
            fetch = None  # (the loop above left the last one here)
            if done is not None:
                done()
        if to_disk:
            await self._disk_put_many(to_disk, pinned, share=ref if ref.etag else None, ref=ref, counted=True)
        else:
            self.disk_writes.end()

    # The disk tier is a cache: any error of it (a full or failing disk, a bug) costs a refetch,
    # never a reader's request or the mount. Each is logged and counted.

    async def disk_read(self, names: list[str], on_each: Callable[[int, Any], Any] | None = None, buffers: list[Any] | None = None) -> list[bytes | None]:
        """Entries of the disk tier (None for each missing or unreadable), in one thread hop;
        `on_each(i, entry)` is also called on the trio thread as each is read. With `buffers`
        (one per name, a `Buffer` or None), whole blocks not in the page cache are read
        directly into them (or into new ones). A lone small entry the page cache holds is read
        here instead: a thread hop costs more than that read."""
        if self.disk is None:
            return [None] * len(names)
        if len(names) == 1 and (got := read_resident(self, self.disk, names[0], on_each)) is not None:
            return got
        token = trio.lowlevel.current_trio_token()
        return await trio.to_thread.run_sync(read_entries, self, self.disk, names, on_each, token, buffers, limiter=self._disk_limiter)

    async def _disk_put_many(self, items: list[tuple[str, bytes]], pinned: list[tuple[str, str, Any]], share: ObjectRef | None = None,
                             indices: list[int] | None = None, counted: bool = False, ref: ObjectRef | None = None) -> None:
        """Writes `items` to the disk tier (and, with `share`, to the node's shared cache as blocks
        of that version: `indices`, else the block indices `pinned` names), then unpins their
        memory entries `pinned`. `counted`: the caller counted it in `disk_writes` already.
        `ref`: the version the blocks are of (its size lays out its segments)."""
        if not counted:
            self.disk_writes.begin()
        try:
            await put_many(self, items, pinned, share, indices, ref)
        finally:
            self.disk_writes.end()

    def _disk_failed(self, event: str, exc: Exception, tier: DiskTier | SharedBlocks | None = None) -> None:
        """Called from a disk thread: a counter of the failing tier (the disk tier unless told)
        and a log line, nothing that needs trio."""
        if tier is None:
            tier = self.disk
        assert tier is not None
        tier.errors += 1
        log.warning(event, error=type(exc).__name__, detail=str(exc)[:200], errors=tier.errors)


async def complete_from_disk(cache: BlockCache, ref: ObjectRef, first: int, fetches: list[BlockFetch], names: list[str], held: bool) -> list[int]:
    """Completes the run's blocks found on disk (one thread hop for the whole run, none if the
    index has none of them), each as soon as it is read; returns the indices in the run of
    the others."""
    if cache.disk is None or not any(name in cache.disk for name in names):
        return list(range(len(fetches)))

    def found(i: int, data: bytes | None) -> bool:
        if data is None or len(data) != cache._block_len(ref, first + i):
            return False
        cache._complete(ref, first + i, fetches[i], data, None, held, from_disk=True)  # (idempotent)
        return True

    # A reader waiting for the run's first block gets it when it is read, not when the
    # run's last one is (a run is up to DISK_RUN_BLOCKS; read from a disk whose pages
    # were dropped, it took 60-100 ms).
    hits: set[int] = set()

    def arrived(i: int, data: bytes | None) -> None:
        if found(i, data):  # counted as its reader gets it, not once the whole run is read
            cache.stats.disk_hits += 1
            hits.add(i)

    # (a buffer the thread did not use stays its fetch's, for a fetch from the backend)
    got = await cache.disk_read(names, on_each=arrived, buffers=[fetch.buffer for fetch in fetches])
    # (trio runs the callbacks in order before the thread's result: an entry handed to one is
    # HANDED here, a hit if `arrived` found it whole)
    return [i for i, data in enumerate(got) if i not in hits and (data is HANDED or not found(i, data))]


async def read_shared(cache: BlockCache, ref: ObjectRef, indices: list[int]) -> list[bytes | None]:
    """Blocks `indices` of `ref` from the node's shared cache, each None where it is not there
    (or is not whole), in one thread hop. The ref's ETag and size come from this sidecar's own
    listing or HEAD: its credentials saw the version. Hits are counted."""
    shared, version_of = cache.shared, cache.version_of
    if shared is None or version_of is None or not ref.etag:
        return [None] * len(indices)
    version = version_of(ref)

    def read() -> list[bytes | None]:
        out = []
        for index in indices:
            try:
                out.append(shared.get(version, cache.block_size, index))
            except Exception as exc:  # a cache: its failure costs a fetch
                out.append(None)
                cache._disk_failed("shared_cache_read_failed", exc, shared)
        try:
            shared.touch()  # (nothing to do without a hit)
        except Exception as exc:
            cache._disk_failed("shared_cache_touch_failed", exc, shared)
        return out

    got = await trio.to_thread.run_sync(read, limiter=cache._disk_limiter)
    out: list[bytes | None] = []
    for index, data in zip(indices, got):
        whole = data is not None and len(data) == cache._block_len(ref, index)
        cache.stats.shared_hits += whole
        out.append(data if whole else None)
    return out


async def from_shared(cache: BlockCache, ref: ObjectRef, first: int, fetches: list[BlockFetch], missing: list[int], held: bool) -> list[int]:
    """Completes the run's `missing` blocks the node's shared cache holds for this version;
    returns the indices still missing."""
    got = await read_shared(cache, ref, [first + i for i in missing])
    still = []
    for i, data in zip(missing, got):
        if data is not None:
            cache._complete(ref, first + i, fetches[i], data, None, held)
        else:
            still.append(i)
    return still


async def get_run(cache: BlockCache, ref: ObjectRef, first: int, fetches: list[BlockFetch], names: list[str], missing: list[int], held: bool,
                  to_disk: list[tuple[str, bytes]], pinned: list[tuple[str, str, Any]]) -> None:
    """Fetches the run's `missing` blocks in one request from the first to the last of them (a
    block held in between costs less as bytes in the stream than as another request), each
    completed as it arrives and added to `to_disk`/`pinned` for the tiers' write."""
    lo, hi = missing[0], missing[-1]
    start, end = cache.block_range(ref, first + lo)[0], cache.block_range(ref, first + hi)[1]
    cache.stats.misses += len(missing)
    timing: list[float] = []  # when the request went, then when each block arrived
    sizes: list[int] = []

    def on_block(i: int, data: bytes) -> None:
        timing.append(time.monotonic())
        sizes.append(len(data))
        j = lo + i
        if j < len(fetches) and not fetches[j].done.is_set():
            cache._complete(ref, first + j, fetches[j], data, None, held)
            if cache.disk is not None or cache.shared is not None:
                cache.memory.pin((ref.key, ref.etag, first + j))
                to_disk.append((names[j], data))
                pinned.append((ref.key, ref.etag, first + j))

    # (taken here: the stream fills them on the store's thread, and `fetches` may change meanwhile)
    extra = {"buffers": handing_out([f.buffer for f in fetches[lo : hi + 1]])} if cache.fills_buffers else {}
    async with cache.fetch_limiter.slot(fetches[lo].ticket):
        timing.append(time.monotonic())
        await cache.store.get_blocks(ref.key, start, end, ref.etag, cache.block_size, on_block, object_size=ref.size, **extra)
    if len(timing) >= 2:
        cache.link.observe_stream(timing[0], timing[1], timing[-1], sizes[0], sum(sizes[1:]))


async def fetch_claimed(cache: BlockCache, ref: ObjectRef, first: int, fetches: list[BlockFetch], names: list[str], missing: list[int],
                        held: bool, to_disk: list[tuple[str, bytes]], pinned: list[tuple[str, str, Any]]) -> list[int]:
    """With the node's shared cache: two sidecars reading the same blocks at once fetch them
    once. The run's leading `missing` blocks no other sidecar is fetching are claimed
    (SharedBlocks.claim), fetched, stored and released at once; for the rest, the blocks another
    sidecar claimed, this run waits until they are stored (read from there), their claim is
    free without them (their fetcher failed or died) or CLAIM_WAIT_S passed. Returns the blocks
    still missing, for the caller to fetch."""
    shared, version_of = cache.shared, cache.version_of
    assert shared is not None and version_of is not None
    version, bs = version_of(ref), cache.block_size
    limiter = cache._disk_limiter
    try:
        mine, rest = await trio.to_thread.run_sync(shared.claim, version, bs, [first + i for i in missing], limiter=limiter)
    except Exception as exc:  # a cache: without claims, the run fetches everything itself
        cache._disk_failed("shared_cache_claim_failed", exc, shared)
        return missing
    rest = [i - first for i in rest]
    try:
        if mine:
            await get_run(cache, ref, first, fetches, names, [i for i in missing if first + i in mine], held, to_disk, pinned)
            items, pins = to_disk[:], pinned[:]
            del to_disk[:], pinned[:]
            await cache._disk_put_many(items, pins, share=ref, ref=ref)  # stored before the claims are let go
    finally:
        shared.release(version, bs, mine)
    found = await wait_for_claimed(cache, ref, [first + i for i in rest],
                                   lambda index, data: cache._complete(ref, index, fetches[index - first], data, None, held))
    return [i for i in rest if first + i not in found]


async def wait_for_claimed(cache: BlockCache, ref: ObjectRef, indices: list[int], on_found: Callable[[int, bytes], None] | None = None) -> dict[int, bytes]:
    """Blocks `indices` of `ref` that other sidecars of the node claimed, as they are stored
    (each handed to `on_found` at once); stops waiting for a block when it is stored but does
    not read (it failed authentication), when its claim is free without it (its fetcher failed
    or died), or after CLAIM_WAIT_S. Returns those found."""
    shared, version_of = cache.shared, cache.version_of
    assert shared is not None and version_of is not None
    version, found = version_of(ref), {}
    rest, deadline = list(indices), trio.current_time() + CLAIM_WAIT_S
    while rest:
        stored, free = await trio.to_thread.run_sync(shared.waiting, version, cache.block_size, rest, limiter=cache._disk_limiter)
        for index, data in zip(stored, await read_shared(cache, ref, stored) if stored else []):
            if data is not None:
                found[index] = data
                if on_found is not None:
                    on_found(index, data)
        rest = [i for i in rest if i not in found]
        if not rest or trio.current_time() >= deadline or set(free) | set(stored) >= set(rest):
            break
        await trio.sleep(CLAIM_POLL_S)
    return found


async def fetch_block_once(cache: BlockCache, ref: ObjectRef, index: int, fetch: Callable[[], Awaitable[bytes]]) -> tuple[bytes, bool]:
    """Whole block `index` of `ref` (a small file's bytes) with the node's shared cache: read
    from there, or waited for while another sidecar fetches it, or claimed, fetched by `fetch`
    and stored before the claim is let go. Returns (the bytes, whether the folder holds them)."""
    shared, version_of = cache.shared, cache.version_of
    assert shared is not None and version_of is not None
    (data,) = await read_shared(cache, ref, [index])
    if data is not None:
        return data, True
    version, bs = version_of(ref), cache.block_size
    try:
        mine, _ = await trio.to_thread.run_sync(shared.claim, version, bs, [index], limiter=cache._disk_limiter)
    except Exception as exc:  # a cache: without a claim, the block is fetched
        cache._disk_failed("shared_cache_claim_failed", exc, shared)
        return await fetch(), False
    if not mine:  # another sidecar fetches it, or has just stored it
        found = await wait_for_claimed(cache, ref, [index])
        return (found[index], True) if index in found else (await fetch(), False)
    try:
        data = await fetch()
        stored = await trio.to_thread.run_sync(share_blocks, cache, ref, [(index, data)], limiter=cache._disk_limiter)
    finally:
        shared.release(version, bs, mine)
    return data, stored == 1


def fetching(cache: BlockCache, ref: ObjectRef, index: int) -> BlockFetch | None:
    """The fetch of block `index` under way (from the backend or the disk), if any."""
    return cache._inflight.get((ref.key, ref.etag, index))


def on_disk(cache: BlockCache, ref: ObjectRef, index: int) -> bool:
    """Block `index` of `ref` is in the disk tier (whether or not also in memory or being read
    from there)."""
    if cache.disk is None or index >= cache.blocks_of(ref):
        return False
    return block_name(cache.storage_id, ref.key, ref.etag, index, cache.block_size) in cache.disk


async def reserve_demand(cache: BlockCache, ref: ObjectRef, index: int) -> Any:
    """`BlockCache._reserve_block` for a block a reader waits for: waits for room."""
    from_disk = on_disk(cache, ref, index)
    while True:
        ok, buffer = cache._reserve_block(ref, index, on_disk=from_disk)
        if ok:
            return buffer
        await cache.memory.room()


def whole_block(cache: BlockCache, ref: ObjectRef, start: int, end: int) -> int | None:
    """The index of the block [start, end) is exactly (a small file read whole is its block 0),
    or None."""
    bs = cache.block_size
    return start // bs if start % bs == 0 and end == min(start + bs, ref.size) else None


def share_blocks(cache: BlockCache, ref: ObjectRef, blocks: list[tuple[int, bytes]]) -> int:
    """Writes fetched blocks of `ref` to the node's shared cache (from a disk thread); how many
    it took."""
    if cache.shared is None or cache.version_of is None:
        return 0
    try:
        return cache.shared.put_many(cache.version_of(ref), cache.block_size, blocks)
    except Exception as exc:
        cache._disk_failed("shared_cache_write_failed", exc, cache.shared)
        return 0


async def put_many(cache: BlockCache, items: list[tuple[str, bytes]], pinned: list[tuple[str, str, Any]], share: ObjectRef | None,
                   indices: list[int] | None, ref: ObjectRef | None = None) -> None:
    """`BlockCache._disk_put_many`'s work."""
    disk = cache.disk
    if disk is None and (share is None or cache.shared is None):
        return  # (nothing is pinned without one)

    def write_all() -> None:
        # One copy per node: blocks the shared cache took are not written to this mount's
        # own disk tier too (found there again after a restart, or by another session).
        shared = share_blocks(cache, share, list(zip(indices or [mid[2] for mid in pinned], (data for _, data in items)))) if share else 0
        try:
            if disk is not None and shared < len(items):
                store_on_disk(cache, disk, items, pinned, ref)
        except Exception as exc:
            cache._disk_failed("disk_cache_write_failed", exc)

    try:
        await trio.to_thread.run_sync(write_all, limiter=cache._disk_limiter)
        if disk is not None:
            for mid, (name, _) in zip(pinned, items):
                if name in disk:
                    cache.memory.mark_local(mid)
    finally:
        cache.memory.unpin(pinned)


class Outstanding:
    """Work begun and not ended (a count), and a wait for none to be left."""

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if not self.count:
            self._none.set()

    async def none_left(self) -> None:
        while self.count:
            self._none = trio.Event() if self._none.is_set() else self._none
            await self._none.wait()


def store_on_disk(cache: BlockCache, disk: DiskTier, items: list[tuple[str, bytes]], pinned: list[tuple[str, str, Any]],
                  ref: ObjectRef | None = None) -> None:
    """Blocks of one object version go into its segments, in the object's order on disk (read
    back after a restart as fast as one file, or by the kernel in place of the mounted file);
    anything else (exact ranges) as a pack."""
    if pinned and len(pinned) == len(items) and all(isinstance(mid[2], int) and mid[:2] == pinned[0][:2] for mid in pinned):
        key, etag = pinned[0][0], pinned[0][1]
        size = ref.size if ref is not None and (ref.key, ref.etag) == (key, etag) else None
        disk.put_blocks(cache.storage_id, key, etag, cache.block_size, [(mid[2], data) for mid, (_, data) in zip(pinned, items)], size)
    else:
        disk.put_many(items)


def read_resident(cache: BlockCache, disk: DiskTier, name: str, on_each: Callable[[int, Any], Any] | None) -> list[Any] | None:
    """`BlockCache.disk_read` of one small entry the page cache holds, on the calling thread, as
    `read_entries` would answer it; None if it is not one."""
    data = get_resident(disk, name)
    if data is None:
        return None
    cache.stats.disk_hits_resident += 1
    if on_each is None:
        return [data]
    on_each(0, data)
    return [HANDED]


def read_entries(cache: BlockCache, disk: DiskTier, names: list[str], on_each: Callable[[int, Any], Any] | None,
                 token: trio.lowlevel.TrioToken, buffers: list[Any] | None = None) -> list[bytes | None]:
    """`BlockCache.disk_read`'s thread: the entries, each handed to `on_each` (on the trio
    thread, without waiting) as soon as it is read. With `buffers`, blocks the page cache does
    not hold are read directly (`DiskTier.get`), and the kernel is not asked to read them ahead
    into the page cache."""
    out: list[bytes | None] = []
    direct = buffers is not None and disk.direct_ok
    if len(names) > 1 and not (direct and not block_cached(disk, names[0])):
        disk.will_need(names)  # the kernel reads them all at once, not block by block
    for i, name in enumerate(names):
        if direct and i % DIRECT_RUN == 0 and buffers is not None:
            # A run's blocks in one request (up to a device's largest), not one by one
            group = names[i : i + DIRECT_RUN]
            try:
                together = read_direct(disk, group, buffers[i : i + len(group)]) if len(group) > 1 else None
            except OSError as exc:
                together = None
                cache._disk_failed("disk_cache_read_failed", exc)
            if together is not None:
                for j, data in enumerate(together):
                    buffers[i + j] = together[j] = None
                    if on_each is not None:
                        token.run_sync_soon(on_each, i + j, data)
                    out.append(HANDED if on_each is not None and data is not None else data)  # (not held here once its entry has it)
                    del data
                continue
        if len(out) > i:
            continue  # (read with its group)
        buffer = buffers[i] if buffers is not None and i < len(buffers) else None
        if buffers is not None and i < len(buffers):
            buffers[i] = None  # (held once, here, until the entry takes it)
        try:
            out.append(disk.get(name, buffer, direct=direct))
        except Exception as exc:  # one bad block costs that block only
            out.append(None)
            cache._disk_failed("disk_cache_read_failed", exc)
        del buffer
        if on_each is not None:
            token.run_sync_soon(on_each, i, out[-1])
            if out[-1] is not None:
                out[-1] = HANDED
    return out


def handing_out(buffers: list[Any]) -> Callable[[int], Any]:
    """`buffers(i)` for a store's get_blocks: block i's buffer, given out once and then no longer
    referenced here (a block evicted while the rest of its GET is still coming can be recycled)."""

    def take(i: int) -> Any:
        if i >= len(buffers):
            return None
        buffer, buffers[i] = buffers[i], None
        return buffer

    return take


HANDED: Any = object()  # read_entries: an entry given to `on_each` (and no longer held in its result)


Pending = tuple[ObjectRef, int, BlockFetch, bool]  # a reserved block, its fetch, whether a reader waits for it


def fetch_parts(pending: list[Pending], most: int, waited_part: int) -> list[list[Pending]]:
    """The pending blocks as GETs: contiguous blocks of one object version, at most `most` per
    GET, and a block a reader waits for at most `waited_part` blocks into its GET (its bytes
    come a round trip plus what is before it in the GET after the request)."""
    by_object: dict[tuple[str, str], list[Pending]] = {}
    for item in pending:
        by_object.setdefault((item[0].key, item[0].etag), []).append(item)
    parts: list[list[Pending]] = []
    for items in by_object.values():
        items.sort(key=lambda item: item[1])
        part: list[Pending] = []
        for item in items:
            if part and (item[1] != part[-1][1] + 1 or len(part) >= most or (item[3] and len(part) >= waited_part)):
                parts.append(part)
                part = []
            part.append(item)
        if part:
            parts.append(part)
    return parts


def adopt(cache: BlockCache, ref: ObjectRef, index: int, data: bytes) -> bool:
    """Keeps `data`, known to be block `index` of `ref` (a file the mount just stored), as if
    fetched: in memory while the budget has room, and on disk. False if there was no room (or
    the block is held already)."""
    start, end = cache.block_range(ref, index)
    if cache.held(ref, index) or len(data) != end - start:
        return False
    fetch = cache.reserve_fetch(ref, index, ahead=False)
    if fetch is None:
        return False
    cache.stats.misses -= 1  # not a miss: nothing was asked of the backend
    cache.complete(ref, index, fetch, data, None)
    cache.keep_on_disk(ref, index, data)
    return True


def carry(cache: BlockCache, old: ObjectRef, new: ObjectRef) -> None:
    """`new` is a server-side copy of `old` (a rename): the blocks of `old` held in memory are
    kept for `new` too."""
    for index in range(cache.blocks_of(old) if old.size == new.size else 0):
        data = cache.memory.peek((old.key, old.etag, index))
        if data is not None:
            adopt(cache, new, index, data)
