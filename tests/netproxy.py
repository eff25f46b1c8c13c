"""An HTTP/1.1 proxy between a client and a local object-store server that behaves like a real
link or a failing backend: the link emulator and fault proxy of the test suite and benchmarks.

    with LinkProxy(upstream_port) as proxy:          # http://127.0.0.1:{proxy.port}
        proxy.set(bandwidth=25e6, first_byte_delay=0.03)   # per connection, like S3
        proxy.set(stall=True)                        # requests hang (until switched off)
        proxy.set(reset_fraction=0.1)                # responses cut mid-body (TCP RST)
        proxy.set(error_fraction=0.2)                # 503 SlowDown without reaching the server
        proxy.set(refuse=True)                       # new connections are reset at once
        proxy.counts["GET"], proxy.counts["LIST"], proxy.bytes_up, proxy.bytes_down

Every knob can be switched while the proxy runs. Requests are counted by kind (LIST is a GET
with `list-type`/`prefix`/`delimiter`/`restype=container` or a GCS `/o?` listing; GET, HEAD,
PUT, POST, DELETE; COPY is a PUT with a copy source, DELETE_MANY a POST ?delete), and the bytes of request and response
bodies are counted, so tests assert request counts and bytes instead of timings.

Each client connection gets a thread; requests on it are handled one after the other (HTTP/1.1
clients such as aiohttp do not pipeline), each over a new upstream connection. Bodies are
delimited by Content-Length or chunked encoding, so keep-alive works as with a real server.
"""

from __future__ import annotations

import fcntl
import random
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any

CHUNK = 64 * 1024
SEND_BUFFER = 256 * 1024  # the proxy's send buffer towards a client (the kernel doubles it)


class _Closed(Exception):
    pass


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(CHUNK)
        if not data:
            raise _Closed()
        self.buf += data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 1 << 20:
                raise _Closed()
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def some(self, limit: int) -> bytes:
        if not self.buf:
            self._fill()
        out, self.buf = self.buf[:limit], self.buf[limit:]
        return out

    def until_close(self) -> bytes:
        if self.buf:
            out, self.buf = self.buf, b""
            return out
        data = self.sock.recv(CHUNK)
        if not data:
            raise _Closed()
        return data


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return lines[0], fields


def _kind(method: str, target: str, fields: dict[str, str]) -> str:
    if method == "GET":
        query = target.partition("?")[2]
        if any(p in query for p in ("list-type", "prefix=", "delimiter=", "restype=container", "comp=list")) or "/o?" in target or target.endswith("/o"):
            return "LIST"
        return "GET"
    if method == "PUT" and ("x-amz-copy-source" in fields or "x-ms-copy-source" in fields):
        return "COPY"
    if method == "POST" and target.partition("?")[2].split("&")[0] in ("delete", "delete="):
        return "DELETE_MANY"  # S3 DeleteObjects
    return method


class LinkProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", **settings: Any) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.bandwidth: float | None = None  # bytes/s per connection and direction; None: unlimited
        self.first_byte_delay = 0.0  # s before each response's first byte
        self.stall = False
        self.stall_kinds: frozenset[str] = frozenset()  # requests of these kinds stall (as `stall`, for them only)
        self.reset_fraction = 0.0
        self.error_fraction = 0.0
        self.errors_next = 0  # the next N responses are replaced by a 503 (after the server acted)
        self.refuse = False
        self.counts: Counter[str] = Counter()
        self.continues = 0  # requests that asked for `100 Continue` (a round trip before the body)
        self.bytes_up = 0  # request bodies (client -> server)
        self.bytes_down = 0  # response bodies (server -> client)
        self.resets = 0
        self.errors_injected = 0
        self.responses: list[Response] = []  # every response body forwarded, in order
        self.requests: list[tuple[str, str, str]] = []  # (kind, target, Range) of every request, in order
        self.in_flight: Counter[str] = Counter()  # requests of each kind between their head and their response's end
        self.max_in_flight: Counter[str] = Counter()  # the most of each kind in flight at once since the last reset
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._unstalled = threading.Condition()
        self.set(**settings)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, name="linkproxy-accept", daemon=True)
        self._thread.start()

    # -- control ------------------------------------------------------------------------------

    def set(self, **settings: Any) -> None:
        for name, value in settings.items():
            if not hasattr(self, name) or name.startswith("_") or name in ("counts", "continues", "upstream", "port", "requests", "in_flight", "max_in_flight"):
                raise AttributeError(f"no proxy setting {name!r}")
            setattr(self, name, value)
        with self._unstalled:
            self._unstalled.notify_all()

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.max_in_flight = Counter(+self.in_flight)
            self.bytes_up = self.bytes_down = self.resets = self.errors_injected = self.continues = 0
            self.responses = []
            self.requests = []

    def close(self) -> None:
        self._stop.set()
        self.set(stall=False)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        self._thread.join(5)

    def __enter__(self) -> "LinkProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the link -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                _reset(client)
                continue
            # A small send buffer: bytes counted as sent down have left the proxy for the
            # client (a reader that stops reading holds back the server within SEND_BUFFER,
            # rather than the bytes piling up here, counted though never delivered).
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            # A response's head and the small body after it go out at once, as a server's do:
            # with Nagle's algorithm the body waited for the client's delayed ACK of the head
            # (up to 40 ms a response on Linux, a latency the emulated link does not have).
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client,), name="linkproxy-conn", daemon=True).start()

    def _track(self, s: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(s)

    def _send(self, sock: socket.socket, data: bytes, started: float, sent: list[int]) -> None:
        """Sends `data`, paced to the bandwidth cap from the start of this body (sent[0] counts
        the bytes handed to the socket)."""
        view = memoryview(data)
        while view:
            piece = view[:CHUNK]
            sock.sendall(piece)
            view = view[len(piece) :]
            sent[0] += len(piece)
            bw = self.bandwidth
            if bw:
                ahead = sent[0] / bw - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    def _wait_unstalled(self, kind: str = "") -> None:
        with self._unstalled:
            while (self.stall or kind in self.stall_kinds) and not self._stop.is_set():
                self._unstalled.wait(0.5)

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        self._track(client, True)
        try:
            creader = _Reader(client)
            while not self._stop.is_set():
                head = creader.head()
                request_line, fields = _headers(head)
                method, target = (request_line.split(" ") + ["", ""])[:2]
                kind = _kind(method, target, fields)
                with self._lock:
                    self.counts[kind] += 1
                    self.requests.append((kind, target, fields.get("range", "")))
                    self.continues += fields.get("expect", "").lower() == "100-continue"
                    self.in_flight[kind] += 1
                    self.max_in_flight[kind] = max(self.max_in_flight[kind], self.in_flight[kind])
                try:
                    if self.stall or kind in self.stall_kinds:
                        self._wait_unstalled(kind)
                        raise _Closed()  # a stalled request never gets an answer
                    # A new upstream connection per request: the local servers (werkzeug for moto)
                    # may close a connection after any response, and the client's keep-alive is
                    # what the link emulation is about.
                    if upstream is not None:
                        self._track(upstream, False)
                        upstream.close()
                    upstream = socket.create_connection(self.upstream)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._track(upstream, True)
                    ureader = _Reader(upstream)
                    if fields.get("expect", "").lower() == "100-continue":
                        # Answered here, after the link's first-byte delay (it is a round trip on a
                        # real link too), and the header dropped: the server needs no 100 round trip.
                        head = b"\r\n".join(h for h in head.split(b"\r\n") if not h.lower().startswith(b"expect:"))
                        if self.first_byte_delay:
                            time.sleep(self.first_byte_delay)
                        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    started, sent = time.monotonic(), [0]
                    upstream.sendall(head)
                    self._pipe_body(creader, upstream, fields, started, sent, up=True)
                    rhead = ureader.head()
                    status_line, rfields = _headers(rhead)
                    if self.first_byte_delay:
                        time.sleep(self.first_byte_delay)
                    if self.stall:
                        self._wait_unstalled()
                        raise _Closed()
                    with self._lock:
                        inject = self.errors_next > 0
                        self.errors_next -= inject
                    if inject or (self.error_fraction and self._rng.random() < self.error_fraction):
                        self._drain_response(ureader, method, status_line, rfields)
                        body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                        with self._lock:
                            self.errors_injected += 1
                        continue
                    cut = self.reset_fraction and self._rng.random() < self.reset_fraction
                    client.sendall(rhead)
                    started, sent = time.monotonic(), [0]
                    response = Response(kind, fields.get("range", ""))
                    with self._lock:
                        self.responses.append(response)
                    self._pipe_body(ureader, client, rfields, started, sent, up=False, method=method, status_line=status_line, cut=bool(cut),
                                    response=response)
                    if rfields.get("connection", "").lower() == "close":
                        break
                finally:
                    with self._lock:
                        self.in_flight[kind] -= 1
        except (_Closed, OSError):
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    self._track(s, False)
                    try:
                        s.close()
                    except OSError:
                        pass

    def _drain_response(self, reader: _Reader, method: str, status_line: str, fields: dict[str, str]) -> None:
        """Reads a body that is not forwarded (an injected error replaces it)."""
        self._pipe_body(reader, None, fields, 0, [0], up=False, method=method, status_line=status_line)

    def _pipe_body(self, reader: _Reader, dst: socket.socket | None, fields: dict[str, str], started: float, sent: list[int],
                   *, up: bool, method: str = "", status_line: str = "", cut: bool = False, response: Response | None = None) -> int:
        """Forwards one message body; returns its length. With `cut`, half of it is sent, then
        the client connection is reset.

        A client that hangs up mid-body (an abandoned open-ended range) has been sent only what
        its kernel acknowledged: the bytes still in the proxy's send queue never crossed the
        link (on a real link they stay in the server's buffer, which the client's receive window
        holds back). The body's count is then what TCP says was acknowledged since the body
        began (`tcpi_bytes_acked`), exact."""
        if not up:
            code = int(status_line.split(" ")[1]) if status_line.count(" ") else 200
            if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
                return 0
        total = 0
        # Every byte written to the client before this body: acknowledged or still queued (the
        # sum stands still while nothing is written).
        before = _acked(dst) + _queued(dst) if response is not None and dst is not None else 0

        def out(data: bytes) -> None:
            if dst is not None:
                try:
                    self._send(dst, data, started, sent)
                except OSError:
                    if response is not None:
                        delivered = max(0, _acked(dst) - before)
                        with self._lock:
                            self.bytes_down += delivered - response.sent
                            response.sent, response.unsent = max(response.sent, delivered), max(0, response.sent - delivered)
                    raise
            with self._lock:  # counted as it goes: a client may hang up mid-body (open-ended ranges)
                if up:
                    self.bytes_up += len(data)
                elif dst is not None:
                    self.bytes_down += len(data)
                    if response is not None:
                        response.sent += len(data)

        if "content-length" in fields:
            left = int(fields["content-length"])
            limit = left // 2 if cut else -1
            while left:
                data = reader.some(min(left, CHUNK))
                if cut and total + len(data) > limit:
                    out(data[: max(0, limit - total)])
                    with self._lock:
                        self.resets += 1
                    assert dst is not None
                    _reset(dst)
                    raise _Closed()
                out(data)
                left -= len(data)
                total += len(data)
            return total
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = reader.line()
                size = int(size_line.split(b";")[0], 16)
                out(size_line)
                if size == 0:  # the last chunk: trailer lines up to an empty one, no chunk data
                    while (trailer := reader.line()) != b"\r\n":
                        out(trailer)
                    out(b"\r\n")
                    return total
                left = size + 2  # the data and its CRLF
                while left:
                    data = reader.some(left)
                    out(data)
                    left -= len(data)
                total += size
        if up:
            return 0  # a request without a body
        while True:  # a response delimited by the end of the connection
            try:
                data = reader.until_close()
            except _Closed:
                raise
            out(data)
            total += len(data)


class Response:
    """One forwarded response body: its request's kind and Range header, the bytes handed to
    the client's socket, and of those the ones still queued when the client hung up."""

    __slots__ = ("kind", "range", "sent", "unsent", "at")

    def __init__(self, kind: str, range_: str) -> None:
        self.kind, self.range, self.sent, self.unsent = kind, range_, 0, 0
        self.at = time.monotonic()  # when its head was forwarded (a timeline of a workload's requests)

    @property
    def delivered(self) -> int:
        return self.sent - self.unsent


SIOCOUTQ = 0x5411  # linux/sockios.h: bytes in a socket's send queue (unacknowledged or unsent)
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in linux/tcp.h's struct tcp_info


def _queued(sock: socket.socket) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _acked(sock: socket.socket) -> int:
    """Bytes of this connection the peer's kernel has acknowledged (kept after a reset)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0
    return struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0] if len(info) >= TCPI_BYTES_ACKED + 8 else 0


def _reset(sock: socket.socket) -> None:
    """Closes with a TCP RST (SO_LINGER 0), as a broken link or a dying server does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
