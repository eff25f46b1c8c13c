"""What training does to a mount (issue 36), on `rclone serve s3` (objects kept as files): a
checkpoint replaced by rename round after round, the worker killed around the rename, and epochs
over a tree of small files, counted at a LinkProxy in front of the server."""

import hashlib
import os
import random
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.backends import S3Backend
from tests.conftest import needs_fuse, wait_for
from tests.netproxy import LinkProxy

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1 << 20
CKPT = 20 * MiB  # above the multipart threshold (16 MiB): the upload is in parts


@pytest.fixture
def served(rclone_s3):
    """(S3Backend, Bucket, LinkProxy) on rclone serve s3; the proxy counts what the mount asks."""
    backend = S3Backend(rclone_s3)
    bucket = backend.create_bucket()
    port = int(rclone_s3.endpoint.rsplit(":", 1)[1])
    with LinkProxy(port) as proxy:
        yield backend, bucket, proxy


def _mount(mount_worker, bucket, proxy, **cfg):
    storage = bucket.storage("")
    storage["options"] = {"endpoint_url": proxy.endpoint}
    return mount_worker(SimpleNamespace(storage=lambda prefix: storage), ttl=300.0, **cfg)


def _write_checkpoint(mnt, round_):
    data = random.Random(round_).randbytes(CKPT)
    with open(f"{mnt}/ckpt.tmp", "wb") as f:
        for i in range(0, CKPT, 4 * MiB):
            f.write(data[i : i + 4 * MiB])
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _stored(bucket, key):
    try:
        return hashlib.sha256(bucket.get(key)).hexdigest()
    except Exception as exc:  # botocore's NoSuchKey is generated per client
        if "NoSuchKey" in type(exc).__name__ or "Not Found" in str(exc) or "404" in str(exc):
            return None
        raise


def _settled(w):
    wait_for(lambda: (u := w.stats()["unsynced"])["files"] == 0 and u["old_names"] == 0, timeout=60, what="uploads and deletes settled")


@pytest.mark.parametrize("mode", ["durable", "writeback"])
def test_a_checkpoint_replaced_by_rename_round_after_round(served, mount_worker, mode):
    """ckpt.tmp written, fsynced, renamed over ckpt, three rounds: each round's ckpt is in the
    bucket whole and ckpt.tmp is not. Write-back sends the file once, under its final name, and
    a replacement after the first is no conflict with the mount's own multipart upload (rclone
    shows another ETag than the one the upload answered). Durable uploads ckpt.tmp and copies it."""
    _, bucket, proxy = served
    w = _mount(mount_worker, bucket, proxy, readonly=False, write_mode=mode, writeback_delay=0.5)
    for r in range(3):
        proxy.reset_counts()
        digest = _write_checkpoint(w.mnt, r)
        os.replace(f"{w.mnt}/ckpt.tmp", f"{w.mnt}/ckpt")
        _settled(w)
        assert _stored(bucket, "ckpt") == digest, f"round {r}"
        assert "ckpt.tmp" not in bucket.keys()
        assert w.stats()["unsynced"]["conflicts"] == 0
        if mode == "writeback":
            assert CKPT <= proxy.bytes_up <= 1.05 * CKPT, (r, proxy.bytes_up)
            assert proxy.counts["COPY"] == 0, dict(proxy.counts)
        else:
            assert proxy.counts["COPY"] == 1 and CKPT <= proxy.bytes_up <= 1.05 * CKPT, (r, dict(proxy.counts), proxy.bytes_up)


@pytest.mark.parametrize("point", ["before_the_rename", "after_the_rename"])
def test_a_checkpoint_killed_around_its_rename_leaves_a_whole_one(served, mount_worker, tmp_path, point):
    """Write-back: the worker SIGKILLed after ckpt.tmp is written and fsynced but before the
    rename (the bucket keeps the previous ckpt), or after the rename before the delayed upload
    (the next start uploads the new ckpt whole). Never a partial or a missing ckpt."""
    _, bucket, proxy = served
    cache = str(tmp_path / "ckpt-cache")
    cfg = dict(readonly=False, write_mode="writeback", writeback_delay=0.2, cache_dir=cache, name="ckpt", mountpath=str(tmp_path / "ckpt"))
    w = _mount(mount_worker, bucket, proxy, **cfg)
    previous = _write_checkpoint(w.mnt, 0)
    os.replace(f"{w.mnt}/ckpt.tmp", f"{w.mnt}/ckpt")
    _settled(w)
    w.stop()
    cfg["writeback_delay"] = 600.0  # nothing leaves before the kill
    w = _mount(mount_worker, bucket, proxy, **cfg)
    new = _write_checkpoint(w.mnt, 1)
    if point == "after_the_rename":
        os.replace(f"{w.mnt}/ckpt.tmp", f"{w.mnt}/ckpt")
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    subprocess.run(["fusermount3", "-u", "-z", w.mnt], check=False)
    assert _stored(bucket, "ckpt") == previous  # nothing of the new one was sent
    cfg["writeback_delay"] = 0.2
    w = _mount(mount_worker, bucket, proxy, **cfg)
    _settled(w)
    assert _stored(bucket, "ckpt") == (new if point == "after_the_rename" else previous)
    with open(f"{w.mnt}/ckpt", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == _stored(bucket, "ckpt")


def test_epochs_over_small_files_ask_once_then_never(served, mount_worker, tmp_path):
    """A tree of small files walked and stat-ed (LISTs only), then read whole in a shuffled order
    by 8 readers: one GET per file and no HEAD; a second epoch on the same mount and a third on
    a new mount over the same cache make no GET (the new mount lists the tree again)."""
    _, bucket, proxy = served
    files = {f"class{i % 4}/img{i:04d}.bin": random.Random(i).randbytes(random.Random(-i).randrange(16 << 10, 96 << 10)) for i in range(160)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: bucket.put(*kv), files.items()))
    cache = str(tmp_path / "epoch-cache")
    w = _mount(mount_worker, bucket, proxy, cache_dir=cache, name="epochs", mountpath=str(tmp_path / "epochs"))

    def walk(root):
        return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names if os.stat(os.path.join(d, n)))

    def epoch(root, seed):
        names = sorted(files)
        random.Random(seed).shuffle(names)
        lock = threading.Lock()
        got = {}

        def read(name):
            with open(f"{root}/{name}", "rb") as f:
                data = f.read()
            with lock:
                got[name] = data

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(read, names))
        assert got == files

    proxy.reset_counts()
    assert walk(w.mnt) == sorted(files)
    assert set(proxy.counts) <= {"LIST"} and proxy.counts["LIST"] <= 6, dict(proxy.counts)
    proxy.reset_counts()
    epoch(w.mnt, 1)
    assert proxy.counts["GET"] == len(files) and proxy.counts["HEAD"] == 0, dict(proxy.counts)
    proxy.reset_counts()
    epoch(w.mnt, 2)
    assert sum(proxy.counts.values()) == 0, proxy.requests
    # A read-only mount answers the kernel's first FLUSH with ENOSYS: no close waits for one again
    # (the 8 readers' closes may send theirs together before that first answer: at most 8 of
    # the 320 closes).
    assert w.stats()["requests"].get("flush", 0) <= 8, w.stats()["requests"]
    w.stop()
    w = _mount(mount_worker, bucket, proxy, cache_dir=cache, name="epochs", mountpath=str(tmp_path / "epochs"))
    proxy.reset_counts()
    assert walk(w.mnt) == sorted(files)
    epoch(w.mnt, 3)
    assert proxy.counts["GET"] == 0 and proxy.counts["HEAD"] == 0, dict(proxy.counts)
    # Each file is whole in the disk cache: the kernel reads it from there (FUSE passthrough),
    # not one READ reaches the worker (where the kernel and the worker's rights allow it).
    stats = w.stats()
    if stats["passthrough"]["state"] == "on":
        assert stats["passthrough"]["opens"] == len(files) and stats["requests"].get("read", 0) == 0, stats


def test_a_tree_walk_gets_the_next_folders_listed_ahead_each_once(served, mount_worker):
    """os.walk lists a folder, goes down into its first subfolder, then the next: once it went
    down into one, the next 16 are listed ahead, in parallel, before it asks; over the whole
    walk each folder is listed once. `ls` of one folder lists nothing ahead."""
    _, bucket, proxy = served
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: bucket.put(f"tree/d{i:02d}/f{i}.bin", b"x" * i), range(40)))
    w = _mount(mount_worker, bucket, proxy)
    proxy.reset_counts()
    assert len(os.listdir(f"{w.mnt}/tree")) == 40
    listed = proxy.counts["LIST"]
    assert os.listdir(f"{w.mnt}/tree/d00") == ["f0.bin"]  # the walker goes down into the first
    wait_for(lambda: proxy.counts["LIST"] >= listed + 1 + 16, timeout=10, what="the next 16 folders listed ahead")
    proxy.reset_counts()
    found = {n for _, _, names in os.walk(f"{w.mnt}/tree") for n in names}
    assert found == {f"f{i}.bin" for i in range(40)}
    assert proxy.counts["LIST"] == 40 - 1 - 16, dict(proxy.counts)  # the rest, each once; none again
    assert proxy.counts["HEAD"] == 0
