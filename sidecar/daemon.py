"""The daemon: manifest -> credentials -> one worker process per mount -> control socket -> signals.

Each mount has one supervisor task (`Daemon.supervise`) that owns its state (the states and
their diagram: sidecar.states, docs/ARCHITECTURE.md); everything else (the control socket's
API in sidecar.api, signals, a worker's exit) talks to it through its command channel, so state
changes are serialised and logged in one place. Each mount is served by its own
`sidecar.worker` process (pyfuse3 serves one file system per process, and a crash then takes
down one mount only). One bad storage never blocks or fails the others.

SIGTERM/SIGINT: stop accepting requests, stop every worker (which unmounts) within the grace
period, lazily unmount whatever is left, remove the socket, exit 0.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from sidecar import credentials as credential_sources
from sidecar import preflight, protocol, rescue
from sidecar.children import Children, WorkerProcess, unmount_if_mounted, unmount_ours
from sidecar.api import ControlAPI
from sidecar.control import serve
from sidecar.holder import PathHold
from sidecar.log import get_logger
from sidecar.manifest import Manifest, RemoteStorage, StorageMount
from sidecar.process import default_cache_dir
from sidecar.protocol import WorkerConfig, WorkerStats
from sidecar.states import UP

log = get_logger("sidecar.daemon")

EVENT_BUFFER = 256  # events a /events client may fall behind before it is dropped
RETRY_FIRST = 1.0  # s before the first automatic attempt after a failure
RETRY_FAST_CAP = 8.0  # s between attempts while a failure is recent (< RETRY_FAST_PERIOD)
RETRY_FAST_PERIOD = 600.0
RETRY_SLOW = 60.0


@dataclass
class DaemonConfig:
    socket: str = "/run/storage-sidecar/sidecar.sock"
    socket_group: str | int | None = None
    cache_dir: str | None = None
    credentials_dir: str | None = None
    block_size: int = protocol.BLOCK_SIZE
    fetch_size: int = protocol.FETCH_SIZE
    max_fetches: int = protocol.MAX_FETCHES
    memory_limit: int = protocol.MEMORY_LIMIT
    readahead: int = protocol.READAHEAD
    disk_limit: int = protocol.DISK_LIMIT
    staging_limit: int = protocol.STAGING_LIMIT
    mount_timeout: float = 60.0
    check_deadline: float = protocol.CHECK_DEADLINE
    credentials_wait: float = 0.0
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


@dataclass
class Mount:
    mount: StorageMount
    storage: RemoteStorage
    state: str = "pending"
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
        if self.state in ("copying", "copied"):
            return "local"
        return self.hold.state if self.hold is not None else "bare"

    def public(self) -> dict[str, Any]:
        st, url = self.storage, self.storage.parsed
        stats = self.stats or {}
        cache = stats.get("cache", {})
        hits = cache.get("memory_hits", 0) + cache.get("disk_hits", 0)
        lookups = hits + cache.get("misses", 0)
        return {
            "name": self.name,
            "storage_id": st.id,
            "storage": st.name,
            "provider": st.provider,
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
            "counters": {k: stats.get(k) for k in ("store", "cache", "disk", "errors", "memory_bytes")} if stats else None,
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
        if m.state in ("pending", "checking"):
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


class EventBus:
    """Live progress for launchers (`GET /events`): each subscriber has a bounded buffer, and
    publishing never waits. A subscriber that falls EVENT_BUFFER events behind is dropped, with a
    last event saying so: a slow or stuck client never slows the daemon."""

    def __init__(self) -> None:
        self._subscribers: dict[trio.MemorySendChannel, trio.MemoryReceiveChannel] = {}

    def publish(self, event: dict[str, Any]) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                del self._subscribers[send]
                send.close()  # the reader sees the end, then learns why

    async def subscribe(self, snapshot: list[dict[str, Any]]) -> Any:
        send, receive = trio.open_memory_channel(EVENT_BUFFER)
        for event in snapshot:
            send.send_nowait(event)
        self._subscribers[send] = receive
        try:
            async for event in receive:
                yield event
            yield {"type": "dropped", "reason": f"this client fell {EVENT_BUFFER} events behind; reconnect to get the current state"}
        finally:
            self._subscribers.pop(send, None)
            send.close()


def worker_config(cfg: DaemonConfig, root: str | None, m: Mount, creds: dict[str, str]) -> WorkerConfig:
    """The configuration of the worker of mount `m`: the manifest's word, then the daemon's."""
    st, mt = m.storage, m.mount
    return WorkerConfig(
        name=mt.name or "",
        storage_id=st.id or "",
        url=st.url,
        options=st.options,
        source_path=mt.source_path,
        mountpath=mt.mountpath,
        root=root,
        mount_helper=cfg.mount_helper,
        readonly=st.readonly,
        write_mode=mt.write_mode,
        writeback_delay=mt.writeback_delay,
        mtime_source=mt.mtime_source,
        mode=mt.mode,
        copy_limit=mt.copy_limit or cfg.copy_limit,
        prefetch=list(mt.prefetch),
        ttl=mt.metadata_ttl if mt.metadata_ttl is not None else (protocol.METADATA_TTL_READONLY if st.readonly else protocol.METADATA_TTL),
        deadline=mt.deadline,
        credentials=creds,
        cache_dir=cfg.cache_dir,
        block_size=cfg.block_size,
        fetch_size=cfg.fetch_size,
        max_fetches=cfg.max_fetches,
        memory_limit=cfg.memory_limit,
        readahead=cfg.readahead,
        disk_limit=cfg.disk_limit,
        staging_limit=cfg.staging_limit,
        uid=cfg.uid,
        gid=cfg.gid,
        allow_other=cfg.allow_other,
        log_level=cfg.log_level,
        grace_period=cfg.grace_period,
        preflight=True,
        write_probe=cfg.write_probe,
        check_deadline=cfg.check_deadline,
    )


class Daemon:
    def __init__(self, manifest: Manifest, cfg: DaemonConfig) -> None:
        self.manifest = manifest
        self.cfg = cfg
        self.mounts = {mt.name: Mount(mt, manifest.storage_for(mt)) for mt in manifest.mounts}
        self.started = time.time()
        self._stopping = False
        self.events = EventBus()
        self.children = Children(cfg.fork_workers, sorted({m.storage.provider for m in self.mounts.values()}))
        self.rescue_base = Path(cfg.cache_dir or default_cache_dir())
        if cfg.placeholders:
            for m in self.mounts.values():
                m.hold = PathHold(m.name, m.mount.mountpath, self.children, root=manifest.root, rescue_base=self.rescue_base, mount_helper=cfg.mount_helper,
                                  allow_other=cfg.allow_other, log_level=cfg.log_level, rescue_enabled=m.mount.mode != "copy")

    # -- state -------------------------------------------------------------------------------

    def _set(self, m: Mount, state: str, error: dict[str, str] | None = None) -> None:
        if m.state != state or m.error != error:
            m.state, m.error, m.since = state, error, time.time()
            fields = {"mount": m.name, "mountpath": m.mount.mountpath, "state": state}
            if error:
                fields.update(code=error.get("code"), reason=error.get("reason"))
            (log.warning if state in ("failed", "needs_credentials", "degraded") else log.info)("mount_state", **fields)
            self.events.publish(m.state_event(self.ready()))

    def ready(self) -> bool:
        for m in self.mounts.values():
            if m.state in ("pending", "checking"):
                return False
            if m.state == "needs_credentials" and m.decision_deadline is not None:
                return False  # the launcher may still hand in credentials or skip it
            if m.state == "copying" and self.cfg.wait_copies:
                return False  # a large copy never blocks a launch, unless asked
        return True

    # -- the supervisor of one mount ---------------------------------------------------------

    def credentials_for(self, m: Mount) -> dict[str, str]:
        if m.storage.options.get("anonymous"):
            return {}
        if m.handed_credentials:
            return m.handed_credentials
        return credential_sources.lookup(m.storage.name or "", m.storage.provider, directory=self.cfg.credentials_dir)

    async def _bring_up(self, m: Mount) -> None:
        """One attempt: pre-flight, then a worker. On failure the mount is `failed` with the
        next automatic attempt scheduled (or `needs_credentials`, which waits for the launcher)."""
        m.retry_at = m.next_try = None
        if m.state != "failed":  # a retry stays `failed` (and ready) until it succeeds
            self._set(m, "checking")
        # Credential sources are files, a keyring, a local store: read off the event loop, under
        # the check's deadline, so a FIFO or a huge file never freezes the daemon.
        try:
            with trio.fail_after(self.cfg.check_deadline):
                creds = await trio.to_thread.run_sync(self.credentials_for, m, abandon_on_cancel=True)
        except (credential_sources.CredentialProblem, trio.TooSlowError) as exc:
            reason = str(exc) if str(exc) else f"reading the credentials took longer than {self.cfg.check_deadline:g} s"
            log.error("credentials_unusable", mount=m.name, reason=reason)
            self._set(m, "needs_credentials", {"code": "credentials_invalid", "reason": reason})
            return
        # The path is held before any worker may mount on it: the placeholder shows `checking`,
        # and what was found beneath is moved aside first.
        held = await self._hold(m)
        if held is not None:
            self._failed(m, held)
            return
        # The worker checks the storage with the client it then mounts with (sidecar.worker.
        # open_store), and mounts on top of the placeholder once the daemon says so.
        with trio.move_on_after(30):
            await self.children.ready.wait()
        m.worker = self.children.process(m.name, m.mount.mountpath)

        async def clear_path() -> dict[str, str] | None:
            if m.hold is None:
                await unmount_if_mounted(m.mount.mountpath)  # no hold: a stale mount of a killed predecessor
                return None
            if m.mount.mode == "copy":  # the copy is written into the folder itself
                await m.hold.release()
                return None
            return await m.hold.before_worker(m.placeholder_message())

        error = await m.worker.start(worker_config(self.cfg, self.manifest.root, m, creds), self.cfg.mount_timeout, before_mount=clear_path)
        if error:  # the worker logged its check; the state change below logs the code
            m.worker = None
            if error["code"] in preflight.CREDENTIAL_CODES:
                if self.cfg.credentials_wait > 0 and m.decision_deadline is None:
                    m.decision_deadline = trio.current_time() + self.cfg.credentials_wait
                self._set(m, "needs_credentials", error)
            else:
                self._failed(m, error)
            return
        if m.hold is not None and m.mount.mode != "copy":
            await m.hold.sweep()
            await self._report_new_rescue(m)
        m.decision_deadline = None
        m.failures, m.failing_since = 0, None
        self._set(m, "copying" if m.mount.mode == "copy" else "mounted")

    def _failed(self, m: Mount, error: dict[str, str]) -> None:
        """`failed`, with the next attempt scheduled: quickly at first (so a backend that comes
        back is used within RETRY_FAST_CAP seconds), every RETRY_SLOW seconds once the failure
        has lasted RETRY_FAST_PERIOD. Never given up: a storage may come back at any time."""
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
        self._set(m, "failed", error)

    async def _take_down(self, m: Mount, state: str, error: dict[str, str] | None = None) -> None:
        """The user's unmount or skip, or the daemon's stop: the worker goes, then the
        placeholder, and the path is left bare (a choice, said in status as `path: bare`)."""
        worker, m.worker = m.worker, None
        m.retry_at = m.next_try = None
        if worker is not None:
            await worker.stop(self.cfg.grace_period)
        if m.hold is not None:
            await m.hold.release()
        else:
            await unmount_if_mounted(m.mount.mountpath)
        self._set(m, state, error)

    # -- what the path shows while the worker does not serve it (sidecar.holder) --------------

    async def _hold(self, m: Mount) -> dict[str, str] | None:
        """Makes the placeholder what the path shows (with the state's message), moving aside
        what lies beneath first; the error that keeps the mount from being made, if any."""
        if m.hold is None or self._stopping:
            return None
        error = await m.hold.hold(m.placeholder_message())
        await self._report_new_rescue(m)
        return error

    async def _report_new_rescue(self, m: Mount) -> None:
        batch = m.hold.last_rescue if m.hold is not None else None
        if batch is not None and str(batch) not in m.reported_rescues:
            m.reported_rescues.add(str(batch))
            await self._report_rescue(m, batch)

    async def _report_rescue(self, m: Mount, batch: Path) -> None:
        here = await trio.to_thread.run_sync(rescue.batch_entries, batch)
        size = sum(e.size for e in here)
        log.warning("files_rescued", mount=m.name, mountpath=m.mount.mountpath, where=str(batch), entries=len(here), bytes=size,
                    reason="found beneath the mount path before it was held; moved aside, not hidden")
        self.events.publish({"type": "rescued", "mount": m.name, "mountpath": m.mount.mountpath, "where": str(batch),
                             "entries": len(here), "bytes": size, "time": time.time()})
        await self._refresh_rescued(m)

    def _rescued_event(self, m: Mount) -> dict[str, Any]:
        """What is waiting in a mount's rescue folder (for a client that connects later)."""
        return {"type": "rescued", "mount": m.name, "mountpath": m.mount.mountpath, "where": str(rescue.mount_folder(self.rescue_base, m.name)),
                "entries": m.rescued_total, "bytes": sum(e.get("size", 0) for e in m.rescued), "time": time.time()}

    async def _refresh_rescued(self, m: Mount) -> None:
        listed, total = await trio.to_thread.run_sync(rescue.inventory, self.rescue_base, m.name)
        m.rescued, m.rescued_total = [e.public() for e in listed], total

    async def _sync_hold(self, m: Mount) -> None:
        """The path matches the state: a mount the user took down is bare; one that is not up by
        nobody's choice shows the placeholder (a failure to hold it fails the mount)."""
        if m.hold is None or self._stopping or m.state in UP or m.state in ("copying", "copied"):
            return
        if m.state in ("unmounted", "skipped"):
            await m.hold.release()
            return
        error = await self._hold(m)
        if error is not None and (m.error or {}).get("code") != error["code"]:
            self._failed(m, error)

    async def _watch_worker(self, m: Mount, worker: WorkerProcess) -> None:
        rc = await worker.wait()
        if m.worker is worker and not self._stopping:
            await m.commands[0].send(("worker_exited", rc, None))

    async def supervise(self, m: Mount) -> None:
        _, receive = m.commands
        async with trio.open_nursery() as nursery:
            if self.cfg.only is None or m.name in self.cfg.only:
                await self._bring_up(m)
            else:
                self._set(m, "unmounted")
            if m.worker:
                nursery.start_soon(self._watch_worker, m, m.worker)
            while True:
                await self._sync_hold(m)
                cmd, arg, done = "retry", None, None
                if m.retry_at is None:
                    cmd, arg, done = await receive.receive()
                else:
                    with trio.move_on_at(m.retry_at):
                        cmd, arg, done = await receive.receive()
                before = m.worker
                if cmd == "retry":
                    if m.state == "failed":
                        log.info("mount_retry", mount=m.name, attempt=m.failures + 1)
                        await self._bring_up(m)
                elif cmd == "mount" and m.state not in UP:
                    m.failures, m.failing_since = 0, None
                    await self._bring_up(m)
                elif cmd == "credentials":
                    m.handed_credentials = arg
                    if m.state not in UP:
                        await self._bring_up(m)
                elif cmd == "unmount":
                    await self._take_down(m, "unmounted")
                elif cmd == "skip":
                    await self._take_down(m, "skipped")
                elif cmd == "decision_timeout" and m.state == "needs_credentials":
                    m.decision_deadline = None
                    self._set(m, "skipped", {"code": "credentials_missing", "reason": f"no credentials were given within {self.cfg.credentials_wait:g} s"})
                elif cmd == "worker_exited" and m.worker is not None:
                    m.worker = None
                    if m.hold is not None:  # its dead mount goes; the placeholder below shows again
                        await m.hold.worker_gone()
                        await self._hold(m)
                    else:
                        await unmount_if_mounted(m.mount.mountpath)
                    m.restarts += 1
                    self._failed(m, {"code": "mount_died", "reason": f"the mount process {how_it_ended(arg)}; mounting again"})
                if m.worker is not None and m.worker is not before:
                    nursery.start_soon(self._watch_worker, m, m.worker)
                if done is not None:  # the caller waits for this command's outcome
                    await self._sync_hold(m)
                    done.set()

    async def _decision_timer(self) -> None:
        while True:
            now = trio.current_time()
            for m in self.mounts.values():
                if m.state == "needs_credentials" and m.decision_deadline is not None and m.decision_deadline <= now:
                    m.decision_deadline = float("inf")  # sent once; the supervisor clears it
                    await m.commands[0].send(("decision_timeout", None, None))
            await trio.sleep(0.2)

    async def _poll(self) -> None:
        """Keeps counters fresh and marks mounts degraded while their backend errors."""
        last_errors: dict[str, int] = {}
        last_stalls: dict[str, int] = {}
        while True:
            await trio.sleep(self.cfg.poll_interval)
            for m in list(self.mounts.values()):
                if m.worker is not None and m.state == "copying":
                    await self._follow_copy(m)
                    continue
                if m.worker is None or m.state not in UP:
                    continue
                stats = await m.worker.stats()
                if stats is None:
                    continue
                m.stats = stats
                errors = stats["store"]["errors"]
                stalled = stats["store"].get("stalled_calls", 0) - last_stalls.get(m.name, 0)
                if errors > last_errors.get(m.name, 0):
                    self._set(m, "degraded", {"code": "backend_errors", "reason": f"{errors - last_errors.get(m.name, 0)} backend errors in the last {self.cfg.poll_interval:g} s"})
                elif stalled > 0 or stats["store"].get("stalled_now", 0):
                    self._set(m, "degraded", {"code": "backend_stalled", "reason": f"{max(stalled, stats['store'].get('stalled_now', 0))} backend call(s) without progress for 5 s or more"})
                elif m.state == "degraded":
                    self._set(m, "mounted")
                last_errors[m.name] = errors
                last_stalls[m.name] = stats["store"].get("stalled_calls", 0)

    async def _follow_copy(self, m: Mount) -> None:
        stats = await m.worker.stats() if m.worker else None
        if stats is None:
            return
        m.stats = stats
        copy = stats.get("copy") or {}
        if copy.get("refused"):
            self._set(m, "failed", {"code": "copy_refused", "reason": copy["refused"]})
        elif copy.get("state") in ("copied", "copied_with_errors"):
            errors = copy.get("errors") or []
            self._set(m, "copied", {"code": "copy_errors", "reason": f"{len(errors)} file(s) not copied; see status --json"} if errors else None)

    # -- the control socket ------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        for m in list(self.mounts.values()):
            if m.worker is not None and m.state == "copying":
                await self._follow_copy(m)
        for m in self.mounts.values():
            if m.worker is not None and m.state in UP:
                m.stats = await m.worker.stats(timeout=1.0) or m.stats
            if m.rescued_total:  # the user may have moved files out of the rescue folder
                await self._refresh_rescued(m)
        return {"ready": self.ready(), "pid": os.getpid(), "started": self.started, "mounts": [m.public() for m in self.mounts.values()]}








    # -- main ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                # Every path is held before anyone can see a state: `pending` already means the
                # placeholder answers there.
                await self.children.start()
                async with trio.open_nursery() as holding:
                    for m in self.mounts.values():
                        if m.mount.mode != "copy" and (self.cfg.only is None or m.name in self.cfg.only):
                            holding.start_soon(self._hold, m)
                for m in self.mounts.values():
                    await self._refresh_rescued(m)
                async with trio.open_nursery() as nursery:
                    await nursery.start(lambda task_status: serve(self.cfg.socket, ControlAPI(self).handle, group=self.cfg.socket_group, task_status=task_status))
                    nursery.start_soon(self.children.warm_up)
                    for m in self.mounts.values():
                        nursery.start_soon(self.supervise, m)
                    nursery.start_soon(self._decision_timer)
                    nursery.start_soon(self._poll)
                    task_status.started()
                    async for signum in signals:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        break
                    self._stopping = True
                    nursery.cancel_scope.cancel()
            finally:
                await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.cfg.grace_period + 5):
                async with trio.open_nursery() as nursery:
                    for m in self.mounts.values():
                        nursery.start_soon(self._take_down, m, "unmounted" if m.state in UP else m.state, m.error)
            for m in self.mounts.values():  # whatever is still there after the grace period
                await unmount_ours(m.mount.mountpath)
            await self.children.stop()
        log.info("daemon_stopped")


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


