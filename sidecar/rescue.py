"""Rescue: what is found beneath a mount path before the daemon holds it is moved aside, never hidden.

Anything under the bare folder of a mount path was written while no sidecar held it (the
sidecar container was killed, the daemon crashed, a laptop user wrote there while FUSE was
refused). A mount made on top would hide it, and the user would see two different folders
under one name. So each entry is moved to `<cache-dir>/rescued/<mount>/<UTC time>/`, keeping
its relative path, mode and times, reported, and kept until uploaded (`rescue --upload`) or
discarded (`rescue --discard`).

How: the caller opens the bare folder (a directory fd) *before* it mounts the placeholder, mounts,
and only then moves the entries through that fd. Nothing new can land beneath once the
placeholder is there, and what landed before, however late, is still reachable through the fd.
On one file system each top-level entry is renamed (atomic; its whole subtree moves, nothing
is opened or followed). Across file systems (or mounts: the bind mounts of a pod share a file
system but refuse renames between them) the tree is copied without following anything
(regular files copied and fsynced, symlinks recreated from their text, FIFOs, sockets and
devices recreated as nodes), and the originals are removed only once every copy is complete:
a rescue that cannot complete (disk full) removes its partial copies and leaves everything
where it was (`RescueFailed`).

The rescued folders are private to the daemon's user (0700): the entries keep their own modes,
and nobody else can reach them.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.private import UnsafeFolder, private_folder

RESCUED = "rescued"
LISTED_MAX = 1000  # entries listed per mount (status stays small); the count is always whole


class RescueFailed(Exception):
    """The entries could not all be moved aside; they are left where they were."""


@dataclass(frozen=True)
class RescuedEntry:
    path: str  # relative to the mount path, as the user wrote it ("dir/" for an empty folder)
    size: int
    where: str  # where it is now
    kind: str  # file, folder, symlink, fifo, socket, device

    def public(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "where": self.where, "kind": self.kind}


def mount_folder(base: Path | str, mount: str) -> Path:
    return Path(base) / RESCUED / mount


def _new_batch(base: Path, mount: str) -> Path:
    """A new `<UTC time>` folder (with a suffix when one of that second exists)."""
    parent = mount_folder(base, mount)
    private_folder(parent.parent)
    private_folder(parent)
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        dest = parent / (stamp if n == 0 else f"{stamp}.{n}")
        try:
            os.mkdir(dest, 0o700)
            return dest
        except FileExistsError:
            continue
    raise RescueFailed(f"no free folder name under {parent}")


def move_aside(dir_fd: int, base: Path | str, mount: str) -> Path | None:
    """Moves every entry of the folder open at `dir_fd` into a new batch folder under
    `<base>/rescued/<mount>/`; returns it, or None when the folder was empty. RescueFailed
    (everything left in place) when that cannot be done whole."""
    names = os.listdir(dir_fd)
    if not names:
        return None
    try:
        dest = _new_batch(Path(base), mount)
    except (OSError, UnsafeFolder) as exc:
        raise RescueFailed(f"cannot create the rescue folder: {getattr(exc, 'strerror', None) or exc}") from None
    dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        moved = os.fstat(dest_fd).st_dev == os.fstat(dir_fd).st_dev and _rename_all(dir_fd, dest_fd, names)
        if not moved:  # another file system, or another mount of the same one (bind mounts of a pod)
            _copy_all(dir_fd, dest_fd, names)
    except RescueFailed:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        os.close(dest_fd)
    return dest


def _rename_all(src_fd: int, dest_fd: int, names: list[str]) -> bool:
    """Renames every entry; False (nothing moved) when the two folders are on different mounts."""
    moved: list[str] = []
    try:
        for name in names:
            os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dest_fd)
            moved.append(name)
    except OSError as exc:
        for name in moved:  # put back what was moved: all or nothing
            try:
                os.rename(name, name, src_dir_fd=dest_fd, dst_dir_fd=src_fd)
            except OSError:
                pass
        if exc.errno == errno.EXDEV and not moved:
            return False
        raise RescueFailed(f"cannot move {name!r} aside: {exc.strerror}") from None
    return True


def _copy_all(src_fd: int, dest_fd: int, names: list[str]) -> None:
    try:
        for name in names:
            _copy_entry(src_fd, dest_fd, name)
        os.fsync(dest_fd)
    except OSError as exc:
        raise RescueFailed(f"cannot copy {name!r} aside: {exc.strerror}") from None
    for name in names:  # every copy is whole and on disk: the originals may go
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=src_fd)
        else:
            os.unlink(name, dir_fd=src_fd)


def _copy_entry(src_fd: int, dest_fd: int, name: str) -> None:
    """Copies one entry without following a symlink or opening anything but regular files and
    folders (with O_NOFOLLOW)."""
    st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(name, 0o700, dir_fd=dest_fd)
        sub_src = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        sub_dest = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest_fd)
        try:
            for child in os.listdir(sub_src):
                _copy_entry(sub_src, sub_dest, child)
            os.fsync(sub_dest)
            os.chmod(sub_dest, mode)
        finally:
            os.close(sub_src)
            os.close(sub_dest)
    elif stat.S_ISREG(st.st_mode):
        fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
        try:
            fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dest_fd)
            try:
                while os.sendfile(fout, fin, None, 1 << 30):  # between file systems (copy_file_range is not)
                    pass
                os.fsync(fout)
                os.chmod(fout, mode)
            finally:
                os.close(fout)
        finally:
            os.close(fin)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dest_fd)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(name, mode, dir_fd=dest_fd)
    else:  # a socket or a device: the node itself, never what it leads to
        os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dest_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dest_fd, follow_symlinks=False)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "device"


def batch_entries(top: Path | str) -> list[RescuedEntry]:
    """The entries of one rescued batch: files, symlinks, special files and empty folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):  # os.walk never follows symlinks to folders
        rel_dir = os.path.relpath(dirpath, top)
        leaves = list(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        if not leaves and not dirnames and dirpath != str(top):
            found = [(rel_dir + "/", dirpath)]
        else:
            found = [(os.path.normpath(os.path.join(rel_dir, n)), os.path.join(dirpath, n)) for n in leaves]
        for rel, where in found:
            try:
                st = os.lstat(where)
            except OSError:
                continue
            out.append(RescuedEntry(rel, st.st_size if stat.S_ISREG(st.st_mode) else 0, where, _kind(st.st_mode)))
    return out


def inventory(base: Path | str, mount: str, limit: int = LISTED_MAX) -> tuple[list[RescuedEntry], int]:
    """The rescued entries of a mount (at most `limit` listed, oldest batch first) and how many
    there are in all."""
    root = mount_folder(base, mount)
    listed: list[RescuedEntry] = []
    total = 0
    try:
        batches = sorted(os.listdir(root))
    except OSError:
        return [], 0
    for batch in batches:
        entries = batch_entries(root / batch)
        total += len(entries)
        listed.extend(entries[: max(0, limit - len(listed))])
    return listed, total


def discard(base: Path | str, mount: str) -> int:
    """Removes every rescued entry of a mount; returns how many there were."""
    _, total = inventory(base, mount, limit=0)
    shutil.rmtree(mount_folder(base, mount), ignore_errors=True)
    return total


def prune_empty(root: Path) -> None:
    """Removes the empty folders left under `root` (after uploads), and `root` if empty."""
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise


def conflict_key(key: str, batch: str) -> str:
    """The name a rescued file is stored under when its own name holds another object:
    `results.csv` rescued in batch 2026-12-02T190000Z -> `results.rescued-2026-12-02T190000Z.csv`."""
    folder, _, name = key.rpartition("/")
    stem, dot, ext = name.partition(".") if not name.startswith(".") else (name, "", "")
    renamed = f"{stem}.rescued-{batch}{dot}{ext}"
    return f"{folder}/{renamed}" if folder else renamed


async def upload(store: Any, root_prefix: str, folder: Path | str) -> dict[str, list[Any]]:
    """Uploads the rescued entries under `folder` (`<base>/rescued/<mount>`) into the storage, each
    under the key it would have had through the mount. Never overwrites: a name that holds an
    object gets the file under `conflict_key`. What was stored is removed locally; what a bucket
    cannot hold (symlinks, FIFOs, sockets, devices) is kept and listed."""
    from sidecar.errors import ObjectChanged, SidecarError

    done: dict[str, list[Any]] = {"uploaded": [], "conflicts": [], "kept": [], "failed": []}
    root = Path(folder)
    try:
        batches = sorted(b for b in os.listdir(root) if (root / b).is_dir() and not (root / b).is_symlink())
    except OSError:
        return done
    for batch in batches:
        for entry in batch_entries(root / batch):
            key = "/".join(p for p in (root_prefix.strip("/"), entry.path.rstrip("/")) if p)
            try:
                if entry.kind == "folder":
                    await store.put_marker(key)
                    os.rmdir(entry.where)
                    done["uploaded"].append(entry.path)
                    continue
                if entry.kind != "file":
                    done["kept"].append({"path": entry.path, "where": entry.where, "reason": f"a {entry.kind}: a bucket cannot hold it"})
                    continue
                mtime = os.lstat(entry.where).st_mtime
                try:
                    await store.put_file(key, entry.where, entry.size, expected=None, mtime=mtime)
                    done["uploaded"].append(entry.path)
                except ObjectChanged:  # the name holds an object that is not this file's base
                    other = conflict_key(key, batch)
                    await store.put_file(other, entry.where, entry.size, expected=None, mtime=mtime)
                    done["conflicts"].append({"path": entry.path, "key": other})
                os.unlink(entry.where)
            except (SidecarError, OSError) as exc:
                done["failed"].append({"path": entry.path, "where": entry.where, "reason": f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"})
        prune_empty(root / batch)
    return done
