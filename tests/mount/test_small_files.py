"""Many small files through a real mount, with the requests counted by tests/netproxy.py
(docs/SEMANTICS.md: the consistency model and the cost of lookups)."""

import os
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import needs_fuse
from tests.netproxy import LinkProxy

pytestmark = [pytest.mark.mount, needs_fuse]


@pytest.fixture
def proxied(s3):
    port = int(s3.endpoint.rsplit(":", 1)[1])
    with LinkProxy(port) as proxy:
        bucket = f"sf-{uuid.uuid4().hex[:12]}"
        s3.client().create_bucket(Bucket=bucket)
        yield proxy, bucket


def _put_many(s3, bucket, files):
    client = s3.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), files.items()))


def test_cold_ls_then_cat_of_1000_files_is_one_list_and_no_head(s3, proxied, mount_worker):
    proxy, bucket = proxied
    files = {f"chunks/{i:04d}": os.urandom(4096) for i in range(1000)}
    _put_many(s3, bucket, files)
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, ttl=300.0)
    proxy.reset_counts()
    listed = subprocess.run(["ls", "-l", f"{w.mnt}/chunks"], capture_output=True, text=True, check=True).stdout
    assert len(listed.splitlines()) == 1001
    for key, data in files.items():
        with open(f"{w.mnt}/{key}", "rb") as f:
            assert f.read() == data
    counts = dict(proxy.counts)
    # the folder lookup of "chunks" and its listing: one LIST each level, then only GETs
    assert counts.get("HEAD", 0) == 0, counts
    assert counts.get("LIST", 0) <= 2, counts  # the root (to find "chunks") and "chunks" (1 page)
    assert counts.get("GET", 0) == 1000, counts


def test_warm_pass_within_the_ttl_makes_no_request(s3, proxied, mount_worker):
    proxy, bucket = proxied
    files = {f"z/{a}/{b}": os.urandom(512) for a in range(5) for b in range(50)}
    _put_many(s3, bucket, files)
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, ttl=300.0)
    for key in files:  # cold
        open(f"{w.mnt}/{key}", "rb").read()
    proxy.reset_counts()
    for key in files:  # warm: metadata and data cached (kernel page cache, keep_cache)
        with open(f"{w.mnt}/{key}", "rb") as f:
            assert f.read() == files[key]
    assert dict(proxy.counts) == {}, dict(proxy.counts)


def test_cp_r_of_500_files_costs_at_most_one_request_per_file_besides_its_put(s3, proxied, mount_worker, tmp_path):
    proxy, bucket = proxied
    src = tmp_path / "src"
    src.mkdir()
    for i in range(500):
        (src / f"f{i:03d}.txt").write_bytes(b"small file %d\n" % i)
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, readonly=False, ttl=5.0)
    proxy.reset_counts()
    subprocess.run(["cp", "-r", str(src), f"{w.mnt}/dst"], check=True)
    counts = dict(proxy.counts)
    puts = counts.pop("PUT", 0)
    assert puts == 501, counts  # 500 files + the folder marker
    others = sum(counts.values())
    assert others <= 500, (others, counts)
    keys = {o["Key"] for p in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", [])}
    assert {f"dst/f{i:03d}.txt" for i in range(500)} <= keys
    print(f"\ncp -r 500 files: {puts} PUT, other requests {counts}")


def test_rsync_a_twice_sends_nothing_the_second_time_and_mtimes_survive_a_remount(s3, proxied, mount_worker, tmp_path):
    proxy, bucket = proxied
    src = tmp_path / "src"
    src.mkdir()
    for i in range(100):
        p = src / f"f{i:03d}.dat"
        p.write_bytes(os.urandom(1000 + i))
        os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
    cache = str(tmp_path / "cache")
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, readonly=False, ttl=5.0, cache_dir=cache, name="rs")
    first = subprocess.run(["rsync", "-a", "--stats", f"{src}/", f"{w.mnt}/out/"], capture_output=True, text=True, check=True).stdout
    assert "Number of regular files transferred: 100" in first
    second = subprocess.run(["rsync", "-a", "--stats", f"{src}/", f"{w.mnt}/out/"], capture_output=True, text=True, check=True).stdout
    assert "Number of regular files transferred: 0" in second, second
    mnt = w.mnt
    w.stop()
    w2 = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, readonly=True, cache_dir=cache, name="rs", mountpath=mnt)
    assert os.stat(f"{w2.mnt}/out/f007.dat").st_mtime == 1_600_000_007
    # the time is in the object too, where rclone (and another sidecar) reads it
    head = s3.client().head_object(Bucket=bucket, Key="out/f007.dat")
    assert float(head["Metadata"]["mtime"]) == 1_600_000_007


@pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (scripts/bootstrap.sh installs it)")
def test_an_object_uploaded_by_rclone_shows_rclones_mtime(s3, proxied, mount_worker, tmp_path):
    proxy, bucket = proxied
    local = tmp_path / "from-rclone.txt"
    local.write_text("written by rclone")
    os.utime(local, (1_500_000_000.25, 1_500_000_000.25))
    env = dict(os.environ, RCLONE_CONFIG_T_TYPE="s3", RCLONE_CONFIG_T_PROVIDER="Other", RCLONE_CONFIG_T_ENDPOINT=s3.endpoint,
               RCLONE_CONFIG_T_REGION="us-east-1", RCLONE_CONFIG_T_ACCESS_KEY_ID=s3.key, RCLONE_CONFIG_T_SECRET_ACCESS_KEY=s3.secret)
    env.pop("AWS_CA_BUNDLE", None)
    subprocess.run(["rclone", "copyto", "--config", "/dev/null", str(local), f"t:{bucket}/r/from-rclone.txt"], env=env, check=True,
                   capture_output=True)
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, mtime_source="metadata")
    assert abs(os.stat(f"{w.mnt}/r/from-rclone.txt").st_mtime - 1_500_000_000.25) < 1e-3
    heads = proxy.counts["HEAD"]
    os.listdir(f"{w.mnt}/r")
    os.stat(f"{w.mnt}/r/from-rclone.txt")
    assert proxy.counts["HEAD"] == heads  # one HEAD per object version, then the index answers


def test_refresh_shows_a_remote_change_before_the_ttl(s3, proxied, mount_worker):
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="data/a.txt", Body=b"one")
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, ttl=300.0)
    assert sorted(os.listdir(f"{w.mnt}/data")) == ["a.txt"]
    s3.client().put_object(Bucket=bucket, Key="data/b.txt", Body=b"two")
    assert sorted(os.listdir(f"{w.mnt}/data")) == ["a.txt"]  # a read-only mount caches for 300 s
    assert w.refresh("data")["event"] == "refreshed"
    deadline = time.monotonic() + 5
    while sorted(os.listdir(f"{w.mnt}/data")) != ["a.txt", "b.txt"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel's invalidation is asynchronous
    assert sorted(os.listdir(f"{w.mnt}/data")) == ["a.txt", "b.txt"]
    assert open(f"{w.mnt}/data/b.txt").read() == "two"
