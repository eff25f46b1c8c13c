"""A mount path is held by the daemon from its start to its stop.

No write may land on the local disk under a mount path: it would be hidden by the next mount
there, and lost to the user. So each path always shows one of:
- `served`: the worker's mount, on top of the placeholder;
- `held`: the placeholder (sidecar.placeholder: read-only, one file saying why);
- `locked`: no FUSE mount could be made at all (FUSE refused, the mount helper down): the
  folder itself is made unwritable (mode 0555, its own mode restored when a mount comes up and
  at stop), so the session's user cannot write into it either;
- `bare`: the user chose it (`unmount`, `skip`, `--only`) or the daemon stopped.

Order, so that no moment shows the bare folder:
1. at the first hold, mounts of ours left by an earlier life (dead, "Transport endpoint is not
   connected") are lazily unmounted; then the bare folder is opened (a directory fd, walked
   without following symlinks), the placeholder mounted, and only then what lies beneath is moved
   aside through the fd (sidecar.rescue): whatever landed there before the placeholder, however
   late, is reachable through the fd, and nothing new can land once it is mounted;
2. the worker mounts on top of the placeholder; the placeholder stays below;
3. when the worker's mount goes (stopped, or its process died and its dead mount is lazily
   unmounted), the placeholder is what the path shows again: there is nothing in between.
The daemon publishes a state only once the path shows it (sidecar.daemon).

Stacking needs the kernel to let the worker's mount go on top of the placeholder's. As root, or
through the mount helper, it can. An unprivileged daemon mounts through the setuid fusermount3,
which must look at the placeholder's root, and FUSE lets only the mount's owner look unless it
was mounted with `allow_other` (which needs `user_allow_other` in /etc/fuse.conf). Without it
the placeholder is unmounted just before the worker mounts, a gap of milliseconds; the bare
folder's fd is kept for the whole hold, and whatever landed beneath in that gap is moved aside
right after the worker's mount is up (`sweep`): never hidden, though not refused either.

Concurrency: one PathHold per mount, used only by that mount's supervisor task.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import trio

from sidecar import rescue
from sidecar.children import Children, WorkerProcess, unmount_ours, unmount_top
from sidecar.log import get_logger
from sidecar.mounttable import UnsafeMountPath
from sidecar.private import UnsafeFolder, private_folder
from sidecar.process import prepare_mountpoint
from sidecar.protocol import PlaceholderConfig, ShowMessage

log = get_logger("sidecar.holder")

PLACEHOLDER_START_S = 15.0
LOCKED_MODE = 0o555


def open_folder(root: str | None, mountpath: str) -> int:
    """A directory fd of the bare folder at a mount path (prepared as a worker prepares it:
    walked without following symlinks when there is a root)."""
    return os.open(prepare_mountpoint(root, mountpath), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


class PathHold:
    def __init__(self, name: str, mountpath: str, children: Children, *, root: str | None, rescue_base: Path, mount_helper: str | None = None,
                 allow_other: bool = False, log_level: str = "info", rescue_enabled: bool = True) -> None:
        self.name = name
        self.mountpath = mountpath
        self.root = root
        self.rescue_base = rescue_base
        self.children = children
        self.placeholder_cfg = PlaceholderConfig(name, mountpath, root=root, mount_helper=mount_helper, allow_other=allow_other,
                                                 log_level=log_level)
        self.rescue_enabled = rescue_enabled
        self.placeholder: WorkerProcess | None = None
        self.locked_mode: int | None = None  # the folder's own mode, while it is kept 0555
        self.first = True
        self.last_rescue: Path | None = None  # the batch folder of the latest rescue
        self.fd: int | None = None  # the bare folder, open while the path is held
        self.can_stack = os.geteuid() == 0 or bool(mount_helper) or allow_other

    @property
    def placeholder_pid(self) -> int | None:
        proc = self.placeholder.process if self.placeholder is not None else None
        return proc.pid if proc is not None else None

    @property
    def state(self) -> str:
        if self.placeholder is not None and self.placeholder.alive:
            return "held"
        return "locked" if self.locked_mode is not None else "bare"

    async def hold(self, message: str) -> dict[str, str] | None:
        """Makes the placeholder what the path shows whenever no worker serves it; None, or the
        error that keeps the mount from being made ({code, reason}: `mount_path_unsafe`,
        `mount_path_not_empty`). A placeholder that cannot be mounted locks the folder instead."""
        if self.placeholder is not None and self.placeholder.alive:
            await self.placeholder.send(ShowMessage(message))
            return None
        self.placeholder = None
        if self.first:
            self.first = False
            self.locked_mode = self._recorded_mode()
            left = await unmount_ours(self.mountpath)
            if left:
                log.warning("stale_mounts_cleared", mount=self.name, mountpath=self.mountpath, count=left)
        else:
            await unmount_top(self.mountpath, placeholder=True)  # a dead placeholder's mount
        error = await self._open()
        if error is not None:
            return error
        assert self.fd is not None
        if self.locked_mode is not None:
            # Locked after a rescue that could not complete (or with no FUSE): the folder shows
            # its files; they are moved aside first, and nothing is mounted over them until then.
            error = await self._rescue(self.fd)
            if error is not None:
                return error
        if os.geteuid() != 0:  # fusermount3 mounts only on a folder its user may write
            await trio.to_thread.run_sync(self._unlock, self.fd)
        placeholder = self.children.process(self.name, self.mountpath, module="sidecar.placeholder")
        error = await placeholder.start(dataclasses.replace(self.placeholder_cfg, message=message), PLACEHOLDER_START_S)
        if error:
            log.error("placeholder_failed", mount=self.name, mountpath=self.mountpath, **error)
            await trio.to_thread.run_sync(self._lock, self.fd, "no FUSE mount could be made")
            return None
        self.placeholder = placeholder
        return await self._rescue(self.fd)

    async def _open(self) -> dict[str, str] | None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self.fd = await trio.to_thread.run_sync(open_folder, self.root, self.mountpath)
        except (UnsafeMountPath, OSError) as exc:
            return {"code": "mount_path_unsafe", "reason": str(exc)}
        return None

    async def before_worker(self, message: str) -> dict[str, str] | None:
        """Right before the worker mounts: a placeholder that died is replaced (showing
        `message`); a locked folder gets its entries moved aside and its own mode back
        (fusermount3 wants a folder its user may write); where the worker cannot mount on top of
        the placeholder, the placeholder goes (see the module's docstring)."""
        if self.placeholder is not None and not self.placeholder.alive:
            error = await self.hold(message)
            if error is not None:
                return error
        if self.state == "locked" and self.fd is not None:
            error = await self._rescue(self.fd)
            if error is None and os.geteuid() != 0:
                await trio.to_thread.run_sync(self._unlock, self.fd)
            return error
        if not self.can_stack:
            await self._drop_placeholder()
        return None

    async def sweep(self) -> dict[str, str] | None:
        """Once the worker's mount is up: what landed beneath meanwhile is moved aside."""
        if self.fd is None or self.placeholder is not None:
            return None
        return await self._rescue(self.fd)

    async def _rescue(self, fd: int) -> dict[str, str] | None:
        if not self.rescue_enabled:
            return None
        try:
            batch = await trio.to_thread.run_sync(rescue.move_aside, fd, self.rescue_base, self.name)
        except rescue.RescueFailed as exc:
            # Never hide what could not be moved: the path shows the folder, unwritable.
            log.error("rescue_failed", mount=self.name, mountpath=self.mountpath, reason=str(exc))
            await self._drop_placeholder()
            await trio.to_thread.run_sync(self._lock, fd, "files beneath it could not be moved aside")
            return {"code": "mount_path_not_empty", "reason": f"files were found under {self.mountpath} and could not be moved aside: {exc}"}
        if batch is not None:
            self.last_rescue = batch
        return None

    @property
    def _mode_file(self) -> Path:
        return self.rescue_base / "locked" / self.name

    def _recorded_mode(self) -> int | None:
        """A folder locked by an earlier life of the daemon (killed before it could restore it)."""
        try:
            return int(self._mode_file.read_text().strip(), 8) & 0o7777
        except (OSError, ValueError):
            return None

    def _lock(self, fd: int, why: str) -> None:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if self.locked_mode is None and mode != LOCKED_MODE:
            self.locked_mode = mode
        elif self.locked_mode is None or mode == LOCKED_MODE and self._recorded_mode() == self.locked_mode:
            return  # 0555 by its owner's choice, or already locked (a retry): nothing to do or say
        try:
            private_folder(self._mode_file.parent)
            self._mode_file.write_text(f"{self.locked_mode:o}\n")
            os.fchmod(fd, LOCKED_MODE)
            log.warning("mount_path_locked", mount=self.name, mountpath=self.mountpath,
                        reason=f"{why}: the folder is read-only until the storage is mounted")
        except (OSError, UnsafeFolder) as exc:
            log.error("mount_path_not_locked", mount=self.name, mountpath=self.mountpath, reason=getattr(exc, "strerror", None) or str(exc))
            self.locked_mode = None

    def _unlock(self, fd: int) -> None:
        if self.locked_mode is not None:
            try:
                os.fchmod(fd, self.locked_mode)
                self._mode_file.unlink(missing_ok=True)
            except OSError as exc:
                log.error("mount_path_not_unlocked", mount=self.name, mountpath=self.mountpath, reason=exc.strerror)
            self.locked_mode = None

    async def _drop_placeholder(self) -> None:
        placeholder, self.placeholder = self.placeholder, None
        if placeholder is not None:
            await placeholder.stop(5)

    async def worker_gone(self) -> None:
        """The worker's process ended: its dead mount, if any is left, goes, and the
        placeholder below shows again."""
        await unmount_top(self.mountpath, placeholder=False)

    async def release(self) -> None:
        """The path is left bare (the user's choice, or the daemon stops); a locked folder gets
        its own mode back. Only once no worker's mount is on top."""
        await self._drop_placeholder()
        if self.fd is not None:
            self._unlock(self.fd)
            os.close(self.fd)
            self.fd = None
