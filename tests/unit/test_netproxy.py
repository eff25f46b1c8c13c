"""The link emulator itself: what it forwards must be exactly what an HTTP client expects, or
every benchmark and fault test behind it measures the proxy instead of the sidecar."""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time

import pytest

from tests.netproxy import CHUNK, LinkProxy


class _Chunked(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (b"<List>", b"x" * 70_000, b"</List>"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if self.path == "/trailer":
            self.wfile.write(b"0\r\nX-Sum: 1\r\n\r\n")
        else:
            self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def chunked_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Chunked)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("path", ["/plain", "/trailer"])
def test_chunked_responses_keep_the_connection_usable(chunked_server, path):
    """A chunked response (rclone serve s3 lists so) ends at its last chunk; the next request on
    the same keep-alive connection is answered (it used to wait forever for a trailer)."""
    with LinkProxy(chunked_server) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        try:
            for _ in range(3):
                conn.request("GET", path)
                resp = conn.getresponse()
                assert resp.read() == b"<List>" + b"x" * 70_000 + b"</List>"
        finally:
            conn.close()
        assert proxy.counts["GET"] == 3
        assert proxy.bytes_down > 3 * 70_000


BIG = 16 << 20


class _Big(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(BIG))
        self.end_headers()
        piece = b"y" * (64 << 10)
        try:
            for _ in range(BIG // len(piece)):
                self.wfile.write(piece)
        except OSError:
            pass  # the proxy hung up: its client left

    def log_message(self, *args: object) -> None:
        pass


def test_a_client_that_hangs_up_mid_body_is_counted_only_what_left_the_proxy():
    """An abandoned open-ended range: the bytes still queued in the proxy's socket when the
    client stopped reading never crossed the link and are not counted as sent down."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with LinkProxy(server.server_address[1]) as proxy:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the kernel doubles it
            client.connect(("127.0.0.1", proxy.port))
            client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got:
                got += client.recv(65536)
            body = len(got.split(b"\r\n\r\n", 1)[1])
            while body < 1 << 20:
                body += len(client.recv(min(65536, (1 << 20) - body)))
            # The client stops reading: wait until the proxy is held back (its count stands still).
            last, steady, deadline = -1, 0, time.monotonic() + 10
            while steady < 3:
                assert time.monotonic() < deadline, "the proxy never stopped sending"
                (response,) = proxy.responses
                steady = steady + 1 if response.sent == last else 0
                last = response.sent
                time.sleep(0.05)
            queued_in_proxy = response.sent - body - (128 << 10)
            assert queued_in_proxy > 128 << 10  # what the old count included
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, as a client aborting its transport sends
            deadline = time.monotonic() + 10
            while response.unsent == 0:
                assert time.monotonic() < deadline, "the hang-up was not noticed"
                time.sleep(0.01)
            # what the client read, what its receive buffer held, and at most one piece more
            assert body <= proxy.bytes_down == response.delivered <= body + (128 << 10) + CHUNK
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
