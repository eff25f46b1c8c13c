"""The node's shared cache (issue 35) between whole sidecars ("sessions") of one node, on `rclone
serve s3` (signed requests: it refuses a wrong secret) behind a LinkProxy that counts requests:
what one session read, another reads with no GET; a session whose
credentials are refused reads nothing; a sidecar killed while writing blocks leaves the others
reading the right bytes; three sidecars reading at once keep one budget."""

import hashlib
import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from sidecar.cache.shared import DB_NAME, TEMP_PREFIX, SharedBlocks
from tests.backends import S3Backend
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir
from tests.netproxy import LinkProxy

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1 << 20


@pytest.fixture
def node(rclone_s3, tmp_path):
    """(server, bucket, proxy factory). Sidecars that are to share blocks go through one proxy: the
endpoint is part of a version's identity (another address is another service)."""
    bucket = S3Backend(rclone_s3).create_bucket()
    port = int(rclone_s3.endpoint.rsplit(":", 1)[1])
    proxies = []

    def proxy():
        p = LinkProxy(port)
        proxies.append(p)
        return p

    yield rclone_s3, bucket, proxy
    for p in proxies:
        p.close()


def _blocks(shared: Path) -> list[Path]:
    return [p for p in shared.rglob("*") if p.is_file() and len(p.name) == 64]


def _session(daemons, tmp_path, name, server, bucket, proxy, shared, secret=None):
    """A whole sidecar (`storage-sidecar run`) with one read-only mount of the bucket at
    <tmp>/<name>/project/raw, its own cache folder, and the node's shared folder."""
    base = tmp_path / name
    base.mkdir()
    manifest = {
        "root": str(base / "project"),
        "storages": [{"name": "raw", "provider": "s3", "url": f"s3://{bucket.name}", "readonly": True,
                      "options": {"endpoint_url": proxy.endpoint}}],
        "mounts": [{"storage": "raw", "mountpath": "raw"}],
    }
    env = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    env.update(AWS_CONFIG_FILE=str(base / "none"), AWS_SHARED_CREDENTIALS_FILE=str(base / "none"),
               XDG_CONFIG_HOME=str(base / "config"), STORAGE_SIDECAR_NO_KEYRING="1")
    d = daemons(base, manifest, creds=creds_dir(base, server, ["raw"], secret=secret), env=env,
                args=("--shared-cache", str(shared)))
    d.wait_ready()
    return d


def _mount_status(d):
    return d.get("/status")[1]["mounts"][0]


def test_a_second_session_reads_256_mib_with_no_get_and_a_refused_one_reads_nothing(node, daemons, tmp_path):
    server, bucket, proxy = node
    data = os.urandom(256 * MiB)
    bucket.put("raw.bin", data)
    shared = tmp_path / "node-shared"

    link = proxy()
    first = _session(daemons, tmp_path, "s1", server, bucket, link, shared)
    with open(os.path.join(first.root, "raw", "raw.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    wait_for(lambda: len(_blocks(shared)) == 256, timeout=60, what="the first session's 256 blocks in the shared folder")

    second = _session(daemons, tmp_path, "s2", server, bucket, link, shared)
    link.reset_counts()  # (the first session is idle: what follows is the second's)
    with open(os.path.join(second.root, "raw", "raw.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert link.counts["GET"] == 0, link.counts  # no GET for the data (its LIST was made at its start)
    wait_for(lambda: ((_mount_status(second)["counters"] or {}).get("shared") or {}).get("hits") == 256, what="the counters of 256 shared hits")
    counters = _mount_status(second)["counters"]
    assert counters["store"]["get_requests"] == 0 and counters["cache"]["shared_hits"] == 256
    assert counters["shared"]["bytes_served"] == 256 * MiB and counters["shared"]["size"] > 256 * MiB
    metrics = dict(line.rsplit(" ", 1) for line in second.get("/metrics")[1].splitlines() if line and not line.startswith("#"))
    assert float(metrics['storage_sidecar_shared_cache_blocks_total{mount="raw",outcome="hit"}']) == 256
    assert float(metrics['storage_sidecar_shared_cache_bytes_served_total{mount="raw"}']) == 256 * MiB
    assert "shared node cache: 256.0 MiB of 10.0 GiB; 256 block(s) read from it (256.0 MiB)" in second.status_cli().stdout

    # Credentials the server refuses: the storage waits for credentials, its path shows no
    # object, and the refused sidecar never asked for (or found) a block.
    link.reset_counts()
    refused = _session(daemons, tmp_path, "s3", server, bucket, link, shared, secret="not-the-secret-0123456789")
    m = _mount_status(refused)
    assert m["state"] == "needs_credentials" and m["error"]["code"] == "credentials_invalid", m
    assert not os.path.exists(os.path.join(refused.root, "raw", "raw.bin"))
    assert link.counts["GET"] == 0 and sum(link.counts.values()) >= 1, link.counts
    assert not (m["counters"] or {}).get("shared"), m["counters"]


def _worker(mount_worker, bucket, proxy, tmp_path, name, **cfg):
    storage = bucket.storage("")
    storage["options"] = {"endpoint_url": proxy.endpoint}
    return mount_worker(SimpleNamespace(storage=lambda prefix: storage), readonly=True, ttl=300.0,
                        shared_cache_dir=str(tmp_path / "node-shared"), cache_dir=str(tmp_path / f"cache-{name}"), **cfg)


def _at_once(workers, read):
    """`read(worker)` in a thread per worker, all released together; joined."""
    go = threading.Barrier(len(workers))

    def run(w):
        go.wait()
        read(w)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_a_sidecar_killed_while_writing_blocks_leaves_the_others_reading_right_bytes(node, mount_worker, tmp_path):
    """The first sidecar reads through a slow link and is SIGKILLed once some of its blocks are
    in the shared folder (more are being fetched and written): the next one reads every byte
    right, the killed one's whole blocks from the folder and the rest by GET, and writes its own."""
    _, bucket, proxy = node
    data = random.Random(351).randbytes(64 * MiB)
    bucket.put("big.bin", data)
    link = proxy()
    link.set(bandwidth=8 * MiB)
    first = _worker(mount_worker, bucket, link, tmp_path, "1", max_fetches=4)
    reader = subprocess.Popen(["cat", os.path.join(first.mnt, "big.bin")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_blocks(tmp_path / "node-shared")) >= 4, timeout=60, what="some blocks in the shared folder")
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", first.mnt], check=False)
        reader.kill()
        reader.wait()
    left = len(_blocks(tmp_path / "node-shared"))
    assert 4 <= left < 64

    link.set(bandwidth=None)
    second = _worker(mount_worker, bucket, link, tmp_path, "2")
    with open(os.path.join(second.mnt, "big.bin"), "rb") as f:
        assert f.read() == data
    st = second.stats()
    assert st["cache"]["shared_hits"] >= 4 and st["store"]["get_requests"] >= 1, st
    assert st["shared"]["rejected"] == 0 and st["shared"]["errors"] == 0, st["shared"]
    wait_for(lambda: len(_blocks(tmp_path / "node-shared")) == 64, what="the second sidecar's blocks stored beside the first's")


def test_three_sidecars_reading_at_once_keep_one_budget(node, mount_worker, tmp_path):
    """Three sidecars read three 24 MiB objects at the same time into a shared budget of 32 MiB:
    every read is right, the folder and its index agree and stay within the budget, and no
    temporary file is left."""
    _, bucket, proxy = node
    objects = {f"obj{i}.bin": random.Random(352 + i).randbytes(24 * MiB) for i in range(3)}
    for key, value in objects.items():
        bucket.put(key, value)
    limit = 32 * MiB
    link = proxy()
    workers = [_worker(mount_worker, bucket, link, tmp_path, str(i), shared_cache_limit=limit) for i in range(3)]
    results: dict[str, bool] = {}

    def read(w):
        key = f"obj{workers.index(w)}.bin"
        with open(os.path.join(w.mnt, key), "rb") as f:
            results[key] = f.read() == objects[key]

    _at_once(workers, read)
    assert results == {key: True for key in objects}
    for w in workers:
        w.stop()  # (a write queued for a disk thread is dropped: the folder is checked as it is left)
    shared = tmp_path / "node-shared"
    files = _blocks(shared)
    on_disk = sum(p.stat().st_size for p in files)
    index = SharedBlocks(shared, limit)
    assert on_disk <= limit and index.used() == on_disk, (on_disk, index.used())
    assert 0 < len(files) < 72  # evicted: 72 blocks were fetched
    assert not list(shared.rglob(f"{TEMP_PREFIX}*"))
    assert (shared / DB_NAME).exists()


def test_a_shared_cache_that_cannot_be_opened_leaves_the_mount_reading_by_get(node, mount_worker, tmp_path):
    """The shared folder's path is a file (an operator's mistake): the mount starts, reads by
    GET, and says why in its counters instead of failing."""
    _, bucket, proxy = node
    data = random.Random(353).randbytes(3 * MiB)
    bucket.put("a.bin", data)
    (tmp_path / "node-shared").write_text("not a folder")
    w = _worker(mount_worker, bucket, proxy(), tmp_path, "1")
    with open(os.path.join(w.mnt, "a.bin"), "rb") as f:
        assert f.read() == data
    st = w.stats()
    assert st["store"]["get_requests"] >= 1 and "FileExistsError" in st["shared"]["unusable"], st["shared"]


def test_small_files_one_session_read_are_read_by_the_next_with_no_get(node, mount_worker, tmp_path):
    """A training set's small files (each less than a block, read whole in a shuffled order: by
    exact ranges or fetched ahead by the folder walk) are blocks of the shared cache too."""
    _, bucket, proxy = node
    files = {f"class{i % 3}/img{i:03d}.bin": random.Random(354 + i).randbytes(random.Random(-i).randrange(4 << 10, 200 << 10)) for i in range(48)}
    for key, value in files.items():
        bucket.put(key, value)
    link = proxy()
    order = list(files)
    for n in ("1", "2"):
        random.Random(n).shuffle(order)
        w = _worker(mount_worker, bucket, link, tmp_path, n)
        link.reset_counts()
        for key in order:
            with open(os.path.join(w.mnt, key), "rb") as f:
                assert f.read() == files[key], key
        st = w.stats()
        if n == "1":  # (stored in the background, after each read)
            wait_for(lambda: len(_blocks(tmp_path / "node-shared")) == 48, what="the first session's 48 blocks in the shared folder")
        w.stop()
    assert link.counts["GET"] == 0, link.counts
    assert st["cache"]["shared_hits"] == 48 and st["shared"]["rejected"] == 0


def test_two_sessions_reading_the_same_object_at_once_fetch_it_once(node, mount_worker, tmp_path):
    """Two sidecars start reading the same object at the same moment, over a link slow enough
    that their reads overlap: each block is fetched by one of them (it claims it) and read from
    the shared folder by the other, so the link carries the object about once, not twice."""
    _, bucket, proxy = node
    size = 48 * MiB
    data = random.Random(355).randbytes(size)
    bucket.put("same.bin", data)
    link = proxy()
    link.set(bandwidth=16 * MiB, first_byte_delay=0.02)
    workers = [_worker(mount_worker, bucket, link, tmp_path, str(i)) for i in range(2)]
    link.reset_counts()
    results: list[bool] = []

    def read(w):
        with open(os.path.join(w.mnt, "same.bin"), "rb") as f:
            results.append(f.read() == data)

    _at_once(workers, read)
    assert results == [True, True]
    stats = [w.stats() for w in workers]
    assert link.bytes_down <= 1.25 * size, (link.bytes_down / size, link.counts, [s["cache"] for s in stats])
    assert sum(s["cache"]["shared_hits"] for s in stats) >= 0.75 * size / MiB


def test_two_sessions_reading_the_same_small_files_at_once_fetch_each_once(node, mount_worker, tmp_path):
    """Small files read whole, in a shuffled order, by two sidecars at the same moment:
    each file is fetched by the one that claims it, the other waits and reads it from the folder."""
    _, bucket, proxy = node
    files = {f"imgs/img{i:03d}.bin": random.Random(356 + i).randbytes(random.Random(-i).randrange(8 << 10, 300 << 10)) for i in range(24)}
    for key, value in files.items():
        bucket.put(key, value)
    link = proxy()
    link.set(first_byte_delay=0.03)
    workers = [_worker(mount_worker, bucket, link, tmp_path, str(i)) for i in range(2)]
    link.reset_counts()
    results: list[bool] = []
    order = list(files)
    random.Random(357).shuffle(order)  # (not a walk: each file is read exactly, as it is opened)
    _at_once(workers, lambda w: results.append(all(open(os.path.join(w.mnt, key), "rb").read() == files[key] for key in order)))
    assert results == [True, True]
    assert link.counts["GET"] == len(files), link.counts  # each fetched once (without the claims, some twice)
    assert sum(w.stats()["cache"]["shared_hits"] for w in workers) >= 22
