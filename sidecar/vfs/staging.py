"""The staging area: local copies of files being written, until their object is stored.

Each staged file is one file in the staging directory, and lines in one journal:
  <id>.data      the file's bytes, written in place (pwrite) by the FUSE write handler;
  journal.jsonl  its metadata, one line per change (appended with a single write): object key,
               the etag (and size) it was based on (None for a new file), state, whether its
               writer committed it, the ranges changed since it was staged; a removal line when
               it is gone. The last line of an id wins; a torn last line (a crash mid-append) is
               ignored, so a crash leaves the previous version. The journal is rewritten with
               only the live files at recovery and when it has grown to many times their number.
Creating a file costs a file system much more than appending a line: a staged file costs one
creation, not three.

States: `dirty` (has bytes the bucket does not), `conflict` (the object changed remotely
since the file was staged; the local copy is kept and reported, never uploaded over the newer
object), `incomplete` (its writer never closed or fsynced it after its last change, e.g. the
sidecar died while it was being written: kept and reported, never published by itself). A file
whose upload succeeded is removed from staging.

`committed` is the one rule of publishing: it is set when a writer closes or fsyncs the file and
cleared by the next change, and it is written to the metadata on every flip, so a crash can
never turn a half-written file into a published object.

Invariants:
- a key has at most one StagedFile at a time (`by_key`), shared by every handle writing it;
- `dirty` is set by every write/truncate and cleared only by an upload that started after the
  last write (`generation` tells them apart), so a write racing an upload is never lost;
- the byte limit (`limit`) counts the sizes of all staged files; a write that would pass it fails
  with ENOSPC rather than filling the disk.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.mtime import Mtime, ns_of


class StagingFull(Exception):
    pass


JOURNAL = "journal.jsonl"
RECYCLED_MAX = 32  # spares kept, recycled ones included (each an open file descriptor)
SPARES = 8  # the worker's: empty data files created ahead, off the request path (a creation costs up to 0.5 ms)
COMPACT_FACTOR, COMPACT_MIN = 4, 1000  # the journal is rewritten past FACTOR lines per live file + MIN
MAX_RANGES = 1024  # changed ranges tracked per file; beyond, the whole file counts as changed


def _cut_range(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    """`ranges` without [start, end)."""
    out = []
    for lo, hi in ranges:
        if lo < start:
            out.append([lo, min(hi, start)])
        if hi > end:
            out.append([max(lo, end), hi])
    return [r for r in out if r[1] > r[0]]


def _add_range(ranges: list[list[int]] | None, start: int, end: int) -> list[list[int]] | None:
    """`ranges` (sorted, disjoint) with [start, end) merged in; None stays None (all changed)."""
    if ranges is None or end <= start:
        return ranges
    out: list[list[int]] = []
    for lo, hi in ranges:
        if hi < start or lo > end:
            out.append([lo, hi])
        else:
            start, end = min(lo, start), max(hi, end)
    out.append([start, end])
    out.sort()
    return out if len(out) <= MAX_RANGES else None


@dataclass
class StagedFile:
    id: str
    key: str
    base_etag: str | None
    data_path: Path
    fd: int
    size: int = 0
    dirty: bool = False
    state: str = "dirty"
    generation: int = 0  # bumped by every change; an upload records the generation it stored
    committed: bool = False  # closed or fsynced by its writer since its last change
    base_size: int | None = None  # size of the object `base_etag` names
    changed: list[list[int]] | None = None  # ranges changed since the base; None: unknown, all
    created: float = field(default_factory=time.time)
    mtime: float | None = None  # set by utime/touch -d: stored as the object's `mtime` metadata
    handles: int = 0
    last_error: str | None = None
    upload_failures: int = 0
    next_try: float = 0.0  # trio time before which the background writer does not retry it
    uploading: Any = None  # a trio.Event while an upload runs
    holes: list[list[int]] = field(default_factory=list)  # ranges a write failed to store (ENOSPC, EIO)
    orphan: bool = False  # unlinked while open: its handles keep reading and writing it; never stored

    def public(self) -> dict[str, Any]:
        state = self.state if self.dirty or self.state in ("conflict", "incomplete") else "clean"
        return {"key": self.key, "size": self.size, "state": state, "last_error": self.last_error,
                "local_path": str(self.data_path), "since": self.created}


class _Files(dict):
    """`by_key`: the staged files by key, with the sum of their sizes kept up to date (the limit
    is checked on every write that grows a file: no walk over thousands of staged files)."""

    total = 0

    def __setitem__(self, key: str, f: StagedFile) -> None:
        old = self.get(key)
        self.total += f.size - (old.size if old is not None else 0)
        super().__setitem__(key, f)

    def __delitem__(self, key: str) -> None:
        self.total -= self[key].size
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.total -= self[key].size
        return super().pop(key, *default)

    def resize(self, f: StagedFile, size: int) -> None:
        if self.get(f.key) is f:
            self.total += size - f.size
        f.size = size


@dataclass
class StagingArea:
    directory: Path
    limit: int = 50 << 30
    spares: int = 0  # empty data files kept ready by a thread of their own (0: none, created on demand)
    by_key: _Files = field(default_factory=_Files)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _journal_fd: int | None = None
    _journal_lines: int = 0
    _spares: collections.deque = field(default_factory=collections.deque)  # (id, fd) of empty data files
    _to_empty: collections.deque = field(default_factory=collections.deque)  # (id, fd) of recycled ones, to truncate
    _spare_wanted: threading.Condition = field(default_factory=threading.Condition)
    _spare_thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)  # staged bytes are the user's data: nobody else reads them

    @property
    def used(self) -> int:
        return self.by_key.total

    def resize(self, f: StagedFile, size: int) -> None:
        """Records the size of `f`'s data file after it was written outside `write`."""
        self.by_key.resize(f, size)

    @property
    def journal_path(self) -> Path:
        return self.directory / JOURNAL

    @staticmethod
    def _doc(f: StagedFile) -> dict[str, Any]:
        return {"id": f.id, "key": f.key, "base_etag": f.base_etag, "base_size": f.base_size, "state": f.state, "dirty": f.dirty,
                "committed": f.committed, "changed": f.changed, "created": f.created, "mtime": f.mtime,
                "mtime_ns": ns_of(f.mtime) if f.mtime is not None else None}

    def _append(self, doc: dict[str, Any]) -> None:
        # A line starts with a newline too: a line torn by a full disk ends there, and never
        # swallows the next one.
        line = ("\n" + json.dumps(doc) + "\n").encode()
        with self._lock:
            if self._journal_fd is None:
                self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            _disk_call(os.write, self._journal_fd, line)  # one write: a line is whole or torn, never mixed
            self._journal_lines += 1
            grown = self._journal_lines > COMPACT_FACTOR * len(self.by_key) + COMPACT_MIN
        if grown:
            self.compact()

    def _write_meta(self, f: StagedFile) -> None:
        if not f.orphan:
            self._append(self._doc(f))

    def compact(self) -> None:
        """Rewrites the journal with one line per live staged file (temp file, then rename)."""
        with self._lock:
            live = [self._doc(f) for f in self.by_key.values()]
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            if not live:
                self.journal_path.unlink(missing_ok=True)
                self._journal_lines = 0
                return
            tmp = self.journal_path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _disk_call(os.write, fd, "".join(json.dumps(d) + "\n" for d in live).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.journal_path)
            self._journal_lines = len(live)

    def _make_spares(self) -> None:
        """The spare-maker thread: keeps `spares` empty data files ready for `create`. A file
        not taken yet is in no journal line: `recover` deletes it after a crash."""
        while True:
            with self._spare_wanted:
                while not self._to_empty and len(self._spares) >= self.spares:
                    self._spare_wanted.wait()
                emptied = self._to_empty.popleft() if self._to_empty else None
            if emptied is not None:  # a stored file's data file, recycled (`remove`)
                sid, fd = emptied
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                else:
                    with self._spare_wanted:
                        if len(self._spares) < RECYCLED_MAX:
                            self._spares.append((sid, fd))
                            continue
                os.close(fd)
                (self.directory / f"{sid}.data").unlink(missing_ok=True)
                continue
            sid = secrets.token_hex(8)
            try:
                fd = os.open(self.directory / f"{sid}.data", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError:  # a full disk, a removed folder: `create` makes its own meanwhile
                with self._spare_wanted:
                    self._spare_wanted.wait(1.0)
                continue
            self._spares.append((sid, fd))

    def start_spares(self) -> None:
        """Starts the spare-maker thread (once; `recover` calls it, after deleting the last
        instance's spares, so a burst of creates finds spares ready)."""
        with self._spare_wanted:
            if self.spares and self._spare_thread is None:
                self._spare_thread = threading.Thread(target=self._make_spares, name="staging-spares", daemon=True)
                self._spare_thread.start()

    def _take_spare(self) -> tuple[str, int] | None:
        if not self.spares:
            return None
        self.start_spares()
        with self._spare_wanted:
            self._spare_wanted.notify()
            while self._spares:
                sid, fd = self._spares.popleft()
                if os.fstat(fd).st_nlink:
                    return sid, fd
                os.close(fd)  # deleted meanwhile (another instance's recover): not usable
        return None

    def create(self, key: str, base_etag: str | None, base_size: int | None = None, *, dirty: bool = False) -> StagedFile:
        """A new staged file for `key`, empty. `dirty`: a new file, to be stored even if nothing
        is written to it (recorded with the file, one metadata write)."""
        spare = self._take_spare()
        if spare is not None:
            sid, fd = spare
            data = self.directory / f"{sid}.data"
        else:
            sid = secrets.token_hex(8)
            data = self.directory / f"{sid}.data"
            fd = _disk_call(os.open, data, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        f = StagedFile(sid, key, base_etag, data, fd, base_size=base_size,
                       changed=[] if base_etag is not None else None, dirty=dirty)
        if dirty:
            f.generation += 1
        self._write_meta(f)
        self.by_key[key] = f
        return f

    def mark(self, f: StagedFile, *, dirty: bool | None = None, state: str | None = None, base_etag: Any = ...,
             committed: bool | None = None, base_size: Any = ..., changed: Any = ...) -> None:
        if dirty is not None:
            f.dirty = dirty
        if state is not None:
            f.state = state
        if base_etag is not ...:
            f.base_etag = base_etag
        if base_size is not ...:
            f.base_size = base_size
        if changed is not ...:
            f.changed = changed
        if committed is not None:
            f.committed = committed
        self._write_meta(f)

    def write(self, f: StagedFile, offset: int, data: bytes) -> int:
        """Writes into the staged file. A write that fails (the staging area or its disk full, an
        I/O error) leaves a hole: the file is `incomplete` and never published by a close until a
        later write covers the hole, a truncate cuts it off, or `publish` is asked for."""
        end = offset + len(data)
        try:
            if end > f.size and self.used + (end - f.size) > self.limit:
                raise StagingFull(f.key)
            n = _disk_call(os.pwrite, f.fd, data, offset)
        except (StagingFull, OSError) as exc:
            f.holes = _add_range(f.holes, offset, end) or [[offset, end]]
            f.last_error = f"a write of {len(data)} bytes at offset {offset} failed ({getattr(exc, 'strerror', None) or 'the staging area is full'}); not published"
            self._changed(f)
            raise
        f.changed = _add_range(f.changed, offset, offset + n)
        if f.holes:
            f.holes = _cut_range(f.holes, offset, offset + n)
            if not f.holes:
                f.last_error = None
        self.by_key.resize(f, max(f.size, offset + n))
        self._changed(f)
        return n

    def truncate(self, f: StagedFile, size: int) -> None:
        if size > f.size and self.used + (size - f.size) > self.limit:
            raise StagingFull(f.key)
        _disk_call(os.ftruncate, f.fd, size)
        if size > f.size:  # the new tail reads as zeros: changed
            f.changed = _add_range(f.changed, f.size, size)
        if f.holes:
            f.holes = _cut_range(f.holes, size, max(size, max(hi for _, hi in f.holes)))
            if not f.holes:
                f.last_error = None
        self.by_key.resize(f, size)
        self._changed(f)

    def _changed(self, f: StagedFile) -> None:
        f.generation += 1
        state = "incomplete" if f.holes else "dirty"
        if not f.dirty or f.state != state or f.committed:
            f.dirty, f.state, f.committed = True, state, False
            self._write_meta(f)

    def read(self, f: StagedFile, offset: int, size: int) -> bytes:
        return os.pread(f.fd, size, offset)

    def rekey(self, f: StagedFile, new_key: str, *, base_etag: str | None = None, base_size: int | None = None,
              changed: list[list[int]] | None = None) -> None:
        """The file was renamed in the mount: it will be stored under `new_key`, based on the
        version of `new_key` given (by default none: stored whole, the name must be free)."""
        self.by_key.pop(f.key, None)
        f.key = new_key
        f.base_etag, f.base_size, f.changed = base_etag, base_size, changed
        self.by_key[new_key] = f
        self._write_meta(f)

    def orphan(self, f: StagedFile) -> None:
        """`f`'s name was unlinked while handles have it open: as on a local disk, they go on
        reading and writing it (a program's unlinked temporary file; sqlite's `-shm` file, whose
        shared mapping the kernel writes back after sqlite deleted it). It is no longer any
        key's file: never stored, gone with its last handle (`remove`), and a crash forgets it."""
        if self.by_key.get(f.key) is f:
            del self.by_key[f.key]
        self._append({"id": f.id, "removed": True})
        f.orphan = True

    def remove(self, f: StagedFile, *, recycle: bool = False) -> None:
        """Drops `f`. `recycle`: no handle has it open any more, so its data file, emptied,
        becomes a spare for the next `create` instead of an unlink now and a creation then (an
        inode allocation costs up to a millisecond on a busy ext4). The journal says it is
        removed either way: after a crash, `recover` deletes it as an unused spare."""
        if self.by_key.get(f.key) is f:
            del self.by_key[f.key]
        self._append({"id": f.id, "removed": True})
        fd, f.fd = f.fd, -1  # whoever still holds `f` gets EBADF, never another file's bytes
        if recycle and self.spares and fd >= 0:
            with self._spare_wanted:  # emptied by the spare thread (a truncate costs ~0.2 ms here)
                self._to_empty.append((f.id, fd))
                self._spare_wanted.notify()
            return
        try:
            os.close(fd)
        except OSError:
            pass
        f.data_path.unlink(missing_ok=True)

    def recover(self, *, keep_incomplete_s: float = 7 * 86400) -> list[StagedFile]:
        """Staged files left by a previous run (a crash, or a shutdown that ran out of time).
        A file its writer had committed is `dirty` (uploaded by the writer); one it had not is
        `incomplete` (kept `keep_incomplete_s` seconds for a person to decide, never published
        by itself)."""
        docs: dict[str, dict[str, Any]] = {}
        try:
            with open(self.journal_path, "rb") as j:
                for line in j:
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                        sid = doc["id"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line
                    if doc.get("removed"):
                        docs.pop(sid, None)
                    else:
                        docs[sid] = doc
        except FileNotFoundError:
            pass
        found = []
        for sid, doc in docs.items():
            data = self.directory / f"{sid}.data"
            try:
                key = doc["key"]
            except (KeyError, TypeError):
                continue
            if not isinstance(key, str) or not data.exists():
                continue
            fd = os.open(data, os.O_RDWR)
            f = StagedFile(sid, key, doc.get("base_etag"), data, fd, size=os.fstat(fd).st_size,
                           dirty=doc.get("dirty", True), state=doc.get("state", "dirty"), committed=bool(doc.get("committed")),
                           base_size=doc.get("base_size"), changed=doc.get("changed"), created=float(doc.get("created") or time.time()),
                           mtime=Mtime(doc["mtime_ns"]) if isinstance(doc.get("mtime_ns"), int) else doc.get("mtime"))
            if not f.dirty and f.state not in ("conflict", "incomplete"):
                self.remove(f)
                continue
            if f.state == "dirty" and not f.committed:
                f.state = "incomplete"
            if f.state == "incomplete" and time.time() - f.created > keep_incomplete_s:
                self.remove(f)
                continue
            if key in self.by_key:  # two copies of one key: keep the newer
                other = self.by_key[key]
                older, f = (f, other) if f.created <= other.created else (other, f)
                self.remove(older)
                found = [x for x in found if x is not older]
            self.by_key[key] = f
            found.append(f)
        self.compact()  # the journal is now what by_key holds (incomplete states included)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        live = {f.id for f in found}
        for data in self.directory.glob("*.data"):
            if data.stem not in live:
                data.unlink(missing_ok=True)  # a spare never taken, or the data of a removed file
        self.start_spares()
        return found

    def pending(self) -> list[StagedFile]:
        return [f for f in self.by_key.values() if f.dirty or f.state in ("conflict", "incomplete")]


def _disk_call(fn, *args):  # type: ignore[no-untyped-def]
    """A write to the staging disk; a full disk is StagingFull (ENOSPC), like the byte limit."""
    try:
        return fn(*args)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StagingFull(str(exc)) from None
        raise
