"""FUSE passthrough: a file whose whole version is in the disk cache is read by the kernel
straight from the cache file (Linux 6.9+), at the disk's speed, without a READ to this process.

The protocol's two steps are set by `sidecar/_fusept.c` in the answers libfuse writes (see
there); this module loads it and holds the rest:
- `load()` must run before pyfuse3's extension is loaded in the process (the modules that import
  pyfuse3 import this one first), else pyfuse3's mount binds to libfuse's own and nothing is
  passed through;
- `open_backing(path)` asks the kernel for a backing id (FUSE_DEV_IOC_BACKING_OPEN, which needs
  CAP_SYS_ADMIN: a worker without it, behind a mount helper, says so once and serves every read
  itself);
- `register(fh, id)` makes the answer to the open that returns `fh` a passthrough one.

The kernel's rules, which `OpenFiles` keeps for the FUSE adapter: every open of an inode while
one is passed through must be passed through to the same backing file, and none may be while
the inode is open otherwise (the kernel fails such an open with EIO). So an inode's opens are
passed through only when it has no other open handle, and then all of them are until the last
closes: those are read-only opens (an inode is one version of an object, so its backing file is
that version's, whatever the disk cache does with it meanwhile: the kernel holds the file). A
writer of an inode passed through (an open for writing, a truncation by path) is sent to a new
inode of its key instead (`Filesystem.make_way_for_writer`): the readers keep their version, as
they would had another client replaced the object.

A cache file is trusted for passthrough (read without the per-block checksums of the normal
path) when it was written since the machine booted: a power loss can leave a file's table
written and its data not, which only the checksums find. Older files are read the normal way.

STORAGE_SIDECAR_PASSTHROUGH=0 turns it off (benchmarks compare both), and with it the hook's
other use, zero-message opens (`zero_message_opens`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.util
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger()

_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map {i32 fd, u32 flags, u64 padding})
_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, u32)
_HOOKED, _OFFERED, _ACTIVE, _ZERO_OPEN = 1, 2, 4, 8

_lib: ctypes.CDLL | None = None
_refused = False  # the kernel refused a backing file (no CAP_SYS_ADMIN): not asked again


def wanted() -> bool:
    return os.environ.get("STORAGE_SIDECAR_PASSTHROUGH", "1") != "0"


def load() -> bool:
    """Loads the protocol hook, once per process, if it was built and pyfuse3 is not loaded yet."""
    global _lib
    if _lib is not None:
        return True
    if not wanted() or "pyfuse3" in sys.modules:
        return False
    spec = importlib.util.find_spec("sidecar._fusept")
    if spec is None or not spec.origin:
        return False
    try:
        lib = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError:
        return False
    lib.sidecar_pt_register.argtypes = [ctypes.c_uint64, ctypes.c_int32]
    lib.sidecar_pt_unregister.argtypes = [ctypes.c_uint64]
    lib.sidecar_pt_pending.argtypes = [ctypes.c_uint64]
    lib.sidecar_pt_ioctls.restype = ctypes.c_uint64
    _lib = lib
    return True


def active() -> bool:
    """Whether this process's FUSE session agreed on passthrough with the kernel."""
    return _lib is not None and not _refused and _lib.sidecar_pt_state() == _HOOKED | _OFFERED | _ACTIVE


def state() -> str:
    """For status and logs: why files are or are not passed through."""
    if _lib is None:
        return "off" if not wanted() else "unavailable"
    bits = _lib.sidecar_pt_state()
    if not bits & _HOOKED:
        return "not hooked"
    if not bits & _OFFERED:
        return "kernel without passthrough"
    if _refused:
        return "refused (no CAP_SYS_ADMIN)"
    return "on" if bits & _ACTIVE else "not agreed"


def open_backing(path: str, size: int) -> int | None:
    """A backing id for the file at `path` if it holds `size` bytes and was written since boot;
    None if not (gone, other, untrusted, or refused)."""
    global _refused
    assert _lib is not None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size != size or st.st_mtime < _BOOTED:
            return None
        arg = bytearray(struct.pack("<iIQ", fd, 0, 0))
        return fcntl.ioctl(_lib.sidecar_pt_fd(), _BACKING_OPEN, arg, True)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            _refused = True
            log.info("passthrough_refused", reason="FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN")
        else:
            log.warning("passthrough_backing_failed", error=exc.strerror)
        return None
    finally:
        os.close(fd)


def device_reader(wanted: bool) -> None:
    """Whether the next mount's hook reads the device in its own thread and refuses IOCTLs there
    (see `_fusept.c`): for read-only mounts, not writable ones, whose WRITEs it would copy once
    more. Call before pyfuse3.init."""
    if _lib is not None:
        _lib.sidecar_pt_device_reader(int(wanted))


def answered_in_hook() -> dict[str, int]:
    """FUSE requests the hook's device reader answered without this process's event loop, by
    operation (IOCTL: the isatty() of Python's open()); empty when none."""
    if _lib is None:
        return {}
    ioctls = int(_lib.sidecar_pt_ioctls())
    return {"ioctl": ioctls} if ioctls else {}


def zero_message_opens_available() -> str:
    """"yes" if `zero_message_opens` can be turned on (now or later), else why not."""
    if _lib is None:
        return "off" if not wanted() else "unavailable (the protocol hook is not built or not loaded first)"
    if not _lib.sidecar_pt_state() & _HOOKED:
        return "not hooked"
    return "yes"


def zero_message_opens() -> str:
    """Makes the hook give a READ or FSYNC without a handle its node id, in the file handle's
    place (`sidecar.vfs.core.ZERO_OPEN_FH`): after that, and only then, the FUSE adapter may
    answer OPEN with ENOSYS, the kernel's sign to open this connection's files alone. Call it
    once the session is mounted. Returns "on", or why not."""
    available = zero_message_opens_available()
    if available != "yes":
        return available
    assert _lib is not None
    _lib.sidecar_pt_zero_open()
    return "on"


def close_backing(backing_id: int) -> None:
    assert _lib is not None
    try:
        fcntl.ioctl(_lib.sidecar_pt_fd(), _BACKING_CLOSE, struct.pack("<I", backing_id))
    except OSError as exc:
        log.warning("passthrough_close_failed", error=exc.strerror)


def register(fh: int, backing_id: int) -> bool:
    assert _lib is not None
    return _lib.sidecar_pt_register(fh, backing_id) == 0


def unregister(fh: int) -> None:
    assert _lib is not None
    _lib.sidecar_pt_unregister(fh)


def _boot_time() -> float:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("inf")  # not known: nothing is trusted


_BOOTED = _boot_time()


@dataclass
class _Inode:
    backing_id: int = 0
    passed: int = 0  # open handles passed through
    others: int = 0  # open handles served by this process
    unconfirmed: list[int] = field(default_factory=list)  # handles passed through whose answer was not seen sent


class OpenFiles:
    """The open handles of a mount's inodes, and which are passed through (the kernel's rules
    above). `backing_file(fh)` names the file holding exactly a handle's version, and its size,
    or None. The backing file is opened on the event loop: after a restart that open reads the
    file's inode from disk, but a thread per open cost more CPU than the wait it saved, on 2
    cores (benchmarks/results/HISTORY.md, 2026-12-04).

    A handle counts as passed through once its answer was sent with the backing id: the hook
    patches only the answers to OPEN requests it noted, and one it could not note (every slot
    taken) is sent as it was. Such a handle is found at the next open of its inode (before
    that open is decided) or at its release, and counted as served by this process."""

    def __init__(self, backing_file: Callable[[int], tuple[str, int] | None]) -> None:
        self._backing_file = backing_file
        self._inodes: dict[int, _Inode] = {}
        self._handles: dict[int, tuple[int, bool]] = {}  # fh -> (inode, passed through)
        self._passed_before: set[int] = set()  # inodes passed through since the kernel looked them up
        self.opens = 0  # opens passed through

    def passed_through(self, ino: int) -> bool:
        node = self._inodes.get(ino)
        return node is not None and node.passed > 0

    def opened(self, ino: int, fh: int, passable: bool = True, page_cached: bool = False) -> bool:
        """Records an open (`passable`: a read-only one); True if its answer passes it through.
        `page_cached`: a small file this process served before, whose bytes the kernel keeps
        in the mounted file's page cache: answered as before, unless it was passed through
        before (then its pages are the cache file's). A passthrough open costs the worker more
        CPU than one the page cache answers (an open, a stat and two ioctls), at the same
        files/s (benchmarks/results/HISTORY.md, 2026-12-04)."""
        node = self._inodes.setdefault(ino, _Inode())
        self._confirm(ino, node)
        passed = False
        if passable and node.others == 0 and active() and (not page_cached or ino in self._passed_before):
            if not node.backing_id and (found := self._backing_file(fh)) is not None:
                node.backing_id = open_backing(*found) or 0
            passed = bool(node.backing_id) and register(fh, node.backing_id)
        if passed:
            node.passed += 1
            node.unconfirmed.append(fh)
            self.opens += 1
            self._passed_before.add(ino)
        else:
            node.others += 1
        self._handles[fh] = (ino, passed)
        return passed

    def _confirm(self, ino: int, node: _Inode) -> None:
        """Handles of `node` whose answers went out without the backing id count as served here."""
        assert _lib is not None or not node.unconfirmed
        for fh in node.unconfirmed:
            if _lib is not None and _lib.sidecar_pt_pending(fh):
                unregister(fh)
                node.passed -= 1
                node.others += 1
                self.opens -= 1
                self._handles[fh] = (ino, False)
        node.unconfirmed.clear()

    def released(self, fh: int) -> None:
        ino = self._handles.get(fh, (0, False))[0]
        node = self._inodes.get(ino)
        if node is not None:
            self._confirm(ino, node)
        ino, passed = self._handles.pop(fh, (0, False))
        if node is None:
            return
        if passed:
            node.passed -= 1
        else:
            node.others -= 1
        if node.passed <= 0 and node.backing_id:
            close_backing(node.backing_id)  # (the kernel keeps the file while it has it open)
            node.backing_id = 0
        if node.passed <= 0 and node.others <= 0:
            del self._inodes[ino]

    def forgotten(self, ino: int) -> None:
        self._passed_before.discard(ino)

    def as_dict(self) -> dict[str, object]:
        return {"state": state(), "opens": self.opens, "open": sum(n.passed for n in self._inodes.values()),
                "served": sum(n.others for n in self._inodes.values())}


load()
