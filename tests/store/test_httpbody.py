"""sidecar.store.httpbody against a scripted HTTP/1.1 server on 127.0.0.1 (each test says what
the server answers, byte for byte): bodies land in the caller's buffer, connections are kept
only when the answer allows it, and a broken or odd answer is an error, never wrong bytes."""

import asyncio

import pytest

from sidecar.store.httpbody import ConnectFailed, ConnectionPool, ResponseError


class Server:
    """Answers each request on a connection with the next of `answers` (bytes, or a callable
    taking the writer), then closes the connection if `close_after` answers were sent on it."""

    def __init__(self, answers, close_after=None):
        self.answers = list(answers)
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader, writer):
        self.connections += 1
        sent = 0
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.answers.pop(0)
                if callable(answer):
                    await answer(writer)
                else:
                    writer.write(answer)
                    await writer.drain()
                sent += 1
                if self.close_after is not None and sent >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_body_is_received_into_the_given_buffer_across_blocks_and_the_connection_is_kept():
    body = bytes(range(256)) * 4096  # 1 MiB, sent with the head in one write

    async def main():
        async with Server([ok(body), ok(b"second")]) as srv:
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            resp = await pool.get("/b/k", {"Host": "x", "Range": "bytes=0-1048575"})
            assert resp.status == 206 and resp.headers["content-length"] == str(len(body))
            first, second = bytearray(300_000), bytearray(len(body) - 300_000)
            ticks = []
            assert await resp.fill(first, lambda: ticks.append(1)) == len(first)
            assert await resp.fill(second) == len(second)
            assert bytes(first + second) == body
            assert await resp.fill(bytearray(10)) == 0  # the body's end
            resp.close()
            again = await pool.get("/b/k2", {"Host": "x"})
            assert await again.read() == b"second"
            again.close()
            assert srv.connections == 1  # one kept-alive connection for both
            assert srv.requests[0].startswith(b"GET /b/k HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1048575\r\n")
            pool.close()

    run(main())


def test_a_kept_connection_the_server_closed_is_replaced_by_a_new_one():
    async def main():
        async with Server([ok(b"one"), ok(b"two")], close_after=1) as srv:
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            resp = await pool.get("/k", {"Host": "x"})
            assert await resp.read() == b"one"
            resp.close()
            await asyncio.sleep(0)  # (the server's close may or may not have arrived yet: both are handled)
            resp = await pool.get("/k", {"Host": "x"})
            assert await resp.read() == b"two"
            resp.close()
            assert srv.connections == 2
            pool.close()

    run(main())


@pytest.mark.parametrize("answer", [
    "HTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    "HTTP/1.0 206 Partial Content\r\nContent-Length: 3\r\n\r\nabc",
])
def test_an_answer_that_ends_its_connection_is_not_kept(answer):
    async def main():
        async with Server([answer.encode(), ok(b"next")]) as srv:
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            resp = await pool.get("/k", {"Host": "x"})
            assert await resp.read() == b"abc"
            resp.close()
            assert pool._idle == []
            pool.close()

    run(main())


def test_a_body_cut_short_is_an_error_not_fewer_bytes():
    async def cut(writer):
        writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        writer.transport.abort()

    async def main():
        async with Server([cut]) as srv:
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            resp = await pool.get("/k", {"Host": "x"})
            with pytest.raises(ResponseError):
                await resp.fill(bytearray(100000))
            resp.close()
            assert pool._idle == []
            pool.close()

    run(main())


def test_a_refusal_without_a_length_gives_what_came_with_its_head_and_is_not_kept():
    chunked = (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3b\r\n<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>\r\n0\r\n\r\n")

    async def main():
        async with Server([chunked]) as srv:
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            resp = await pool.get("/k", {"Host": "x"})
            assert resp.status == 404
            assert b"<Code>NoSuchKey</Code>" in await resp.read(4096)  # at once: nothing waited for
            resp.close()
            assert pool._idle == []
            pool.close()

    run(main())


def test_not_http_and_a_head_too_long_are_errors():
    async def main():
        async with Server([b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n"], close_after=1) as srv:
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            with pytest.raises(ResponseError, match="not an HTTP/1.x answer"):
                await pool.get("/k", {"Host": "x"})
            with pytest.raises(ResponseError, match="longer than"):
                await pool.get("/k", {"Host": "x"})
            pool.close()

    run(main())


def test_no_server_is_a_connect_failure():
    async def main():
        async with Server([]) as srv:
            port = srv.port
        pool = ConnectionPool("http", "127.0.0.1", port, 4)
        with pytest.raises(ConnectFailed):
            await pool.get("/k", {"Host": "x"})
        assert pool._slots._value == 4  # the slot was given back

    run(main())


def test_a_paced_body_wakes_the_loop_every_few_hundred_kib_not_per_segment(monkeypatch):
    """A link brings a body in small segments over time; each wake of the IO loop costs an epoll
    turn and a Python call. Once a connection's rate is known, the kernel gathers what LOWAT_S of
    it brings (SO_RCVLOWAT, at most BODY_LOWAT) before it wakes the loop; the last bytes of a
    buffer, fewer than that, still arrive (the mark is lowered to them)."""
    from sidecar.store import httpbody

    wakes = []
    original = httpbody._Connection.buffer_updated
    monkeypatch.setattr(httpbody._Connection, "buffer_updated", lambda self, n: (wakes.append(n), original(self, n))[1])
    body = bytes(range(256)) * (8 * 1024 + 100)  # 2 MiB and 25,600 bytes: the body ends 25,600 bytes past a mark

    async def paced(writer):
        writer.write(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for lo in range(0, len(body), 16 * 1024):  # 16 KiB a millisecond: 16 MB/s
            writer.write(body[lo : lo + 16 * 1024])
            await writer.drain()
            await asyncio.sleep(0.001)

    async def main():
        async with Server([paced, ok(b"next")]) as srv:  # (kept alive: no FIN ends the body early)
            pool = ConnectionPool("http", "127.0.0.1", srv.port, 4)
            resp = await pool.get("/b/k", {"Host": "x"})
            parts = [bytearray(1 << 20), bytearray((1 << 20) + 100 * 256)]
            counts = []
            for part in parts:
                before = len(wakes)
                assert await asyncio.wait_for(resp.fill(part), 5) == len(part)
                counts.append(len(wakes) - before)
            resp.close()
            assert b"".join(parts) == body
            again = await pool.get("/b/k2", {"Host": "x"})  # the same connection, its mark back at a byte
            assert await again.read() == b"next"
            again.close()
            assert srv.connections == 1
            return counts

    counts = run(main())
    # The first MiB sets the rate (a wake per segment or so); the second comes in far fewer.
    assert counts[1] <= 16 and counts[0] > 2 * counts[1], counts
