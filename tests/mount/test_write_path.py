"""The write path through a real FUSE mount of a moto S3 server: what close() acknowledges is in
the bucket (checked with boto3, not through the mount)."""

import errno
import io
import os
import random
import signal
import subprocess
import tarfile
import time

import pytest

from tests.devservers import fuse_mounts, moto_server
from tests.backends import S3Backend
from tests.conftest import needs_fuse, sha, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1024 * 1024


def remote(bucket, key):
    return bucket.get(key)


def keys(bucket):
    return bucket.keys()


@pytest.fixture
def writable(bucket, mount_worker):
    return mount_worker(bucket, readonly=False)


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 64 * MiB])
def test_python_write_lands_in_bucket_on_close(bucket, writable, size):
    data = random.Random(size).randbytes(size)
    with open(os.path.join(writable.mnt, "f.bin"), "wb") as f:
        f.write(data)
    assert sha(remote(bucket, "f.bin")) == sha(data)  # close returned: it is stored


def test_cp_and_dd_of_a_300_mib_file(bucket, writable, tmp_path):
    src = tmp_path / "src.bin"
    with open(src, "wb") as f:
        rng = random.Random(9)
        for _ in range(30):
            f.write(rng.randbytes(10 * MiB))
    subprocess.run(["cp", str(src), os.path.join(writable.mnt, "cp.bin")], check=True)
    digest = sha(src.read_bytes())
    assert sha(remote(bucket, "cp.bin")) == digest
    subprocess.run(["dd", f"if={src}", f"of={writable.mnt}/dd.bin", "bs=1M", "count=5", "status=none"], check=True)
    assert remote(bucket, "dd.bin") == src.read_bytes()[: 5 * MiB]
    stats = writable.stats()["store"]
    assert stats["bytes_stored"] >= 305 * MiB


def test_random_offset_writes_append_and_overwrite_existing(bucket, writable):
    original = random.Random(1).randbytes(3 * MiB)
    bucket.put("existing.bin", original)
    expected = bytearray(original)
    path = os.path.join(writable.mnt, "existing.bin")
    rng = random.Random(2)
    with open(path, "r+b") as f:
        for _ in range(40):
            off = rng.randrange(0, 4 * MiB)
            chunk = rng.randbytes(rng.randrange(1, 70000))
            f.seek(off)
            f.write(chunk)
            if off > len(expected):
                expected.extend(b"\0" * (off - len(expected)))
            expected[off : off + len(chunk)] = chunk
    assert remote(bucket, "existing.bin") == bytes(expected)
    with open(path, "ab") as f:
        f.write(b"appended")
    assert remote(bucket, "existing.bin") == bytes(expected) + b"appended"
    assert open(path, "rb").read() == bytes(expected) + b"appended"  # reads see it too


def test_reads_see_writes_at_once_and_truncate(bucket, writable):
    path = os.path.join(writable.mnt, "t.txt")
    with open(path, "w+b") as f:
        f.write(b"0123456789")
        f.flush()
        assert open(path, "rb").read() == b"0123456789"  # before close, another reader sees it
        f.truncate(4)
    assert remote(bucket, "t.txt") == b"0123"
    os.truncate(path, 2)
    assert remote(bucket, "t.txt") == b"01"
    assert os.stat(path).st_size == 2


def test_tree_operations(bucket, writable):
    m = writable.mnt
    subprocess.run(f"mkdir -p {m}/a/b/c && touch {m}/a/b/c/f", shell=True, check=True)
    assert {"a/", "a/b/", "a/b/c/", "a/b/c/f"} <= set(keys(bucket))
    subprocess.run(["mv", f"{m}/a/b/c/f", f"{m}/a/g"], check=True)
    assert "a/g" in keys(bucket) and os.listdir(f"{m}/a/b/c") == []
    wait_for(lambda: "a/b/c/f" not in keys(bucket), timeout=10, what="the old name deleted")  # S3: a moment later
    with pytest.raises(OSError) as err:
        os.rmdir(f"{m}/a")
    assert err.value.errno == errno.ENOTEMPTY
    subprocess.run(["mv", f"{m}/a", f"{m}/renamed"], check=True)
    assert sorted(k for k in keys(bucket)) == ["renamed/", "renamed/b/", "renamed/b/c/", "renamed/g"]
    subprocess.run(["rm", f"{m}/renamed/g"], check=True)
    os.rmdir(f"{m}/renamed/b/c")
    subprocess.run(["rm", "-r", f"{m}/renamed"], check=True)
    assert keys(bucket) == []
    assert os.listdir(m) == []
    for fn, code in ((lambda: os.symlink("x", f"{m}/link"), errno.EPERM), (lambda: os.link(f"{m}", f"{m}/hard"), errno.EPERM)):
        with pytest.raises(OSError) as err:
            fn()
        assert err.value.errno in (code, errno.EISDIR)


def test_rename_replaces_and_is_seen_complete(bucket, writable):
    m = writable.mnt
    open(f"{m}/x", "wb").write(b"new contents")
    open(f"{m}/y", "wb").write(b"old")
    os.rename(f"{m}/x", f"{m}/y")
    assert remote(bucket, "y") == b"new contents"  # complete under the new name when rename returns
    assert open(f"{m}/y", "rb").read() == b"new contents"
    assert not os.path.exists(f"{m}/x")
    # the old name's delete may wait a moment to go with others (S3: sidecar.vfs.deletes)
    wait_for(lambda: "x" not in keys(bucket), timeout=10, what="the old name deleted")


def test_tar_extract_into_the_mount(bucket, writable, tmp_path):
    buf = io.BytesIO()
    files = {f"proj/{d}/{i}.dat": random.Random(i).randbytes(i * 1000) for d in ("raw", "raw/deep", "out") for i in range(1, 4)}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    r = subprocess.run(["tar", "xf", str(tmp_path / "a.tar"), "-C", writable.mnt], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name, data in files.items():
        assert remote(bucket, name) == data


def test_git_init_and_commit_inside_a_writable_mount(bucket, writable):
    repo = os.path.join(writable.mnt, "repo")
    os.mkdir(repo)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    run = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, env=env)  # noqa: E731
    assert run("init", "-q").returncode == 0
    open(os.path.join(repo, "README"), "w").write("hello\n")
    assert run("add", "README").returncode == 0
    r = run("commit", "-q", "-m", "first")
    assert r.returncode == 0, r.stderr
    assert run("log", "--oneline").stdout.strip().endswith("first")
    assert "repo/.git/HEAD" in keys(bucket)


def test_readonly_mount_every_mutation_erofs_bucket_unchanged(bucket, mount_worker):
    bucket.put("keep.txt", b"keep")
    bucket.put("dir/", b"")
    before = keys(bucket)
    w = mount_worker(bucket)  # readonly by default
    m = w.mnt
    attempts = [
        lambda: open(f"{m}/new", "wb"), lambda: open(f"{m}/keep.txt", "r+b"), lambda: open(f"{m}/keep.txt", "ab"),
        lambda: os.truncate(f"{m}/keep.txt", 0), lambda: os.unlink(f"{m}/keep.txt"), lambda: os.mkdir(f"{m}/d"),
        lambda: os.rmdir(f"{m}/dir"), lambda: os.rename(f"{m}/keep.txt", f"{m}/k2"), lambda: os.symlink("x", f"{m}/l"),
        lambda: os.link(f"{m}/keep.txt", f"{m}/h"), lambda: os.chmod(f"{m}/keep.txt", 0o600), lambda: os.utime(f"{m}/keep.txt"),
        lambda: os.mknod(f"{m}/fifo"),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS, i
    assert keys(bucket) == before and remote(bucket, "keep.txt") == b"keep"


def test_mtimes_are_stored_as_object_metadata_and_read_back_by_a_new_mount(bucket, mount_worker, tmp_path):
    """`touch -d` / rsync -t: the mtime is stored with the object in rclone's convention (S3:
    `mtime` seconds; Azure and GCS: `mtime` RFC 3339), both for a time set before the close
    (sent with the upload) and after it (a metadata update), and a mount with a new cache
    shows it."""
    if bucket.provider == "s3":
        pytest.skip("S3 keeps the mtime in the metadata too; covered with rclone's key in test_small_files")
    if bucket.backend.file_tree:
        pytest.skip("a WebDAV server keeps no metadata of ours (README: WebDAV)")
    w = mount_worker(bucket, readonly=False, cache_dir=str(tmp_path / "c1"), name="mt")
    with open(f"{w.mnt}/before-close.txt", "wb") as f:
        f.write(b"time set while open")
        os.utime(f"{w.mnt}/before-close.txt", (1_600_000_001.5, 1_600_000_001.5))
    with open(f"{w.mnt}/after-close.txt", "wb") as f:
        f.write(b"time set after the upload")
    os.utime(f"{w.mnt}/after-close.txt", (1_600_000_002.25, 1_600_000_002.25))
    mnt = w.mnt
    w.stop()
    w2 = mount_worker(bucket, cache_dir=str(tmp_path / "c2"), name="mt", mountpath=mnt)  # nothing cached: from the backend
    assert os.stat(f"{w2.mnt}/before-close.txt").st_mtime == pytest.approx(1_600_000_001.5, abs=1e-3)
    assert os.stat(f"{w2.mnt}/after-close.txt").st_mtime == pytest.approx(1_600_000_002.25, abs=1e-3)
    assert open(f"{w2.mnt}/after-close.txt", "rb").read() == b"time set after the upload"


def _write_while_another_writer_stores(bucket, writable, key, mode, theirs):
    """Writes "mine" to `key` through the mount while `theirs` is stored in the bucket, then
    checks the close: EIO, their object untouched, our bytes kept in staging as a conflict."""
    f = open(os.path.join(writable.mnt, key), mode)
    f.write(b"mine")
    bucket.put(key, theirs)
    with pytest.raises(OSError) as err:
        f.close()
    assert err.value.errno == errno.EIO
    assert remote(bucket, key) == theirs
    (staged,) = writable.stats()["staged"]
    assert staged["key"] == key and staged["state"] == "conflict"
    assert open(staged["local_path"], "rb").read() == b"mine"


def test_conflict_keeps_local_copy_and_never_overwrites(bucket, writable):
    bucket.put("c.txt", b"v1")
    _write_while_another_writer_stores(bucket, writable, "c.txt", "r+b", b"theirs, newer")


def test_a_new_file_whose_name_appears_in_the_bucket_meanwhile_is_a_conflict(bucket, writable):
    """A file created in the mount must still be new when it is stored (S3 and Azure send
    If-None-Match: * with the upload; GCS checks just before): another writer's object of the
    same name, stored while ours was being written, is never overwritten."""
    _write_while_another_writer_stores(bucket, writable, "race.txt", "wb", b"theirs, stored first")


@pytest.mark.serial
def test_upload_failure_then_backend_returns(tmp_path, mount_worker):
    from tests.devservers import free_port

    port = free_port()
    with moto_server(tmp_path / "m1.log", auth=False, port=port) as s3:
        s3.client().create_bucket(Bucket="flaky")
        w = mount_worker("flaky", readonly=False, deadline=3.0, options={"endpoint_url": s3.endpoint})
        open(f"{w.mnt}/before.txt", "wb").write(b"stored")
        f = open(f"{w.mnt}/after.txt", "wb")
        f.write(b"acknowledged only once stored")
    # the server is gone: close cannot store the file, and says so within the mount's deadline
    started = time.monotonic()
    with pytest.raises(OSError) as err:
        f.close()
    assert err.value.errno == errno.EIO
    assert time.monotonic() - started < 3.0 + 5.0  # the deadline, plus the adapter's margin
    staged = w.stats()["staged"]
    assert [s["key"] for s in staged] == ["after.txt"] and staged[0]["last_error"]
    with moto_server(tmp_path / "m2.log", auth=False, port=port) as s3:
        s3.client().create_bucket(Bucket="flaky")
        wait_for(lambda: "after.txt" in S3Backend(s3).keys("flaky"), timeout=60, what="the background upload")
        assert S3Backend(s3).get("flaky", "after.txt") == b"acknowledged only once stored"
        wait_for(lambda: w.stats()["staged"] == [], what="staging to empty")
        w.stop()


def test_sigkill_keeps_an_unclosed_file_incomplete_never_published(s3_bucket, mount_worker, tmp_path):
    bucket = s3_bucket
    cache = str(tmp_path / "crash-cache")
    w = mount_worker(bucket, readonly=False, cache_dir=cache, name="crash")
    open(f"{w.mnt}/closed.txt", "wb").write(b"closed before the crash")
    unclosed = open(f"{w.mnt}/unclosed.txt", "wb")
    unclosed.write(b"written, never closed")
    unclosed.flush()
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    assert remote(bucket, "closed.txt") == b"closed before the crash"  # acknowledged = stored
    try:
        unclosed.close()
    except OSError:
        pass
    subprocess.run(["fusermount3", "-u", "-z", w.mnt], check=False)
    w2 = mount_worker(bucket, readonly=False, cache_dir=cache, name="crash", mountpath=w.mnt)
    (staged,) = w2.stats()["staged"]
    assert staged["key"] == "unclosed.txt" and staged["state"] == "incomplete"
    assert w2.stats()["unsynced"]["incomplete"] == 1
    assert "unclosed.txt" not in keys(bucket)  # a prefix of a file is never published by itself
    assert open(staged["local_path"], "rb").read() == b"written, never closed"
    # an explicit decision publishes it
    assert w2.publish("unclosed.txt")["ok"] is True
    assert remote(bucket, "unclosed.txt") == b"written, never closed"
    assert w2.stats()["staged"] == []


def test_writeback_sigkill_then_restart_uploads_every_closed_file(s3, proxied, mount_worker, tmp_path):
    """Write-back: close returns before the upload (the backend is stalled, nothing can be
    stored), the worker is killed, and the next start uploads every closed file; `unsynced`
    goes to 0."""
    proxy, bucket = proxied
    cache = str(tmp_path / "wb-cache")
    cfg = dict(options={"endpoint_url": proxy.endpoint}, readonly=False, cache_dir=cache, name="wb", write_mode="writeback", deadline=3.0, ttl=60.0)
    w = mount_worker(bucket, **cfg)
    os.mkdir(f"{w.mnt}/dir")
    assert os.listdir(f"{w.mnt}/dir") == []  # listed before the stall: new names need no request
    proxy.set(stall=True)
    files = {f"dir/f{i:02d}.txt": b"closed before the kill %d" % i for i in range(20)}
    for key, data in files.items():
        with open(f"{w.mnt}/{key}", "wb") as f:
            f.write(data)
    unsynced = w.stats()["unsynced"]
    assert unsynced["files"] == len(files), unsynced  # all acknowledged, none stored
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    subprocess.run(["fusermount3", "-u", "-z", w.mnt], check=False)
    proxy.set(stall=False)
    assert not [k for k in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []) if k["Key"] in files]
    w2 = mount_worker(bucket, mountpath=w.mnt, **cfg)
    wait_for(lambda: w2.stats()["unsynced"]["files"] == 0, timeout=60, what="the uploads after the restart")
    for key, data in files.items():
        assert s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_writeback_delay_sends_a_file_closed_twice_once(proxied, mount_worker, s3):
    """A file closed, reopened and closed again within the write-back delay is uploaded once,
    with its last bytes; a temporary file deleted within the delay is never uploaded."""
    proxy, bucket = proxied
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, readonly=False, write_mode="writeback",
                     writeback_delay=1.0, ttl=60.0)
    os.listdir(w.mnt)
    proxy.reset_counts()
    with open(f"{w.mnt}/log.txt", "wb") as f:
        f.write(b"first line\n")
    with open(f"{w.mnt}/log.txt", "ab") as f:
        f.write(b"second line\n")
    with open(f"{w.mnt}/scratch.tmp", "wb") as f:
        f.write(b"gone before the delay")
    os.unlink(f"{w.mnt}/scratch.tmp")
    wait_for(lambda: w.stats()["unsynced"]["files"] == 0, timeout=30, what="the delayed upload")
    assert s3.client().get_object(Bucket=bucket, Key="log.txt")["Body"].read() == b"first line\nsecond line\n"
    assert proxy.counts["PUT"] == 1, dict(proxy.counts)
    assert "scratch.tmp" not in [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_sigterm_stores_closed_files_and_keeps_open_ones_incomplete(bucket, mount_worker):
    w = mount_worker(bucket, readonly=False, grace_period=20, write_mode="writeback")
    for i in range(5):  # write-back: closed, not yet stored when SIGTERM comes
        with open(f"{w.mnt}/closed-{i}.txt", "wb") as f:
            f.write(b"closed %d" % i)
    f = open(f"{w.mnt}/open-at-shutdown.txt", "wb")
    f.write(b"still open when the pod stopped")
    f.flush()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0
    for i in range(5):
        assert remote(bucket, f"closed-{i}.txt") == b"closed %d" % i
    assert "open-at-shutdown.txt" not in keys(bucket)  # its writer never closed it
    assert os.path.realpath(w.mnt) not in fuse_mounts()
    try:
        f.close()
    except OSError:
        pass


def test_a_put_stored_but_answered_with_an_error_is_not_a_conflict_when_retried(proxied, mount_worker, s3):
    """The server stores the object but its answer is lost (here: replaced by a 503 after the
    server acted). The SDK sends the PUT again, and its precondition (`If-None-Match: *` for a
    new file, `If-Match` for a replacement) now meets our own object: 412. That is not another
    writer's change: close succeeds, the bytes are there, nothing is left staged."""
    proxy, bucket = proxied
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, readonly=False, ttl=60.0)
    os.listdir(w.mnt)
    for name, data in (("new.txt", b"first version\n"), ("new.txt", b"second version, replacing\n")):
        proxy.set(errors_next=1)
        with open(f"{w.mnt}/{name}", "wb") as f:
            f.write(data)
        assert proxy.errors_injected >= 1
        assert s3.client().get_object(Bucket=bucket, Key=name)["Body"].read() == data
        assert w.stats()["staged"] == []


@pytest.mark.parametrize("mode", ["durable", "writeback"])
def test_a_write_into_a_full_staging_area_publishes_nothing(s3_bucket, mount_worker, mode):
    """100 MiB into a 64 MiB staging area: the write fails with ENOSPC, close() fails too, and no
    truncated object ever appears in the bucket; the file is kept `incomplete`."""
    w = mount_worker(s3_bucket, readonly=False, staging_limit=64 * MiB, write_mode=mode, writeback_delay=0.1)
    path = os.path.join(w.mnt, "big.bin")
    f = open(path, "wb", buffering=0)
    written, failed = 0, None
    chunk = os.urandom(MiB)
    try:
        for _ in range(100):
            written += f.write(chunk)
    except OSError as exc:
        failed = exc.errno
    assert failed == errno.ENOSPC and 60 * MiB <= written < 100 * MiB
    with pytest.raises(OSError) as closed:
        f.close()
    assert closed.value.errno == errno.EIO
    stats = w.stats()
    staged = {x["key"]: x for x in stats["staged"]}
    assert staged["big.bin"]["state"] == "incomplete" and "failed" in staged["big.bin"]["last_error"]
    assert stats["unsynced"]["queued"] == 0 and stats["unsynced"]["incomplete"] == 1  # nothing waits to be uploaded
    assert "big.bin" not in keys(s3_bucket)


def test_sqlite_in_wal_mode_on_a_writable_mount(s3_bucket, mount_worker):
    """sqlite's WAL mode maps its -shm file shared and deletes it at the last close; the kernel
    writes the mapping's pages back after that. Every write lands (none refused), and the
    database is whole after a remount."""
    w = mount_worker(s3_bucket, readonly=False)
    db = os.path.join(w.mnt, "wal.db")
    r = _sqlite(db, "pragma journal_mode=wal", "create table t(x)", "insert into t values(1),(2)", "select count(*) from t")
    assert r.returncode == 0 and r.stdout.split() == ["wal", "2"], r.stdout + r.stderr
    assert sorted(os.listdir(w.mnt)) == ["wal.db"]
    w.stop()
    log = open(w.cfg["log"]).read()
    assert "bad_handle" not in log and "request_failed" not in log, [l for l in log.splitlines() if "request_failed" in l]
    w2 = mount_worker(s3_bucket, readonly=False)
    r = _sqlite(os.path.join(w2.mnt, "wal.db"), "select sum(x) || '|' || count(*) from t", "pragma integrity_check")
    assert r.returncode == 0 and r.stdout.split() == ["3|2", "ok"], r.stdout + r.stderr


def _sqlite(db, *statements):
    """sqlite in its own process (as the sqlite3 shell: its mappings and its last close are its own)."""
    import sys

    code = ("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "for st in sys.argv[2:]:\n    for row in con.execute(st): print(*row)\ncon.close()\n")
    return subprocess.run([sys.executable, "-c", code, db, *statements], capture_output=True, text=True, timeout=60)


def test_mtimes_are_kept_to_the_nanosecond(bucket, mount_worker, tmp_path):
    """`…50.817603073` reads back as itself (not `…072`, a float's nearest): through the mount,
    from the mount's index after a remount, and from the object's metadata in a new cache."""
    t1, t2 = 1_796_233_250_817_603_073, 1_796_233_251_000_000_001
    w = mount_worker(bucket, readonly=False, cache_dir=str(tmp_path / "c1"), name="ns")
    with open(f"{w.mnt}/before-close.txt", "wb") as f:
        f.write(b"time set while open")
        os.utime(f"{w.mnt}/before-close.txt", ns=(t1, t1))
    with open(f"{w.mnt}/after-close.txt", "wb") as f:
        f.write(b"time set after the upload")
    os.utime(f"{w.mnt}/after-close.txt", ns=(t2, t2))
    assert os.stat(f"{w.mnt}/before-close.txt").st_mtime_ns == t1
    assert os.stat(f"{w.mnt}/after-close.txt").st_mtime_ns == t2
    mnt = w.mnt
    w.stop()
    again = mount_worker(bucket, cache_dir=str(tmp_path / "c1"), name="ns", mountpath=mnt)  # the mount's own index
    assert [os.stat(f"{mnt}/{n}").st_mtime_ns for n in ("before-close.txt", "after-close.txt")] == [t1, t2]
    again.stop()
    if bucket.backend.file_tree:
        return  # a WebDAV server keeps no metadata of ours: a new cache shows its last-modified
    fresh = mount_worker(bucket, cache_dir=str(tmp_path / "c2"), name="ns", mountpath=mnt, mtime_source="metadata")  # the metadata
    assert [os.stat(f"{mnt}/{n}").st_mtime_ns for n in ("before-close.txt", "after-close.txt")] == [t1, t2]
    assert fresh.stats()["store"]["errors"] == 0
