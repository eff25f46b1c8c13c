import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.devservers import fuse_mounts, moto_server, stop_process

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 that checks request signatures."""
    with moto_server(tmp_path_factory.mktemp("moto") / "log") as server:
        yield server


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


class Worker:
    """A sidecar.worker process serving one mount, driven over its stdin/stdout protocol."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mnt = cfg["mountpath"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(cfg["log"], "a")
        )
        self.proc.stdin.write((json.dumps(cfg) + "\n").encode())
        self.proc.stdin.flush()
        event = json.loads(self.proc.stdout.readline() or b'{"event": "exited"}')
        if event["event"] != "mounted":
            self.stop()
            raise RuntimeError(f"worker did not mount: {event}; log: {Path(cfg['log']).read_text()[-3000:]}")

    def stats(self):
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()
            self.proc.wait(15)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            pass
        stop_process(self.proc)
        if os.path.realpath(self.mnt) in fuse_mounts():
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False)


@pytest.fixture
def mount_worker(s3, tmp_path):
    """Factory: mount_worker(bucket, **cfg) -> Worker; everything is unmounted and stopped at the end."""
    started = []

    def start(bucket, prefix="", **overrides):
        n = len(started)
        cfg = {
            "name": f"t{n}",
            "storage_id": f"test-{bucket}",
            "url": f"s3://{bucket}/{prefix}".rstrip("/"),
            "options": {"endpoint_url": s3.endpoint},
            "credentials": {"access_key_id": s3.key, "secret_access_key": s3.secret},
            "mountpath": str(tmp_path / f"mnt{n}"),
            "cache_dir": str(tmp_path / "cache"),
            "ttl": 1.0,
            "deadline": 10.0,
            "log": str(tmp_path / f"worker{n}.log"),
            "log_level": "info",
        }
        cfg.update(overrides)
        w = Worker(cfg)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
    leftover = [m for m in fuse_mounts() if m.startswith(str(tmp_path))]
    assert not leftover, f"mounts left behind: {leftover}"
