"""HTTP/1.1 GETs whose bodies the kernel copies straight into the reader's buffers.

aiohttp hands a body over as the `bytes` of each socket read (a 64 KiB segment on a real link):
per segment its protocol, its parser, its stream buffer and the waiting task each run Python,
and the caller copies the segment again into its block. A cold read of 1 GiB through the link
made about 16,000 such turns, and the IO thread spent 1.4 CPU-s per GiB in them (py-spy and the
threads' CPU, benchmarks/results/HISTORY.md), more than a whole direct client. Here a connection
is an asyncio `BufferedProtocol`: while a block is being received the transport `recv_into`s
the block's own buffer (its recycled pages, sidecar.cache.memory), one Python call per socket
read and none per byte, and the waiting task wakes once per block. The socket's SO_RCVLOWAT
makes a socket read a few hundred KiB rather than a segment (BODY_LOWAT).

Only what a ranged GET of an object needs: one request at a time per connection (no
pipelining), a body delimited by Content-Length, keep-alive; an answer without a length
(chunked) can be read only as a refusal's head (its <Code>), and a connection is then not kept.
TLS is asyncio's, which receives into a buffered protocol's buffer too. Requests through an HTTP
proxy are not made here (`proxied`): the caller leaves them to the SDK.

Concurrency: asyncio, all on one loop (fsspec's IO thread).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

HEAD_LIMIT = 64 * 1024  # bytes of a response's status line and headers, at most
SCRATCH = 64 * 1024  # the receive buffer while no body buffer is given (the head, and what came with it)
CONNECT_TIMEOUT_S = 5.0
# Bytes the kernel gathers for a body before it wakes the loop (SO_RCVLOWAT). A link delivers a
# body in segments of a few dozen KiB (the emulated one in 64 KiB, 2.6 ms apart per connection),
# and each wake costs the IO thread an epoll turn and a Python call: at one per segment, that was
# most of the thread's CPU in a cold read. What a connection received in LOWAT_S at the rate its
# last body part came, at most BODY_LOWAT: a slow link still reports progress often (a call
# without any for seconds counts as stalled). Under memory pressure, or with a receive buffer
# too small for it, Linux wakes the reader earlier anyway.
BODY_LOWAT = 256 * 1024
LOWAT_S = 0.02


class ResponseError(ConnectionError):
    """The connection broke, or the server answered something that is not HTTP/1.x."""


class ConnectFailed(OSError):
    """No connection to the server (refused, unreachable, TLS refused, timed out)."""


class _Connection(asyncio.BufferedProtocol):
    """One kept-alive connection; `request` sends, `head` waits for the answer's head, `fill`
    receives body bytes into a buffer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(SCRATCH)
        self._head = bytearray()
        self._phase = "idle"  # "head": an answer's head is awaited; "body": its body is being read
        self._spill = memoryview(b"")  # body bytes that arrived with the head
        self._target: memoryview | None = None  # where the body goes now
        self._filled = 0
        self.left = 0  # body bytes not received yet
        self._waiter: asyncio.Future[None] | None = None
        self._on_bytes: Callable[[], None] | None = None
        self.lost = False
        self.keep = False  # whether the connection may carry another request after this body
        self.status = 0
        self.headers: dict[str, str] = {}
        self.sized = True  # whether the body's length is known (Content-Length)
        self.sent_any = False  # whether the server answered anything on this connection
        self._sock: socket.socket | None = None  # for SO_RCVLOWAT (None: not a socket we can set it on)
        self._lowat = 1
        self._rate = 0.0  # bytes/s at which the last body part came on this connection (0: none yet)

    # -- the transport's side -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self._sock = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002 (the size is ours to choose)
        if self._target is not None:
            return self._target[self._filled :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self.sent_any = True
        if self._target is not None:
            self._filled += nbytes
            self.left -= nbytes
            if self._on_bytes is not None:
                self._on_bytes()
            if self._filled >= len(self._target):
                self._target = None
                self._pause()
                self._wake(None)
            elif len(self._target) - self._filled < self._lowat:  # (else the last bytes never wake it)
                self._set_lowat(len(self._target) - self._filled)
            return
        if self._phase != "head":  # bytes nobody asked for: the connection cannot be trusted again
            self.abort()
            self._lost(ResponseError("the server sent bytes nobody asked for"))
            return
        seen = len(self._head)
        self._head += self._scratch[:nbytes]
        end = self._head.find(b"\r\n\r\n", max(0, seen - 3))
        if end > HEAD_LIMIT or (end < 0 and len(self._head) > HEAD_LIMIT):
            self.abort()
            self._wake(ResponseError(f"a response head longer than {HEAD_LIMIT} bytes"))
            return
        if end < 0:
            return
        self._pause()  # the body waits in the socket until a buffer is given
        try:
            self._parse(bytes(self._head[:end]))
        except ResponseError as exc:
            self._wake(exc)
            return
        self._spill = memoryview(bytes(self._head[end + 4 :]))
        self._head = bytearray()
        self._phase = "body"
        if self.sized:
            if len(self._spill) > self.left:  # more than the body: a server we do not understand
                self.keep = False
                self._spill = self._spill[: self.left]
            self.left -= len(self._spill)
        self._wake(None)

    def eof_received(self) -> bool:
        self._lost(ResponseError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc if isinstance(exc, ConnectionError) else ResponseError(f"the connection broke: {exc or 'closed'}"))

    def _lost(self, exc: ConnectionError) -> None:
        self.lost = True
        self.keep = False
        self._wake(exc)

    # -- the caller's side ----------------------------------------------------------------------

    def request(self, data: bytes) -> None:
        self._set_lowat(1)
        self._phase, self.status, self.headers, self._head = "head", 0, {}, bytearray()
        self.keep = True
        self.transport.write(data)  # type: ignore[union-attr]
        self._resume()

    async def head(self) -> None:
        """Waits for the answer's status and headers."""
        if self._phase == "head":
            if self.lost:
                raise ResponseError("the connection closed before the answer")
            await self._wait()

    async def fill(self, view: memoryview, on_bytes: Callable[[], None] | None = None) -> int:
        """Receives the body's next bytes into `view`, until it is full or the body ends; the
        bytes received. Raises ResponseError if the connection breaks first."""
        want = min(len(view), self.remaining)
        n = min(want, len(self._spill))
        view[:n] = self._spill[:n]
        self._spill = self._spill[n:]
        if n < want:
            if self.lost:
                raise ResponseError("the server closed the connection mid-body")
            self._target, self._filled, self._on_bytes = view[:want], n, on_bytes
            self._set_lowat(max(1, min(want - n, BODY_LOWAT, int(self._rate * LOWAT_S))))
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                self._resume()
                await self._wait()
                took = loop.time() - started
                if took > 0:
                    self._rate = (want - n) / took
            finally:
                self._target, self._on_bytes = None, None
        return want

    @property
    def remaining(self) -> int:
        """The body's bytes not handed to a caller yet (some may have come with the head)."""
        return self.left + len(self._spill)

    @property
    def done(self) -> bool:
        """Whether the whole body was received."""
        return self._phase == "body" and self.remaining == 0

    def hold_back(self, rcvbuf: int) -> None:
        """A receive buffer of `rcvbuf` bytes for the rest of this connection's one body (see
        `Response.hold_back`), and no low-water mark: one above such a buffer would wake the
        loop only under memory pressure."""
        self.keep = False
        sock = None if self.transport is None else self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError:
                pass
        self._set_lowat(1)
        self._sock = None

    def idle(self) -> None:
        """Between requests: reading goes on, so a server that closes the connection is noticed."""
        self._set_lowat(1)
        self._phase = "idle"
        self._resume()

    def abort(self) -> None:
        self.keep = False
        if self.transport is not None:
            self.transport.abort()

    def _parse(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ResponseError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        length = self.headers.get("content-length")
        self.sized = length is not None and length.isdigit() and "transfer-encoding" not in self.headers
        if self.sized:
            self.left = int(length)  # type: ignore[arg-type]
        else:  # no length: only what came with the head is read (a refusal's head), never kept
            self.left, self.keep = 0, False
        connection = self.headers.get("connection", "").lower()
        if connection == "close" or (parts[0] == "HTTP/1.0" and connection != "keep-alive"):
            self.keep = False

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self, exc: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _set_lowat(self, n: int) -> None:
        if self._sock is not None and n != self._lowat and not self.lost:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
                self._lowat = n
            except OSError:
                self._sock = None

    def _pause(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()


class Response:
    """An answer's status, headers (names in lower case) and body."""

    def __init__(self, pool: ConnectionPool, conn: _Connection) -> None:
        self._pool, self._conn = pool, conn
        self.status, self.headers = conn.status, conn.headers
        self._closed = False

    @property
    def length(self) -> int:
        """The body's bytes not received yet."""
        return self._conn.remaining

    async def fill(self, buffer: bytearray | memoryview, on_bytes: Callable[[], None] | None = None) -> int:
        """Receives the next body bytes into `buffer` until it is full or the body ends (the
        bytes received); ResponseError if the connection breaks first."""
        with memoryview(buffer) as view:
            return await self._conn.fill(view, on_bytes)

    async def read(self, n: int = -1) -> bytes:
        """The next `n` body bytes (all that are left for -1); fewer only at the body's end."""
        size = self.length if n < 0 else min(n, self.length)
        if size <= 0:
            return b""
        buffer = bytearray(size)
        got = await self.fill(buffer)
        return bytes(buffer) if got == size else bytes(buffer[:got])

    def hold_back(self, rcvbuf: int) -> None:
        """Gives the connection a receive buffer of `rcvbuf` bytes (the server is held back
        within about that much while the body waits for its reader); it is not kept after."""
        self._conn.hold_back(rcvbuf)

    def close(self) -> None:
        """Gives the connection back for another request if its body was read to the end, else
        closes it (what is left of the body is never read)."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.done and conn.keep and not conn.lost:
            conn.idle()
            self._pool.release(conn)
        else:
            conn.abort()
            self._pool.release(None)


class ConnectionPool:
    """Kept-alive connections to one server (`scheme://host:port`), at most `limit` in use."""

    def __init__(self, scheme: str, host: str, port: int, limit: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self._ssl = (ssl_context or ssl.create_default_context()) if scheme == "https" else None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)

    async def get(self, target: str, headers: dict[str, str]) -> Response:
        """Sends `GET target` with `headers` and waits for the answer's head. A kept connection
        the server had closed meanwhile is replaced once by a new one."""
        data = "".join([f"GET {target} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"]).encode("latin-1")
        await self._slots.acquire()
        try:
            while True:
                conn, kept = await self._connection()
                try:
                    conn.request(data)
                    await conn.head()
                except ResponseError:
                    conn.abort()
                    if kept and not conn.sent_any:
                        continue  # the server had closed it while it was idle: a new one
                    raise
                except BaseException:
                    conn.abort()
                    raise
                return Response(self, conn)
        except BaseException:
            self._slots.release()
            raise

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: least likely closed by the server
            if not conn.lost:
                conn.sent_any = False
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port, ssl=self._ssl), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"{self.scheme}://{self.host}:{self.port}: {type(exc).__name__}: {exc}") from exc
        return conn, False  # (asyncio sets TCP_NODELAY on its TCP sockets)

    def release(self, conn: _Connection | None) -> None:
        if conn is not None:
            self._idle.append(conn)
        self._slots.release()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()


def proxied(url: str) -> bool:
    """Whether the environment sends requests to `url` through a proxy (HTTP(S)_PROXY, not
    excluded by NO_PROXY), as the SDK would."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies:
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")
