"""Client side of the control socket, for `storage-sidecar status` and the other commands that
talk to a running daemon. Standard library only: `status --probe` runs as a Kubernetes exec
probe every few seconds, so importing this module must stay cheap."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from typing import Any

DEFAULT_SOCKET = "/run/storage-sidecar/sidecar.sock"


def default_socket() -> str:
    return os.environ.get("STORAGE_SIDECAR_SOCKET", DEFAULT_SOCKET)


class Unreachable(Exception):
    """No daemon answers on the socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("sidecar", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def request(path: str, method: str = "GET", body: Any = None, *, sock: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One request to the daemon; returns (HTTP status, decoded JSON or text)."""
    conn = _UnixConnection(sock or default_socket(), timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise Unreachable(f"no storage-sidecar answers at {sock or default_socket()} ({exc.strerror})") from None
    except PermissionError:
        raise Unreachable(f"not allowed to connect to {sock or default_socket()}: run as the session user or in its group") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"the storage-sidecar at {sock or default_socket()} did not answer ({exc})") from None
    finally:
        conn.close()
    ctype = resp.getheader("content-type", "")
    return resp.status, json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def request_settled(path: str, method: str = "GET", body: Any = None, *, sock: str | None = None, timeout: float = 120.0) -> tuple[int, Any]:
    """`request`, and a mount action the daemon accepted but has not finished (202: a slow
    pre-flight or mount) followed on /status until the mount settles or `timeout` passes."""
    code, answer = request(path, method, body, sock=sock, timeout=timeout)
    if code == 202 and method == "POST" and isinstance(answer, dict):
        end = time.monotonic() + timeout
        while answer.get("state") in ("pending", "checking") and time.monotonic() < end:
            time.sleep(0.2)
            _, status = request("/status", sock=sock, timeout=timeout)
            answer = next((m for m in status["mounts"] if m["name"] == answer.get("name")), answer)
        if answer.get("state") not in ("pending", "checking"):
            code = 200
    return code, answer


def events(*, sock: str | None = None, timeout: float = 300.0) -> Any:
    """Yields the daemon's events (GET /events): every mount's state, then each change."""
    conn = _UnixConnection(sock or default_socket(), timeout)
    try:
        conn.request("GET", "/events")
        resp = conn.getresponse()
        if resp.status != 200:
            raise Unreachable(f"the storage-sidecar at {sock or default_socket()} answered {resp.status} to /events")
        while line := resp.readline():
            if line.strip():
                yield json.loads(line)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise Unreachable(f"no storage-sidecar answers at {sock or default_socket()} ({exc.strerror})") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"the storage-sidecar at {sock or default_socket()} stopped answering ({exc})") from None
    finally:
        conn.close()
