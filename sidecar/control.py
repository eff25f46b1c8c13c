"""The control and health socket: HTTP/1.1 (h11) over a unix socket, served by the daemon.

    curl --unix-socket /run/storage-sidecar/sidecar.sock http://sidecar/status

GET  /health                      liveness: the event loop answers
GET  /ready                       readiness: no mount is pending or checking (503 until then)
GET  /status                      every mount: state, last error, counters (never a secret)
GET  /metrics                     Prometheus text format
GET  /events                      newline-delimited JSON: every mount's state now, then each change
POST /mounts/{name}/mount         mount (again) a mount that is unmounted, failed or skipped
POST /mounts/{name}/unmount       unmount it
POST /mounts/{name}/skip          the session goes on without it
POST /mounts/{name}/credentials   JSON object of credential fields; the check runs again
POST /mounts/{name}/publish       {"key": ...}: upload an `incomplete` staged file (explicitly)
POST /mounts/{name}/refresh       {"path": ...} or empty: forget cached metadata of a folder / all
POST /mounts/{name}/prefetch      {"paths": [...]}: warm the disk cache with folders/files (background)
POST /mounts/{name}/push          copy mode: upload files new or changed since the copy

The socket is created with mode 0660 (owner and group only; `--socket-group` sets the group),
so other users cannot connect. Every request is answered with JSON (or metrics text); a bad
request gets a 4xx with {"error": ..., "code": ...}, never a crash of the daemon. Each connection
serves one request (Connection: close) within a deadline.

Probes are answered whatever other clients do. The socket's own users (the session's user is in
its group) can open connections and never finish a request; a liveness probe that waited behind
them would restart the sidecar and drop every mount. So:
- a request must arrive whole within READ_DEADLINE, else its connection is closed;
- each peer uid (SO_PEERCRED) has at most PEER_CONNECTIONS connections at once: beyond that, a
  new connection of that uid is closed as soon as it is accepted (its fd freed at once), so one
  user cannot exhaust the daemon's file descriptors or memory, nor wait in front of another's;
- `/health` and `/ready` are answered as soon as they are read, without waiting for a slot of
  the MAX_CONNECTIONS that other requests share.
"""

from __future__ import annotations

import grp
import json
import os
import re
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from sidecar.log import get_logger

log = get_logger("sidecar.control")

MAX_BODY = 64 * 1024
REQUEST_DEADLINE = 10.0  # a request's whole life: read, handled, answered
READ_DEADLINE = 2.0  # the request (head and body) must have arrived by then
MAX_CONNECTIONS = 64  # requests handled at once (probes excepted); more wait for a slot
PEER_CONNECTIONS = 32  # connections one uid may hold open at once; more are closed at accept
PROBES = ("/health", "/ready")


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


def _error_body(status: int, code: str, message: str) -> tuple[int, bytes, str]:
    return status, json.dumps({"error": message, "code": code}).encode(), "application/json"


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> tuple[str, str, bytes] | None:
    """The request's method, target and body; None when the client went away before sending one."""
    method = target = ""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data and conn.their_state is h11.IDLE:
                return None  # connected and left without a request
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace")
            # h11 accepts any declared length; refuse a large body before reading it.
            for name, value in event.headers:
                if name == b"content-length" and int(value) > MAX_BODY:
                    raise HTTPError(413, "body_too_large", f"request bodies are limited to {MAX_BODY} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise HTTPError(413, "body_too_large", f"request bodies are limited to {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return method, target, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _serve_one(stream: trio.SocketStream, handler: Handler, slots: trio.CapacityLimiter | None = None) -> None:
    """Serves one connection. Whatever the client does (garbage, a wrong method, an oversize
    body, hanging up before or while the reply is sent, never finishing its request), the damage
    stays inside this connection: nothing escapes to the listener, so the daemon and its mounts
    live on."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    reply: tuple[int, bytes, str] | None = None
    stream_of: EventStream | None = None
    method = target = ""
    try:
        with trio.move_on_after(REQUEST_DEADLINE) as scope:
            try:
                with trio.fail_after(READ_DEADLINE):
                    request = await _read_request(conn, stream)
                if request is None:
                    return
                method, target, body = request
                try:
                    if slots is None or target.split("?", 1)[0] in PROBES:
                        status, payload = await handler(method, target, body)
                    else:
                        async with slots:
                            status, payload = await handler(method, target, body)
                except HTTPError:
                    raise
                except Exception:
                    log.exception("control_request_crashed", method=method, target=target)
                    raise HTTPError(500, "internal", "internal error; see the sidecar log") from None
                if isinstance(payload, EventStream):
                    stream_of = payload
                elif isinstance(payload, str):
                    reply = (status, payload.encode(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    reply = (status, json.dumps(payload).encode(), "application/json")
            except HTTPError as exc:
                reply = _error_body(exc.status, exc.code, exc.message)
            except h11.RemoteProtocolError as exc:
                reply = _error_body(exc.error_status_hint, "bad_request", f"bad HTTP request: {exc}")
            except ValueError:  # e.g. a Content-Length that is not a number
                reply = _error_body(400, "bad_request", "bad HTTP request")
            if reply is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(conn, stream, *reply)
        if scope.cancelled_caught:
            log.debug("control_request_timed_out", method=method, target=target, deadline=REQUEST_DEADLINE)
        elif stream_of is not None:
            await _stream(conn, stream, stream_of)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, OSError, trio.TooSlowError):
        pass  # the client hung up, was too slow to send its request, or left h11 unable to answer
    except Exception:
        log.exception("control_connection_crashed", method=method, target=target)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.aclose()
            except Exception:
                pass


def peer_uid(stream: trio.SocketStream) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED); -1 if unknown."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[1]
    except (OSError, struct.error):
        return -1


class EventStream:
    """A handler's answer that is a stream of newline-delimited JSON documents (GET /events):
    `lines` yields them; the response lasts until it ends or the client goes away. Each line
    must be taken by the client within REQUEST_DEADLINE, else the client is dropped."""

    def __init__(self, lines: Any) -> None:
        self.lines = lines


async def _stream(conn: h11.Connection, stream: trio.SocketStream, events: EventStream) -> None:
    headers = [("content-type", "application/x-ndjson"), ("transfer-encoding", "chunked"), ("connection", "close")]
    with trio.fail_after(REQUEST_DEADLINE):
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
    async for doc in events.lines:
        with trio.fail_after(REQUEST_DEADLINE):  # a client that takes nothing is dropped
            await stream.send_all(conn.send(h11.Data(data=(json.dumps(doc) + "\n").encode())))
    with trio.move_on_after(1):
        await stream.send_all(conn.send(h11.EndOfMessage()))


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
    raw.listen(socket.SOMAXCONN)  # connections are accepted at once, and refused by uid after
    return trio.socket.from_stdlib_socket(raw)


async def serve(path: str, handler: Handler, *, group: str | int | None = None, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serves the control socket at `path` until cancelled; removes the socket file on the way out."""
    sock = _bind(path, group)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            log.info("control_socket_ready", socket=path)
            slots = trio.CapacityLimiter(MAX_CONNECTIONS)
            open_by_uid: Counter[int] = Counter()

            async def bounded(stream: trio.SocketStream) -> None:
                uid = peer_uid(stream)
                if open_by_uid[uid] >= PEER_CONNECTIONS:
                    log.debug("control_connection_refused", uid=uid, open=open_by_uid[uid])
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    return
                open_by_uid[uid] += 1
                try:
                    await _serve_one(stream, handler, slots)
                finally:
                    open_by_uid[uid] -= 1
                    if not open_by_uid[uid]:
                        del open_by_uid[uid]

            await trio.serve_listeners(bounded, [listener], handler_nursery=nursery)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


_MOUNT_ACTION = re.compile(r"^/mounts/(?P<name>[a-z0-9][a-z0-9_-]{0,62})/(?P<action>mount|unmount|skip|credentials|publish|refresh|prefetch|push|rescue)$")


def route(target: str) -> tuple[str, dict[str, str]]:
    path = target.split("?", 1)[0]
    if path in ("/health", "/ready", "/status", "/metrics", "/events"):
        return path, {}
    m = _MOUNT_ACTION.match(path)
    if m:
        return "/mounts/{name}/" + m.group("action"), {"name": m.group("name")}
    raise HTTPError(404, "not_found", f"no such endpoint: {path}")
