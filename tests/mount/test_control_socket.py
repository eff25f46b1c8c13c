"""The control socket serves probes whatever its other users do (docs/SECURITY.md)."""

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sidecar.status import request
from tests.conftest import needs_fuse
from tests.daemons import creds_dir, new_bucket, one_mount

pytestmark = [pytest.mark.mount, needs_fuse]

NOBODY = 65534
FLOOD = str(Path(__file__).with_name("sockflood.py"))


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def as_nobody():
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.mark.serial
def test_probes_are_answered_within_a_second_while_a_group_member_floods_the_socket(s3, tmp_path, daemons):
    """2,000 connections of the socket group's user (1,000 that never finish a request, 1,000
    that send nothing, each reopened as soon as it is closed): /health and /ready are answered
    within 1 s throughout (before: only after ~10 s), the mount stays mounted, and the daemon's
    memory stays bounded."""
    run = tempfile.mkdtemp(prefix="ctl-")
    os.chmod(run, 0o755)
    sock = os.path.join(run, "sidecar.sock")
    try:
        b = new_bucket(s3, {"f.txt": b"data"})
        d = daemons(tmp_path, one_mount(tmp_path, s3, b), creds=creds_dir(tmp_path, s3, ["one"]), sock=sock,
                    args=["--socket-group", "nogroup"])
        d.wait_ready()
        before = rss_kib(d.proc.pid)
        flood = subprocess.Popen(["/usr/bin/python3", FLOOD, sock, "2000", "120"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, preexec_fn=as_nobody)
        try:
            assert flood.stdout.readline().strip() == "flooding"
            peak = before
            for _ in range(10):
                assert request("/health", sock=sock, timeout=1.0)[0] == 200
                assert request("/ready", sock=sock, timeout=1.0)[0] == 200
                peak = max(peak, rss_kib(d.proc.pid))
                time.sleep(0.2)
            cli = d.status_cli("--probe", "liveness")
            assert cli.returncode == 0, cli.stderr
            assert flood.poll() is None, "the flood ended before the probes did"
        finally:
            out, _ = flood.communicate(input="", timeout=60)
        stats = json.loads(out)
        assert stats["opened"] >= 2000 and stats["closed_by_server"] > 1000, stats  # refused at accept, by uid
        assert peak - before < 32 * 1024, f"daemon RSS grew by {(peak - before) / 1024:.1f} MiB under the flood"
        assert d.states() == {"one": "mounted"}
        assert request("/status", sock=sock, timeout=5)[0] == 200
    finally:
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.serial
def test_a_request_that_does_not_arrive_within_two_seconds_is_dropped(s3, tmp_path, daemons):
    import socket

    b = new_bucket(s3, {"f.txt": b"data"})
    d = daemons(tmp_path, one_mount(tmp_path, s3, b), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(8)
    s.connect(d.sock)
    s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
    started = time.monotonic()
    assert s.recv(100) == b""  # closed by the daemon
    waited = time.monotonic() - started
    s.close()
    assert 1.5 < waited < 5, waited
