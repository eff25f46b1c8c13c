"""The block cache: objects read in fixed-size blocks through a memory tier and a disk tier.

A block is identified by (storage, object key, etag, index): a changed object has a new etag and
so never serves old bytes.

Concurrency protocol (all on the trio thread unless noted):
- `_inflight` maps a block id to its `_Fetch`; a second reader of the same block waits on that
  fetch's event instead of starting another (single flight).
- Fetches run in the cache's own nursery (`run`), not in the reader's task, so a reader that is
  interrupted does not cancel a fetch others wait for, and the disk write happens after the
  waiters have been woken.
- One memory budget (`memory_limit`) covers the memory tier *and* the blocks being fetched:
  a fetch reserves its block size first, evicting least-recently-used blocks to make room. A
  demand read waits for room; a prefetch that finds no room is simply not started.
- A run of contiguous blocks is fetched as parallel streamed ranged GETs of `fetch_size` each (at
  most `max_fetches` in flight per mount); each block completes (wakes its waiters) as soon as
  its bytes have arrived, not when the whole GET has.
- Disk reads and writes run in worker threads (`trio.to_thread`, bounded by `_disk_limiter`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from sidecar.cache.disk import DiskTier, block_name, range_name
from sidecar.cache.prefetch import FOLLOW_MAX
from sidecar.log import get_logger
from sidecar.store.base import Gate, ObjectStore

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

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Fetch:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class Follow:
    """One streamed GET behind one sequential reader (a Parquet column chunk, an HDF5 dataset
    read from some offset): the range covers blocks [start, end) but the body is read only as
    far as blocks are `registered` (those its reader asked for); the rest waits in TCP and, when
    the reader jumps elsewhere, is never read. One request per run instead of one per block, and
    what is fetched beyond what was read stays within the last block read (plus what the
    socket's small receive buffer held: see the store's `_hold_back`)."""

    def __init__(self, ref: ObjectRef, start: int, end: int, gap: int = 0, head: bytes = b"") -> None:
        self.ref, self.start, self.end = ref, start, end
        # The first block's bytes from `gap` on, already held: the stream starts after them, and
        # its first `gap` bytes (if any) are fetched apart (`BlockCache._head`).
        self.gap, self.head = gap, head
        self.registered = start  # blocks [start, registered) are fetched by this stream (or held)
        self.fetches: dict[int, _Fetch] = {}  # registered blocks not delivered yet
        self.gate = Gate()
        self.closed = False

    def close(self) -> None:
        """Stops the stream after the blocks registered so far (their waiters still get them)."""
        self.closed = True
        self.gate.close()


FOLLOWS_PER_HANDLE = 8  # streams one file handle keeps open (runs it reads at once)
GAP_WORTH = 16  # held bytes of a stream's first block, from 1/GAP_WORTH of a block, are worth a GET for the bytes before them
DISK_RUN_BLOCKS = 16  # blocks read from disk per thread hop: a hop per 1 MiB block cost more than the read (mapped)
COALESCE_S = 0.002  # backend runs started this close together are merged into one request


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
        self._memory: OrderedDict[tuple[str, str, Any], bytes] = OrderedDict()
        self._memory_bytes = 0
        self._reserved = 0  # bytes reserved by fetches in flight
        # Memory entries waiting for their disk write: never evicted before it (the write holds
        # their bytes anyway; evicted, they would be memory outside the budget). Counts per id.
        self._unwritten: dict[tuple[str, str, Any], int] = {}
        self._room = trio.Event()  # set (and replaced) whenever reserved bytes are released
        self._inflight: dict[tuple[str, str, int], _Fetch] = {}
        self._nursery: trio.Nursery | None = None
        self._disk_limiter = trio.CapacityLimiter(4)
        # Object stores scale by connections: a run of blocks is fetched as several ranged GETs
        # of `fetch_size` in flight at once, at most `max_fetches` per mount.
        self.fetch_blocks = max(1, fetch_size // block_size)
        self._fetch_limiter = trio.CapacityLimiter(max_fetches)
        # Streams following readers (`follow`), least recently read first: at most max_fetches,
        # the oldest closed for a new one, so a new reader never waits for an idle stream's
        # connection (a stream waits for its reader, up to the gate's idle time).
        self._follows: OrderedDict[Follow, None] = OrderedDict()
        self.max_follows = max_fetches
        # Backend runs wait COALESCE_S before they start, merged with the runs started meanwhile:
        # the kernel splits one large read (a Parquet column chunk read at once) into 1 MiB
        # requests that arrive together, each a run of its own; merged, they are one GET.
        self._pending: list[tuple[ObjectRef, int, _Fetch]] = []  # reserved backend blocks not started yet
        self._flush_scheduled = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The cache's fetch service; start with `await nursery.start(cache.run)`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes + self._reserved

    def count_direct(self, data: bytes) -> bytes:
        self.stats.direct_reads += 1
        return data

    def blocks_of(self, ref: ObjectRef) -> int:
        return -(-ref.size // self.block_size)

    def block_range(self, ref: ObjectRef, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(start + self.block_size, ref.size)

    def has(self, ref: ObjectRef, index: int) -> bool:
        """In memory, being fetched, or on disk: reading it through the cache costs no request."""
        bid = (ref.key, ref.etag, index)
        if bid in self._memory or bid in self._inflight:
            return True
        return self.disk is not None and block_name(self.storage_id, ref.key, ref.etag, index, self.block_size) in self.disk

    async def get(self, ref: ObjectRef, index: int) -> bytes:
        """The bytes of block `index` of `ref` (shorter than block_size for the last block)."""
        bid = (ref.key, ref.etag, index)
        data = self._memory.get(bid)
        if data is not None:
            self._memory.move_to_end(bid)
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
        return fetch.data

    def prefetch(self, ref: ObjectRef, indices: range, *, readahead: bool = True) -> int:
        """Starts fetching blocks `indices` (contiguous) in the background, as few requests as
        possible, for as many blocks as the memory budget has room for; never waits. Returns
        the number of blocks started. `readahead=False` marks blocks a reader is about to wait
        for (not counted as prefetches)."""
        run: list[int] = []
        run_on_disk = False
        started = 0

        def start_run() -> int:  # disk runs are read DISK_RUN_BLOCKS per thread hop
            return self._start_run(ref, run, part_blocks=DISK_RUN_BLOCKS if run_on_disk else None)

        for index in indices:
            if index >= self.blocks_of(ref):
                break
            bid = (ref.key, ref.etag, index)
            if bid in self._memory or bid in self._inflight:
                started += start_run()
                run = []
                continue
            # Blocks on disk are read ahead too (into memory, by a disk thread, while the reader
            # is being answered): a warm sequential reader never waits for the disk. A run is
            # all disk or all backend, so a disk read never waits behind a network stream.
            on_disk = self.disk is not None and block_name(self.storage_id, ref.key, ref.etag, index, self.block_size) in self.disk
            if run and on_disk != run_on_disk:
                started += start_run()
                run = []
            if not self._try_reserve(self._block_len(ref, index)):
                self.stats.prefetch_skipped += readahead
                break
            run.append(index)
            run_on_disk = on_disk
        started += start_run()
        if readahead:
            self.stats.prefetches += started
        return started

    def _block_len(self, ref: ObjectRef, index: int) -> int:
        start, end = self.block_range(ref, index)
        return end - start

    def _start_run(self, ref: ObjectRef, run: list[int], *, reserved: bool = True, part_blocks: int | None = None) -> int:
        """Registers fetches for the contiguous blocks `run` and starts them as parallel ranged
        GETs of at most `fetch_blocks` blocks each (`part_blocks`: disk reads, DISK_RUN_BLOCKS
        per thread hop). Reserved backend runs start after
        COALESCE_S, merged with the runs registered meanwhile (`_flush_pending`)."""
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
                fetch = _Fetch()
                self._inflight[(ref.key, ref.etag, index)] = fetch
                self._pending.append((ref, index, fetch))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._nursery.start_soon(self._flush_pending)
            return len(run)
        step = part_blocks or self.fetch_blocks
        for lo in range(0, len(run), step):
            part = run[lo : lo + step]
            fetches = []
            for index in part:
                fetch = _Fetch()
                self._inflight[(ref.key, ref.etag, index)] = fetch
                fetches.append(fetch)
            self._nursery.start_soon(self._fetch_run, ref, part[0], fetches, reserved)
        return len(run)

    @property
    def follows(self) -> bool:
        """Whether a sequential reader can be followed by one streamed GET (`follow`)."""
        return bool(getattr(self.store, "streams", False))

    def follow(
        self, follows: list[Follow], ref: ObjectRef, first: int, last: int, *, may_start: bool, after: Iterable[tuple[int, int]] = ()
    ) -> bool:
        """Follows a sequential reader with a streamed GET: if blocks [first, last] continue one
        of the handle's streams `follows`, that stream is extended to them; else, with
        `may_start` (the handle's read-ahead saw the run begin), a new stream starts at the
        first of them not held, its range ending before the next held block. `after`: exact ranges
        the reader read before, kept by `keep_range`; a new stream that starts in the last block
        of one starts where it ended, not at the block's start (a Parquet column chunk's first
        read is exact, and its block's head would otherwise be fetched twice). Several streams
        per handle, since one reader may read several runs at once (pyarrow's pre-buffering
        reads the column chunks of a row group in parallel through one file descriptor). False:
        the read is not followed (nothing needed, or no memory for even one block: the caller
        fetches as usual)."""
        follows[:] = [f for f in follows if not f.closed]
        for f in follows:
            if f.ref == ref and f.start <= first <= f.registered and first < f.end:
                follows.remove(f)
                follows.append(f)  # the most recently read last
                self._follows.move_to_end(f)  # (a stream not closed is in both)
                # No block ahead of the reader: TCP keeps the next bytes coming while the reader
                # turns round (the stream pauses only once its socket's buffer is full), and what
                # a run fetches past its end is at most the rest of its last block.
                self._register(f, last + 1, last + 1)
                return True
        if not may_start:
            return False
        start, blocks = first, self.blocks_of(ref)
        while start <= last and self.has(ref, start):
            start += 1
        if start > last:
            return False
        end = start + 1
        span = max(1, FOLLOW_MAX // self.block_size)  # the Range header's extent; read as asked
        while end < min(blocks, start + span) and not self.has(ref, end):
            end += 1
        f = Follow(ref, start, end, *self._head(ref, start, after))
        if not self._register(f, last + 1, last + 1):
            return False
        if self._nursery is None:
            raise RuntimeError("BlockCache.run is not started")
        while len(self._follows) >= self.max_follows:
            self._follows.popitem(last=False)[0].close()  # the mount's least recently read stream
        self._follows[f] = None
        self._nursery.start_soon(self._follow_run, f)
        if len(follows) >= FOLLOWS_PER_HANDLE:
            follows.pop(0).close()  # the handle's least recently read
        follows.append(f)
        return True

    def _head(self, ref: ObjectRef, index: int, after: Iterable[tuple[int, int]]) -> tuple[int, bytes]:
        """(gap, head): a kept range of `after` that ends inside block `index` gives the block's
        bytes [gap, gap + len(head)); gap > 0 when the range began inside the block too (an HDF5
        chunk smaller than a block), and only if the range is worth an extra small GET for the
        gap. (0, b""): no such range, the stream reads the whole block."""
        base = index * self.block_size
        for lo, hi in after:
            if not (lo < base + self.block_size and base < hi < min(base + self.block_size, ref.size)):
                continue
            data = self._memory.get((ref.key, ref.etag, ("range", lo, hi)))
            if data is None or (lo > base and (hi - lo) * GAP_WORTH < self.block_size):
                continue
            return (lo - base, bytes(data)) if lo > base else (0, bytes(data[base - lo :]))
        return 0, b""

    def _register(self, follow: Follow, want_end: int, ahead_from: int) -> bool:
        """Registers the stream's blocks up to `want_end` (as far as memory allows) and opens its
        gate that far; False if not even one block had room."""
        ref = follow.ref
        while follow.registered < min(want_end, follow.end):
            index = follow.registered
            bid = (ref.key, ref.etag, index)
            if bid not in self._memory and bid not in self._inflight:  # held ones: read past
                if not self._try_reserve(self._block_len(ref, index)):
                    break
                fetch = _Fetch()
                self._inflight[bid] = fetch
                follow.fetches[index] = fetch
                self.stats.misses += 1
                self.stats.prefetches += index >= ahead_from
            follow.registered += 1
        follow.gate.open_to(follow.registered - follow.start)
        return follow.registered > follow.start

    async def _follow_run(self, follow: Follow) -> None:
        ref, bs = follow.ref, self.block_size
        error: BaseException = OSError(f"{ref.key}: the backend sent fewer bytes than asked")
        first: list[bytes | None] = [None, None]  # the gap's bytes and the stream's first piece
        gap_pending = [bool(follow.gap)]

        def on_block(i: int, data: bytes) -> None:
            if i == 0 and (follow.head or follow.gap):
                first[1] = data
                if first[0] is not None or not follow.gap:
                    finish(0, (first[0] or b"") + follow.head + data)
                return
            finish(i, data)

        async def fetch_gap() -> None:
            base = follow.start * bs
            try:
                first[0] = await self.store.get_range(ref.key, base, base + follow.gap, ref.etag)
            except Exception as exc:  # the first block fails; the stream's other blocks do not
                fetch = follow.fetches.pop(follow.start, None)
                if fetch is not None:
                    self._complete(ref, follow.start, fetch, None, exc, True)
                return
            finally:
                gap_pending[0] = False
            if first[1] is not None:
                finish(0, first[0] + follow.head + first[1])

        def finish(i: int, data: bytes) -> None:
            index = follow.start + i
            fetch = follow.fetches.pop(index, None)
            if fetch is not None:
                self._complete(ref, index, fetch, data, None, True)
                if self.disk is not None and self._nursery is not None:
                    # Block by block: the stream goes at its reader's pace, and a block held
                    # back for a pack would be pinned in memory meanwhile.
                    name = block_name(self.storage_id, ref.key, ref.etag, index, bs)
                    self._pin((ref.key, ref.etag, index))
                    self._nursery.start_soon(self._disk_put_many, [(name, data)], [(ref.key, ref.etag, index)])

        try:
            # Streams have their own bound (`max_follows`, kept by `follow`): one waiting for its
            # reader never holds up demand reads.
            start, end = follow.start * bs + follow.gap + len(follow.head), min(follow.end * bs, ref.size)
            if follow.gap and self._nursery is not None:
                self._nursery.start_soon(fetch_gap)  # beside the stream; it never raises
            await self.store.get_blocks(ref.key, start, end, ref.etag, bs, on_block, object_size=ref.size, gate=follow.gate)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else OSError("fetch cancelled")
            if not isinstance(exc, Exception):
                raise
        finally:
            follow.close()
            self._follows.pop(follow, None)
            # Whatever did not arrive fails; the first block, if the stream brought its part,
            # is the gap's GET's to complete (the stream may end first: its reader went quiet
            # while waiting for that very block).
            for index, fetch in list(follow.fetches.items()):
                if not (index == follow.start and gap_pending[0] and first[1] is not None):
                    del follow.fetches[index]
                    self._complete(ref, index, fetch, None, error, True)

    async def _flush_pending(self) -> None:
        """Starts the pending backend blocks as contiguous runs of at most `fetch_blocks`."""
        await trio.sleep(COALESCE_S)
        pending, self._pending, self._flush_scheduled = self._pending, [], False
        by_object: dict[tuple[str, str], list[tuple[ObjectRef, int, _Fetch]]] = {}
        for item in pending:
            by_object.setdefault((item[0].key, item[0].etag), []).append(item)
        assert self._nursery is not None
        for items in by_object.values():
            items.sort(key=lambda item: item[1])
            part: list[tuple[ObjectRef, int, _Fetch]] = []
            for item in items + [None]:  # type: ignore[list-item]
                if part and (item is None or item[1] != part[-1][1] + 1 or len(part) >= self.fetch_blocks):
                    self._nursery.start_soon(self._fetch_run, part[0][0], part[0][1], [p[2] for p in part], True)
                    part = []
                if item is not None:
                    part.append(item)

    def _start(self, ref: ObjectRef, index: int) -> _Fetch:
        self._start_run(ref, [index], reserved=False)
        return self._inflight[(ref.key, ref.etag, index)]

    def _evict_for(self, need: int) -> bool:
        """Evicts least recently used memory entries, except those waiting for their disk write,
        until `need` more bytes fit the budget; whether they do."""
        over = self._memory_bytes + self._reserved + need - self.memory_limit
        if over > 0:
            victims = []
            for mid, data in self._memory.items():
                if over <= 0:
                    break
                if mid not in self._unwritten:
                    victims.append(mid)
                    over -= len(data)
            for mid in victims:
                self._memory_bytes -= len(self._memory.pop(mid))
        return self._memory_bytes + self._reserved + need <= self.memory_limit

    def _pin(self, mid: tuple[str, str, Any]) -> None:
        """Keeps memory entry `mid` until its disk write (`_disk_put_many`) is done."""
        self._unwritten[mid] = self._unwritten.get(mid, 0) + 1

    def _try_reserve(self, n: int) -> bool:
        if self._evict_for(n):
            self._reserved += n
            return True
        return False

    async def _reserve(self, n: int) -> None:
        while not self._try_reserve(n):
            await self._room.wait()

    def _release(self, n: int) -> None:
        self._reserved -= n
        self._room.set()
        self._room = trio.Event()

    def _complete(self, ref: ObjectRef, index: int, fetch: _Fetch, data: bytes | None, error: BaseException | None, held: bool) -> None:
        """Finishes one block's fetch: wakes its waiters and moves its memory reservation (if
        `held`) into the memory tier, or releases it on error. Idempotent."""
        if fetch.done.is_set():
            return
        bid = (ref.key, ref.etag, index)
        n = self._block_len(ref, index)
        if data is not None and len(data) != n:
            data, error = None, OSError(f"short read of {ref.key} block {index}: {len(data)} of {n} bytes")
        if data is not None:
            fetch.data = data
            self._memory[bid] = data
            self._memory_bytes += len(data)
        else:
            fetch.error = error
        if held:
            self._release(n)
        if self._inflight.get(bid) is fetch:
            del self._inflight[bid]
        fetch.done.set()

    async def _fetch_run(self, ref: ObjectRef, first: int, fetches: list[_Fetch], reserved: bool) -> None:
        names = [block_name(self.storage_id, ref.key, ref.etag, first + i, self.block_size) for i in range(len(fetches))]
        to_disk: list[tuple[str, bytes]] = []
        pinned: list[tuple[str, str, Any]] = []  # their memory entries, kept until written
        held = reserved
        error: BaseException = OSError(f"{ref.key}: the backend sent fewer bytes than asked")
        try:
            if not held:
                await self._reserve(self._block_len(ref, first))  # a run of one demand block
                held = True
            # Blocks already on disk are served from there (read in one thread hop for the whole
            # run); the rest are fetched in one stream.
            missing = await self._complete_from_disk(ref, first, fetches, names, held)
            if missing:
                # One request from the first to the last missing block: a disk hit in between
                # costs less as bytes in the stream than as another request.
                lo, hi = missing[0], missing[-1]
                start, end = self.block_range(ref, first + lo)[0], self.block_range(ref, first + hi)[1]
                self.stats.misses += len(missing)

                def on_block(i: int, data: bytes) -> None:
                    j = lo + i
                    if j < len(fetches) and not fetches[j].done.is_set():
                        self._complete(ref, first + j, fetches[j], data, None, held)
                        if self.disk is not None:
                            self._pin((ref.key, ref.etag, first + j))
                            to_disk.append((names[j], data))
                            pinned.append((ref.key, ref.etag, first + j))

                async with self._fetch_limiter:
                    await self.store.get_blocks(ref.key, start, end, ref.etag, self.block_size, on_block, object_size=ref.size)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else OSError("fetch cancelled")
            if not isinstance(exc, Exception):
                raise
        finally:
            # Whatever did not arrive fails, so no waiter is left hanging.
            for i, fetch in enumerate(fetches):
                self._complete(ref, first + i, fetch, None, error, held)
            # The run holds no block while its disk write waits (each _Fetch holds its data): a
            # block evicted meanwhile would be memory outside the budget. Its waiters have theirs.
            fetches.clear()
            fetch = None  # (the loop above left the last one here)
        if to_disk:
            await self._disk_put_many(to_disk, pinned)

    async def _complete_from_disk(self, ref: ObjectRef, first: int, fetches: list[_Fetch], names: list[str], held: bool) -> list[int]:
        """Completes the run's blocks found on disk (one thread hop for the whole run, none if the
        index has none of them); returns the indices in the run of the others."""
        if self.disk is None or not any(name in self.disk for name in names):
            return list(range(len(fetches)))
        missing: list[int] = []
        for i, data in enumerate(await self._disk_get_many(names)):
            if data is not None and len(data) == self._block_len(ref, first + i):
                self.stats.disk_hits += 1
                self._complete(ref, first + i, fetches[i], data, None, held)
            else:
                missing.append(i)
        return missing

    # The disk tier is a cache: any error of it (a full or failing disk, a bug) costs a refetch,
    # never a reader's request or the mount. Each is logged and counted.

    async def _disk_get_many(self, names: list[str]) -> list[bytes | None]:
        if self.disk is None:
            return [None] * len(names)
        disk = self.disk

        def read_all() -> list[bytes | None]:
            out: list[bytes | None] = []
            for name in names:
                try:
                    out.append(disk.get(name))
                except Exception as exc:  # one bad block costs that block only
                    out.append(None)
                    self._disk_failed("disk_cache_read_failed", exc)
            return out

        return await trio.to_thread.run_sync(read_all, limiter=self._disk_limiter)

    async def _disk_put_many(self, items: list[tuple[str, bytes]], pinned: list[tuple[str, str, Any]]) -> None:
        """Writes `items` to the disk tier, then unpins their memory entries `pinned` (`_pin`)."""
        disk = self.disk
        if disk is None:
            return  # (nothing is pinned without one)

        def write_all() -> None:
            try:
                disk.put_many(items)  # a run's blocks in one file
            except Exception as exc:
                self._disk_failed("disk_cache_write_failed", exc)

        try:
            await trio.to_thread.run_sync(write_all, limiter=self._disk_limiter)
        finally:
            for mid in pinned:
                left = self._unwritten.pop(mid, 1) - 1
                if left:
                    self._unwritten[mid] = left
            self._room.set()  # they can be evicted now: a fetch waiting for room may go on
            self._room = trio.Event()

    def _disk_failed(self, event: str, exc: Exception) -> None:
        """Called from a disk thread: a counter and a log line, nothing that needs trio."""
        assert self.disk is not None
        self.disk.errors += 1
        log.warning(event, error=type(exc).__name__, detail=str(exc)[:200], errors=self.disk.errors)

    # -- exact ranges of random readers ---------------------------------------------------------
    #
    # A random read is fetched as exactly the bytes asked for (not whole blocks). The range is
    # kept too, in the memory tier (under the same budget and LRU as blocks) and on disk, so a
    # second pass over the same reads (a new handle, a new mount on the kept cache) fetches
    # nothing. A range is found again by its exact offsets: random readers repeat theirs.

    async def cached_range(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        rid = (ref.key, ref.etag, ("range", start, end))
        data = self._memory.get(rid)
        if data is not None:
            self._memory.move_to_end(rid)
            self.stats.range_hits += 1
            return data
        if self.disk is None:
            return None
        name = range_name(self.storage_id, ref.key, ref.etag, start, end)
        if name not in self.disk:
            return None
        (data,) = await self._disk_get_many([name])
        if data is None or len(data) != end - start:
            return None
        self.stats.range_hits += 1
        self._keep_in_memory(rid, data)
        return data

    def keep_range(self, ref: ObjectRef, start: int, data: bytes) -> None:
        """Keeps a range a random reader fetched (memory now, disk in the background)."""
        if not data or len(data) > self.block_size:
            return
        end = start + len(data)
        rid = (ref.key, ref.etag, ("range", start, end))
        self._keep_in_memory(rid, data)
        if self.disk is not None and self._nursery is not None:
            self._pin(rid)
            self._nursery.start_soon(self._disk_put_many, [(range_name(self.storage_id, ref.key, ref.etag, start, end), data)], [rid])

    def _keep_in_memory(self, rid: tuple, data: bytes) -> None:
        if rid not in self._memory and self._evict_for(len(data)):
            self._memory[rid] = data
            self._memory_bytes += len(data)

    def invalidate(self, key: str) -> None:
        """Drops every memory block of `key` (any etag); disk blocks of old etags age out by LRU."""
        for bid in [b for b in self._memory if b[0] == key]:
            self._memory_bytes -= len(self._memory.pop(bid))
