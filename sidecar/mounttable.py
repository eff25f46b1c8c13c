"""The kernel's mount table (/proc/self/mounts): the one place that reads it."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _entries() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount in this mount namespace."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                # spaces, tabs, newlines and backslashes in paths are octal escapes
                out.append((_unescape(parts[1]), parts[2]))
    return out


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@dataclass(frozen=True)
class MountEntry:
    id: int
    parent: int
    point: str
    fstype: str
    source: str


OUR_SOURCES = ("storage-sidecar:", "storage-sidecar-placeholder:")  # mount sources of workers and placeholders
PLACEHOLDER_SOURCES = ("storage-sidecar-placeholder:", "storage-sidecar:placeholder:")
HELPER_FSNAME_PREFIX = "placeholder:"  # a placeholder mounted by the helper: storage-sidecar:placeholder:NAME


def is_placeholder(entry: "MountEntry") -> bool:
    return entry.source.startswith(PLACEHOLDER_SOURCES)


def mount_stack(real_path: str) -> list[MountEntry]:
    """The mounts at `real_path` (an already resolved path: nothing here touches the mounts),
    bottom first: each one's parent is the one below it. The last is what the path shows."""
    here = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 1 and _unescape(fields[4]) == real_path:
                here.append(MountEntry(int(fields[0]), int(fields[1]), real_path, tail[0], _unescape(tail[1])))
    ids = {m.id for m in here}
    stack = [m for m in here if m.parent not in ids][:1]
    while stack:
        above = [m for m in here if m.parent == stack[-1].id]
        if not above:
            break
        stack.append(above[0])
    return stack


def fuse_mounts() -> list[str]:
    """Mount points of FUSE file systems."""
    return [point for point, fstype in _entries() if fstype.startswith("fuse")]


def real_mountpoint(path: str) -> str:
    """`path` with its parent folder resolved: the mount point itself is not touched (a hung
    mount there would block the caller)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mounted(path: str) -> bool:
    """Whether something is mounted at `path` (resolved without touching the mount itself)."""
    real = real_mountpoint(path)
    return any(point == real for point, _ in _entries())


class UnsafeMountPath(Exception):
    """A mount path that leads somewhere else than the manifest says (a symlink below the root)."""


def safe_mountpoint(root: str, mountpath: str) -> str:
    """The mount point of `mountpath` inside `root`, checked at mount time: every component below
    the root is walked with O_NOFOLLOW (missing ones are created 0755), so a folder swapped for a
    symlink after the manifest was validated is refused instead of mounting outside the project.
    Returns the real path to mount on."""
    os.makedirs(root, exist_ok=True)  # the root is the operator's (trusted); below it nothing is
    real_root = os.path.realpath(root)
    rel = os.path.relpath(os.path.normpath(os.path.join(real_root, mountpath)), real_root)
    if rel == "." or rel.startswith(".."):
        raise UnsafeMountPath(f"{mountpath} is not inside the project root {root}")
    fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.split("/"):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise UnsafeMountPath(f"{mountpath}: {part!r} is not a folder (a symlink or a file: {exc.strerror})") from None
            os.close(fd)
            fd = nxt
    except OSError as exc:
        raise UnsafeMountPath(f"{mountpath}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return os.path.join(real_root, rel)
