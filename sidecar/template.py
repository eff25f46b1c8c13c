"""The worker template: a process that has imported everything a mount's worker needs, and forks
a worker on request, so a worker starts in milliseconds instead of re-importing Python, botocore,
aiohttp, trio and pyfuse3 (about a second of CPU each, several at once at a session's start), and
shares its read-only memory with every worker copy-on-write.

Why forking here is safe: the template never runs an event loop and starts no thread (it checks,
and refuses to fork otherwise): it imports modules, freezes the garbage collector's view of them
(`gc.freeze`, so collections in the children do not write to the shared pages) and then blocks in
`recvmsg` on its socket. A child therefore holds no lock another thread owned, and builds its
trio loop, fsspec's IO thread and its SDK client after the fork, as a spawned worker would.

It warms in two steps. First what a placeholder needs (pyfuse3, trio, logging: a fraction of a
second), then it answers `P`: the daemon forks every mount path's placeholder from it before
anything else, so a held path costs a few MiB of private memory instead of a whole interpreter.
Then, told `W`, it imports the SDKs of the manifest's providers and answers `R`.

Protocol (the daemon's side is `WorkerTemplate` and `ForkedWorker` in sidecar.children): to fork,
the daemon sends one byte, `F` (a worker) or `P` (a placeholder), with two fds attached
(SCM_RIGHTS): the read end of the child's stdin pipe and the write end of its stdout pipe. The
template forks; the child puts them on fds 0 and 1 and runs `sidecar.worker`'s or
`sidecar.placeholder`'s main (it reads its config from stdin, as always); the template answers
the child's pid as 8 bytes. Children are reaped by the template. If the template is gone, the
daemon spawns its children the ordinary way.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import sys
import threading


PROVIDER_MODULES = {"s3": ("s3fs", "aiobotocore.session", "aiohttp", "botocore.session"), "azure": ("adlfs",), "gcs": ("gcsfs",),
                    "webdav": ("webdav4.client", "webdav4.multistatus", "httpx")}


def warm_placeholder() -> None:
    """Imports what a placeholder imports (sidecar.placeholder holds a path while no worker does)."""
    import sidecar.placeholder  # noqa: F401


def warm_up(providers: list[str] | None = None) -> None:
    """Imports what a worker imports, and what its first requests would load: for the given
    providers (the manifest's), or all. A worker of another provider imports its SDK itself."""
    from sidecar.store.patches import sdk_environment

    sdk_environment()
    warm_placeholder()

    import sidecar.fuse_ops  # noqa: F401
    import sidecar.store.factory  # noqa: F401
    import sidecar.worker  # noqa: F401

    for provider, modules in PROVIDER_MODULES.items():
        if providers is not None and provider not in providers:
            continue
        for name in modules:
            try:
                __import__(name)
            except ImportError:
                pass
    from sidecar.store.patches import share_botocore_data

    share_botocore_data()


EXITS_FD: int | None = None  # where each reaped child's wait status goes (pid, status), for the daemon


def _reap(*_: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if EXITS_FD is not None:  # the daemon reports how its child ended (a signal by name)
            try:
                os.write(EXITS_FD, struct.pack("qi", pid, status))
            except OSError:
                pass


def serve(sock: socket.socket, providers: list[str] | None) -> None:
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 2)
        except InterruptedError:
            continue
        if not msg:
            return  # the daemon is gone
        if msg == b"W" and not fds:
            warm_up(providers)
            _freeze()
            sock.sendall(b"R")  # ready for workers
            continue
        if len(fds) != 2 or msg not in (b"F", b"P") or threading.active_count() != 1:  # never fork a process with threads
            for fd in fds:
                os.close(fd)
            sock.sendall(struct.pack("q", -1))
            continue
        pid = os.fork()
        if pid == 0:
            _child(sock, fds, "worker" if msg == b"F" else "placeholder")
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack("q", pid))


def _child(sock: socket.socket, fds: list[int], kind: str) -> None:
    """The forked child: a worker or a placeholder on the given stdin and stdout."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock.close()
    if EXITS_FD is not None:
        os.close(EXITS_FD)
    os.dup2(fds[0], 0)
    os.dup2(fds[1], 1)
    for fd in fds:
        os.close(fd)
    gc.enable()
    code = 1
    try:
        if kind == "worker":
            from sidecar import worker

            worker.main()
        else:
            from sidecar import placeholder

            placeholder.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never fall back into the template's loop


def _freeze() -> None:
    gc.collect()
    gc.freeze()  # the imported world moves to a generation collections never touch


def main() -> None:
    global EXITS_FD
    sock = socket.socket(fileno=int(sys.argv[1]))
    EXITS_FD = int(sys.argv[3]) if len(sys.argv) > 3 else None
    warm_placeholder()
    _freeze()
    try:
        sock.sendall(b"P")  # ready for placeholders
        serve(sock, sys.argv[2].split(",") if len(sys.argv) > 2 else None)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon stopped (even before it asked for anything): nothing to serve


if __name__ == "__main__":
    main()
