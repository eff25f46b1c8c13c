import os
import time

import pytest

from sidecar.devservers import WorkerProcess as Worker
from sidecar.devservers import fuse_mounts, moto_server

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
