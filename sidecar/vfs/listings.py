"""Folder listings and "does not exist" answers, cached for the mount's metadata TTL.

A folder's listing is the names directly in it, each a folder or an object (size, etag, mtime),
after skipping the names no program could use: empty segments ("a//b"), "." and "..", names over
255 bytes, and names with control characters (a newline or a NUL byte in a key: listed, they
would be ENOENT or a duplicate of a truncated name). Each skipped key is logged once.

All times are `trio.current_time()`; used from the trio thread only.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from sidecar.log import get_logger
from sidecar.store.base import Listing, ObjectInfo

log = get_logger(__name__)

NAME_MAX = 255
OWN_MAX = 10_000  # own changes remembered before the expired ones are dropped
# Kept at most (a long session looks up millions of names, walks thousands of folders): beyond,
# the expired ones go, then the oldest. Forgetting one costs a request when it is asked again.
NEGATIVE_MAX = 100_000  # "does not exist" answers
FOLDERS_MAX = 20_000  # folder listings


@dataclass
class Entry:
    is_dir: bool
    info: ObjectInfo | None  # None for folders


@dataclass
class _Dir:
    entries: dict[str, Entry]
    expires: float


def unusable_name(name: str) -> str | None:
    """Why `name` cannot be a file name in the mount, or None if it can."""
    if name == "" or "/" in name:
        return "empty path segment ('//' in the key)"
    if name in (".", ".."):
        return "'.' or '..' as a path segment"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "a control character (newline, tab, NUL, ...) in the name"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return f"name longer than {NAME_MAX} bytes"
    return None


PROBE_PREFIX = ".storage-sidecar-write-probe-"  # sidecar.store.classify.probe_name

class Listings:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._dirs: dict[str, _Dir] = {}
        self._negative: dict[str, float] = {}  # key -> expiry of a cached "does not exist"
        self._warned: set[str] = set()
        # This mount's own changes (a name created, stored, removed) of the last `ttl` seconds:
        # a listing asked for before one of them completed may come back without it, and must
        # not undo it while it is cached (git in write-back mode lost sight of objects it had
        # just renamed into place). Folder -> name -> (when, entry; None if removed).
        self._own: dict[str, dict[str, tuple[float, Entry | None]]] = {}
        self._own_count = 0

    # -- folders ------------------------------------------------------------------------------

    def fresh(self, prefix: str, now: float) -> dict[str, Entry] | None:
        cached = self._dirs.get(prefix)
        return cached.entries if cached is not None and cached.expires > now else None

    def store(self, prefix: str, entries: dict[str, Entry], now: float) -> None:
        """Caches a folder's listing, with this mount's own recent changes in it replayed."""
        for name, (when, entry) in self._own.get(prefix, {}).items():
            if when <= now - self.ttl:
                continue
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        self._dirs.pop(prefix, None)  # (re)inserted last: the dict is oldest first
        self._dirs[prefix] = _Dir(entries, now + self.ttl)
        _bounded(self._dirs, FOLDERS_MAX, lambda d: d.expires <= now)

    def _note_own(self, key: str, when: float, entry: Entry | None) -> None:
        names = self._own.setdefault(parent_key(key), {})
        name = key.rpartition("/")[2]
        self._own_count += name not in names
        names[name] = (when, entry)
        if self._own_count > OWN_MAX:  # the expired ones go
            self._own = {folder: kept for folder, names in self._own.items()
                         if (kept := {n: v for n, v in names.items() if v[0] > when - self.ttl})}
            self._own_count = sum(map(len, self._own.values()))

    def forget(self, prefix: str) -> None:
        self._dirs.pop(prefix, None)

    def forget_parent(self, key: str) -> None:
        self._dirs.pop(parent_key(key), None)

    def forget_tree(self, prefix: str) -> None:
        for key in [k for k in self._dirs if k == prefix or k.startswith(prefix + "/")]:
            del self._dirs[key]

    def add(self, key: str, entry: Entry) -> None:
        """A name this mount just created, visible at once in a cached listing of its folder."""
        cached = self._dirs.get(parent_key(key))
        if cached is not None:
            cached.entries[key.rpartition("/")[2]] = entry
        self._negative.pop(key, None)
        self._note_own(key, trio.current_time(), entry)

    def remove(self, key: str, now: float) -> None:
        """A name this mount just removed: gone from its folder's listing, and known absent."""
        cached = self._dirs.get(parent_key(key))
        if cached is not None:
            cached.entries.pop(key.rpartition("/")[2], None)
        self.set_absent(key, now)
        self._note_own(key, now, None)

    # -- names known not to exist -------------------------------------------------------------

    def absent(self, key: str, now: float) -> bool:
        return self._negative.get(key, float("-inf")) > now

    def set_absent(self, key: str, now: float) -> None:
        self._negative.pop(key, None)
        self._negative[key] = now + self.ttl
        _bounded(self._negative, NEGATIVE_MAX, lambda expires: expires <= now)

    def clear_absent(self, key: str) -> None:
        self._negative.pop(key, None)

    def forget_absent_under(self, prefix: str, now: float) -> list[str]:
        """A refresh: the "does not exist" answers and own recent changes at and below `prefix`
        are forgotten, and the next listing is the bucket's word. Returns the keys of the
        answers still in force (the kernel may hold them too)."""

        def under(key: str) -> bool:
            return not prefix or key == prefix or key.startswith(prefix + "/")

        in_force = [k for k, expires in self._negative.items() if under(k) and expires > now]
        for key in [k for k in self._negative if under(k)]:
            del self._negative[key]
        for folder in [f for f in self._own if under(f)]:
            self._own_count -= len(self._own.pop(folder))
        if prefix and (names := self._own.get(parent_key(prefix))):
            self._own_count -= names.pop(prefix.rpartition("/")[2], None) is not None
        return in_force

    # -- listing -> entries -------------------------------------------------------------------

    def _usable(self, name: str, key: str) -> bool:
        if name.startswith(PROBE_PREFIX):
            return False  # another mount's pre-flight probe, there for a moment: never user data
        reason = unusable_name(name)
        if reason is not None and key not in self._warned:
            self._warned.add(key)
            log.warning("object_skipped", key=key, reason=reason)
        return reason is None

    def entries_of(self, prefix: str, listing: Listing) -> dict[str, Entry]:
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, Entry] = {}
        for d in listing.dirs:
            name = d[len(base) :]
            if self._usable(name, d + "/"):
                entries[name] = Entry(True, None)
        for marker in listing.markers:
            # "folder/sub/" listed inside "folder/" is a folder that may hold nothing else.
            name = marker[len(base) :].rstrip("/")
            if name and self._usable(name, marker):
                entries.setdefault(name, Entry(True, None))
        for info in listing.files:
            name = info.key[len(base) :]
            if not self._usable(name, info.key):
                continue
            if name in entries:
                if info.key not in self._warned:
                    self._warned.add(info.key)
                    log.warning("object_skipped", key=info.key, reason="an object with the same name as a folder (the folder is shown)")
                continue
            entries[name] = Entry(False, info)
        return entries


def _bounded(d: dict[str, Any], limit: int, expired: Callable[[Any], bool]) -> None:
    """Keeps `d` (oldest first) within `limit`: the expired entries go, then the oldest, down to
    9/10 of the limit, so a walk over it comes once per limit/10 insertions at most."""
    if len(d) <= limit:
        return
    for k in [k for k, v in d.items() if expired(v)]:
        del d[k]
    for k in list(itertools.islice(d, max(0, len(d) - limit * 9 // 10))):
        del d[k]


LIST_AHEAD = 16  # sibling folders listed ahead of a walk going down a tree
SORTED_KEPT = 64  # folders whose sorted subfolder names are kept for it


class ListAhead:
    """Listings ahead of a tree walk (`os.walk`, `find`, `du`, a Dataset indexing its files):
    such a walker lists a folder, goes down into its first subfolder, then the next, one LIST
    after another. Once it went down into one, the next LIST_AHEAD subfolders of the same parent
    are the ones it will list next: they are listed ahead, in parallel. A walker that stops
    costs at most LIST_AHEAD listings it did not read; `ls` of one folder costs none."""

    def __init__(self) -> None:
        self._sorted: dict[str, tuple[dict[str, Entry], list[str]]] = {}  # parent -> (its entries, sorted folder names)

    def next_folders(self, parent: str, entries: dict[str, Entry], name: str) -> list[str]:
        """The keys of the subfolders of `parent` after `name` that a walker lists next."""
        kept = self._sorted.get(parent)
        if kept is None or kept[0] is not entries:
            kept = self._sorted[parent] = (entries, sorted(n for n, e in entries.items() if e.is_dir))
            while len(self._sorted) > SORTED_KEPT:
                self._sorted.pop(next(iter(self._sorted)))
        dirs = kept[1]
        i = bisect.bisect_right(dirs, name)
        return [f"{parent}/{d}" if parent else d for d in dirs[i : i + LIST_AHEAD]]


def parent_key(key: str) -> str:
    return key.rpartition("/")[0] if "/" in key else ""
