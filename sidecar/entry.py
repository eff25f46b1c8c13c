"""The `storage-sidecar` console script. `status --probe ...` is answered here, with nothing but
the standard library's socket module: it runs as a Kubernetes exec probe every few seconds, so
it must cost little more than starting Python. Every other command goes to the click CLI."""

from __future__ import annotations

import os
import socket
import sys

PROBES = {"liveness": "/health", "readiness": "/ready", "startup": "/ready"}


def probe(kind: str, sock: str) -> int:
    """0 when the daemon answers 200 on the probe's endpoint; 1 (with a message) otherwise."""
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3.0)
        s.connect(sock)
        s.sendall(f"GET {PROBES[kind]} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError) as exc:
        print(f"storage-sidecar {kind} probe failed: cannot reach {sock} ({exc})", file=sys.stderr)
        return 1
    if status != 200:
        print(f"storage-sidecar {kind} probe failed: HTTP {status} {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    return 0


def _fast_probe(argv: list[str]) -> int | None:
    if not argv or argv[0] != "status" or not any(a == "--probe" or a.startswith("--probe=") for a in argv):
        return None
    kind, sock = None, os.environ.get("STORAGE_SIDECAR_SOCKET", "/run/storage-sidecar/sidecar.sock")
    rest = argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg in ("--probe", "--socket") and rest:
            value = rest.pop(0)
        elif arg.startswith(("--probe=", "--socket=")):
            arg, value = arg.split("=", 1)
        else:
            return None  # anything else: let the full CLI parse it (and report errors)
        if arg == "--probe":
            kind = value
        else:
            sock = value
    if kind not in PROBES:
        return None
    return probe(kind, sock)


def main() -> None:
    code = _fast_probe(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from sidecar.cli import main as cli

    cli()
