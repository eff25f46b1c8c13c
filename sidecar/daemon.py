"""The daemon: manifest -> credentials -> one worker process per mount -> control socket -> signals.

Each mount has one supervisor task (sidecar.supervisor) that owns its state (the states and
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
import signal
import time
from pathlib import Path
from typing import Any

import trio

from sidecar import rescue
from sidecar.children import Children, unmount_ours
from sidecar.api import ControlAPI
from sidecar.control import serve
from sidecar.holder import PathHold
from sidecar.log import get_logger
from sidecar.manifest import Manifest
from sidecar.process import default_cache_dir
from sidecar.states import STARTING, UP, MountState
from sidecar.config import DaemonConfig
from sidecar.supervisor import Mount, Supervisor

log = get_logger("sidecar.daemon")

OBSERVED_WAIT = 2.0  # s the poller or a status request waits for a supervisor to take in what it saw

EVENT_BUFFER = 256  # events a /events client may fall behind before it is dropped


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
        self.stopping = False
        self.events = EventBus()
        self.children = Children(cfg.fork_workers, sorted({m.storage.provider for m in self.mounts.values()}))
        self.rescue_base = Path(cfg.cache.cache_dir or default_cache_dir())
        if cfg.placeholders:
            for m in self.mounts.values():
                m.hold = PathHold(m.name, m.mount.mountpath, self.children, root=manifest.root, rescue_base=self.rescue_base, mount_helper=cfg.mount_helper,
                                  allow_other=cfg.allow_other, log_level=cfg.log_level, rescue_enabled=m.mount.mode != "copy")
        self.supervisors = {name: Supervisor(m, self) for name, m in self.mounts.items()}

    # -- state -------------------------------------------------------------------------------

    def ready(self) -> bool:
        for m in self.mounts.values():
            if m.state in STARTING:
                return False
            if m.state == MountState.NEEDS_CREDENTIALS and m.decision_deadline is not None:
                return False  # the launcher may still hand in credentials or skip it
            if m.state == MountState.COPYING and self.cfg.wait_copies:
                return False  # a large copy never blocks a launch, unless asked
        return True

    # -- what the path shows while the worker does not serve it (sidecar.holder) --------------

    def rescued_event(self, m: Mount) -> dict[str, Any]:
        """What is waiting in a mount's rescue folder (for a client that connects later)."""
        return {"type": "rescued", "mount": m.name, "mountpath": m.mount.mountpath, "where": str(rescue.mount_folder(self.rescue_base, m.name)),
                "entries": m.rescued_total, "bytes": sum(e.get("size", 0) for e in m.rescued), "time": time.time()}

    async def refresh_rescued(self, m: Mount) -> None:
        listed, total = await trio.to_thread.run_sync(rescue.inventory, self.rescue_base, m.name)
        m.rescued, m.rescued_total = [e.public() for e in listed], total

    async def _decision_timer(self) -> None:
        while True:
            now = trio.current_time()
            for m in self.mounts.values():
                if m.state == MountState.NEEDS_CREDENTIALS and m.decision_deadline is not None and m.decision_deadline <= now:
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
                if m.worker is not None and m.state == MountState.COPYING:
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
                    await self._observed(m, UP, MountState.DEGRADED, {"code": "backend_errors", "reason": f"{errors - last_errors.get(m.name, 0)} backend errors in the last {self.cfg.poll_interval:g} s"})
                elif stalled > 0 or stats["store"].get("stalled_now", 0):
                    await self._observed(m, UP, MountState.DEGRADED, {"code": "backend_stalled", "reason": f"{max(stalled, stats['store'].get('stalled_now', 0))} backend call(s) without progress for 5 s or more"})
                elif m.state == MountState.DEGRADED:
                    await self._observed(m, {MountState.DEGRADED}, MountState.MOUNTED)
                last_errors[m.name] = errors
                last_stalls[m.name] = stats["store"].get("stalled_calls", 0)

    async def _follow_copy(self, m: Mount) -> None:
        stats = await m.worker.stats() if m.worker else None
        if stats is None:
            return
        m.stats = stats
        copy = stats.get("copy") or {}
        if copy.get("refused"):
            await self._observed(m, {MountState.COPYING}, MountState.FAILED, {"code": "copy_refused", "reason": copy["refused"]})
        elif copy.get("state") in ("copied", "copied_with_errors"):
            errors = copy.get("errors") or []
            await self._observed(m, {MountState.COPYING}, MountState.COPIED,
                                 {"code": "copy_errors", "reason": f"{len(errors)} file(s) not copied; see status --json"} if errors else None)

    async def _observed(self, m: Mount, seen_in: Any, state: MountState, error: dict[str, str] | None = None) -> None:
        """Tells the mount's supervisor what its worker's counters show (the supervisor changes
        the state, if it is still one of `seen_in`); waits for it briefly, so a status request
        that asked sees the outcome."""
        done = trio.Event()
        await m.commands[0].send(("observed", (frozenset(seen_in), state, error), done))
        with trio.move_on_after(OBSERVED_WAIT):
            await done.wait()

    # -- the control socket ------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        for m in list(self.mounts.values()):
            if m.worker is not None and m.state == MountState.COPYING:
                await self._follow_copy(m)
        for m in self.mounts.values():
            if m.worker is not None and m.state in UP:
                m.stats = await m.worker.stats(timeout=1.0) or m.stats
            if m.rescued_total:  # the user may have moved files out of the rescue folder
                await self.refresh_rescued(m)
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
                            holding.start_soon(self.supervisors[m.name].hold)
                for m in self.mounts.values():
                    await self.refresh_rescued(m)
                async with trio.open_nursery() as nursery:
                    await nursery.start(lambda task_status: serve(self.cfg.socket, ControlAPI(self).handle, group=self.cfg.socket_group, task_status=task_status))
                    nursery.start_soon(self.children.warm_up)
                    for m in self.mounts.values():
                        nursery.start_soon(self.supervisors[m.name].run)
                    nursery.start_soon(self._decision_timer)
                    nursery.start_soon(self._poll)
                    task_status.started()
                    async for signum in signals:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        break
                    self.stopping = True
                    nursery.cancel_scope.cancel()
            finally:
                await self.stop()

    async def stop(self) -> None:
        self.stopping = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.cfg.grace_period + 5):
                async with trio.open_nursery() as nursery:
                    for m in self.mounts.values():
                        nursery.start_soon(self.supervisors[m.name].take_down, MountState.UNMOUNTED if m.state in UP else m.state, m.error)
            for m in self.mounts.values():  # whatever is still there after the grace period
                await unmount_ours(m.mount.mountpath)
            await self.children.stop()
        log.info("daemon_stopped")


