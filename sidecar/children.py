"""The daemon's child processes: mount workers (forked from the warm template, or spawned) and
placeholders, seen from the daemon's trio loop as JSON lines over their stdin and stdout
(sidecar.process is the children's side).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from sidecar import credentials as credential_sources
from sidecar.log import get_logger
from sidecar.mounttable import OUR_SOURCES, is_mounted, is_placeholder, mount_stack, real_mountpoint
from sidecar.protocol import (
    Checked, Command, Copying, Event, Failed, Mount, Mounted, PlaceholderConfig, ProtocolError, Stats, StatsReport, WorkerConfig,
    WorkerStats, decode_event,
)

log = get_logger("sidecar.children")


def worker_environment() -> dict[str, str]:
    """A worker's environment holds no secret: its own credentials come over the pipe, and other
    storages' (prefixed variables) are none of its business."""
    secrets = set(credential_sources.secret_variables())
    return {k: v for k, v in os.environ.items() if k not in secrets}


class ForkedWorker:
    """A worker forked by the template (sidecar.template), with the part of trio.Process's
    interface that WorkerProcess uses. Not our child: its end is seen through a pidfd, and its
    exit status comes from the template, which reaps it (-1 if that does not arrive in time)."""

    def __init__(self, pid: int, stdin_fd: int, stdout_fd: int, template: "WorkerTemplate | None" = None) -> None:
        self.pid = pid
        self.template = template
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
            status = await self.template.exit_status(self.pid) if self.template is not None else None
            self.returncode = os.waitstatus_to_exitcode(status) if status is not None else -1
            os.close(self._pidfd)
            self._exited.set()
        await self._exited.wait()
        return self.returncode  # type: ignore[return-value]

    def ended(self) -> bool:
        """Whether it has ended, without waiting (its pidfd is readable once it has)."""
        if self.returncode is not None:
            return True
        try:
            return bool(select.select([self._pidfd], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WorkerTemplate:
    """The warm template process that forks workers and placeholders (see sidecar.template)."""

    def __init__(self) -> None:
        self.process: trio.Process | None = None
        self.sock: socket.socket | None = None
        self._lock = trio.Lock()
        self.warm = False  # workers may be forked (the SDKs are imported)
        self._exits_fd: int | None = None  # the template writes (pid, wait status) of each child it reaps
        self._exits: dict[int, int] = {}
        self._exits_lock = trio.Lock()

    async def exit_status(self, pid: int, timeout: float = 2.0) -> int | None:
        """The wait status of a child the template reaped (it reaps at once; the record may come
        a moment after the pidfd said the child ended)."""
        if self._exits_fd is None:
            return None
        with trio.move_on_after(timeout):
            async with self._exits_lock:  # one reader of the pipe at a time
                while pid not in self._exits:
                    await trio.lowlevel.wait_readable(self._exits_fd)
                    try:
                        data = os.read(self._exits_fd, 12 * 256)
                    except BlockingIOError:
                        continue
                    if not data:
                        break
                    for i in range(0, len(data) - len(data) % 12, 12):
                        p, status = struct.unpack("qi", data[i : i + 12])
                        self._exits[p] = status
        return self._exits.pop(pid, None)

    async def start(self, env: dict[str, str], providers: list[str], timeout: float = 20.0) -> bool:
        """Starts the template; True once it can fork placeholders (`warm_up` readies it for
        workers, warmed for `providers`, the manifest's)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        exits_r, exits_w = os.pipe()
        try:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "sidecar.template", str(theirs.fileno()), ",".join(providers), str(exits_w)],
                pass_fds=(theirs.fileno(), exits_w), env=env,
            )
        finally:
            theirs.close()
            os.close(exits_w)
        os.set_blocking(exits_r, False)
        self._exits_fd = exits_r
        ours.setblocking(False)
        self.sock = ours
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(ours)
            return ours.recv(1) == b"P"
        return False

    async def warm_up(self, timeout: float = 60.0) -> bool:
        """Has the template import the SDKs; True once it can fork workers."""
        if self.sock is None:
            return False
        async with self._lock:
            with trio.move_on_after(timeout):
                self.sock.send(b"W")
                await trio.lowlevel.wait_readable(self.sock)
                self.warm = self.sock.recv(1) == b"R"
        return self.warm

    async def fork(self, kind: str = "worker") -> ForkedWorker | None:
        """A new worker (or placeholder) with pipes on its stdin and stdout; None if the template
        cannot."""
        if self.sock is None or self.process is None or self.process.returncode is not None or (kind == "worker" and not self.warm):
            return None
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            async with self._lock:
                with trio.move_on_after(10):
                    socket.send_fds(self.sock, [b"F" if kind == "worker" else b"P"], [in_r, out_w])
                    await trio.lowlevel.wait_readable(self.sock)
                    raw = self.sock.recv(8)
                    pid = struct.unpack("q", raw)[0] if len(raw) == 8 else -1
                    if pid > 0:
                        os.set_blocking(in_w, False)
                        os.set_blocking(out_r, False)
                        return ForkedWorker(pid, in_w, out_r, self)
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
        if self._exits_fd is not None:
            os.close(self._exits_fd)
            self._exits_fd = None
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()


class Children:
    """Where the daemon's child processes come from: forked from the warm template
    (sidecar.template) while it lives, else each spawned in a fresh interpreter. The template's
    life: `start` (it can fork placeholders), `warm_up` (it imports the SDKs of `providers`, and
    can fork workers), `stop`. A worker due before the warm-up ends waits for it (`ready`) rather
    than importing the same modules once more beside it."""

    def __init__(self, fork: bool, providers: list[str]) -> None:
        self.fork = fork
        self.providers = providers
        self.template: WorkerTemplate | None = None
        self.ready = trio.Event()

    def process(self, name: str, mountpath: str, module: str = "sidecar.worker") -> "WorkerProcess":
        return WorkerProcess(name, mountpath, module, template=self.template)

    async def start(self) -> None:
        if not self.fork:
            self.ready.set()
            return
        template = WorkerTemplate()
        if await template.start(worker_environment(), self.providers):
            self.template = template
        else:
            log.warning("worker_template_failed", reason="it did not start; workers and placeholders are spawned")
            await template.stop()
            self.ready.set()

    async def warm_up(self) -> None:
        template = self.template
        try:
            if template is None:
                return
            if await template.warm_up():
                log.info("worker_template_ready")
            else:
                log.warning("worker_template_failed", reason="it did not get ready; workers are spawned")
                self.template = None
                await template.stop()
        finally:
            self.ready.set()

    async def stop(self) -> None:
        if self.template is not None:
            await self.template.stop()
            self.template = None


class WorkerProcess:
    """The trio side of one child process (worker, copy worker or placeholder): its
    configuration, the commands it is sent and the events it answers (sidecar.protocol)."""

    def __init__(self, name: str, mountpath: str, module: str = "sidecar.worker", template: WorkerTemplate | None = None) -> None:
        self.name = name
        self.mountpath = mountpath
        self.module = module
        self.template = template  # workers and placeholders are forked from it when there is one
        self.process: trio.Process | None = None
        self._buffer = b""
        self._lock = trio.Lock()
        self._may_have_mounted = False  # stop() unmounts the path only if this process may own it

    async def _read_event(self) -> Event | None:
        """The child's next event; None when its stdout closed. A line that is no event is
        logged and skipped."""
        assert self.process is not None and self.process.stdout is not None
        while True:
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    return None
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                return decode_event(line)
            except ProtocolError as exc:
                log.warning("event_skipped", mount=self.name, reason=str(exc))

    async def start(self, cfg: WorkerConfig | PlaceholderConfig, timeout: float,
                    before_mount: Callable[[], Awaitable[dict[str, str] | None]] | None = None) -> dict[str, str] | None:
        """Starts the child (forked from the warm template when there is one); None once
        mounted, else an error {code, reason}. A worker that runs the pre-flight check first
        (`cfg.preflight`) reports `Checked`; then `before_mount` runs (it prepares the mount path,
        or returns the error that forbids mounting there) and the worker is told to `Mount`.
        `timeout` is the mount's; the check has its own deadline."""
        preflight = cfg.preflight
        self._may_have_mounted = not preflight
        kind = {"sidecar.worker": "worker", "sidecar.placeholder": "placeholder"}.get(self.module)
        forked = await self.template.fork(kind) if self.template is not None and kind else None
        if forked is not None:
            self.process = forked  # type: ignore[assignment]
        else:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=worker_environment()
            )
        assert self.process.stdin is not None
        await self.process.stdin.send_all(cfg.to_line())
        with trio.move_on_after(timeout + (cfg.check_deadline if isinstance(cfg, WorkerConfig) and preflight else 0)):
            event = await self._read_event()
            if isinstance(event, Checked):
                refused = await before_mount() if before_mount is not None else None
                if refused:
                    await self.stop(5)
                    return refused
                self._may_have_mounted = True
                await self.process.stdin.send_all(Mount().encode())
                event = await self._read_event()
            if isinstance(event, (Mounted, Copying)):
                return None
            await self.stop(5)
            return event.as_error() if isinstance(event, Failed) else {"code": "mount_failed", "reason": "the mount process exited"}
        await self.stop(5)
        return {"code": "timeout", "reason": f"not mounted within {timeout:g} s"}

    async def send(self, command: Command) -> None:
        """A command that expects no answer."""
        if self.alive:
            assert self.process is not None and self.process.stdin is not None
            try:
                await self.process.stdin.send_all(command.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    @property
    def alive(self) -> bool:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return False
        return not proc.ended() if isinstance(proc, ForkedWorker) else True

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def call(self, command: Command, timeout: float) -> Any:
        """Sends `command` and returns the event that answers it (None if the child is gone or
        did not answer in time). Answers to earlier calls that timed out are skipped."""
        if not self.alive:
            return None
        async with self._lock:
            with trio.move_on_after(timeout):
                assert self.process is not None and self.process.stdin is not None
                try:
                    await self.process.stdin.send_all(command.encode())
                    while (event := await self._read_event()) is not None:
                        if event.name == command.answer:
                            return event
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
        return None

    async def stats(self, timeout: float = 2.0) -> WorkerStats | None:
        report: StatsReport | None = await self.call(Stats(), timeout)
        return report.stats if report is not None else None  # type: ignore[return-value]

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
                await unmount_top(self.mountpath, placeholder=self.module == "sidecar.placeholder")


async def _lazy_unmount(path: str) -> None:
    """fusermount3 -u -z: the mount the path shows goes at once, and lives on for open files."""
    await trio.run_process(["fusermount3", "-u", "-z", path], check=False, capture_stdout=True, capture_stderr=True)


async def unmount_top(path: str, *, placeholder: bool) -> bool:
    """Lazily unmounts what the path shows, if it is a mount of that kind (a placeholder's, or a
    worker's), also a dead one ("Transport endpoint is not connected"); never the placeholder
    below a worker's mount. True if there was one."""
    stack = mount_stack(real_mountpoint(path))
    if not stack or not stack[-1].source.startswith(OUR_SOURCES) or is_placeholder(stack[-1]) != placeholder:
        return False
    await _lazy_unmount(path)
    return True


async def unmount_ours(path: str) -> int:
    """Lazily unmounts, top down, every mount of ours at the path (left by an earlier life of the
    daemon, or dead), stopping at the first that is not ours. Returns how many."""
    count = 0
    while (stack := mount_stack(real_mountpoint(path))) and stack[-1].source.startswith(OUR_SOURCES) and count < 64:
        await _lazy_unmount(path)
        if len(mount_stack(real_mountpoint(path))) >= len(stack):
            break  # could not: leave it to the caller's checks
        count += 1
    return count


async def unmount_if_mounted(path: str) -> bool:
    """Lazy unmount of whatever is mounted at `path` (also a dead one: "Transport endpoint is not
    connected"), for paths no placeholder holds. A mount that is already gone counts as success."""
    if is_mounted(path):
        await _lazy_unmount(path)
        return True
    return False
