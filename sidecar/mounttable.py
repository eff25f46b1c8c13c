"""The kernel's mount table (/proc/self/mounts): the one place that reads it."""

from __future__ import annotations

import os


def _entries() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount in this mount namespace."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                # spaces, tabs, newlines and backslashes in paths are octal escapes
                point = parts[1].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
                out.append((point, parts[2]))
    return out


def fuse_mounts() -> list[str]:
    """Mount points of FUSE file systems."""
    return [point for point, fstype in _entries() if fstype.startswith("fuse")]


def is_mounted(path: str) -> bool:
    """Whether something is mounted at `path` (resolved without touching the mount itself)."""
    real = os.path.realpath(path)
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
