"""The daemon under hostile clients and absent backends (docs/RELIABILITY.md quotes these tests)."""

import errno
import os
import random
import socket
import time
import uuid

import pytest

from tests.devservers import free_port, moto_server
from sidecar.status import request
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir, new_bucket, one_mount

pytestmark = [pytest.mark.mount, needs_fuse]


def _raw(sock_path, data, *, read=True, half_close=False):
    """Sends raw bytes on the control socket; returns what came back (b"" if we hung up first)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    try:
        s.connect(sock_path)
        if data:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                return b""
        if half_close:
            s.shutdown(socket.SHUT_WR)
        if not read:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    except ConnectionResetError:
        return b""
    finally:
        s.close()


def _hostile_requests(rng, n):
    """Garbage, wrong methods, unknown paths, oversize and lying bodies, and clients that hang up."""
    paths = ["/health", "/ready", "/status", "/metrics", "/nope", "/mounts/one/mount", "/mounts/x/credentials",
             "/mounts/one/credentials", "/" + "a" * 5000, "/mounts/ONE/skip", "/%00", "/mounts/one/unmount?force=0"]
    for i in range(n):
        kind = i % 8
        if kind == 0:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))), rng.random() < 0.5
        elif kind == 1:
            method = rng.choice([b"PUT", b"DELETE", b"PATCH", b"GET", b"POST", b"\xff\xfe", b"G E T"])
            target = rng.choice(paths).encode()
            if method == b"POST" and target.startswith(b"/mounts/one/") and not target.endswith(b"credentials"):
                target = b"/nope"  # never unmount or skip the mount this test watches
            yield method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", rng.random() < 0.7
        elif kind == 2:
            yield b"POST /mounts/one/credentials HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000, rng.random() < 0.5
        elif kind == 3:
            body = rng.choice([b"\xff\xfe\x00", b"[" * 30000, b"1" * 5000, b'{"access_key_id": 1}', b"{}", b"null"])
            yield b"POST /mounts/one/credentials HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body, True
        elif kind == 4:
            yield b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", rng.random() < 0.5
        elif kind == 5:
            yield b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"y" * 70000 + b"\r\n\r\n", rng.random() < 0.5
        elif kind == 6:
            yield b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", False  # 404, and we hang up before the answer
        else:
            yield b"", False  # connect and leave


def test_control_socket_survives_1000_hostile_requests(s3, tmp_path, daemons):
    b = new_bucket(s3, {"f.txt": b"data"})
    d = daemons(tmp_path, one_mount(tmp_path, s3, b), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    rng = random.Random(1234)
    statuses = set()
    for i, (data, read) in enumerate(_hostile_requests(rng, 1000)):
        answer = _raw(d.sock, data, read=read, half_close=read)
        if answer.startswith(b"HTTP/1.1 "):
            statuses.add(int(answer[9:12]))
        if i % 50 == 0:
            assert d.get("/health")[0] == 200, f"no /health after request {i}"
    assert d.proc.poll() is None, d.log()[-3000:]
    assert d.get("/health")[0] == 200
    assert d.states() == {"one": "mounted"}
    assert open(tmp_path / "project/one/f.txt").read() == "data"
    assert {400, 404, 405, 413} <= statuses, statuses  # each kind of refusal was really sent
    assert 500 not in statuses
    assert "control_connection_crashed" not in d.log()


def test_backend_down_at_start_gives_a_read_only_placeholder_then_mounts_by_itself(tmp_path, daemons):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"late-{uuid.uuid4().hex[:8]}"
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [{"name": "one", "provider": "s3", "url": f"s3://{bucket}", "options": {"endpoint_url": endpoint}}],
        "mounts": [{"storage": "one", "mountpath": "one"}],
    }

    class NoAuth:  # moto without signature checks: any key is accepted
        key, secret = "testing", "testing"

    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, NoAuth, ["one"]))
    d.wait_ready()
    mnt = tmp_path / "project/one"
    status = d.get("/status")[1]["mounts"][0]
    assert status["state"] == "failed" and status["error"]["code"] == "endpoint_unreachable", status
    assert status["next_try"] is not None
    wait_for(lambda: d.get("/status")[1]["mounts"][0]["placeholder"], what="the placeholder")
    # Failed is not an empty writable folder: writes fail, and the folder says why.
    assert os.listdir(mnt) == ["STORAGE-NOT-MOUNTED.txt"]
    assert "unreachable" in (mnt / "STORAGE-NOT-MOUNTED.txt").read_text()
    for attempt in (lambda: open(mnt / "results.csv", "w"), lambda: os.mkdir(mnt / "out")):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    # the daemon keeps trying: a second failed attempt is scheduled after the first
    first_try = status["next_try"]
    wait_for(lambda: (d.get("/status")[1]["mounts"][0]["next_try"] or 0) > first_try, timeout=20, what="a second attempt")
    # That attempt's check failed in its worker before the path was cleared: the placeholder stayed.
    assert os.path.ismount(mnt) and os.listdir(mnt) == ["STORAGE-NOT-MOUNTED.txt"]

    with moto_server(tmp_path / "moto.log", auth=False, port=port) as server:
        server.client().create_bucket(Bucket=bucket)
        server.client().put_object(Bucket=bucket, Key="f.txt", Body=b"late data")
        # RETRY_FAST_CAP is 8 s: the mount comes up within 10 s of the backend's return
        wait_for(lambda: d.states()["one"] == "mounted", timeout=12, what="the mount after the backend returned")
        assert os.listdir(mnt) == ["f.txt"]
        assert (mnt / "f.txt").read_text() == "late data"
        status = d.get("/status")[1]["mounts"][0]
        assert status["placeholder"] is False and status["next_try"] is None
        d.stop()
    assert not os.path.ismount(mnt)


@pytest.mark.reliability  # (12 s of a hung pre-flight: make test-reliability, for make test's bound)
def test_a_slow_mount_request_is_answered_202_and_followed(tmp_path, daemons):
    # A hung endpoint: accepts connections, never answers. Its pre-flight takes the whole
    # --check-deadline (12 s), longer than the socket's 10 s request deadline.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        manifest = {
            "root": str(tmp_path / "project"),
            "storages": [{"name": "hung", "provider": "s3", "url": "s3://bucket-hung",
                          "options": {"endpoint_url": f"http://127.0.0.1:{hung.getsockname()[1]}"}}],
            "mounts": [{"storage": "hung", "mountpath": "hung"}],
        }

        class Keys:
            key, secret = "testing", "testing"

        d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, Keys, ["hung"]), args=["--check-deadline", "12", "--only", "none"])
        assert d.states() == {"hung": "unmounted"}
        code, body = request("/mounts/hung/mount", "POST", sock=d.sock, timeout=30)
        assert code == 202 and body["state"] == "checking", (code, body)  # answered, not dropped
        code, body = d.post("/mounts/hung/mount")  # follows the 202 on /status
        assert code == 200 and body["state"] == "failed" and body["error"]["code"] == "timeout", body
    finally:
        hung.close()


@pytest.mark.reliability
@pytest.mark.serial
def test_backend_down_for_60_s_at_start(tmp_path, daemons):
    port = free_port()
    bucket = f"late-{uuid.uuid4().hex[:8]}"
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [{"name": "one", "provider": "s3", "url": f"s3://{bucket}", "readonly": False,
                      "options": {"endpoint_url": f"http://127.0.0.1:{port}"}}],
        "mounts": [{"storage": "one", "mountpath": "one"}],
    }

    class NoAuth:
        key, secret = "testing", "testing"

    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, NoAuth, ["one"]), args=["--no-write-probe"])
    d.wait_ready()
    mnt = tmp_path / "project/one"
    end = time.monotonic() + 60
    while time.monotonic() < end:  # the whole outage: writes at the mount path always fail
        with pytest.raises(OSError) as exc:
            open(mnt / f"w-{int(time.monotonic())}.txt", "w").close()
        assert exc.value.errno in (errno.EROFS, errno.ENOENT, errno.EIO), exc.value
        time.sleep(2)
    with moto_server(tmp_path / "moto.log", auth=False, port=port) as server:
        server.client().create_bucket(Bucket=bucket)
        back = time.monotonic()
        wait_for(lambda: d.states()["one"] == "mounted", timeout=15, what="the mount after the backend returned")
        print(f"\nmounted {time.monotonic() - back:.1f} s after the backend returned (60 s outage)")
        assert time.monotonic() - back < 10
        assert os.listdir(mnt) == []  # nothing written during the outage reached any disk
        d.stop()


@pytest.mark.serial
def test_ten_hung_endpoints_cost_one_check_deadline_not_ten(tmp_path, daemons):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        names = [f"h{i}" for i in range(10)]
        manifest = {
            "root": str(tmp_path / "project"),
            "storages": [{"name": n, "provider": "s3", "url": f"s3://bucket-{n}",
                          "options": {"endpoint_url": f"http://127.0.0.1:{hung.getsockname()[1]}"}} for n in names],
            "mounts": [{"storage": n, "mountpath": n} for n in names],
        }

        class Keys:
            key, secret = "testing", "testing"

        started = time.monotonic()
        d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, Keys, names), args=["--check-deadline", "4"])
        d.wait_ready()
        took = time.monotonic() - started
        states = d.get("/status")[1]["mounts"]
        assert {m["state"] for m in states} == {"failed"} and {m["error"]["code"] for m in states} == {"timeout"}
        assert took < 2 * 4 + 3, took  # checked in parallel: one deadline (plus start-up), not ten
    finally:
        hung.close()
