"""Modification times set through the mount (`touch -d`, `rsync -t`, `utime`), by object version.

Object listings carry only the server's Last-Modified; the time a user set is stored as the
object's `mtime` metadata (rclone's convention, so both tools show the same time) and here, keyed
by (key, etag), so that a listing shows it without a HEAD per object, also after a remount (the
index lives in the cache folder). A version this mount never saw shows its HEAD's `mtime`
metadata when a HEAD happens (lookups outside a listing, revalidation), else Last-Modified.
"""

from __future__ import annotations

import dbm
import os
from pathlib import Path

from sidecar.mtime import Mtime, seconds_text

MAX_ENTRIES_IN_MEMORY = 100_000


class MtimeIndex:
    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._memory: dict[str, float] = {}
        self._db = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                self._db = dbm.open(str(path), "c", 0o600)
            except OSError:
                self._db = None  # an unreadable index costs mtimes, not the mount

    @staticmethod
    def _id(key: str, etag: str) -> str:
        return f"{etag}\0{key}"

    def get(self, key: str, etag: str) -> float | None:
        if not etag:
            return None
        ident = self._id(key, etag)
        if ident in self._memory:
            return self._memory[ident]
        if self._db is not None:
            try:
                raw = self._db.get(ident.encode())
            except OSError:
                return None
            if raw is not None:
                return Mtime.parse_seconds(raw.decode()) or float(raw)
        return None

    def set(self, key: str, etag: str, mtime: float) -> None:
        if not etag:
            return
        ident = self._id(key, etag)
        if len(self._memory) >= MAX_ENTRIES_IN_MEMORY:
            self._memory.clear()
        self._memory[ident] = mtime
        if self._db is not None:
            try:
                self._db[ident.encode()] = seconds_text(mtime).encode()  # exact to the ns
            except OSError:
                pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
