"""The daemon: manifest -> pre-flight -> one worker process per mount -> control socket -> signals.

Per-mount state machine (`MountState`):

    pending -> checking -> mounted | needs_credentials | failed | skipped
    mounted <-> degraded       (backend errors since the last poll)
    mounted -> unmounted       (POST unmount, shutdown)
    mounted -> failed -> checking -> mounted   (the worker died: noticed, reported, mounted again)

Each mount has one supervisor task that owns its state; everything else (control socket,
signals, worker exit) talks to it through its command channel, so state changes are serialised
and logged in one place. Each mount is served by its own `sidecar.worker` process (pyfuse3
serves one file system per process, and a crash then takes down one mount only). One bad
storage never blocks or fails the others.

SIGTERM/SIGINT: stop accepting requests, stop every worker (which unmounts) within the grace
period, lazily unmount whatever is left, remove the socket, exit 0.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sidecar import credentials as credential_sources
from sidecar import preflight, protocol
from sidecar.protocol import WorkerConfig, WorkerStats
from sidecar.control import REQUEST_DEADLINE, EventStream, HTTPError, route, serve
from sidecar.log import get_logger, register_secret
from sidecar.manifest import Manifest, RemoteStorage, StorageMount
from sidecar.mounttable import is_mounted
from sidecar.states import UP

log = get_logger("sidecar.daemon")

EVENT_BUFFER = 256  # events a /events client may fall behind before it is dropped
RETRY_FIRST = 1.0  # s before the first automatic attempt after a failure
RETRY_FAST_CAP = 8.0  # s between attempts while a failure is recent (< RETRY_FAST_PERIOD)
RETRY_FAST_PERIOD = 600.0
RETRY_SLOW = 60.0
ACTION_WAIT = REQUEST_DEADLINE - 2  # a POST action answers 202 once this has passed


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


def busy_pids(path: str) -> list[int]:
    """Processes with a file open, or their working directory, inside `path`."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        links = [f"/proc/{entry}/cwd"]
        try:
            links += [f"/proc/{entry}/fd/{fd}" for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == real or target.startswith(prefix):
                found.append(int(entry))
                break
    return found


def worker_environment() -> dict[str, str]:
    """A worker's environment holds no secret: its own credentials come over the pipe, and other
    storages' (prefixed variables) are none of its business."""
    secrets = set(credential_sources.secret_variables())
    return {k: v for k, v in os.environ.items() if k not in secrets}


class ForkedWorker:
    """A worker forked by the template (sidecar.template), with the part of trio.Process's
    interface that WorkerProcess uses. Not our child: its end is seen through a pidfd, and its
    exit status is not known (-1)."""

    def __init__(self, pid: int, stdin_fd: int, stdout_fd: int) -> None:
        self.pid = pid
        self.stdin = trio.lowlevel.FdStream(stdin_fd)
        self.stdout = trio.lowlevel.FdStream(stdout_fd)
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)
        self._exited = trio.Event()
        self._watching = False

    async def wait(self) -> int:
        """Several tasks may wait (the supervisor's watcher and a stop): one of them watches the
        pidfd (trio allows one waiter per fd), the others wait for it to say so."""
        if not self._watching:
            self._watching = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            finally:
                if not self._exited.is_set():
                    self._watching = False
            self.returncode = -1
            os.close(self._pidfd)
            self._exited.set()
        await self._exited.wait()
        return -1

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WorkerTemplate:
    """The warm template process that forks workers (see sidecar.template)."""

    def __init__(self) -> None:
        self.process: trio.Process | None = None
        self.sock: socket.socket | None = None
        self._lock = trio.Lock()

    async def start(self, env: dict[str, str], providers: list[str], timeout: float = 60.0) -> bool:
        """Starts the template, warmed for `providers` (the manifest's)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "sidecar.template", str(theirs.fileno()), ",".join(providers)], pass_fds=(theirs.fileno(),), env=env
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(ours)
            return ours.recv(1) == b"R"
        return False

    async def fork(self) -> ForkedWorker | None:
        """A new worker with pipes on its stdin and stdout; None if the template cannot."""
        if self.sock is None or self.process is None or self.process.returncode is not None:
            return None
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            async with self._lock:
                with trio.move_on_after(10):
                    socket.send_fds(self.sock, [b"F"], [in_r, out_w])
                    await trio.lowlevel.wait_readable(self.sock)
                    raw = self.sock.recv(8)
                    pid = struct.unpack("q", raw)[0] if len(raw) == 8 else -1
                    if pid > 0:
                        os.set_blocking(in_w, False)
                        os.set_blocking(out_r, False)
                        return ForkedWorker(pid, in_w, out_r)
        except OSError as exc:
            log.warning("template_fork_failed", error=str(exc))
        finally:
            os.close(in_r)
            os.close(out_w)
        for fd in (in_w, out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        return None

    async def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()


class WorkerProcess:
    """The trio side of one worker process (JSON lines over its stdin/stdout)."""

    template: WorkerTemplate | None = None  # set by the daemon: workers are forked from it

    def __init__(self, name: str, mountpath: str, module: str = "sidecar.worker") -> None:
        self.name = name
        self.mountpath = mountpath
        self.module = module
        self.process: trio.Process | None = None
        self._buffer = b""
        self._lock = trio.Lock()
        self._may_have_mounted = False  # stop() unmounts the path only if this process may own it

    async def _read_event(self) -> dict[str, Any] | None:
        assert self.process is not None and self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    async def start(self, cfg: WorkerConfig | dict[str, Any], timeout: float,
                    before_mount: Callable[[], Awaitable[None]] | None = None) -> dict[str, str] | None:
        """Starts the worker (forked from the warm template when there is one); None once
        mounted, else an error {code, reason}. A worker that runs the pre-flight check first
        (`cfg.preflight`) reports `checked`; then `before_mount` runs (it clears the mount path)
        and the worker is told to mount. `timeout` is the mount's; the check has its own deadline."""
        preflight = isinstance(cfg, WorkerConfig) and cfg.preflight
        self._may_have_mounted = not preflight
        forked = await self.template.fork() if self.template is not None and self.module == "sidecar.worker" else None
        if forked is not None:
            self.process = forked  # type: ignore[assignment]
        else:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=worker_environment()
            )
        assert self.process.stdin is not None
        await self.process.stdin.send_all(cfg.to_line() if isinstance(cfg, WorkerConfig) else (json.dumps(cfg) + "\n").encode())
        with trio.move_on_after(timeout + (cfg.check_deadline if preflight else 0)):  # type: ignore[union-attr]
            event = await self._read_event()
            if event and event.get("event") == "checked":
                if before_mount is not None:
                    await before_mount()
                self._may_have_mounted = True
                await self.process.stdin.send_all(b"mount\n")
                event = await self._read_event()
            if event and event.get("event") in ("mounted", "copying"):
                return None
            await self.stop(5)
            event = event or {}
            return {"code": event.get("code", "mount_failed"), "reason": event.get("reason", "the mount process exited")}
        await self.stop(5)
        return {"code": "timeout", "reason": f"not mounted within {timeout:g} s"}

    async def send_line(self, doc: Any) -> None:
        if self.alive:
            assert self.process is not None and self.process.stdin is not None
            try:
                await self.process.stdin.send_all((json.dumps(doc) + "\n").encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def call(self, line: bytes, expect: str, timeout: float) -> dict[str, Any] | None:
        """Sends a command line and returns the worker's `expect` event (None if the worker is
        gone or did not answer in time). Answers to earlier calls that timed out are skipped."""
        if not self.alive:
            return None
        async with self._lock:
            with trio.move_on_after(timeout):
                assert self.process is not None and self.process.stdin is not None
                try:
                    await self.process.stdin.send_all(line)
                    while (event := await self._read_event()) is not None:
                        if event.get("event") == expect:
                            return event
                except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
                    return None
        return None

    async def stats(self, timeout: float = 2.0) -> WorkerStats | None:
        return await self.call(b"stats\n", "stats", timeout)  # type: ignore[return-value]

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
            if self._may_have_mounted:
                await unmount_if_mounted(self.mountpath)


async def unmount_if_mounted(path: str) -> bool:
    """Lazy unmount of a mount left behind (also a dead one: "Transport endpoint is not
    connected"). A mount that is already gone counts as success."""
    if is_mounted(path):
        await trio.run_process(["fusermount3", "-u", "-z", path], check=False, capture_stdout=True, capture_stderr=True)
        return True
    return False


@dataclass
class Mount:
    mount: StorageMount
    storage: RemoteStorage
    state: str = "pending"
    error: dict[str, str] | None = None
    worker: WorkerProcess | None = None
    handed_credentials: dict[str, str] | None = None
    restarts: int = 0
    placeholder: WorkerProcess | None = None  # the read-only stand-in while not mounted
    failures: int = 0  # consecutive failed attempts, for the retry backoff
    failing_since: float | None = None  # trio time of the first of them
    retry_at: float | None = None  # trio time of the next automatic attempt
    next_try: float | None = None  # the same as wall-clock time, for status
    stats: WorkerStats | None = None
    since: float = field(default_factory=time.time)
    commands: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel] = field(default_factory=lambda: trio.open_memory_channel(16))
    decision_deadline: float | None = None

    @property
    def name(self) -> str:
        return self.mount.name or ""

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
            "placeholder": self.placeholder is not None,
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


class Daemon:
    def __init__(self, manifest: Manifest, cfg: DaemonConfig) -> None:
        self.manifest = manifest
        self.cfg = cfg
        self.mounts = {mt.name: Mount(mt, manifest.storage_for(mt)) for mt in manifest.mounts}
        self.started = time.time()
        self._stopping = False
        self.events = EventBus()
        self._template: WorkerTemplate | None = None
        self._template_ready = trio.Event()

    # -- state -------------------------------------------------------------------------------

    def _state_event(self, m: Mount) -> dict[str, Any]:
        event = {"type": "mount_state", "mount": m.name, "mountpath": m.mount.mountpath, "state": m.state, "time": m.since,
                 "ready": self.ready()}
        if m.error:
            event.update(code=m.error.get("code"), reason=m.error.get("reason"))
        if m.next_try is not None:
            event["next_try"] = m.next_try
        return event

    def _set(self, m: Mount, state: str, error: dict[str, str] | None = None) -> None:
        if m.state != state or m.error != error:
            m.state, m.error, m.since = state, error, time.time()
            fields = {"mount": m.name, "mountpath": m.mount.mountpath, "state": state}
            if error:
                fields.update(code=error.get("code"), reason=error.get("reason"))
            (log.warning if state in ("failed", "needs_credentials", "degraded") else log.info)("mount_state", **fields)
            self.events.publish(self._state_event(m))

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

    def worker_config(self, m: Mount, creds: dict[str, str]) -> WorkerConfig:
        st, mt, cfg = m.storage, m.mount, self.cfg
        return WorkerConfig(
            name=mt.name or "",
            storage_id=st.id or "",
            url=st.url,
            options=st.options,
            source_path=mt.source_path,
            mountpath=mt.mountpath,
            root=self.manifest.root,
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
        # The worker checks the storage with the client it then mounts with (sidecar.worker.
        # open_store), and mounts once the path is cleared of a placeholder or a stale mount.
        with trio.move_on_after(30):
            await self._template_ready.wait()
        m.worker = WorkerProcess(m.name, m.mount.mountpath)

        async def clear_path() -> None:
            await self._drop_placeholder(m)
            await unmount_if_mounted(m.mount.mountpath)  # a stale mount of a killed predecessor

        error = await m.worker.start(self.worker_config(m, creds), self.cfg.mount_timeout, before_mount=clear_path)
        if error:  # the worker logged its check; the state change below logs the code
            m.worker = None
            if error["code"] in preflight.CREDENTIAL_CODES:
                if self.cfg.credentials_wait > 0 and m.decision_deadline is None:
                    m.decision_deadline = trio.current_time() + self.cfg.credentials_wait
                self._set(m, "needs_credentials", error)
            else:
                self._failed(m, error)
            return
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
        worker, m.worker = m.worker, None
        m.retry_at = m.next_try = None
        if worker is not None:
            await worker.stop(self.cfg.grace_period)
        await self._drop_placeholder(m)
        await unmount_if_mounted(m.mount.mountpath)
        self._set(m, state, error)

    # -- the placeholder of a mount that is not up -------------------------------------------

    def _placeholder_message(self, m: Mount) -> str:
        err = m.error or {}
        text = f"State: {m.state}" + (f" ({err.get('code')}): {err.get('reason')}" if err else "")
        if m.next_try is not None:
            text += f"\nNext attempt: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(m.next_try))}"
        return text

    async def _sync_placeholder(self, m: Mount) -> None:
        """A mount that is not up by nobody's choice (failed, needs credentials) gets the
        read-only placeholder at its path; any other state removes it."""
        want = self.cfg.placeholders and not self._stopping and m.state in ("failed", "needs_credentials")
        if not want:
            await self._drop_placeholder(m)
        elif m.placeholder is not None:
            await m.placeholder.send_line(self._placeholder_message(m))
        else:
            await unmount_if_mounted(m.mount.mountpath)  # e.g. the dead mount of a crashed worker
            placeholder = WorkerProcess(m.name, m.mount.mountpath, module="sidecar.placeholder")
            cfg = {"name": m.name, "mountpath": m.mount.mountpath, "root": self.manifest.root, "mount_helper": self.cfg.mount_helper,
                   "message": self._placeholder_message(m),
                   "allow_other": self.cfg.allow_other, "log_level": self.cfg.log_level}
            error = await placeholder.start(cfg, 15.0)
            if error:
                log.error("placeholder_failed", mount=m.name, mountpath=m.mount.mountpath, **error)
            else:
                m.placeholder = placeholder

    async def _drop_placeholder(self, m: Mount) -> None:
        placeholder, m.placeholder = m.placeholder, None
        if placeholder is not None:
            await placeholder.stop(5)

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
                await self._sync_placeholder(m)
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
                    await unmount_if_mounted(m.mount.mountpath)
                    m.restarts += 1
                    self._failed(m, {"code": "mount_died", "reason": f"the mount process exited with status {arg}; mounting again"})
                if m.worker is not None and m.worker is not before:
                    nursery.start_soon(self._watch_worker, m, m.worker)
                if done is not None:  # the caller waits for this command's outcome
                    await self._sync_placeholder(m)
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
                stalled = stats["store"].get("stalled_calls", 0)
                if errors > last_errors.get(m.name, 0):
                    self._set(m, "degraded", {"code": "backend_errors", "reason": f"{errors - last_errors.get(m.name, 0)} backend errors in the last {self.cfg.poll_interval:g} s"})
                elif stalled:
                    self._set(m, "degraded", {"code": "backend_stalled", "reason": f"{stalled} backend call(s) without progress for 5 s or more"})
                elif m.state == "degraded":
                    self._set(m, "mounted")
                last_errors[m.name] = errors

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
        return {"ready": self.ready(), "pid": os.getpid(), "started": self.started, "mounts": [m.public() for m in self.mounts.values()]}

    async def handle(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        path, params = route(target)
        expected = "POST" if path.startswith("/mounts/") else "GET"
        if method != expected:
            raise HTTPError(405, "method_not_allowed", f"{path} takes {expected}")
        if path == "/health":
            return 200, {"status": "ok"}
        if path == "/ready":
            ready = self.ready()
            return (200 if ready else 503), {"ready": ready, "states": {m.name: m.state for m in self.mounts.values()}}
        if path == "/status":
            return 200, await self.status()
        if path == "/events":
            return 200, EventStream(self.events.subscribe([self._state_event(m) for m in self.mounts.values()]))
        if path == "/metrics":
            from sidecar.metrics import render

            return 200, render(self)
        m = self.mounts.get(params["name"])
        if m is None:
            raise HTTPError(404, "no_such_mount", f"no mount named {params['name']!r}; mounts: {', '.join(self.mounts)}")
        action = path.rsplit("/", 1)[1]
        if action == "publish":
            return await self._publish(m, body)
        if action == "refresh":
            return await self._refresh(m, body)
        if action == "prefetch":
            return await self._prefetch(m, body)
        if action == "push":
            if m.mount.mode != "copy" or m.worker is None or m.state not in ("copying", "copied"):
                raise HTTPError(409, "not_a_copy", f"{m.name} is not a copied folder ({m.mount.mode}, {m.state})")
            answer = await m.worker.call(b'{"cmd": "push"}\n', "pushed", ACTION_WAIT)
            if answer is None:
                return 202, {"pushed": None, "reason": "still uploading"}
            if not answer.get("ok"):
                raise HTTPError(409, "not_pushed", answer.get("reason") or "not pushed")
            return 200, {"pushed": answer.get("pushed"), "failed": answer.get("failed")}
        arg = None
        if action == "credentials":
            arg = parse_credentials(body, m.storage.provider)
        if action == "unmount" and m.state in UP and "force=1" not in target.partition("?")[2]:
            pids = await trio.to_thread.run_sync(busy_pids, m.mount.mountpath)
            if pids:
                raise HTTPError(409, "busy", f"{m.mount.mountpath} is in use by process(es) {', '.join(map(str, pids))}; close them or unmount with --force")
        done = trio.Event()
        await m.commands[0].send((action, arg, done))
        # Answer within the socket's request deadline: a pre-flight or mount that takes longer
        # goes on, and the client follows it on /status (or /events) after a 202.
        with trio.move_on_after(ACTION_WAIT):
            await done.wait()
        return (200 if done.is_set() else 202), m.public()

    @staticmethod
    def _body_field(body: bytes, name: str, kind: type, default: Any, example: str) -> Any:
        """One field of a JSON object body (`default` when the body is empty), or a 400."""
        try:
            doc = json.loads(body.decode("utf-8")) if body else {name: default}
            value = doc.get(name, default) if isinstance(doc, dict) else None
            if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
                raise ValueError
        except (ValueError, RecursionError, UnicodeDecodeError):
            raise HTTPError(400, "bad_request", f"the body must be {example}") from None
        return value

    async def _ask_worker(self, m: Mount, action: str, command: dict[str, Any], answer: str) -> dict[str, Any] | None:
        """Sends a command to a mounted mount's worker; its answer, or None if it takes longer
        than a request may wait (the work goes on)."""
        if m.worker is None or m.state not in UP:
            raise HTTPError(409, "not_mounted", f"{m.name} is {m.state}; {action} needs it mounted")
        return await m.worker.call((json.dumps(command) + "\n").encode(), answer, ACTION_WAIT)

    async def _refresh(self, m: Mount, body: bytes) -> tuple[int, Any]:
        """Forgets the mount's cached metadata of a folder (or all of it) in the worker and the
        kernel: the next access sees the bucket as it is now, whatever the metadata TTL."""
        path = self._body_field(body, "path", str, "", 'empty or {"path": "<folder in the mount>"}')
        answer = await self._ask_worker(m, "refresh", {"cmd": "refresh", "path": path}, "refreshed")
        if answer is None:
            raise HTTPError(503, "no_answer", f"the mount process of {m.name} did not answer")
        return 200, {"path": path, "entries": answer.get("entries", 0)}

    async def _prefetch(self, m: Mount, body: bytes) -> tuple[int, Any]:
        """Warms the mount's disk cache with folders or files, in the background (progress in
        /status); refused when it cannot fit the disk cache."""
        paths = self._body_field(body, "paths", list, [], '{"paths": ["<folder or file in the mount>", ...]}')
        answer = await self._ask_worker(m, "prefetch", {"cmd": "prefetch", "paths": paths}, "prefetch")
        if answer is None:
            return 202, {"paths": paths, "started": None, "reason": "still planning; see status"}
        if not answer.get("ok"):
            raise HTTPError(409, "prefetch_refused", answer.get("reason") or "refused")
        return 200, {"paths": paths, "started": True, "files": answer.get("files"), "bytes": answer.get("bytes")}

    async def _publish(self, m: Mount, body: bytes) -> tuple[int, Any]:
        """Uploads an `incomplete` staged file of a mount on a person's explicit request."""
        key = self._body_field(body, "key", str, "", '{"key": "<object key of an incomplete file>"}')
        if not key:
            raise HTTPError(400, "bad_request", 'the body must be {"key": "<object key of an incomplete file>"}')
        answer = await self._ask_worker(m, "publish", {"cmd": "publish", "key": key}, "published")
        if answer is None:
            return 202, {"key": key, "published": None, "reason": "still uploading; see status"}
        if not answer.get("ok"):
            raise HTTPError(409, "not_published", answer.get("reason") or "not published")
        return 200, {"key": key, "published": True}

    # -- main ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(lambda task_status: serve(self.cfg.socket, self.handle, group=self.cfg.socket_group, task_status=task_status))
                    if self.cfg.fork_workers:
                        nursery.start_soon(self._start_template)
                    else:
                        self._template_ready.set()
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

    async def _start_template(self) -> None:
        """The warm template forks the workers (sidecar.template), which run the pre-flight
        checks; it imports the SDKs of the manifest's providers while the daemon reads the
        credentials. A worker due before it is ready waits for it rather than importing the
        same modules once more beside it."""
        template = WorkerTemplate()
        try:
            if await template.start(worker_environment(), sorted({m.storage.provider for m in self.mounts.values()})):
                WorkerProcess.template = self._template = template
                log.info("worker_template_ready")
            else:
                log.warning("worker_template_failed", reason="it did not get ready; workers are spawned")
                await template.stop()
        finally:
            self._template_ready.set()

    async def stop(self) -> None:
        self._stopping = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.cfg.grace_period + 5):
                async with trio.open_nursery() as nursery:
                    for m in self.mounts.values():
                        nursery.start_soon(self._take_down, m, "unmounted" if m.state in UP else m.state, m.error)
            for m in self.mounts.values():  # whatever is still there after the grace period
                await unmount_if_mounted(m.mount.mountpath)
            if self._template is not None:
                await self._template.stop()
                WorkerProcess.template = self._template = None
        log.info("daemon_stopped")


def parse_credentials(body: bytes, provider: str) -> dict[str, str]:
    try:
        doc = json.loads((body or b"null").decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "bad_json", "the body must be UTF-8 JSON: a JSON object of credential fields") from None
    except (ValueError, RecursionError):  # bad JSON, a number too long to convert, deep nesting
        raise HTTPError(400, "bad_json", "the body must be a JSON object of credential fields") from None
    allowed = credential_sources.FIELDS[provider]
    if not isinstance(doc, dict) or not doc:
        raise HTTPError(400, "bad_credentials", f"the body must be a JSON object with fields from: {', '.join(allowed)}")
    unknown = [k for k in doc if k not in allowed]
    if unknown:
        raise HTTPError(400, "bad_credentials", f"unknown credential field(s) {', '.join(map(repr, unknown))} for {provider}; allowed: {', '.join(allowed)}")
    if not all(isinstance(v, str) and v for v in doc.values()):
        raise HTTPError(400, "bad_credentials", "every credential field must be a non-empty string")
    for v in doc.values():
        register_secret(v)
    return doc
