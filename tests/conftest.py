import hashlib
import os
import time

import pytest

from tests.devservers import WorkerProcess as Worker
from tests.devservers import azurite_server, fuse_mounts, gcs_server, moto_server, rclone_s3_server, webdav_server
from tests.backends import AzureBackend, GCSBackend, S3Backend, WebDAVBackend

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")


def pytest_addoption(parser):
    parser.addoption("--reliability", action="store_true", help="also run the long `reliability` scenarios")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reliability"):
        return
    skip = pytest.mark.skip(reason="long scenario: run with `make test-reliability`")
    for item in items:
        if "reliability" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 that checks request signatures."""
    with moto_server(tmp_path_factory.mktemp("moto") / "log") as server:
        yield server


@pytest.fixture(scope="session")
def azure(tmp_path_factory):
    """Azurite (blob) on 127.0.0.1; it checks the account key."""
    with azurite_server(tmp_path_factory.mktemp("azurite")) as server:
        yield server


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 (no authentication)."""
    with gcs_server(tmp_path_factory.mktemp("gcs") / "log") as server:
        yield server


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory):
    """`rclone serve s3` on 127.0.0.1 (signed requests), objects kept as files."""
    with rclone_s3_server(tmp_path_factory.mktemp("rclone-s3")) as server:
        yield server


@pytest.fixture(scope="session")
def dav_rclone(tmp_path_factory):
    """`rclone serve webdav` on 127.0.0.1 (basic authentication)."""
    with webdav_server("rclone", tmp_path_factory.mktemp("dav-rclone")) as server:
        yield server


@pytest.fixture(scope="session")
def dav_wsgidav(tmp_path_factory):
    """WsgiDAV on 127.0.0.1 (basic authentication)."""
    with webdav_server("wsgidav", tmp_path_factory.mktemp("dav-wsgidav")) as server:
        yield server


BACKENDS = {"s3": ("s3", S3Backend), "azure": ("azure", AzureBackend), "gcs": ("gcs", GCSBackend),
            "webdav-rclone": ("dav_rclone", WebDAVBackend), "webdav-wsgidav": ("dav_wsgidav", WebDAVBackend)}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    """The same suite against each provider (WebDAV: two servers); the servers start on first use."""
    fixture, cls = BACKENDS[request.param]
    return cls(request.getfixturevalue(fixture))


@pytest.fixture
def bucket(backend):
    return backend.create_bucket()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def reads_back(path, data):
    """`path` holds `data`: read whole, read from a third of it on, mapped (its first and last
    pages), and stat-ed."""
    import mmap

    with open(path, "rb") as f:
        assert sha(f.read()) == sha(data)
        third = len(data) // 3
        f.seek(third)
        assert f.read(4099) == data[third : third + 4099]
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:5000] == data[:5000] and m[len(data) - 5000 :] == data[-5000:]
    assert os.stat(path).st_size == len(data)


def s3_keys(s3, bucket):
    """Every key of an S3 bucket of the session's moto server (all pages)."""
    return [o["Key"] for p in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", [])]


@pytest.fixture
def s3_bucket(s3):
    """A new bucket of the session's moto server, as a tests.backends bucket."""
    return S3Backend(s3).create_bucket()


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
        if isinstance(bucket, str):  # an S3 bucket of the session's moto server
            where = {"storage_id": f"test-{bucket}", "url": f"s3://{bucket}/{prefix}".rstrip("/"),
                     "options": {"endpoint_url": s3.endpoint}, "credentials": {"access_key_id": s3.key, "secret_access_key": s3.secret}}
        else:
            where = bucket.storage(prefix)
        cfg = {
            "name": f"t{n}",
            **where,
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


@pytest.fixture
def daemons():
    """Factory: daemons(tmp_path, manifest, ...) -> tests.daemons.Daemon; all stopped at the end."""
    from tests.daemons import Daemon

    started = []

    def start(*a, **kw):
        d = Daemon(*a, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def proxied(s3):
    """(LinkProxy, bucket): tests/netproxy.py's link emulator and fault proxy in front of the
    session's moto server, counting requests by kind and bytes, and a new bucket on it."""
    import uuid

    from tests.netproxy import LinkProxy

    port = int(s3.endpoint.rsplit(":", 1)[1])
    with LinkProxy(port) as proxy:
        bucket = f"p-{uuid.uuid4().hex[:12]}"
        s3.client().create_bucket(Bucket=bucket)
        yield proxy, bucket
