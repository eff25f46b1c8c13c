"""Real mounts under real conditions: a link that behaves like S3, a backend that stalls, resets
or changes objects under readers (tests/netproxy.py between the mount and moto). Quoted by
docs/RELIABILITY.md. The long variants (`reliability` marker) run in `make test-reliability`.
"""

import errno
import hashlib
import os
import random
import threading
import time
import uuid

import pytest

from tests.conftest import needs_fuse, s3_keys, sha, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1 << 20



def _mount(mount_worker, s3, proxy, bucket, **cfg):
    return mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, **cfg)


# -- versions: no reader ever gets bytes of two versions ------------------------------------


def _replace_while_open(s3, bucket, mnt, size_old, size_new, rng):
    """Reader A opens v1 and reads its start; the object is replaced; reader B opens the name
    after the TTL and reads; A reads on. Returns (A's bytes or the error, B's bytes, v1, v2)."""
    key = f"obj-{rng.getrandbits(32):08x}"
    v1, v2 = rng.randbytes(size_old), rng.randbytes(size_new)
    s3.client().put_object(Bucket=bucket, Key=key, Body=v1)
    a = open(f"{mnt}/{key}", "rb", buffering=0)
    got_a = a.read(2 * MiB)
    s3.client().put_object(Bucket=bucket, Key=key, Body=v2)
    time.sleep(1.1)  # the mount's TTL (1 s): the next open by name must see v2
    with open(f"{mnt}/{key}", "rb") as b:
        got_b = b.read()
    try:
        while chunk := a.read(4 * MiB):
            got_a += chunk
        result_a = got_a
    except OSError as exc:
        result_a = exc
    finally:
        a.close()
    return result_a, got_b, v1, v2


@pytest.mark.parametrize("size_new", [pytest.param(24 * MiB, marks=pytest.mark.reliability), pytest.param(12 * MiB, marks=pytest.mark.reliability), 40 * MiB],
                         ids=["same", "smaller", "larger"])  # `make test` keeps one size (its 15-minute bound)
def test_replaced_while_open_readers_never_mix_versions(s3, proxied, mount_worker, size_new):
    proxy, bucket = proxied
    w = _mount(mount_worker, s3, proxy, bucket, ttl=1.0, block_size=4 * MiB)
    rng = random.Random(size_new)
    for _ in range(3):
        result_a, got_b, v1, v2 = _replace_while_open(s3, bucket, w.mnt, 24 * MiB, size_new, rng)
        assert got_b == v2, "a reader opening after the TTL reads the new version whole"
        if isinstance(result_a, OSError):
            assert result_a.errno in (errno.ESTALE, errno.EIO), result_a
        else:  # the old version whole (served from what was fetched before the change)
            assert sha(result_a) == sha(v1), f"reader A got {len(result_a)} bytes that are not v1"


# -- deadlines: a stall is an error within the deadline, a slow transfer is not -------------


@pytest.mark.serial
def test_stalled_backend_fails_read_and_close_within_the_deadline(s3, proxied, mount_worker):
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="data.bin", Body=os.urandom(8 * MiB))
    w = _mount(mount_worker, s3, proxy, bucket, readonly=False, deadline=3.0, ttl=30.0)
    f = open(f"{w.mnt}/data.bin", "rb", buffering=0)  # looked up and opened before the stall
    out = open(f"{w.mnt}/result.txt", "wb")
    out.write(b"computed while the backend stalls")
    out.flush()
    proxy.set(stall=True)
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            f.read(1 * MiB)
        assert err.value.errno == errno.EIO
        assert time.monotonic() - started < 3.0 + 2.0  # the deadline + 2 s, not a minute
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            out.close()
        assert err.value.errno == errno.EIO
        assert time.monotonic() - started < 3.0 + 2.0
        stats = w.stats()
        assert [s["key"] for s in stats["staged"]] == ["result.txt"]
        assert stats["store"]["errors"] >= 2
        # counted as they ended: a poll between two stalled calls still sees them
        assert stats["store"]["stalled_calls"] >= 2 and stats["store"]["stalls"] >= 2, stats["store"]
    finally:
        proxy.set(stall=False)
    # the backend is back: the committed file is uploaded by the background writer
    wait_for(lambda: "result.txt" in s3_keys(s3, bucket), timeout=60, what="the retried upload")
    assert s3.client().get_object(Bucket=bucket, Key="result.txt")["Body"].read() == b"computed while the backend stalls"
    f.close()


def _close_on_slow_link(s3, proxy, bucket, mount_worker, size, bandwidth, deadline):
    proxy.set(bandwidth=bandwidth, first_byte_delay=0.03)
    w = _mount(mount_worker, s3, proxy, bucket, readonly=False, deadline=deadline)
    chunk = random.Random(size).randbytes(4 * MiB)
    digest = hashlib.sha256()
    started = time.monotonic()
    with open(f"{w.mnt}/big.bin", "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
            digest.update(chunk)
        written = time.monotonic()
    closed = time.monotonic() - written
    proxy.set(bandwidth=None, first_byte_delay=0.0)
    body = s3.client().get_object(Bucket=bucket, Key="big.bin")["Body"]
    remote = hashlib.sha256()
    while data := body.read(8 * MiB):
        remote.update(data)
    assert remote.hexdigest() == digest.hexdigest()
    return closed, written - started


@pytest.mark.reliability  # (~16 s of a slow link: make test-reliability, for make test's bound)
def test_close_of_a_large_file_on_a_slow_link(s3, proxied, mount_worker):
    # 256 MiB through a link of 4 MB/s per connection, deadline 5 s: the upload takes longer
    # than the deadline (8 parts of 16 MiB in flight: ~8 s) yet moves all along, so close
    # succeeds. (The 2 GiB case below is the long version.)
    proxy, bucket = proxied
    closed, _ = _close_on_slow_link(s3, proxy, bucket, mount_worker, 256 * MiB, 4e6, 5.0)
    assert closed > 5.0  # it really took longer than the deadline (else the test proves nothing)
    assert proxy.counts["PUT"] >= 256 // 16


@pytest.mark.reliability
def test_close_of_a_2_gib_file_at_25_mb_s_per_connection(s3, proxied, mount_worker):
    proxy, bucket = proxied
    closed, write = _close_on_slow_link(s3, proxy, bucket, mount_worker, 2048 * MiB, 25e6, 30.0)
    # the helper checked the stored bytes; the upload went in parts, and none was left open
    assert proxy.counts["PUT"] >= 2048 // 16
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    print(f"\n2 GiB close at 25 MB/s per connection: write {write:.1f} s, close {closed:.1f} s")


# -- partial re-uploads ------------------------------------------------------------------


@pytest.mark.parametrize("size_mib", [40, pytest.param(200, marks=pytest.mark.reliability)])
def test_partial_reupload_of_a_large_object_on_s3(s3, proxied, mount_worker, size_mib):
    proxy, bucket = proxied
    base = random.Random(size_mib).randbytes(size_mib * MiB)
    s3.client().put_object(Bucket=bucket, Key="log.bin", Body=base)
    w = _mount(mount_worker, s3, proxy, bucket, readonly=False)
    proxy.reset_counts()
    with open(f"{w.mnt}/log.bin", "ab") as f:
        f.write(b"L" * 1024)
    appended = proxy.bytes_up
    expected = base + b"L" * 1024
    assert s3.client().get_object(Bucket=bucket, Key="log.bin")["Body"].read() == expected
    proxy.reset_counts()
    with open(f"{w.mnt}/log.bin", "r+b") as f:
        f.seek(17 * MiB + 3)
        f.write(b"0123456789abcdef")
    edited = proxy.bytes_up
    expected = expected[: 17 * MiB + 3] + b"0123456789abcdef" + expected[17 * MiB + 19 :]
    assert s3.client().get_object(Bucket=bucket, Key="log.bin")["Body"].read() == expected
    print(f"\n{size_mib} MiB object: append 1 KiB sent {appended / MiB:.2f} MiB, 16-byte edit sent {edited / MiB:.2f} MiB")
    assert appended < 16 * MiB and edited < 16 * MiB
    assert proxy.counts["COPY"] >= 2  # the unchanged parts were copied server-side


# -- resets mid-body ---------------------------------------------------------------------


def test_resets_mid_body_are_retried_and_counted(s3, proxied, mount_worker):
    proxy, bucket = proxied
    files = {f"f{i:03d}": random.Random(i).randbytes(300 * 1024) for i in range(100)}
    for k, v in files.items():
        s3.client().put_object(Bucket=bucket, Key=k, Body=v)
    w = _mount(mount_worker, s3, proxy, bucket, ttl=60.0, cache_dir=None)
    os.listdir(w.mnt)
    proxy.set(reset_fraction=0.1)
    failed = 0
    for k, v in files.items():
        try:
            with open(f"{w.mnt}/{k}", "rb") as f:
                failed += f.read() != v
        except OSError:
            failed += 1
    proxy.set(reset_fraction=0.0)
    assert proxy.resets >= 3  # the faults were really injected
    assert failed == 0
    store = w.stats()["store"]
    assert store["retries"] + store["sdk_retries"] >= proxy.resets // 2, (store, proxy.resets)


# -- names -------------------------------------------------------------------------------


def test_unstorable_names_are_einval_and_unlistable_keys_skipped(s3, proxied, mount_worker, tmp_path):
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="good.txt", Body=b"ok")
    # moto refuses a newline in a key (its router 404s it); a tab and a control byte it stores
    s3.client().put_object(Bucket=bucket, Key="bad\tname.txt", Body=b"tab")
    s3.client().put_object(Bucket=bucket, Key="bad\x01name.txt", Body=b"control")
    w = _mount(mount_worker, s3, proxy, bucket, readonly=False)
    assert os.listdir(w.mnt) == ["good.txt"]  # such keys are skipped, not ghost entries
    for name in ("new\nline.txt", "tab\there", b"\xff\xfe-not-utf8"):
        path = os.path.join(os.fsencode(w.mnt), name if isinstance(name, bytes) else name.encode())
        with pytest.raises(OSError) as err:
            open(path, "wb").close()
        assert err.value.errno == errno.EINVAL, name
        with pytest.raises(OSError) as err:
            os.mkdir(path)
        assert err.value.errno == errno.EINVAL, name
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(os.fsencode(w.mnt), b"\xff\xfe-not-utf8"))
    assert w.stats()["staged"] == []  # nothing stuck unsynced
    os.listdir(w.mnt)
    log = open(w.cfg["log"]).read()
    assert log.count("object_skipped") == 2 and "request_crashed" not in log  # one warning per key


def test_many_readers_while_objects_are_replaced(s3, proxied, mount_worker):
    """Several readers of objects replaced while they read: each read is one whole version or
    an error (the acceptance's 32 readers x 100 tries run in `make test-reliability`)."""
    _readers_and_replacements(s3, proxied, mount_worker, readers=4, tries=3)


@pytest.mark.reliability
def test_32_readers_of_replaced_objects_100_tries(s3, proxied, mount_worker):
    _readers_and_replacements(s3, proxied, mount_worker, readers=32, tries=100)


def _readers_and_replacements(s3, proxied, mount_worker, *, readers, tries):
    proxy, bucket = proxied
    w = _mount(mount_worker, s3, proxy, bucket, ttl=0.5, block_size=1 * MiB)
    versions: dict[str, set[str]] = {}
    lock = threading.Lock()
    sizes = [3 * MiB, 2 * MiB, 5 * MiB]  # same, smaller, larger
    keys = [f"k{i}" for i in range(4)]
    for k in keys:
        data = os.urandom(sizes[0])
        versions[k] = {sha(data)}
        s3.client().put_object(Bucket=bucket, Key=k, Body=data)
    outcomes = {"whole": 0, "error": 0, "mixed": 0}
    stop = threading.Event()

    def writer():
        rng = random.Random(7)
        while not stop.is_set():
            k = rng.choice(keys)
            data = os.urandom(rng.choice(sizes))
            with lock:
                versions[k].add(sha(data))
            s3.client().put_object(Bucket=bucket, Key=k, Body=data)
            time.sleep(0.05)

    def reader(n):
        rng = random.Random(n)
        for _ in range(tries):
            k = rng.choice(keys)
            try:
                with open(f"{w.mnt}/{k}", "rb") as f:
                    data = f.read()
            except OSError:
                with lock:
                    outcomes["error"] += 1
                continue
            with lock:
                outcomes["whole" if sha(data) in versions[k] else "mixed"] += 1

    t = threading.Thread(target=writer)
    t.start()
    threads = [threading.Thread(target=reader, args=(n,)) for n in range(readers)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(600)
    finally:
        stop.set()
        t.join(30)
    print(f"\n{readers} readers x {tries} tries: {outcomes}")
    assert outcomes["mixed"] == 0, outcomes
    assert outcomes["whole"] > 0


# -- a writer's sidecar killed mid-write: nothing partial is ever visible ------------------


def _sigkill_during_writes(s3, mount_worker, tmp_path, tries):
    import signal
    import subprocess

    bucket = f"k-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=bucket)
    seen_partial = []
    stop = threading.Event()

    def poll():  # every 100 ms, as the acceptance asks: any object under a key being written is partial
        while not stop.is_set():
            for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []):
                if o["Key"].startswith("partial-"):
                    seen_partial.append((o["Key"], o["Size"]))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        for i in range(tries):
            cache = str(tmp_path / f"cache{i}")
            w = mount_worker(bucket, readonly=False, cache_dir=cache, name=f"k{i}")
            f = open(f"{w.mnt}/partial-{i}.bin", "wb")
            chunk = os.urandom(MiB)
            for _ in range(25):  # 25 of 70 MiB written, never closed
                f.write(chunk)
            f.flush()
            os.kill(w.proc.pid, signal.SIGKILL)
            w.proc.wait()
            try:
                f.close()
            except OSError:
                pass
            subprocess.run(["fusermount3", "-u", "-z", w.mnt], check=False, capture_output=True)
            # the next start finds it staged and keeps it incomplete
            w2 = mount_worker(bucket, readonly=False, cache_dir=cache, name=f"k{i}", mountpath=w.mnt)
            assert [s["state"] for s in w2.stats()["staged"]] == ["incomplete"]
            w2.stop()
        time.sleep(0.3)
    finally:
        stop.set()
        poller.join(5)
    assert seen_partial == []


def test_sigkill_during_a_write_never_shows_a_partial_object(s3, mount_worker, tmp_path):
    _sigkill_during_writes(s3, mount_worker, tmp_path, tries=2)


@pytest.mark.reliability
def test_sigkill_during_a_write_20_tries(s3, mount_worker, tmp_path):
    _sigkill_during_writes(s3, mount_worker, tmp_path, tries=20)


def test_sigkill_during_close_leaves_no_multipart_upload_behind(s3, proxied, mount_worker, tmp_path):
    """The worker is killed while its close uploads a 64 MiB file in parts: the next start aborts
    the upload the killed one left open (its ledger says which), then stores the file again."""
    import signal
    import subprocess

    proxy, bucket = proxied
    proxy.set(bandwidth=8e6)  # per connection: the parts take seconds, the kill comes in between
    cache = str(tmp_path / "cache")
    cfg = dict(options={"endpoint_url": proxy.endpoint}, readonly=False, cache_dir=cache, name="mpu", deadline=30.0)
    w = mount_worker(bucket, **cfg)
    data = os.urandom(64 * MiB)
    f = open(f"{w.mnt}/big.bin", "wb")
    f.write(data)
    outcome = []
    closer = threading.Thread(target=lambda: outcome.append(_close(f)))
    closer.start()
    wait_for(lambda: proxy.counts["PUT"] >= 1, timeout=60, what="the first part on its way")
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads"), "no upload open at the kill"
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    closer.join(30)
    assert outcome and outcome[0] in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO), outcome
    subprocess.run(["fusermount3", "-u", "-z", w.mnt], check=False, capture_output=True)
    proxy.set(bandwidth=None)
    w2 = mount_worker(bucket, mountpath=w.mnt, **cfg)
    wait_for(lambda: not w2.stats()["staged"], timeout=60, what="the recovered upload")
    assert s3.client().get_object(Bucket=bucket, Key="big.bin")["Body"].read() == data
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "abandoned_upload_aborted" in open(tmp_path / "worker1.log").read()


def _close(f):
    try:
        f.close()
        return 0
    except OSError as exc:
        return exc.errno


def test_503s_retried_inside_the_sdk_are_counted(s3, proxied, mount_worker):
    """botocore retries a 503 SlowDown by itself (s3fs never sees it): each request it sent again
    is counted in `sdk_retries`, per mount."""
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="f.bin", Body=b"x" * 1000)
    w = _mount(mount_worker, s3, proxy, bucket, deadline=10.0)
    before = w.stats()["store"]["sdk_retries"]
    proxy.set(errors_next=3)
    assert open(f"{w.mnt}/f.bin", "rb").read() == b"x" * 1000
    assert proxy.errors_injected == 3
    assert w.stats()["store"]["sdk_retries"] - before >= 3
