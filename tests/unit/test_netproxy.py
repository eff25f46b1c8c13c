"""The link emulator itself: what it forwards must be exactly what an HTTP client expects, or
every benchmark and fault test behind it measures the proxy instead of the sidecar."""

from __future__ import annotations

import http.client
import http.server
import threading

import pytest

from tests.netproxy import LinkProxy


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
