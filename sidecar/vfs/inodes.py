"""The inode table: which inode stands for which object version, and who still holds it.

Invariants:
- an inode stands for one *version* of a key: a file whose etag changed remotely gets a new inode
  (`for_entry`), and the old one is `superseded`: it keeps its key, size and etag for the handles
  that still read it, and is dropped normally. The kernel caches pages per inode, so a reader of
  the old version can never receive pages a reader of the new version loaded.
- `current(key)` is the newest inode of a key (at most one); superseded inodes are in no index;
- an inode is held by the kernel (`lookups`: +1 per lookup reply or accepted readdirplus entry,
  -n per forget) and by the file system itself (`pins`: open file handles and open directory
  snapshots). It is dropped only when both are zero (the root never is), so no reply can name an
  inode the table no longer knows.
Single-threaded: used from the trio thread only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.errors import NotFound

if TYPE_CHECKING:
    from sidecar.store.base import ObjectInfo
    from sidecar.vfs.staging import StagedFile

ROOT_INO = 1


@dataclass(eq=False)
class Node:
    ino: int
    key: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str = ""
    lookups: int = 0
    pins: int = 0
    checked_at: float = float("-inf")  # trio time of the last listing/HEAD that confirmed it
    superseded: bool = False  # a newer version of the key has its own inode now
    last_open_etag: str | None = None
    staged: "StagedFile | None" = None  # local bytes being written; the truth for reads meanwhile


class InodeTable:
    def __init__(self, root_key: str) -> None:
        self.root = Node(ROOT_INO, root_key, True, lookups=1)
        self._nodes: dict[int, Node] = {ROOT_INO: self.root}
        self._by_key: dict[str, Node] = {root_key: self.root}
        self._next_ino = itertools.count(ROOT_INO + 1)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, ino: int) -> bool:
        return ino in self._nodes

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino}") from None

    def current(self, key: str) -> Node | None:
        return self._by_key.get(key)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def for_entry(self, key: str, is_dir: bool, info: "ObjectInfo | None", now: float) -> Node:
        """The current inode of `key` as a listing or HEAD just saw it: a new inode when there
        was none, when the type changed, or when the object is another version than the one
        the current inode stands for (and nothing local is being written to it)."""
        node = self._by_key.get(key)
        if node is not None and (
            node.is_dir != is_dir
            or (info is not None and node.staged is None and node.etag and info.etag != node.etag)
        ):
            self.supersede(node)
            node = None
        if node is None:
            node = Node(next(self._next_ino), key, is_dir)
            self._nodes[node.ino] = node
            self._by_key[key] = node
        if info is not None and node.staged is None:
            node.size, node.mtime, node.etag = info.size, info.mtime, info.etag
        node.checked_at = now
        return node

    def supersede(self, node: Node) -> None:
        """`node` no longer stands for its key's current version (replaced, deleted, renamed
        over); it lives on, unindexed, while the kernel or a handle holds it."""
        if node.ino == ROOT_INO:
            return
        node.superseded = True
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        self._drop_if_unused(node)

    def remember(self, ino: int, n: int = 1) -> None:
        self.get(ino).lookups += n

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= n
        self._drop_if_unused(node)

    def pin(self, node: Node) -> None:
        node.pins += 1

    def unpin(self, node: Node) -> None:
        node.pins -= 1
        self._drop_if_unused(node)

    def _drop_if_unused(self, node: Node) -> None:
        if node.ino == ROOT_INO or node.lookups > 0 or node.pins > 0 or node.staged is not None:
            return
        self._nodes.pop(node.ino, None)
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]

    def release_unused(self, node: Node) -> None:
        """Drops `node` if nothing holds it any more (e.g. after its staged file went away)."""
        self._drop_if_unused(node)

    def move(self, node: Node, new_key: str) -> None:
        """`node` is now `new_key` (rename); whatever stood there before is superseded."""
        old = self._by_key.get(new_key)
        if old is not None and old is not node:
            self.supersede(old)
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = new_key
        node.superseded = False
        self._by_key[new_key] = node

    def under(self, prefix: str) -> list[Node]:
        """Current inodes strictly below the folder `prefix`."""
        base = prefix + "/"
        return [n for k, n in self._by_key.items() if k.startswith(base)]
