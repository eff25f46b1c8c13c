"""What the daemon and a mount's worker process say to each other, typed.

The daemon writes one `WorkerConfig` as the first JSON line of the worker's stdin (credentials
included: they never appear on a command line or in an environment). Later stdin lines are
commands: `stats`, `stop`, or a JSON object {"cmd": "publish", "key": ...}. The worker answers on
stdout with JSON events: `mounted`, `error` {code, reason}, `stats` (see `sidecar.worker`),
`published` {key, ok, reason}.

Defaults live here once (the block size, the staging limit, ...): the daemon's flags, the
manifest and the worker all read them from this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypedDict

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
KERNEL_READAHEAD_KB = 1024
INCOMPLETE_KEEP_DAYS = 7.0
COPY_LIMIT = 10 << 30
WRITEBACK_DELAY = 2.0  # s a closed file rests before its write-back upload
CHECK_DEADLINE = 10.0  # s for the pre-flight check of one storage


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
    source_path: str = ""
    readonly: bool = True
    write_mode: str = "durable"
    writeback_delay: float = WRITEBACK_DELAY
    mtime_source: str = "listing"
    mode: str = "mount"  # or "copy": downloaded into the mount path as ordinary files
    copy_limit: int = COPY_LIMIT
    prefetch: list[str] = field(default_factory=list)  # folders/files to warm the disk cache with at start
    ttl: float = METADATA_TTL
    deadline: float = DEADLINE
    cache_dir: str | None = None
    block_size: int = BLOCK_SIZE
    fetch_size: int = FETCH_SIZE
    max_fetches: int = MAX_FETCHES
    memory_limit: int = MEMORY_LIMIT
    readahead: int = READAHEAD
    disk_limit: int = DISK_LIMIT
    staging_limit: int = STAGING_LIMIT
    incomplete_keep_days: float = INCOMPLETE_KEEP_DAYS
    kernel_readahead_kb: int = KERNEL_READAHEAD_KB
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown worker option(s): {', '.join(sorted(unknown))}")
        return cls(**doc)

    def to_line(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self)) + "\n").encode()


class WorkerStats(TypedDict, total=False):
    """The `stats` event a worker answers (JSON): what status, metrics and the CLI read."""

    store: dict[str, int | float]  # StoreStats fields, plus stalled_calls
    cache: dict[str, int]  # CacheStats fields
    memory_bytes: int
    disk: dict[str, int] | None  # used, limit, configured_limit, blocks, corrupt, evictions, errors
    errors: dict[str, int]  # FUSE requests answered with an error, by reason
    requests: dict[str, int]  # FUSE requests served, by operation
    inodes: int
    write_mode: str | None
    unsynced: dict[str, int] | None  # files, bytes, queued, incomplete, conflicts
    staged: list[dict[str, Any]]  # StagedFile.public() of each pending file
    prefetch: dict[str, Any] | None  # PrefetchProgress.public()
    copy: dict[str, Any] | None  # copy mode: CopyProgress.public() and `refused`
