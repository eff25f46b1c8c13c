"""The daemon's configuration: its flags (sidecar.cli `run`), with every default from
sidecar.protocol, passed whole to the daemon and its supervisors."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar import protocol


@dataclass
class DaemonConfig:
    socket: str = "/run/storage-sidecar/sidecar.sock"
    socket_group: str | int | None = None
    credentials_dir: str | None = None
    cache: protocol.CacheConfig = field(default_factory=protocol.CacheConfig)  # passed whole to every worker
    mount_timeout: float = 60.0
    check_deadline: float = protocol.CHECK_DEADLINE
    credentials_wait: float = protocol.CREDENTIALS_WAIT
    write_probe: bool = True
    grace_period: float = protocol.GRACE_PERIOD
    poll_interval: float = 5.0
    uid: int | None = None
    gid: int | None = None
    allow_other: bool = False
    log_level: str = "info"
    only: set[str] | None = None  # mount only these at start; the others wait, unmounted
    placeholders: bool = True  # a read-only stand-in at the path of a mount that is not up
    wait_copies: bool = False  # /ready waits for copy-mode mounts to finish
    mount_helper: str | None = None  # mount through a privileged helper (fd passing)
    fork_workers: bool = True  # workers forked from a warm template process
    copy_limit: int = protocol.COPY_LIMIT
