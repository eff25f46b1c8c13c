"""The supervisor of one mount: its state machine (sidecar.states; the diagram is drawn in
docs/ARCHITECTURE.md), one task per mount.

It owns the mount's state: every change goes through `set` (logged once, published as an
event), called only from its own task. Everything else (the control socket's API, the daemon's
polling, a worker's exit) sends it commands through the mount's channel (`Mount.commands`), so
changes are serialised: an
attempt (`bring_up`: credentials, the path held, a worker that checks then mounts), a failure
with its next attempt scheduled (`failed`), the user's unmount or skip (`take_down`), a worker
that died (mounted again). While the worker does not serve the path, the placeholder does
(`hold`, sidecar.holder).
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from sidecar import credentials as credential_sources
from sidecar import preflight, protocol, rescue
from sidecar.children import WorkerProcess, unmount_if_mounted
from sidecar.config import DaemonConfig
from sidecar.holder import PathHold
from sidecar.manifest import RemoteStorage, StorageMount
from sidecar.log import get_logger
from sidecar.protocol import MountOptions, WorkerConfig, WorkerStats
from sidecar.states import COPY, STARTING, TROUBLED, UP, MountState

log = get_logger("sidecar.daemon")

MOUNT_FIELDS = {f.name for f in dataclasses.fields(MountOptions)}  # the manifest's mount names them alike
RETRY_FIRST = 1.0  # s before the first automatic attempt after a failure
RETRY_FAST_CAP = 8.0  # s between attempts while a failure is recent (< RETRY_FAST_PERIOD)
RETRY_FAST_PERIOD = 600.0
RETRY_SLOW = 60.0


def worker_config(cfg: DaemonConfig, root: str | None, m: Mount, creds: dict[str, str]) -> WorkerConfig:
    """The configuration of the worker of mount `m`: the manifest's word, then the daemon's."""
    st, mt = m.storage, m.mount
    return WorkerConfig(
        name=mt.name or "",
        storage_id=st.id or "",
        url=st.url,
        options=st.options,
        mountpath=mt.mountpath,
        root=root,
        mount_helper=cfg.mount_helper,
        readonly=st.readonly,
        mount=MountOptions(
            **mt.model_dump(include=MOUNT_FIELDS - {"ttl", "copy_limit"}),
            ttl=mt.metadata_ttl if mt.metadata_ttl is not None else (protocol.METADATA_TTL_READONLY if st.readonly else protocol.METADATA_TTL),
            copy_limit=mt.copy_limit or cfg.copy_limit,
        ),
        credentials=creds,
        cache=cfg.cache,
        uid=cfg.uid,
        gid=cfg.gid,
        allow_other=cfg.allow_other,
        log_level=cfg.log_level,
        grace_period=cfg.grace_period,
        preflight=True,
        write_probe=cfg.write_probe,
        check_deadline=cfg.check_deadline,
    )


def how_it_ended(returncode: int | None) -> str:
    """A child's end in words: killed by a signal (by name), or its exit status."""
    if returncode is not None and returncode < -1:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    if returncode is None or returncode == -1:
        return "ended (how is not known)"
    return f"exited with status {returncode}"


@dataclass
class Mount:
    mount: StorageMount
    storage: RemoteStorage
    state: MountState = MountState.PENDING
    error: dict[str, str] | None = None
    worker: WorkerProcess | None = None
    handed_credentials: dict[str, str] | None = None
    restarts: int = 0
    hold: PathHold | None = None  # what the path shows while the worker does not serve it
    rescued: list[dict[str, Any]] = field(default_factory=list)  # moved aside from beneath the path
    rescued_total: int = 0
    failures: int = 0  # consecutive failed attempts, for the retry backoff
    failing_since: float | None = None  # trio time of the first of them
    retry_at: float | None = None  # trio time of the next automatic attempt
    next_try: float | None = None  # the same as wall-clock time, for status
    stats: WorkerStats | None = None
    since: float = field(default_factory=time.time)
    commands: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel] = field(default_factory=lambda: trio.open_memory_channel(16))
    decision_deadline: float | None = None
    reported_rescues: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.mount.name or ""

    def path_state(self) -> str:
        """What the mount path shows: `served` (the worker's mount), `held` (the read-only
        placeholder), `locked` (no FUSE mount possible: the folder is kept unwritable), `local`
        (a copy-mode folder), or `bare` (the user unmounted or skipped it, or nothing holds it)."""
        if self.state in UP:
            return "served"
        if self.state in COPY:
            return "local"
        return self.hold.state if self.hold is not None else "bare"

    def public(self) -> dict[str, Any]:
        st, url = self.storage, self.storage.parsed
        stats = self.stats or {}
        cache = stats.get("cache", {})
        hits = cache.get("memory_hits", 0) + cache.get("disk_hits", 0) + cache.get("shared_hits", 0)
        lookups = hits + cache.get("misses", 0)
        return {
            "name": self.name,
            "storage_id": st.id,
            "storage": st.name,
            "provider": st.provider,
            "rclone_type": st.rclone_type,
            "url": url.canonical(),
            "source_path": self.mount.source_path,
            "mountpath": self.mount.mountpath,
            "readonly": st.readonly,
            "state": self.state,
            "since": self.since,
            "error": self.error,
            "restarts": self.restarts,
            "worker_pid": self.worker.process.pid if self.worker is not None and self.worker.process is not None else None,
            "next_try": self.next_try,
            "placeholder": self.path_state() == "held",
            "placeholder_pid": self.hold.placeholder_pid if self.hold is not None else None,
            "path": self.path_state(),
            "rescued": self.rescued,
            "rescued_total": self.rescued_total,
            "cache_hit_rate": (hits / lookups) if lookups else None,
            "counters": {k: stats.get(k) for k in ("store", "cache", "link", "disk", "shared", "errors", "memory_bytes")} if stats else None,
            "unsynced_writes": len(stats.get("staged") or []),
            "unsynced": stats.get("unsynced"),
            "prefetch": stats.get("prefetch"),
            "mode": self.mount.mode,
            "copy": stats.get("copy"),
            "write_mode": self.mount.write_mode if not st.readonly else None,
            "staged": stats.get("staged") or [],
        }

    def placeholder_message(self) -> str:
        """What the placeholder's file says while the path is held."""
        m = self
        err = m.error or {}
        if m.state in STARTING:
            text = f"State: {m.state}: mounting..."
        else:
            text = f"State: {m.state}" + (f" ({err.get('code')}): {err.get('reason')}" if err else "")
        if m.next_try is not None:
            text += f"\nNext attempt: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(m.next_try))}"
        return text

    def state_event(self, ready: bool) -> dict[str, Any]:
        m = self
        event = {"type": "mount_state", "mount": m.name, "mountpath": m.mount.mountpath, "state": m.state, "time": m.since,
                 "ready": ready}
        if m.error:
            event.update(code=m.error.get("code"), reason=m.error.get("reason"))
        if m.next_try is not None:
            event["next_try"] = m.next_try
        return event


class Supervisor:
    def __init__(self, m: Mount, daemon: Any) -> None:
        self.m = m
        self.d = daemon  # sidecar.daemon.Daemon: its configuration, children, events, rescue folder

    def set(self, state: MountState, error: dict[str, str] | None = None) -> None:
        m = self.m
        if m.state != state or m.error != error:
            m.state, m.error, m.since = state, error, time.time()
            fields = {"mount": m.name, "mountpath": m.mount.mountpath, "state": state}
            if error:
                fields.update(code=error.get("code"), reason=error.get("reason"))
            (log.warning if state in TROUBLED else log.info)("mount_state", **fields)
            self.d.events.publish(m.state_event(self.d.ready()))

    def credentials(self) -> dict[str, str]:
        m = self.m
        if m.storage.options.get("anonymous"):
            return {}
        if m.handed_credentials:
            return m.handed_credentials
        return credential_sources.lookup(m.storage.name or "", m.storage.provider, directory=self.d.cfg.credentials_dir)

    async def bring_up(self) -> None:
        """One attempt: pre-flight, then a worker. On failure the mount is `failed` with the
        next automatic attempt scheduled (or `needs_credentials`, which waits for the launcher)."""
        m = self.m
        m.retry_at = m.next_try = None
        if m.state != MountState.FAILED:  # a retry stays `failed` (and ready) until it succeeds
            self.set(MountState.CHECKING)
        # Credential sources are files, a keyring, a local store: read off the event loop, under
        # the check's deadline, so a FIFO or a huge file never freezes the daemon.
        try:
            with trio.fail_after(self.d.cfg.check_deadline):
                creds = await trio.to_thread.run_sync(self.credentials, abandon_on_cancel=True)
        except (credential_sources.CredentialProblem, trio.TooSlowError) as exc:
            reason = str(exc) if str(exc) else f"reading the credentials took longer than {self.d.cfg.check_deadline:g} s"
            log.error("credentials_unusable", mount=m.name, reason=reason)
            self.set(MountState.NEEDS_CREDENTIALS, {"code": "credentials_invalid", "reason": reason})
            return
        # The path is held before any worker may mount on it: the placeholder shows `checking`,
        # and what was found beneath is moved aside first.
        held = await self.hold()
        if held is not None:
            self.failed(held)
            return
        # The worker checks the storage with the client it then mounts with (sidecar.worker.
        # open_store), and mounts on top of the placeholder once the daemon says so.
        with trio.move_on_after(30):
            await self.d.children.ready.wait()
        m.worker = self.d.children.process(m.name, m.mount.mountpath)

        async def clear_path() -> dict[str, str] | None:
            if m.hold is None:
                await unmount_if_mounted(m.mount.mountpath)  # no hold: a stale mount of a killed predecessor
                return None
            if m.mount.mode == "copy":  # the copy is written into the folder itself
                await m.hold.release()
                return None
            return await m.hold.before_worker(m.placeholder_message())

        error = await m.worker.start(worker_config(self.d.cfg, self.d.manifest.root, m, creds), self.d.cfg.mount_timeout, before_mount=clear_path)
        if error:  # the worker logged its check; the state change below logs the code
            m.worker = None
            if error["code"] in preflight.CREDENTIAL_CODES:
                if self.d.cfg.credentials_wait > 0 and m.decision_deadline is None:
                    m.decision_deadline = trio.current_time() + self.d.cfg.credentials_wait
                self.set(MountState.NEEDS_CREDENTIALS, error)
            else:
                self.failed(error)
            return
        if m.hold is not None and m.mount.mode != "copy":
            await m.hold.sweep()
            await self.report_new_rescue()
        m.decision_deadline = None
        m.failures, m.failing_since = 0, None
        self.set(MountState.COPYING if m.mount.mode == "copy" else MountState.MOUNTED)

    def failed(self, error: dict[str, str]) -> None:
        """`failed`, with the next attempt scheduled: quickly at first (so a backend that comes
        back is used within RETRY_FAST_CAP seconds), every RETRY_SLOW seconds once the failure
        has lasted RETRY_FAST_PERIOD. Never given up: a storage may come back at any time."""
        m = self.m
        now = trio.current_time()
        if m.failing_since is None:
            m.failing_since = now
        m.failures += 1
        if now - m.failing_since < RETRY_FAST_PERIOD:
            delay = min(RETRY_FIRST * 2 ** (m.failures - 1), RETRY_FAST_CAP)
        else:
            delay = RETRY_SLOW
        delay *= random.uniform(0.85, 1.0)  # jitter: mounts failing together do not retry in step
        m.retry_at, m.next_try = now + delay, time.time() + delay
        self.set(MountState.FAILED, error)

    async def take_down(self, state: MountState, error: dict[str, str] | None = None) -> None:
        """The user's unmount or skip, or the daemon's stop: the worker goes, then the
        placeholder, and the path is left bare (a choice, said in status as `path: bare`)."""
        m = self.m
        worker, m.worker = m.worker, None
        m.retry_at = m.next_try = None
        if worker is not None:
            await worker.stop(self.d.cfg.grace_period)
        if m.hold is not None:
            await m.hold.release()
        else:
            await unmount_if_mounted(m.mount.mountpath)
        self.set(state, error)

    async def hold(self) -> dict[str, str] | None:
        """Makes the placeholder what the path shows (with the state's message), moving aside
        what lies beneath first; the error that keeps the mount from being made, if any."""
        m = self.m
        if m.hold is None or self.d.stopping:
            return None
        error = await m.hold.hold(m.placeholder_message())
        await self.report_new_rescue()
        return error

    async def report_new_rescue(self) -> None:
        m = self.m
        batch = m.hold.last_rescue if m.hold is not None else None
        if batch is not None and str(batch) not in m.reported_rescues:
            m.reported_rescues.add(str(batch))
            await self.report_rescue(batch)

    async def report_rescue(self, batch: Path) -> None:
        m = self.m
        here = await trio.to_thread.run_sync(rescue.batch_entries, batch)
        size = sum(e.size for e in here)
        log.warning("files_rescued", mount=m.name, mountpath=m.mount.mountpath, where=str(batch), entries=len(here), bytes=size,
                    reason="found beneath the mount path before it was held; moved aside, not hidden")
        self.d.events.publish({"type": "rescued", "mount": m.name, "mountpath": m.mount.mountpath, "where": str(batch),
                             "entries": len(here), "bytes": size, "time": time.time()})
        await self.d.refresh_rescued(m)

    async def sync_hold(self) -> None:
        """The path matches the state: a mount the user took down is bare; one that is not up by
        nobody's choice shows the placeholder (a failure to hold it fails the mount)."""
        m = self.m
        if m.hold is None or self.d.stopping or m.state in UP or m.state in COPY:
            return
        if m.state in (MountState.UNMOUNTED, MountState.SKIPPED):
            await m.hold.release()
            return
        error = await self.hold()
        if error is not None and (m.error or {}).get("code") != error["code"]:
            self.failed(error)

    async def watch_worker(self, worker: WorkerProcess) -> None:
        m = self.m
        rc = await worker.wait()
        if m.worker is worker and not self.d.stopping:
            await m.commands[0].send(("worker_exited", rc, None))

    async def run(self) -> None:
        m = self.m
        _, receive = m.commands
        async with trio.open_nursery() as nursery:
            if self.d.cfg.only is None or m.name in self.d.cfg.only:
                await self.bring_up()
            else:
                self.set(MountState.UNMOUNTED)
            if m.worker:
                nursery.start_soon(self.watch_worker, m.worker)
            while True:
                await self.sync_hold()
                cmd, arg, done = "retry", None, None
                if m.retry_at is None:
                    cmd, arg, done = await receive.receive()
                else:
                    with trio.move_on_at(m.retry_at):
                        cmd, arg, done = await receive.receive()
                before = m.worker
                if cmd == "retry":
                    if m.state == MountState.FAILED:
                        log.info("mount_retry", mount=m.name, attempt=m.failures + 1)
                        await self.bring_up()
                elif cmd == "mount" and m.state not in UP:
                    m.failures, m.failing_since = 0, None
                    await self.bring_up()
                elif cmd == "credentials":
                    m.handed_credentials = arg
                    if m.state not in UP:
                        await self.bring_up()
                elif cmd == "unmount":
                    await self.take_down(MountState.UNMOUNTED)
                elif cmd == "skip":
                    await self.take_down(MountState.SKIPPED)
                elif cmd == "observed":  # the daemon's poller, from the worker's counters
                    seen_in, state, error = arg
                    if m.state in seen_in:  # (not, if the mount moved on meanwhile)
                        self.set(state, error)
                elif cmd == "decision_timeout" and m.state == MountState.NEEDS_CREDENTIALS:
                    m.decision_deadline = None
                    self.set(MountState.SKIPPED, {"code": "credentials_missing", "reason": f"no credentials were given within {self.d.cfg.credentials_wait:g} s"})
                elif cmd == "worker_exited" and m.worker is not None:
                    m.worker = None
                    if m.hold is not None:  # its dead mount goes; the placeholder below shows again
                        await m.hold.worker_gone()
                        await self.hold()
                    else:
                        await unmount_if_mounted(m.mount.mountpath)
                    m.restarts += 1
                    self.failed({"code": "mount_died", "reason": f"the mount process {how_it_ended(arg)}; mounting again"})
                if m.worker is not None and m.worker is not before:
                    nursery.start_soon(self.watch_worker, m.worker)
                if done is not None:  # the caller waits for this command's outcome
                    await self.sync_hold()
                    done.set()
