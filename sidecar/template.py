"""The worker template: a process that has imported everything a mount's worker needs, and forks
a worker on request, so a worker starts in milliseconds instead of re-importing Python, botocore,
aiohttp, trio and pyfuse3 (about a second of CPU each, several at once at a session's start), and
shares its read-only memory with every worker copy-on-write.

Why forking here is safe: the template never runs an event loop and starts no thread (it checks,
and refuses to fork otherwise): it imports modules, freezes the garbage collector's view of them
(`gc.freeze`, so collections in the children do not write to the shared pages) and then blocks in
`recvmsg` on its socket. A child therefore holds no lock another thread owned, and builds its
trio loop, fsspec's IO thread and its SDK client after the fork, as a spawned worker would.

Protocol (the daemon's side is `ForkedWorker` in sidecar.daemon): the daemon sends one byte with
two fds attached (SCM_RIGHTS): the read end of the worker's stdin pipe and the write end of its
stdout pipe. The template forks; the child puts them on fds 0 and 1 and runs `sidecar.worker`'s
main (it reads its config from stdin, as always); the template answers the child's pid as 8
bytes. Children are reaped by the template. If the template is gone, the daemon spawns workers
the ordinary way.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import sys
import threading


def warm_up() -> None:
    """Imports what a worker imports, and what its first requests would load."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import sidecar.fuse_ops  # noqa: F401
    import sidecar.placeholder  # noqa: F401
    import sidecar.store.factory  # noqa: F401
    import sidecar.worker  # noqa: F401

    for name in ("s3fs", "aiobotocore.session", "aiohttp", "botocore.session", "adlfs", "gcsfs"):
        try:
            __import__(name)
        except ImportError:
            pass
    share_botocore_data()


def share_botocore_data() -> None:
    """botocore parses its JSON data (the S3 model, endpoints, partitions: tens of MiB of Python
    objects) once per loader instance, and every SDK client has its own loader. Cached per
    process instead, and loaded here, the parsed data is made once in the template and shared by
    every forked worker (copy-on-write), instead of parsed again, privately, by each."""
    try:
        import botocore.loaders
    except ImportError:
        return
    loader_cls = botocore.loaders.Loader
    if getattr(loader_cls, "_sidecar_shared", False):
        return
    load_service_model, load_data = loader_cls.load_service_model, loader_cls.load_data
    models: dict[tuple, object] = {}
    data: dict[str, object] = {}

    def shared_service_model(self, service_name, type_name, api_version=None):  # type: ignore[no-untyped-def]
        key = (tuple(self.search_paths), service_name, type_name, api_version)
        if key not in models:
            models[key] = load_service_model(self, service_name, type_name, api_version)
        return models[key]

    def shared_data(self, name):  # type: ignore[no-untyped-def]
        key = "\0".join([*self.search_paths, name])
        if key not in data:
            data[key] = load_data(self, name)
        return data[key]

    loader_cls.load_service_model = shared_service_model
    loader_cls.load_data = shared_data
    loader_cls._sidecar_shared = True
    try:
        loader = botocore.loaders.create_loader()
        loader.load_service_model("s3", "service-2")
        for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
            try:
                loader.load_data(name)
            except Exception:
                pass
        import botocore.session

        botocore.session.get_session().get_service_model("s3")
    except Exception:
        pass


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 2)
        except InterruptedError:
            continue
        if not msg:
            return  # the daemon is gone
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            sock.sendall(struct.pack("q", -1))
            continue
        if threading.active_count() != 1:  # never fork a process with threads
            sock.sendall(struct.pack("q", -1))
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sock.close()
            os.dup2(fds[0], 0)
            os.dup2(fds[1], 1)
            for fd in fds:
                os.close(fd)
            gc.enable()
            from sidecar import worker

            code = 1
            try:
                worker.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # never fall back into the template's loop
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack("q", pid))


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    warm_up()
    gc.collect()
    gc.freeze()  # the imported world moves to a generation collections never touch
    sock.sendall(b"R")  # ready
    serve(sock)


if __name__ == "__main__":
    main()
