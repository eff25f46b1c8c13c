"""The control and health socket: HTTP/1.1 (h11) over a unix socket, served by the daemon.

    curl --unix-socket /run/storage-sidecar/sidecar.sock http://sidecar/status

GET  /health                      liveness: the event loop answers
GET  /ready                       readiness: no mount is pending or checking (503 until then)
GET  /status                      every mount: state, last error, counters (never a secret)
GET  /metrics                     Prometheus text format
POST /mounts/{name}/mount         mount (again) a mount that is unmounted, failed or skipped
POST /mounts/{name}/unmount       unmount it
POST /mounts/{name}/skip          the session goes on without it
POST /mounts/{name}/credentials   JSON object of credential fields; the check runs again

The socket is created with mode 0660 (owner and group only; `--socket-group` sets the group),
so other users cannot connect. Every request is answered with JSON (or metrics text); a bad
request gets a 4xx with {"error": ..., "code": ...}, never a crash of the daemon. Each connection
serves one request (Connection: close) within a deadline.
"""

from __future__ import annotations

import grp
import json
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from sidecar.log import get_logger

log = get_logger("sidecar.control")

MAX_BODY = 64 * 1024
REQUEST_DEADLINE = 10.0


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


Handler = Callable[[str, str, bytes], Awaitable[tuple[int, Any]]]


async def _send(conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes, ctype: str) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER)
    method = target = ""
    body = b""
    try:
        with trio.fail_after(REQUEST_DEADLINE):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    method, target = event.method.decode(), event.target.decode()
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise HTTPError(413, "body_too_large", f"request bodies are limited to {MAX_BODY} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            try:
                status, payload = await handler(method, target, body)
            except HTTPError:
                raise
            except Exception:
                log.exception("control_request_crashed", method=method, target=target)
                raise HTTPError(500, "internal", "internal error; see the sidecar log") from None
            if isinstance(payload, str):
                await _send(conn, stream, status, payload.encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                await _send(conn, stream, status, json.dumps(payload).encode(), "application/json")
    except HTTPError as exc:
        if conn.our_state is h11.SEND_RESPONSE:
            await _send(conn, stream, exc.status, json.dumps({"error": exc.message, "code": exc.code}).encode(), "application/json")
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            err = json.dumps({"error": f"bad HTTP request: {exc}", "code": "bad_request"}).encode()
            try:
                await _send(conn, stream, exc.error_status_hint, err, "application/json")
            except (h11.LocalProtocolError, trio.BrokenResourceError):
                pass
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


def _bind(path: str, group: str | int | None) -> trio.socket.SocketType:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)  # a socket left by a killed predecessor
    except FileNotFoundError:
        pass
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # created 0660: no window in which others could connect
    try:
        raw.bind(path)
    finally:
        os.umask(old)
    if group is not None:
        gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
    os.chmod(path, 0o660)
    raw.listen(64)
    return trio.socket.from_stdlib_socket(raw)


async def serve(path: str, handler: Handler, *, group: str | int | None = None, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serves the control socket at `path` until cancelled; removes the socket file on the way out."""
    sock = _bind(path, group)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            log.info("control_socket_ready", socket=path)
            await trio.serve_listeners(lambda s: _serve_one(s, handler), [listener], handler_nursery=nursery)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


_MOUNT_ACTION = re.compile(r"^/mounts/(?P<name>[a-z0-9][a-z0-9_-]{0,62})/(?P<action>mount|unmount|skip|credentials)$")


def route(target: str) -> tuple[str, dict[str, str]]:
    path = target.split("?", 1)[0]
    if path in ("/health", "/ready", "/status", "/metrics"):
        return path, {}
    m = _MOUNT_ACTION.match(path)
    if m:
        return "/mounts/{name}/" + m.group("action"), {"name": m.group("name")}
    raise HTTPError(404, "not_found", f"no such endpoint: {path}")
