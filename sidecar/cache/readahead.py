"""Read-ahead policy for one open file handle: how many blocks to fetch ahead of a reader.

Evidence, not proximity: a read is *sequential* when it starts where one of the handle's recent
reads ended (the kernel sends several read-ahead requests at once, so they may arrive out of
order: the last RECENT reads are remembered, and a read that fills a gap between them counts
too). A read that merely lands near the previous one does not. The window opens only after
STREAK_TO_OPEN sequential reads in a row; any other read closes it (window 0), and the caller
then fetches exactly the bytes asked for.

Window size, in blocks:
- a reader that started at offset 0 and reads in kernel-sized requests (a stream: `cat`, `cp`,
  `read_csv`) gets INITIAL_STREAM blocks at once, doubling per block it enters, up to
  `max_blocks`, so the link's parallel ranged GETs are used from the start; but until the run
  has read EARLY_RUN blocks, no more than twice what it has read while none of its reads has been
  answered: the kernel sends the pieces of one large read together (a DuckDB column chunk that
  starts at offset 4, read in one call), and doubling per piece opened a window of 128 blocks for
  a run of eight. A read that comes after one of its run was answered was sent by a reader
  consuming the stream (`cat`, `cp`: the kernel's next read-ahead), and the window doubles on
  from there: capped until EARLY_RUN blocks, a cold 256 MiB read spent a third of its time
  ramping up;
- any other sequential run (a column chunk of a Parquet file, an HDF5 dataset) gets a window
  proportional to what it has read so far (an eighth of it, at least one block), so what is
  fetched beyond the end of the run stays a fraction of the run itself.

Blocks are requested a GET at a time (`step` blocks, the cache's fetch size): when what is
requested ahead of the reader falls a GET short of the window (or to half a small window), it is
topped up. Topped up at half the window, a stream's GETs started in waves of eight, ended
together, and between the waves half as many were in flight.

A stream whose window is open all the way is *pumped* as well: each of its GETs that ends starts
the next (`top_up`, sidecar.vfs.reader), whether or not the reader has read what it brought, as
long as fewer than a window's blocks are in flight and what is requested stays within PUMP_AHEAD
windows of the reader. A reader reads its GETs in order; GETs that ended before the one it waits
for no longer leave their connections idle until it has read them, as a direct client with as
many connections would not.

A copy out of a memory mapping (a tensor of a safetensors file, a numpy memmap slice) faults in
its first page, then its last (a large memcpy moves both ends before the middle), then walks
the middle: the kernel reads a window around each of the two faults, then reads ahead of the
first. A read that continues a run of one kernel window while the reads since it are one window
further on (at most COPY_GAP ahead) is such a copy: `copy` then names the bytes between the read and the
window, what the reader reads next (sidecar.vfs.reader fetches them at once); what the kernel
reads past the window is its read-ahead past the copy. A memcpy that runs backwards (glibc's
does at some alignments) faults in the last page's window, then reads down from it: the
bytes between the two windows are the copy's middle too.

A run that did not start at offset 0 is *followed* instead, from its second read (if it began
exactly where the first ended; else once the window would open) until it has read FOLLOW_MAX:
one streamed GET reads the object as far as the reader has asked (sidecar.cache.streams), rather
than a GET per block of the window. A Parquet column chunk read in 1 MiB requests then costs
two GETs (its first read, exact, and the stream), and what is fetched past its end stays within
its last block. Longer runs switch to the window's parallel GETs, which a single connection
cannot match.
"""

from __future__ import annotations

import bisect
import re
from collections import OrderedDict, deque
from typing import NamedTuple

from sidecar.protocol import KERNEL_READAHEAD_KB

RECENT = 16  # read ends remembered per handle
STREAK_TO_OPEN = 2  # sequential reads in a row before anything is read ahead
INITIAL_STREAM = 4  # blocks ahead of a reader streaming from offset 0
STREAM_REQUEST = 64 * 1024  # reads at least this large are kernel read-ahead sized
PROPORTION = 8  # a run that did not start at 0 reads ahead 1/PROPORTION of what it has read
EARLY_RUN = 16  # blocks a stream reads before its window may exceed twice what it read
FOLLOW_MAX = 32 * 1024 * 1024  # bytes of a run followed by one stream before parallel GETs take over
KERNEL_WINDOW = KERNEL_READAHEAD_KB * 1024  # bytes: the kernel read-ahead a mount gets unless it is configured
PUMP_AHEAD = 2  # windows a stream's GETs may reach ahead of its reader when they end before it reads them
COPY_GAP = FOLLOW_MAX  # bytes between a copy's two ends fetched at once, at most


class Copy(NamedTuple):
    """The middle of a copy out of a mapping: [lo, hi) to fetch at once, where the kernel's
    window around its far end ends (-1: nothing past it is read), and its direction."""

    lo: int
    hi: int
    past: int
    backward: bool


class ReadAhead:
    def __init__(self, block_size: int, max_blocks: int = 8, kernel_window: int = KERNEL_WINDOW, step: int = 1) -> None:
        self.block_size = block_size
        self.step = step
        self.max_blocks = max(1, max_blocks)
        self.kernel_window = kernel_window  # bytes the kernel reads ahead on this mount
        self.window = 0
        self._ends: deque[int] = deque(maxlen=RECENT)
        self._starts: deque[int] = deque(maxlen=RECENT)
        self._streak = 0
        self._run_start = 0  # offset where the current sequential run began
        self._run_bytes = 0  # bytes read in it
        self._stream = False  # the run began at offset 0 with kernel-sized reads
        self._answered = False  # a read of the current run has been answered
        self._block = -1
        self._requested_end = 0  # first block index not yet requested ahead of the reader
        self._exact = False  # the last read began exactly where a recent one ended
        self.copy: Copy | None = None  # the middle of a copy the last read belongs to

    @property
    def requested_end(self) -> int:
        """The first block not yet requested ahead of the reader."""
        return self._requested_end

    def answered(self, offset: int) -> None:
        """The read at `offset` was answered: reads of its run that come after it were sent by a
        reader that is consuming the stream, not by the kernel splitting one large read."""
        if offset >= self._run_start:
            self._answered = True

    @property
    def position(self) -> int:
        """The block after the last one read."""
        return (self._ends[-1] - 1) // self.block_size + 1 if self._ends else 0

    @property
    def pumping(self) -> bool:
        """A stream whose window is open all the way: each of its GETs that ends starts the next
        (`top_up`), whether or not the reader has read what it brought."""
        return self._stream and self.window >= self.max_blocks > 1

    def top_up(self, in_flight: int) -> range:
        """Blocks to request now that GETs of a pumping stream ended and `in_flight` of the blocks
        requested ahead of the reader are still on their way: a GET's worth at a time while fewer
        than a window minus one GET are, up to PUMP_AHEAD windows ahead of the reader."""
        if not self.pumping:
            return range(0)
        start = stop = self._requested_end
        limit = self.position + PUMP_AHEAD * self.window
        while in_flight + (stop - start) <= self.window - self.step and stop + self.step <= limit:
            stop += self.step
        self._requested_end = stop
        return range(start, stop)

    @property
    def following(self) -> bool:
        """The current read continues a run that did not start at offset 0 (and is not long yet):
        one streamed GET should follow it (see the module's docstring)."""
        if self._stream or self._run_bytes >= FOLLOW_MAX:
            return False
        # From the second read if it began exactly where the first ended; a read that only
        # overlaps a recent one (a random reader of a small range) needs a longer streak.
        return self._streak >= STREAK_TO_OPEN or (self._streak >= 1 and self._exact)

    def _sequential(self, offset: int, end: int) -> bool:
        if offset in self._ends:
            return True
        # Out of order: this read fills a gap between recent reads, or continues a read that
        # arrived before it (the kernel's read-ahead requests overtake each other).
        if any(start <= offset <= e for start, e in zip(self._starts, self._ends)) or end in self._starts:
            return True
        # ... or it overtook the requests before it: a kernel-sized read starting at most two of
        # its own sizes past a recent end or, in a stream from offset 0, within the kernel's
        # read-ahead window past it (the kernel sends a window's requests together and they
        # reach the worker out of order: on kernel 6.18 a read four blocks ahead of the last
        # one came before the three between). Elsewhere such a jump may be a reader skipping
        # to its next run (a Parquet column chunk a few MiB on), which must not continue this
        # one. A small read with a gap (a random reader) never is sequential.
        size = end - offset
        reach = max(2 * size, self.kernel_window if self._stream else 0)
        return size >= STREAM_REQUEST and any(e < offset <= e + reach for e in self._ends)

    def _copy_of(self, offset: int, size: int) -> Copy | None:
        """The middle of a copy out of a mapping this read (kernel-sized) belongs to, seen from its
        two ends (see the module's docstring); else None. Forwards: the read continues a run of
        one kernel window, and every read since lies ahead, one window at most COPY_GAP on.
        Backwards (memcpy runs backwards at some alignments): the read ends where the window
        around the copy's last page begins, the last reads, and the window around its first
        page lies below."""
        end = offset + size
        # (on every read: the lists are built only for a read that meets a recent one's ends)
        if size < STREAM_REQUEST or not (offset in self._ends or end in self._starts):
            return None
        starts, ends = list(self._starts), list(self._ends)
        if offset in ends:  # forwards
            since = len(ends) - 1 - ends[::-1].index(offset)
            later = list(zip(starts[since + 1 :], ends[since + 1 :]))
            head, head_end = since, offset
        else:  # backwards
            since = len(starts) - 1 - starts[::-1].index(end)
            later = list(zip(starts[since:], ends[since:]))
            head, head_end = since - 1, ends[since - 1] if since else -1
        if not later or head < 0:
            return None
        far, far_end = min(s for s, _ in later), max(e for _, e in later)
        while head > 0 and ends[head - 1] == starts[head]:  # the run that ends at head_end, from its first read
            head -= 1
        # Both ends exactly one window, as the kernel reads around a fault: two readers' runs
        # (pyarrow's column chunks, read at once) rarely are.
        if far_end - far != self.kernel_window or head_end - starts[head] != self.kernel_window or not head_end < far <= head_end + COPY_GAP:
            return None
        if offset == head_end:
            return Copy(offset, far, far_end, False)
        return Copy(head_end, end, -1, True) if far == end and head_end < offset else None

    def on_read(self, offset: int, size: int) -> range:
        """Records a read and returns the block indices to prefetch (possibly empty)."""
        end = offset + max(size, 1)
        block = offset // self.block_size
        last = (end - 1) // self.block_size
        self._exact = offset in self._ends
        self.copy = self._copy_of(offset, size)
        if self._ends and self._sequential(offset, end):
            self._streak += 1
            self._run_bytes += size
        else:
            self._streak = 0 if self._ends or offset != 0 else 1
            self._run_start, self._run_bytes = offset, size
            self._stream = offset == 0 and size >= STREAM_REQUEST
            self._answered = False
            self.window = 0
            self._requested_end = 0
        self._starts.append(offset)
        self._ends.append(end)
        if self._streak >= STREAK_TO_OPEN or (self._stream and self._streak >= 1):
            if self._stream:
                if self.window == 0:
                    self.window = min(INITIAL_STREAM, self.max_blocks)
                elif block != self._block:
                    self.window = min(self.window * 2, self.max_blocks)
                read_blocks = self._run_bytes // self.block_size
                if read_blocks < EARLY_RUN and not self._answered:
                    self.window = min(self.window, max(INITIAL_STREAM, 2 * read_blocks))
            else:
                proportional = self._run_bytes // (PROPORTION * self.block_size)
                self.window = min(max(1, proportional), self.max_blocks)
        self._block = block
        if self.window == 0:
            return range(0)
        self._requested_end = max(self._requested_end, last + 1)
        if self._requested_end - (last + 1) > max(self.window - self.step, self.window // 2):
            return range(0)
        target = last + 1 + self.window
        todo = range(self._requested_end, target)
        self._requested_end = target
        return todo


FOLDER_STREAK = 3  # files opened one after another in name order before the next are fetched
FOLDER_AHEAD = 8  # files fetched ahead of such a reader
FOLDER_SKIP = 2  # a reader that skips a name or two (a filter, a glob) still walks the folder
FOLDERS = 64  # folders whose walk is remembered


class FolderWalk:
    """Read-ahead across files: a reader that opens a folder's files one after another in name
    order (`cat *`, `grep -r`, a data loader over an image folder) or in natural order, numbers
    counted up (zarr's chunks "0.8", "0.9", "0.10", ..., "0.49", "1.0"; "img9" then "img10"),
    gets the next FOLDER_AHEAD names fetched ahead once it has opened FOLDER_STREAK of them in a
    row, and stays that far ahead while it walks on. One file per request is otherwise a round
    trip per file, paid one after another. Opens in any other order fetch nothing ahead.

    `on_open` gets the folder's fresh listing (a dict; its sorted names are kept while the same
    listing is handed in) and returns the names to fetch now. The listing is sorted only once
    the last `streak` names opened in it rose in name order: a shuffled reader (a training
    epoch over more folders than are remembered here) otherwise paid a sort of the folder for
    most opens, more than the open itself. The natural order is never sorted (a 100,000-name
    folder would cost a third of a second): the next name is the current one counted up, looked
    up in the listing, and only for a name whose numbers are above the last one's. The caller
    decides what is worth fetching (small files) and where from."""

    def __init__(self, ahead: int = FOLDER_AHEAD, streak: int = FOLDER_STREAK) -> None:
        self.ahead = ahead
        self.streak = streak
        self._walks: OrderedDict[str, _Walk] = OrderedDict()

    def on_open(self, folder: str, listing: dict[str, object], name: str) -> list[str]:
        walk = self._walks.get(folder)
        if walk is None or walk.listing is not listing:
            walk = _Walk(listing)
            self._walks[folder] = walk
            while len(self._walks) > FOLDERS:
                self._walks.popitem(last=False)
        self._walks.move_to_end(folder)
        if name not in listing:
            return []
        by_name = self._by_name(walk, name)
        by_number = self._by_number(walk, listing, name)
        return by_number if walk.counted >= self.streak else by_name

    def _by_name(self, walk: _Walk, name: str) -> list[str]:
        if walk.names is None:
            walk.rising = (walk.rising + [name])[-self.streak :] if not walk.rising or name > walk.rising[-1] else [name]
            if len(walk.rising) < self.streak:
                return []
            walk.names = sorted(walk.listing)
            for earlier in walk.rising[:-1]:  # the run so far, as if the names had been sorted all along
                self._step(walk, earlier)
        if not self._step(walk, name):
            return []
        i, names = walk.last, walk.names
        start, end = max(i + 1, walk.fetched), min(i + 1 + self.ahead, len(names))
        if end - start < self.ahead // 2 and end < len(names):
            return []  # topped up in batches, like a handle's window
        walk.fetched = max(walk.fetched, end)
        return names[start:end]

    def _step(self, walk: _Walk, name: str) -> bool:
        """Counts `name` into the walk's run in name order; whether the run is a walk."""
        names = walk.names
        assert names is not None
        i = bisect.bisect_left(names, name)
        if i >= len(names) or names[i] != name:
            return False  # added to the listing after the walk began (the mount's own new file)
        walk.run = walk.run + 1 if 0 < i - walk.last <= FOLDER_SKIP else 1
        walk.last = i
        return walk.run >= self.streak

    def _by_number(self, walk: _Walk, listing: dict[str, object], name: str) -> list[str]:
        if name in walk.counted_ahead:
            walk.counted += 1
            walk.counted_ahead = walk.counted_ahead[walk.counted_ahead.index(name) + 1 :]
        else:
            nxt, skipped = walk.last_name, 0
            # (a name counted up has greater numbers: a name whose numbers are not cannot be one)
            key = _numbers(name)
            if walk.last_key is not None and key > walk.last_key:
                while nxt is not None and skipped <= FOLDER_SKIP and nxt != name:
                    nxt, skipped = counted_up(nxt, listing), skipped + 1
            walk.counted = walk.counted + 1 if nxt == name and skipped > 0 else 1
            walk.counted_ahead = []
            walk.last_key = key
        walk.last_name = name
        if walk.counted < self.streak or len(walk.counted_ahead) > self.ahead // 2:
            return []
        new: list[str] = []
        last = walk.counted_ahead[-1] if walk.counted_ahead else name
        while len(walk.counted_ahead) < self.ahead and (last := counted_up(last, listing)) is not None:  # type: ignore[assignment]
            walk.counted_ahead.append(last)
            new.append(last)
        return new


_DIGITS = re.compile(r"(\d+)")


def counted_up(name: str, listing: dict[str, object]) -> str | None:
    """The name after `name` in natural order that the listing holds: its last number plus one,
    else the number before it plus one and the numbers after it back to 0 ("0.49" -> "1.0"), and
    so on; zero-padded numbers keep their width. None if there is none."""
    parts = _DIGITS.split(name)
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    for k in range(len(numbers) - 1, -1, -1):
        i = numbers[k]
        cand = parts[:]
        cand[i] = str(int(parts[i]) + 1).zfill(len(parts[i]) if parts[i].startswith("0") and len(parts[i]) > 1 else 0)
        for j in numbers[k + 1 :]:
            cand[j] = "0" * len(parts[j]) if parts[j].startswith("0") and len(parts[j]) > 1 else "0"
        joined = "".join(cand)
        if joined in listing:
            return joined
    return None


def _numbers(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _DIGITS.findall(name))


class _Walk:
    __slots__ = ("listing", "names", "rising", "last", "run", "fetched", "last_name", "last_key", "counted", "counted_ahead")

    def __init__(self, listing: dict[str, object]) -> None:
        self.listing = listing
        self.names: list[str] | None = None  # sorted once `rising` is a streak
        self.rising: list[str] = []  # the last names opened while they rise in name order
        self.last, self.run, self.fetched = -FOLDER_SKIP - 2, 0, 0
        self.last_name: str | None = None  # the natural-order walk: the last name opened,
        self.last_key: tuple[int, ...] | None = None  # its numbers,
        self.counted = 0  # how many in a row followed each other counting up,
        self.counted_ahead: list[str] = []  # and the names fetched ahead of it, in order
