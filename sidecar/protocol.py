"""What the daemon and its children (mount worker, copy worker, placeholder) say to each other,
typed, with the one encoding of it.

The daemon writes the child's configuration (`WorkerConfig` or `PlaceholderConfig`) as the first
JSON line of its stdin (credentials included: they never appear on a command line or in an
environment). Every later stdin line is a `Command` ({"cmd": name, ...fields}); the child
answers on stdout with `Event`s ({"event": name, ...fields}), one a line. A command that expects
an answer names its event (`Command.answer`).

Defaults live here once (the block size, the staging limit, ...): the daemon's flags, the
manifest and the worker all read them from this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict, TypeVar

BLOCK_SIZE = 1 << 20  # the cache's unit: small, so a short read never pulls megabytes
FETCH_SIZE = 8 << 20  # bytes per ranged GET of a sequential reader
MAX_FETCHES = 16  # ranged GETs in flight per mount
MEMORY_LIMIT = 256 << 20
READAHEAD = 128 << 20
DISK_LIMIT = 10 << 30
STAGING_LIMIT = 50 << 30
DEADLINE = 30.0
METADATA_TTL = 5.0  # writable mounts: another writer's change is seen within seconds
METADATA_TTL_READONLY = 300.0  # read-only mounts: data that rarely changes, cached long
GRACE_PERIOD = 20.0
KERNEL_READAHEAD_KB = 8192
SHARED_CACHE_LIMIT = 10 << 30  # bytes of the node's shared cache, all sidecars together
INCOMPLETE_KEEP_DAYS = 7.0
COPY_LIMIT = 10 << 30
WRITEBACK_DELAY = 2.0  # s a closed file rests before its write-back upload
CHECK_DEADLINE = 10.0  # s for the pre-flight check of one storage
CREDENTIALS_WAIT = 0.0  # s /ready waits for credentials or a skip (0: it does not wait)


REOPENS_TO_SWITCH = 256  # zero_message_opens "auto": files opened again before the kernel is told to open alone


@dataclass
class CacheConfig:
    """How every mount reads and caches: the daemon's flags, passed whole to each worker."""

    cache_dir: str | None = None  # the disk tier and staging area (None: memory only; staging in the default place)
    block_size: int = BLOCK_SIZE
    fetch_size: int = FETCH_SIZE
    max_fetches: int = MAX_FETCHES
    memory_limit: int = MEMORY_LIMIT
    readahead: int = READAHEAD
    disk_limit: int = DISK_LIMIT
    staging_limit: int = STAGING_LIMIT
    kernel_readahead_kb: int = KERNEL_READAHEAD_KB
    shared_cache_dir: str | None = None  # the node's shared block cache (sidecar.cache.shared); None: none
    shared_cache_limit: int = SHARED_CACHE_LIMIT

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "CacheConfig":
        return _from_dict(cls, doc, "cache")


@dataclass
class MountOptions:
    """One mount's own settings: the manifest's mount (sidecar.manifest.StorageMount) by name,
    passed whole to its worker."""

    source_path: str = ""
    write_mode: str = "durable"
    writeback_delay: float = WRITEBACK_DELAY
    mtime_source: str = "listing"
    mode: str = "mount"  # or "copy": downloaded into the mount path as ordinary files
    copy_limit: int = COPY_LIMIT
    prefetch: list[str] = field(default_factory=list)  # folders/files to warm the disk cache with at start
    ttl: float = METADATA_TTL
    deadline: float = DEADLINE
    kernel_readahead_kb: int | None = None  # None: the daemon's (CacheConfig)
    passthrough: bool = True  # the kernel reads files whole in the disk cache itself (sidecar.passthrough)
    # A read-only mount's opens made by the kernel alone (FuseOps.open_without_requests); "auto":
    # once REOPENS_TO_SWITCH files were opened again (FuseOps.switch_after_reopens).
    zero_message_opens: bool | str = False

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "MountOptions":
        return _from_dict(cls, doc, "mount")


@dataclass
class WorkerConfig:
    name: str
    storage_id: str
    url: str
    mountpath: str
    root: str | None = None  # the project root: the mount path is checked against it at mount time
    mount_helper: str | None = None  # socket of a privileged mount helper (fd passing): no privilege here
    options: dict[str, Any] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    readonly: bool = True
    mount: MountOptions = field(default_factory=MountOptions)
    cache: CacheConfig = field(default_factory=CacheConfig)
    incomplete_keep_days: float = INCOMPLETE_KEEP_DAYS
    uid: int | None = None
    gid: int | None = None
    allow_other: bool = False
    log_level: str = "info"
    log: str | None = None  # tests: where the test harness sends the worker's stderr
    grace_period: float = GRACE_PERIOD
    # The pre-flight check, in the worker with the client it mounts with: it reports `checked`
    # (or an error with the check's code) and mounts once the daemon answers `mount`.
    preflight: bool = False
    write_probe: bool = True
    check_deadline: float = CHECK_DEADLINE

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "WorkerConfig":
        cfg = _from_dict(cls, doc, "worker")
        if not isinstance(cfg.cache, CacheConfig):
            cfg.cache = CacheConfig.from_dict(cfg.cache if isinstance(cfg.cache, dict) else {})
        if not isinstance(cfg.mount, MountOptions):
            cfg.mount = MountOptions.from_dict(cfg.mount if isinstance(cfg.mount, dict) else {})
        return cfg

    def to_line(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self)) + "\n").encode()


class WorkerStats(TypedDict, total=False):
    """The `stats` event a worker answers (JSON): what status, metrics and the CLI read."""

    store: dict[str, int | float]  # StoreStats fields, plus stalled_calls
    cache: dict[str, int]  # CacheStats fields
    memory_bytes: int
    link: dict[str, float]  # the mount's estimate of a request's round trip and one connection's bandwidth (rtt_ms, bandwidth_mbps, samples)
    disk: dict[str, int] | None  # used, limit, configured_limit, blocks (of them `writing`: not written yet), corrupt, evictions, errors
    shared: dict[str, int] | None  # the node's shared cache: SharedBlocks.as_dict(); None without one
    errors: dict[str, int]  # FUSE requests answered with an error, by reason
    requests: dict[str, int]  # FUSE requests served, by operation
    bytes_read: int  # bytes answered to the kernel's reads (FUSE READ; reads passed through are the kernel's own)
    passthrough: dict[str, Any] | None  # OpenFiles.as_dict(): state, opens, open, served; None when off
    zero_message_opens: dict[str, Any] | None  # state ("on", "auto: ..." or why not), readers; None unless asked for
    inodes: int
    handles: int  # file and folder handles open
    write_mode: str | None
    unsynced: dict[str, int] | None  # files, bytes, queued, incomplete, conflicts, old_names (renamed-away names whose delete waits)
    staged: list[dict[str, Any]]  # StagedFile.public() of each pending file
    prefetch: dict[str, Any] | None  # PrefetchProgress.public()
    copy: dict[str, Any] | None  # copy mode: CopyProgress.public() and `refused`


@dataclass
class PlaceholderConfig:
    """A placeholder's configuration: it holds a mount path while no worker serves it
    (sidecar.placeholder), showing `message` in its one file."""

    name: str
    mountpath: str
    root: str | None = None
    mount_helper: str | None = None
    allow_other: bool = False
    log_level: str = "info"
    message: str = ""
    preflight: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "PlaceholderConfig":
        return _from_dict(cls, doc, "placeholder")

    def to_line(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self)) + "\n").encode()


def _from_dict(cls: Any, doc: dict[str, Any], what: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(sorted(unknown))}")
    return cls(**doc)


# -- messages ---------------------------------------------------------------------------------

class ProtocolError(ValueError):
    """A line that is not a message of this protocol (names what is wrong, never the line)."""


class Message:
    name: ClassVar[str]

    def encode(self) -> bytes:
        key = "cmd" if isinstance(self, Command) else "event"
        return (json.dumps({key: self.name, **self.fields()}) + "\n").encode()

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


class Command(Message):
    answer: ClassVar[str | None] = None  # the event that answers it


class Event(Message):
    pass


@dataclass(frozen=True)
class Stats(Command):
    name = "stats"
    answer = "stats"


@dataclass(frozen=True)
class Stop(Command):
    name = "stop"


@dataclass(frozen=True)
class Mount(Command):
    """After `Checked`: the daemon has prepared the mount path; mount now."""

    name = "mount"


@dataclass(frozen=True)
class Publish(Command):
    name = "publish"
    answer = "published"
    key: str = ""


@dataclass(frozen=True)
class Refresh(Command):
    name = "refresh"
    answer = "refreshed"
    path: str = ""


@dataclass(frozen=True)
class Prefetch(Command):
    name = "prefetch"
    answer = "prefetch"
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class RescueUpload(Command):
    name = "rescue_upload"
    answer = "rescue_uploaded"
    folder: str = ""


@dataclass(frozen=True)
class Push(Command):
    """Copy mode: store the local changes."""

    name = "push"
    answer = "pushed"


@dataclass(frozen=True)
class ShowMessage(Command):
    """Placeholder: the text its file shows from now on."""

    name = "message"
    text: str = ""


@dataclass(frozen=True)
class Mounted(Event):
    name = "mounted"
    mountpath: str = ""


@dataclass(frozen=True)
class Copying(Event):
    name = "copying"
    mountpath: str = ""


@dataclass(frozen=True)
class Checked(Event):
    """The pre-flight check passed; the worker waits for `Mount`."""

    name = "checked"


@dataclass(frozen=True)
class Failed(Event):
    name = "error"
    code: str = "internal"
    reason: str = ""

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "reason": self.reason}


@dataclass(frozen=True)
class StatsReport(Event):
    name = "stats"
    stats: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return dict(self.stats)


@dataclass(frozen=True)
class Published(Event):
    name = "published"
    key: str = ""
    ok: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class Refreshed(Event):
    name = "refreshed"
    path: str = ""
    entries: int = 0


@dataclass(frozen=True)
class PrefetchStarted(Event):
    name = "prefetch"
    ok: bool = False
    files: int | None = None
    bytes: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RescueUploaded(Event):
    name = "rescue_uploaded"
    uploaded: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pushed(Event):
    name = "pushed"
    ok: bool = False
    reason: str | None = None
    pushed: list[str] | None = None
    failed: list[str] | None = None


COMMANDS: dict[str, type[Command]] = {c.name: c for c in (Stats, Stop, Mount, Publish, Refresh, Prefetch, RescueUpload, Push, ShowMessage)}
EVENTS: dict[str, type[Event]] = {e.name: e for e in (Mounted, Copying, Checked, Failed, StatsReport, Published, Refreshed, PrefetchStarted,
                                                      RescueUploaded, Pushed)}
M = TypeVar("M", bound=Message)


def _decode(line: bytes | str, key: str, kinds: dict[str, type[M]]) -> M:
    try:
        doc = json.loads(line)
    except ValueError:
        raise ProtocolError("not a JSON line") from None
    if not isinstance(doc, dict) or doc.get(key) not in kinds:
        raise ProtocolError(f"no known {key!r} in the line")
    kind = kinds[doc.pop(key)]
    if kind is StatsReport:
        return StatsReport(stats=doc)  # type: ignore[return-value]
    names = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    if set(doc) - set(names):
        raise ProtocolError(f"{kind.name}: unknown field(s) {', '.join(sorted(set(doc) - set(names)))}")
    if "paths" in doc:
        if not isinstance(doc["paths"], list) or not all(isinstance(p, str) for p in doc["paths"]):
            raise ProtocolError(f"{kind.name}: paths must be a list of text")
        doc["paths"] = tuple(doc["paths"])
    for fname in ("key", "path", "folder", "text", "code", "reason", "mountpath"):
        if fname in doc and not isinstance(doc[fname], str) and not (fname == "reason" and doc[fname] is None):
            raise ProtocolError(f"{kind.name}: {fname} must be text")
    return kind(**doc)


def decode_command(line: bytes | str) -> Command:
    return _decode(line, "cmd", COMMANDS)


def decode_event(line: bytes | str) -> Event:
    return _decode(line, "event", EVENTS)
