"""A block cache shared by the sidecars of one node (issue 35): its storage format, its keys and
its budget: the part every sidecar of the node must agree on (sidecar.cache.blocks uses it).

Who may read what: the sessions of a node belong to different people. A block of an object
version is stored encrypted and authenticated (AES-256-GCM) under a key derived from the
version's identity (`VersionId`: provider, endpoint, bucket, key, ETag, size, mtime), which a
sidecar learns only from the listing or HEAD its own credentials were allowed to make. The file
name is a different derivation of the same identity, so the folder shows neither the key nor the
object's name. A block is bound to its place (the name, the block size and its index are the
associated data): a valid block copied over another name fails authentication. Anything that
fails (flipped bytes, a cut file, a block written by someone without the key, another version)
is `None` to the caller, who fetches the block itself; nothing here ever returns bytes that did
not authenticate. What this does not protect against is in docs/SECURITY.md.

Never wrong, never stuck: a block is written to a temporary name in the same folder and renamed
into place (a reader sees a whole block or none; a writer killed midway leaves a temporary file
that `sweep` removes once it is old). No lock is held while a block is read or written.

The budget (`limit` bytes for all sidecars together) is kept in an SQLite database in the folder
(WAL mode; SQLite's own locks coordinate the processes): each stored block is a row with its size
and when it was last used; a writer that takes the total over the limit deletes the least
recently used rows and their files in the same transaction. Hits update `used` in batches
(`touch`), so a read costs no database write.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SSSB"  # storage-sidecar shared block
FORMAT = 1
_HEAD = struct.Struct("<4sB12s")  # magic, format, nonce
TAG_SIZE = 16  # AES-GCM's authentication tag, after the ciphertext
KEY_LABEL = b"storage-sidecar shared block key v1"
NAME_LABEL = b"storage-sidecar shared block name v1"
TEMP_PREFIX = ".tmp-"
TEMP_MAX_AGE = 3600.0  # s: a temporary file this old was left by a writer that died
DB_NAME = "index.sqlite"
CLAIMS = "claims"  # a claim file per block being fetched, locked (flock) by its fetcher


@dataclass(frozen=True)
class VersionId:
    """What identifies one version of one object, as the sidecar's own listing or HEAD showed it."""

    provider: str  # "s3", "azure", "gcs", "webdav"
    endpoint: str  # the service's address (a bucket of the same name elsewhere is another)
    bucket: str
    key: str
    etag: str
    size: int
    mtime: str  # as the server reported it (an ISO date or seconds), not reinterpreted

    def canonical(self) -> bytes:
        """The fields, each length-prefixed: no two identities share an encoding."""
        out = bytearray()
        for field in (self.provider, self.endpoint, self.bucket, self.key, self.etag, str(self.size), self.mtime):
            raw = field.encode("utf-8", "surrogatepass")
            out += struct.pack("<I", len(raw)) + raw
        return bytes(out)


def block_key(version: VersionId) -> bytes:
    """The AES-256 key of a version's blocks."""
    return hmac.new(KEY_LABEL, version.canonical(), hashlib.sha256).digest()


def block_file_name(version: VersionId, block_size: int, index: int) -> str:
    """The file name of one block: a different derivation than the key (one tells nothing of the other)."""
    msg = version.canonical() + struct.pack("<QQ", block_size, index)
    return hmac.new(NAME_LABEL, msg, hashlib.sha256).hexdigest()


def _aad(name: str, block_size: int, index: int) -> bytes:
    return name.encode("ascii") + struct.pack("<QQ", block_size, index)


_buffers = threading.local()  # one file-sized buffer per thread: a new 1 MiB object per block cost more than its encryption


def _buffer(size: int) -> memoryview:
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = bytearray(size)
    return memoryview(buf)[:size]


def seal_into(version: VersionId, block_size: int, index: int, data: bytes) -> tuple[str, memoryview]:
    """(file name, file content) of block `index` of `version`; the content is this thread's
    buffer, valid until its next call."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # (only where a shared cache is used)

    name = block_file_name(version, block_size, index)
    nonce = secrets.token_bytes(12)
    out = _buffer(_HEAD.size + len(data) + TAG_SIZE)
    _HEAD.pack_into(out, 0, MAGIC, FORMAT, nonce)
    AESGCM(block_key(version)).encrypt_into(nonce, data, _aad(name, block_size, index), out[_HEAD.size :])
    return name, out


def seal(version: VersionId, block_size: int, index: int, data: bytes) -> tuple[str, bytes]:
    """(file name, file content) of block `index` of `version`."""
    name, out = seal_into(version, block_size, index, data)
    return name, bytes(out)


def unseal(version: VersionId, block_size: int, index: int, name: str, content: bytes | memoryview) -> bytes | None:
    """The block's bytes if `content` authenticates as block `index` of `version` stored under
    `name`; None otherwise (never bytes that did not)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(content) < _HEAD.size + TAG_SIZE:
        return None
    magic, fmt, nonce = _HEAD.unpack_from(content)
    if magic != MAGIC or fmt != FORMAT:
        return None
    try:
        return AESGCM(block_key(version)).decrypt(nonce, memoryview(content)[_HEAD.size :], _aad(name, block_size, index))
    except InvalidTag:
        return None


class SharedBlocks:
    """The shared folder of one node. Blocking calls (file and database I/O): call them from a
    worker thread. Safe to use from several threads and processes at once."""

    def __init__(self, directory: str | os.PathLike[str], limit: int) -> None:
        self.dir = Path(directory)
        self.limit = limit
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # files that did not authenticate (flipped, cut, foreign, another version)
        self.evictions = 0
        self.errors = 0  # calls that failed (the caller fetched instead)
        self.bytes_served = 0  # plaintext bytes of the hits
        self.stored = 0  # blocks this instance wrote
        self._touched: dict[str, float] = {}
        self._subdirs: set[str] = set()  # the two-letter folders known to exist
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CLAIMS).mkdir(exist_ok=True)
        self._db_path = self.dir / DB_NAME
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS blocks (name TEXT PRIMARY KEY, size INTEGER NOT NULL, used REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS blocks_used ON blocks (used)")
            # The folder's size as this instance last saw it (every sidecar's writes and evictions):
            # kept from the budget transactions, so reporting it costs no query.
            (self.size,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()

    def as_dict(self) -> dict[str, int]:
        """Counters for status and /metrics (this sidecar's hits; the folder's size as last seen)."""
        return {"hits": self.hits, "misses": self.misses, "bytes_served": self.bytes_served, "stored": self.stored,
                "evictions": self.evictions, "rejected": self.rejected, "errors": self.errors, "size": int(self.size), "limit": self.limit}

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._db_path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")  # an index of a cache: a crash loses rows, whose files the sweep removes
            yield db
        finally:
            db.close()

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / name

    # -- reading ---------------------------------------------------------------------------

    def get(self, version: VersionId, block_size: int, index: int) -> bytes | None:
        """Block `index` of `version`, if a sidecar stored it and it authenticates."""
        name = block_file_name(version, block_size, index)
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > _HEAD.size + block_size + TAG_SIZE:
                    content: memoryview | None = None  # (no block of this size is that long)
                else:
                    content = _buffer(size)
                    content = content[: f.readinto(content)]
        except FileNotFoundError:
            self.misses += 1
            return None
        data = unseal(version, block_size, index, name, content) if content is not None else None
        if data is None:
            self.rejected += 1
            self.misses += 1
            return None
        self.hits += 1
        self.bytes_served += len(data)
        self._touched[name] = time.time()
        return data

    def touch(self) -> None:
        """Records when the blocks read since the last call were used (one transaction)."""
        touched, self._touched = self._touched, {}
        if not touched:
            return
        with self._db() as db:
            db.executemany("UPDATE blocks SET used = ? WHERE name = ?", [(t, n) for n, t in touched.items()])

    # -- writing ---------------------------------------------------------------------------

    def put(self, version: VersionId, block_size: int, index: int, data: bytes) -> bool:
        """Stores a block for every sidecar of the node; False if it cannot fit the budget."""
        return self.put_many(version, block_size, [(index, data)]) == 1

    def put_many(self, version: VersionId, block_size: int, blocks: list[tuple[int, bytes]]) -> int:
        """Stores blocks of one version (a fetched run); one budget transaction for all of them.
        Returns how many were stored."""
        stored: list[tuple[str, int]] = []
        for index, data in blocks:
            name, content = seal_into(version, block_size, index, data)
            if len(content) > self.limit:
                continue
            path = self._path(name)
            if name[:2] not in self._subdirs:
                path.parent.mkdir(exist_ok=True)
                self._subdirs.add(name[:2])
            temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                with open(temp, "wb") as f:
                    f.write(content)
                os.replace(temp, path)  # a reader sees the whole block or none
            except OSError:
                temp.unlink(missing_ok=True)
                self._subdirs.discard(name[:2])  # (the folder may have been cleaned meanwhile)
                continue
            stored.append((name, len(content)))
        if stored:
            self._account(stored)
        return len(stored)

    # -- fetching once for all --------------------------------------------------------------

    def claim(self, version: VersionId, block_size: int, indices: list[int]) -> tuple[dict[int, int], list[int]]:
        """Claims blocks this sidecar is about to fetch, so another sidecar of the node that
        wants them waits for them to be stored instead of fetching them too: an exclusive flock
        on a claim file per block (the kernel lets go of a dead process's locks: a killed
        fetcher blocks nobody). In order, up to the first block that is stored already or
        claimed by another: ({index: lock fd} claimed, the indices from there on)."""
        mine: dict[int, int] = {}
        for n, index in enumerate(indices):
            name = block_file_name(version, block_size, index)
            fd = self._try_lock(self._claim_path(name)) if not self._path(name).exists() else None
            if fd is not None and self._path(name).exists():
                # Its fetcher stored it and let go between the look and the lock (a fetcher
                # stores before it lets go: once the lock is taken, the look is final).
                self._let_go(name, fd)
                fd = None
            if fd is None:
                return mine, indices[n:]
            mine[index] = fd
        return mine, []

    def release(self, version: VersionId, block_size: int, claimed: dict[int, int]) -> None:
        """Lets go of claims (their blocks stored, or their fetch failed)."""
        for index, fd in claimed.items():
            self._let_go(block_file_name(version, block_size, index), fd)
        claimed.clear()

    def waiting(self, version: VersionId, block_size: int, indices: list[int]) -> tuple[list[int], list[int]]:
        """For blocks another sidecar claimed: (those stored now, those neither stored nor
        claimed any more: their fetcher failed or died)."""
        stored, free = [], []
        for index in indices:
            name = block_file_name(version, block_size, index)
            if self._path(name).exists():
                stored.append(index)
            elif (fd := self._try_lock(self._claim_path(name))) is not None:
                self._let_go(name, fd)
                # Stored and let go between the look and the lock, or failed or died (then the
                # caller fetches it unclaimed).
                (stored if self._path(name).exists() else free).append(index)
        return stored, free

    def _let_go(self, name: str, fd: int) -> None:
        """Removes a claim file and lets go of its lock. (Another sidecar that opened the file
        before it was removed then takes the lock, and looks for the block again: a fetcher
        stores its block before it lets go.)"""
        try:
            self._claim_path(name).unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _claim_path(self, name: str) -> Path:
        return self.dir / CLAIMS / f"{name}.claim"

    @staticmethod
    def _try_lock(path: Path) -> int | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _account(self, stored: list[tuple[str, int]]) -> None:
        """Adds the blocks to the budget and evicts the least recently used others over it, in
        one transaction (the database's lock orders the sidecars)."""
        doomed: list[str] = []
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO blocks (name, size, used) VALUES (?, ?, ?)", [(n, size, now) for n, size in stored])
                (total,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()
                if total > self.limit:
                    # (the run's own blocks are the most recent: they go last, if they alone exceed it)
                    for old, old_size in db.execute("SELECT name, size FROM blocks ORDER BY used").fetchall():
                        doomed.append(old)
                        total -= old_size
                        if total <= self.limit:
                            break
                    db.executemany("DELETE FROM blocks WHERE name = ?", [(n,) for n in doomed])
                db.execute("COMMIT")
                self.size = total
            except BaseException:
                db.execute("ROLLBACK")
                raise
        for old in doomed:  # a reader that opened one before still reads it whole
            self._path(old).unlink(missing_ok=True)
        self.evictions += len(doomed)
        self.stored += len(stored)

    def used(self) -> int:
        with self._db() as db:
            (total,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM blocks").fetchone()
        self.size = int(total)
        return self.size

    def sweep(self, now: float | None = None) -> int:
        """Removes what writers that died left (older than TEMP_MAX_AGE): temporary files, and
        blocks renamed into place whose budget row was never written (killed in between: no
        row, so never evicted)."""
        now = time.time() if now is None else now
        removed = 0
        old_blocks: list[Path] = []
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    if now - f.stat().st_mtime <= TEMP_MAX_AGE:
                        continue
                    if f.name.startswith(TEMP_PREFIX):
                        f.unlink()
                        removed += 1
                    else:
                        old_blocks.append(f)
                except FileNotFoundError:
                    pass
        with self._db() as db:
            for i in range(0, len(old_blocks), 500):
                part = old_blocks[i : i + 500]
                rows = db.execute(f"SELECT name FROM blocks WHERE name IN ({','.join('?' * len(part))})", [f.name for f in part])
                known = {name for (name,) in rows}
                for f in part:
                    if f.name not in known:
                        f.unlink(missing_ok=True)
                        removed += 1
        return removed
