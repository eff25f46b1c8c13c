"""The staging area: local copies of files being written, until their object is stored.

Each staged file is two files in the staging directory:
  <id>.data   the file's bytes, written in place (pwrite) by the FUSE write handler;
  <id>.json   its metadata: object key, the etag it was based on (None for a new file), state.
The metadata is written to a temp file and renamed, so a crash leaves either the old or the new
version. States: `dirty` (has bytes the bucket does not), `conflict` (the object changed remotely
since the file was staged; the local copy is kept and reported, never uploaded over the newer
object). A file whose upload succeeded is removed from staging.

Invariants:
- a key has at most one StagedFile at a time (`by_key`), shared by every handle writing it;
- `dirty` is set by every write/truncate and cleared only by an upload that started after the
  last write (`generation` tells them apart), so a write racing an upload is never lost;
- the byte limit (`limit`) counts the sizes of all staged files; a write that would pass it fails
  with ENOSPC rather than filling the disk.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StagingFull(Exception):
    pass


@dataclass
class StagedFile:
    id: str
    key: str
    base_etag: str | None
    data_path: Path
    meta_path: Path
    fd: int
    size: int = 0
    dirty: bool = False
    state: str = "dirty"
    generation: int = 0  # bumped by every change; an upload records the generation it stored
    handles: int = 0
    last_error: str | None = None
    upload_failures: int = 0
    uploading: Any = None  # a trio.Event while an upload runs

    def public(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "state": self.state if self.dirty or self.state == "conflict" else "clean",
                "last_error": self.last_error, "local_path": str(self.data_path)}


@dataclass
class StagingArea:
    directory: Path
    limit: int = 50 << 30
    by_key: dict[str, StagedFile] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def used(self) -> int:
        return sum(f.size for f in self.by_key.values())

    def _write_meta(self, f: StagedFile) -> None:
        tmp = f.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": f.key, "base_etag": f.base_etag, "state": f.state, "dirty": f.dirty}))
        os.replace(tmp, f.meta_path)

    def create(self, key: str, base_etag: str | None) -> StagedFile:
        sid = secrets.token_hex(8)
        data = self.directory / f"{sid}.data"
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        f = StagedFile(sid, key, base_etag, data, self.directory / f"{sid}.json", fd)
        self._write_meta(f)
        self.by_key[key] = f
        return f

    def mark(self, f: StagedFile, *, dirty: bool | None = None, state: str | None = None, base_etag: Any = ...) -> None:
        if dirty is not None:
            f.dirty = dirty
        if state is not None:
            f.state = state
        if base_etag is not ...:
            f.base_etag = base_etag
        self._write_meta(f)

    def write(self, f: StagedFile, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > f.size and self.used + (end - f.size) > self.limit:
            raise StagingFull(f.key)
        n = os.pwrite(f.fd, data, offset)
        f.size = max(f.size, offset + n)
        self._changed(f)
        return n

    def truncate(self, f: StagedFile, size: int) -> None:
        if size > f.size and self.used + (size - f.size) > self.limit:
            raise StagingFull(f.key)
        os.ftruncate(f.fd, size)
        f.size = size
        self._changed(f)

    def _changed(self, f: StagedFile) -> None:
        f.generation += 1
        if not f.dirty or f.state != "dirty":
            f.dirty, f.state = True, "dirty"
            self._write_meta(f)

    def read(self, f: StagedFile, offset: int, size: int) -> bytes:
        return os.pread(f.fd, size, offset)

    def rekey(self, f: StagedFile, new_key: str) -> None:
        """The file was renamed in the mount: it will be stored under `new_key`."""
        self.by_key.pop(f.key, None)
        f.key = new_key
        f.base_etag = None
        self.by_key[new_key] = f
        self._write_meta(f)

    def remove(self, f: StagedFile) -> None:
        if self.by_key.get(f.key) is f:
            del self.by_key[f.key]
        try:
            os.close(f.fd)
        except OSError:
            pass
        f.data_path.unlink(missing_ok=True)
        f.meta_path.unlink(missing_ok=True)

    def recover(self) -> list[StagedFile]:
        """Staged files left by a previous run (a crash, or a shutdown that ran out of time)."""
        found = []
        for meta in sorted(self.directory.glob("*.json")):
            data = meta.with_suffix(".data")
            try:
                doc = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if not data.exists():
                meta.unlink(missing_ok=True)
                continue
            fd = os.open(data, os.O_RDWR)
            f = StagedFile(meta.stem, doc["key"], doc.get("base_etag"), data, meta, fd, size=os.fstat(fd).st_size,
                           dirty=doc.get("dirty", True), state=doc.get("state", "dirty"))
            if not f.dirty and f.state != "conflict":
                self.remove(f)
                continue
            self.by_key[f.key] = f
            found.append(f)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        return found

    def pending(self) -> list[StagedFile]:
        return [f for f in self.by_key.values() if f.dirty or f.state == "conflict"]
