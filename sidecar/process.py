"""Process plumbing shared by the daemon's children (worker, placeholder, copy worker): JSON
lines to the daemon on stdout, command lines from it on stdin, and making the FUSE mount.
It imports nothing of the read stack, so a placeholder costs only pyfuse3, trio and logging.

The messages are sidecar.protocol's: the first stdin line is the child's configuration (JSON;
credentials travel only here, never on a command line or in the environment); stdout carries
events, each further stdin line is a command; stdin closed means the daemon went away, and the
child must not outlive it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from typing import Any, AsyncIterator

import trio

from sidecar import log, passthrough  # (passthrough: before pyfuse3 is loaded; see there)
from sidecar.mounthelper import request_fuse_fd
from sidecar.mounttable import safe_mountpoint
from sidecar.protocol import Command, Event, ProtocolError, decode_command

logger = log.get_logger("sidecar.process")


def emit(event: Event) -> None:
    try:
        os.write(1, event.encode())
    except BrokenPipeError:
        pass  # the daemon is gone; there is nobody to tell


async def command_lines() -> AsyncIterator[Command]:
    """The daemon's commands after the config, until stdin closes (the daemon went away: the
    caller must not outlive it). A line that is no command is logged and skipped."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    async with stream:
        while chunk := await stream.receive_some(4096):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if command := _command(line):
                    yield command


def _command(line: bytes) -> Command | None:
    try:
        return decode_command(line)
    except ProtocolError as exc:
        logger.warning("command_skipped", reason=str(exc))
        return None


def read_command() -> Command | None:
    """One command read from stdin without a buffer (so no later command is swallowed), None if
    stdin closed first or the line is no command."""
    line = read_line()
    return _command(line) if line else None


def read_line() -> bytes:
    """One line of stdin, byte by byte, so no later command is swallowed by a read buffer."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_config_line() -> dict[str, Any]:
    return json.loads(read_line())


def clear_stale_mount(path: str) -> bool:
    """Unmounts a dead FUSE mount left at `path` by a killed process ("Transport endpoint is not
    connected"). Returns True if there was one."""
    try:
        os.stat(path)
        return False
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    subprocess.run(["fusermount3", "-u", "-z", path], check=False, capture_output=True)
    logger.warning("stale_mount_cleared", mountpath=path)
    return True


def prepare_mountpoint(root: str | None, mountpath: str) -> str:
    """The folder to mount on: checked against the project root at mount time when there is
    one (`safe_mountpoint`), else created as given (tests, laptop one-offs)."""
    if root:
        return safe_mountpoint(root, mountpath)
    os.makedirs(mountpath, exist_ok=True)
    return os.path.realpath(mountpath)


def fuse_init(ops: Any, mountpath: str, opts: set[str], helper: str | None, *, name: str, readonly: bool) -> Any:
    """pyfuse3.init at `mountpath`; with a mount helper, the helper mounts /dev/fuse there and
    this process serves the fd it hands over (`/dev/fd/N`), with no privilege of its own.
    Returns the helper connection to keep open (the mount lives as long as it does)."""
    import pyfuse3

    passthrough.device_reader(readonly)
    if not helper:
        pyfuse3.init(ops, mountpath, opts)
        return None
    # Always allow_other: the session's user is not the sidecar's (the point of the helper).
    fd, conn = request_fuse_fd(helper, mountpath, fsname=name, readonly=readonly, allow_other=True)
    pyfuse3.init(ops, f"/dev/fd/{fd}", opts)
    return conn


def default_cache_dir() -> str:
    if os.getuid() == 0:
        return "/var/cache/storage-sidecar"
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "storage-sidecar")
