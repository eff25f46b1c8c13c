"""Mounting without privilege in the sidecar: a small privileged helper opens /dev/fuse, mounts
it and hands the open file descriptor to the unprivileged worker, which serves `/dev/fd/N`.

    storage-sidecar mount-helper --socket /run/storage-sidecar-helper/helper.sock --allowed-root /mnt/sessions

This is the shape of mountpoint-s3's CSI driver v2 and GKE's gcsfuse driver: in Kubernetes the
helper is a node DaemonSet (privileged, once per node) and session pods need neither
`privileged` nor SYS_ADMIN. libfuse (>= 3.3) accepts `/dev/fd/N` as a mount point, and pyfuse3
passes it through.

Protocol, one mount per connection (JSON lines over a unix socket):
- client: {"op": "mount", "mountpoint": PATH, "fsname": NAME, "readonly": BOOL, "allow_other": BOOL}
- helper: checks that PATH lies inside an allowed root with no symlink below it (O_NOFOLLOW
  walk), opens /dev/fuse, mount(2)s it there owned by the caller's uid/gid (SO_PEERCRED), and
  answers {"ok": true} with the fd attached (SCM_RIGHTS), or {"ok": false, "reason": ...};
- the mount lives as long as the connection: when the caller closes it (or dies), or sends
  {"op": "unmount"}, the helper unmounts (lazily) that mount and no other. A mount may be
  covered by a later one at the same path (a worker's over its placeholder): unmounting by path
  would take the top one, so a covered mount is unmounted once it is on top again.
Callers may be restricted to some uids (`--allow-uid`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
import struct
import threading
from pathlib import Path

from sidecar.log import get_logger
from sidecar.mounttable import UnsafeMountPath, mount_stack, safe_mountpoint

log = get_logger("sidecar.mounthelper")

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class HelperError(Exception):
    pass


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """mount(2); OSError with the errno where it fails."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() if data is not None else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _mount_fuse(target: str, fsname: str, fd: int, uid: int, gid: int, *, readonly: bool, allow_other: bool) -> None:
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    data = f"fd={fd},rootmode=40000,user_id={uid},group_id={gid}" + (",allow_other" if allow_other else "")
    try:
        mount(fsname, target, "fuse.storage-sidecar", flags, data)
    except OSError as exc:
        raise HelperError(f"mount({target}) failed: {exc.strerror}") from None


def _unmount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        log.debug("helper_unmount_failed", target=target, error=os.strerror(ctypes.get_errno()))


def _top_id(target: str) -> int | None:
    stack = mount_stack(target)
    return stack[-1].id if stack else None


class MountHelper:
    def __init__(self, socket_path: str, allowed_roots: list[str], allow_uids: set[int] | None = None) -> None:
        self.socket_path = socket_path
        self.allowed_roots = [os.path.realpath(r) for r in allowed_roots]
        self.allow_uids = allow_uids
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._covered: set[tuple[str, int]] = set()  # (path, mount id) to unmount once on top

    def _release(self, target: str, mount_id: int | None) -> None:
        """Unmounts the mount this helper made (`mount_id`) at `target`, now or, while another
        mount covers it, once that one is gone; then any covered one that is on top again."""
        with self._lock:
            if mount_id is not None:
                self._covered.add((target, mount_id))
            for path, mid in sorted(self._covered):
                stack = mount_stack(path)
                if not any(m.id == mid for m in stack):
                    self._covered.discard((path, mid))
                elif stack[-1].id == mid:
                    _unmount(path)
                    self._covered.discard((path, mid))
                    log.info("helper_unmounted", target=path)

    def _root_for(self, path: str) -> str:
        real = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        for root in self.allowed_roots:
            if real == root or real.startswith(root + "/"):
                return root
        raise HelperError(f"{path} is not inside an allowed root ({', '.join(self.allowed_roots)})")

    def serve(self) -> None:
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.socket_path)
        os.chmod(self.socket_path, 0o666)  # who may mount is decided by uid (SO_PEERCRED), below
        srv.listen(64)
        log.info("mount_helper_ready", socket=self.socket_path, roots=self.allowed_roots)
        try:
            while not self._stop.is_set():
                conn, _ = srv.accept()
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        finally:
            srv.close()

    def _handle(self, conn: socket.socket) -> None:
        target, mount_id = None, None
        try:
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            line = conn.makefile("rb").readline(64 * 1024)
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or req.get("op") != "mount" or not isinstance(req.get("mountpoint"), str):
                    raise ValueError
                if self.allow_uids is not None and uid not in self.allow_uids:
                    raise HelperError(f"uid {uid} may not mount here")
                root = self._root_for(req["mountpoint"])
                target = safe_mountpoint(root, os.path.relpath(os.path.abspath(req["mountpoint"]), root))
                fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
                try:
                    with self._lock:
                        _mount_fuse(target, f"storage-sidecar:{str(req.get('fsname', ''))[:64]}", fd, uid, gid,
                                    readonly=bool(req.get("readonly")), allow_other=bool(req.get("allow_other", True)))
                        mount_id = _top_id(target)
                    socket.send_fds(conn, [json.dumps({"ok": True, "mountpoint": target}).encode() + b"\n"], [fd])
                finally:
                    os.close(fd)
                log.info("helper_mounted", target=target, uid=uid, pid=pid)
            except (ValueError, HelperError, UnsafeMountPath, OSError) as exc:
                reason = str(exc) or "the request must be a JSON object with op=mount and a mountpoint"
                conn.sendall(json.dumps({"ok": False, "reason": reason}).encode() + b"\n")
                log.warning("helper_refused", uid=uid, reason=reason)
                target = None
                return
            # The mount lives as long as this connection.
            while data := conn.recv(4096):
                if b'"unmount"' in data:
                    break
        except OSError:
            pass
        finally:
            if target is not None:
                self._release(target, mount_id)
            conn.close()


def request_fuse_fd(helper_socket: str, mountpoint: str, *, fsname: str, readonly: bool, allow_other: bool = True) -> tuple[int, socket.socket]:
    """Client side (the worker): asks the helper to mount; returns (fuse fd, the connection to
    keep open for the mount's lifetime)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(helper_socket)
    conn.sendall(json.dumps({"op": "mount", "mountpoint": mountpoint, "fsname": fsname, "readonly": readonly,
                             "allow_other": allow_other}).encode() + b"\n")
    msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 1)
    answer = json.loads(msg.splitlines()[0]) if msg else {"ok": False, "reason": "the helper closed the connection"}
    if not answer.get("ok") or not fds:
        conn.close()
        raise HelperError(answer.get("reason") or "no file descriptor from the helper")
    return fds[0], conn
