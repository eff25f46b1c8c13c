"""The daemon: manifest -> one worker process per mount -> wait for a signal -> unmount all.

Each mount is served by its own `sidecar.worker` process (pyfuse3 serves one file system per
process, and a crash then takes down one mount only). Mounts start concurrently; one that fails
is reported and does not stop the others. SIGTERM/SIGINT stop every worker within the grace
period; a worker that does not stop in time is killed and its mount lazily unmounted, so the
pod never hangs while terminating.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from sidecar import credentials
from sidecar.log import get_logger
from sidecar.manifest import Manifest

log = get_logger("sidecar.daemon")


@dataclass
class DaemonConfig:
    cache_dir: str | None = None
    credentials_dir: str | None = None
    block_size: int = 8 << 20
    memory_limit: int = 256 << 20
    disk_limit: int = 10 << 30
    mount_timeout: float = 60.0
    grace_period: float = 20.0
    uid: int | None = None
    gid: int | None = None
    allow_other: bool = False
    log_level: str = "info"


@dataclass
class MountWorker:
    """The trio side of one worker process."""

    name: str
    mountpath: str
    state: str = "pending"
    error: dict[str, str] | None = None
    process: trio.Process | None = None
    _buffer: bytes = field(default=b"", repr=False)

    async def _read_event(self) -> dict[str, Any] | None:
        assert self.process is not None and self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    async def start(self, cfg: dict[str, Any], timeout: float) -> bool:
        self.state = "checking"
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "sidecar.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdin is not None
        await self.process.stdin.send_all((json.dumps(cfg) + "\n").encode())
        with trio.move_on_after(timeout):
            event = await self._read_event()
            if event and event.get("event") == "mounted":
                self.state = "mounted"
                return True
            self.error = {"code": (event or {}).get("code", "worker_exited"), "reason": (event or {}).get("reason", "the mount process exited")}
            self.state = "failed"
            return False
        self.error = {"code": "timeout", "reason": f"not mounted within {timeout:g} s"}
        self.state = "failed"
        await self.stop(5)
        return False

    async def stats(self) -> dict[str, Any] | None:
        if self.process is None or self.process.returncode is not None or self.state != "mounted":
            return None
        assert self.process.stdin is not None
        await self.process.stdin.send_all(b"stats\n")
        event = await self._read_event()
        return event

    async def stop(self, grace: float) -> None:
        proc = self.process
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await proc.wait()
                if proc.returncode is None:
                    log.warning("worker_killed", mount=self.name, grace_period=grace)
                    proc.kill()
                    await proc.wait()
            await unmount_if_mounted(self.mountpath)
        self.state = "unmounted" if self.state == "mounted" else self.state


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == real for line in f if len(line.split()) > 1)


async def unmount_if_mounted(path: str) -> None:
    """Lazy unmount of a mount left behind; a mount that is already gone counts as success."""
    if is_mounted(path):
        await trio.run_process(["fusermount3", "-u", "-z", path], check=False, capture_stdout=True, capture_stderr=True)


def worker_config(manifest: Manifest, name: str, cfg: DaemonConfig) -> dict[str, Any]:
    mt = manifest.mount_named(name)
    st = manifest.storage_for(mt)
    creds = {} if st.options.get("anonymous") else credentials.lookup(st.name or "", st.provider, directory=cfg.credentials_dir)
    return {
        "name": mt.name,
        "storage_id": st.id,
        "url": st.url,
        "options": st.options,
        "source_path": mt.source_path,
        "mountpath": mt.mountpath,
        "readonly": st.readonly,
        "ttl": mt.metadata_ttl,
        "deadline": mt.deadline,
        "credentials": creds,
        "cache_dir": cfg.cache_dir,
        "block_size": cfg.block_size,
        "memory_limit": cfg.memory_limit,
        "disk_limit": cfg.disk_limit,
        "uid": cfg.uid,
        "gid": cfg.gid,
        "allow_other": cfg.allow_other,
        "log_level": cfg.log_level,
    }


class Daemon:
    def __init__(self, manifest: Manifest, cfg: DaemonConfig) -> None:
        self.manifest = manifest
        self.cfg = cfg
        self.workers = {mt.name: MountWorker(mt.name or "", mt.mountpath) for mt in manifest.mounts}

    async def _start_one(self, worker: MountWorker) -> None:
        try:
            ok = await worker.start(worker_config(self.manifest, worker.name, self.cfg), self.cfg.mount_timeout)
        except Exception as exc:  # one bad storage never stops the others
            worker.state, worker.error = "failed", {"code": "internal", "reason": str(exc)}
            ok = False
        if ok:
            log.info("mount_ready", mount=worker.name, mountpath=worker.mountpath)
        else:
            log.error("mount_failed", mount=worker.name, **(worker.error or {}))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    for w in self.workers.values():
                        nursery.start_soon(self._start_one, w)
                task_status.started()
                log.info("daemon_ready", mounts={n: w.state for n, w in self.workers.items()})
                async for signum in signals:
                    log.info("signal_received", signal=signal.Signals(signum).name)
                    break
            finally:
                await self.stop()

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for w in self.workers.values():
                    nursery.start_soon(w.stop, self.cfg.grace_period)
        log.info("daemon_stopped")
