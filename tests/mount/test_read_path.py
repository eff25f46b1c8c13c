"""The read path through a real FUSE mount of a moto S3 server on 127.0.0.1."""

import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sidecar.cache.disk import tree_bytes
from tests.conftest import needs_fuse, sha, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]

MiB = 1024 * 1024
BLOCK = 8 * MiB


SIZES = {"empty": 0, "one": 1, "block-1": BLOCK - 1, "block": BLOCK, "block+1": BLOCK + 1}


def test_tree_listing_stat_cat_cp_and_checksums(bucket, mount_worker, tmp_path):
    rng = random.Random(1)
    objects = {f"data/raw/{name}.bin": rng.randbytes(size) for name, size in SIZES.items()}
    objects["data/raw/nested/deeper/note.txt"] = b"a note\n"
    objects["data/raw/folder-marker/"] = b""
    objects["data/other/not-mounted.txt"] = b"outside source_path"
    for key, data in objects.items():
        bucket.put(key, data)

    w = mount_worker(bucket, "data", source_path="raw")
    out = subprocess.run(["ls", "-R", w.mnt], capture_output=True, text=True, check=True).stdout
    for name in SIZES:
        assert f"{name}.bin" in out
    assert "deeper" in out and "note.txt" in out and "folder-marker" in out
    assert "not-mounted.txt" not in out

    for name, size in SIZES.items():
        path = os.path.join(w.mnt, f"{name}.bin")
        st = os.stat(path)
        assert st.st_size == size
        assert subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout.split()[0] == sha(
            objects[f"data/raw/{name}.bin"]
        )
    assert subprocess.run(["cat", os.path.join(w.mnt, "nested/deeper/note.txt")], capture_output=True, check=True).stdout == b"a note\n"
    assert os.path.isdir(os.path.join(w.mnt, "folder-marker")) and os.listdir(os.path.join(w.mnt, "folder-marker")) == []

    dest = tmp_path / "copy"
    subprocess.run(["cp", "-r", w.mnt, str(dest)], check=True)
    for key, data in objects.items():
        if key.startswith("data/raw/") and not key.endswith("/"):
            assert (dest / key.removeprefix("data/raw/")).read_bytes() == data

    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(w.mnt, "missing"))


def test_large_object_and_odd_offsets(bucket, mount_worker):
    data = random.Random(2).randbytes(200 * MiB + 12345)
    bucket.put("big.bin", data)
    w = mount_worker(bucket)
    path = os.path.join(w.mnt, "big.bin")
    out = subprocess.run(["sha256sum", path], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == sha(data)
    for skip, count in [(0, 1), (7, 3), (BLOCK - 3, 11), (199 * MiB + 1, 7000)]:
        got = subprocess.run(
            ["dd", f"if={path}", "bs=1", f"skip={skip}", f"count={count}", "iflag=skip_bytes,count_bytes", "status=none"],
            capture_output=True,
            check=True,
        ).stdout
        assert got == data[skip : skip + count]
    with open(path, "rb") as f:
        for off in (BLOCK - 1, 3 * BLOCK + 5, len(data) - 10):
            f.seek(off)
            assert f.read(100_000) == data[off : off + 100_000]
    stats = w.stats()
    # sequential read-ahead kicked in, and the reads above never fetched more than the object
    assert stats["cache"]["prefetches"] > 0
    assert stats["store"]["bytes_fetched"] <= len(data) + BLOCK * 2


def test_sixteen_concurrent_readers_same_and_different_files(bucket, mount_worker):
    rng = random.Random(3)
    files = {f"f{i}.bin": rng.randbytes(3 * MiB + i) for i in range(8)}
    for k, v in files.items():
        bucket.put(k, v)
    w = mount_worker(bucket, block_size=MiB)

    def read(name):
        with open(os.path.join(w.mnt, name), "rb") as f:
            return name, f.read()

    names = ["f0.bin"] * 8 + [f"f{i}.bin" for i in range(8)]
    with ThreadPoolExecutor(16) as pool:
        for name, got in pool.map(read, names):
            assert got == files[name]
    st = w.stats()  # (what the store and the cache did, said when it fails: it failed once under load, not understood)
    assert st["store"]["get_requests"] <= sum(-(-len(v) // MiB) for v in files.values()) + 8, (st["store"], st["cache"])


def test_readers_through_a_small_memory_budget_reuse_buffers_and_read_right_bytes(s3_bucket, mount_worker):
    """Through a budget of sixteen blocks and no disk tier: two readers at once, then one alone,
    of S3 objects larger than the budget. Blocks are fetched into the buffers of evicted ones
    (sidecar.cache.memory) while replies are written from the blocks being read; every byte is
    right. (With two readers, a budget this small is mostly held by their read-ahead, and a
    victim is often a block still being answered: recycling is counted for the lone reader.)"""
    rng = random.Random(33)
    files = {f"r{i}.bin": rng.randbytes(24 * MiB + 7 * i) for i in range(3)}
    for k, v in files.items():
        s3_bucket.put(k, v)
    w = mount_worker(s3_bucket, block_size=MiB, memory_limit=16 * MiB, cache_dir=None)

    def read(name):
        with open(os.path.join(w.mnt, name), "rb") as f:
            return name, sha(f.read())

    with ThreadPoolExecutor(2) as pool:
        for name, got in pool.map(read, ["r0.bin", "r1.bin"]):
            assert got == sha(files[name])
    before = w.stats()["cache"]["buffers_recycled"]
    assert read("r2.bin")[1] == sha(files["r2.bin"])
    assert w.stats()["cache"]["buffers_recycled"] - before >= 8  # of its 25 blocks


def test_a_new_mount_over_a_disk_cache_the_page_cache_dropped_reads_it_directly_into_recycled_buffers(s3_bucket, mount_worker, tmp_path):
    """Two files read whole, one after the other (the second's fetched blocks reuse the buffers
    of the first's, on disk and served), then a new mount over the same disk cache after its
    files left the page cache (as after a restart on a node whose page cache went elsewhere):
    read again in the same order, their blocks come from disk with O_DIRECT, the second's into
    the buffers of the first's though the budget has room, with no request to the server, and
    every byte is right. (One after the other: read at once, two files of 72 blocks have most of
    their blocks asked for by the read-ahead before 16 are served, so how many are reused
    depends on the timing.)"""
    from tests.cache.test_disk import _evict_page_cache, _reads_direct

    if not _reads_direct(str(tmp_path)):
        pytest.skip("this file system does not read with O_DIRECT")
    rng = random.Random(37)
    files = {f"w{i}.bin": rng.randbytes(72 * MiB + 5 * i) for i in range(2)}
    for k, v in files.items():
        s3_bucket.put(k, v)
    cache = str(tmp_path / "warm-cache")
    first = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache, passthrough=False)  # (the sidecar's own reads, here)
    blocks = 0
    for name, data in files.items():
        with open(os.path.join(first.mnt, name), "rb") as f:
            assert sha(f.read()) == sha(data)
        blocks += -(-len(data) // MiB)
        wait_for(lambda: first.stats()["disk"]["blocks"] == blocks, timeout=30, what="the blocks on disk")
    # The budget, 256 MiB, never fills: without the early reuse of served blocks none would be.
    # How many are varies: in a full parallel run under load far fewer were, now and then, for a
    # reason not found yet. The bound asks only that some are.
    st = first.stats()
    assert st["cache"]["buffers_recycled"] >= 8, (st["cache"], st["memory_bytes"], st["disk"])
    first.stop()
    _evict_page_cache(cache)
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache, passthrough=False)
    gets = w.stats()["store"]["get_requests"]
    for name, data in files.items():
        with open(os.path.join(w.mnt, name), "rb") as f:
            assert sha(f.read()) == sha(data)
    st = w.stats()
    assert st["store"]["get_requests"] == gets and st["disk"]["corrupt"] == 0
    assert st["disk"]["direct_reads"] >= 2 * 64  # the last, short blocks are mapped; a few may be cached
    assert st["cache"]["buffers_recycled"] >= 32


def test_replaced_object_seen_after_ttl_never_mixed(bucket, mount_worker):
    old = bucket.put("obj.bin", random.Random(4).randbytes(3 * MiB))
    w = mount_worker(bucket, block_size=MiB, ttl=1.0)
    path = os.path.join(w.mnt, "obj.bin")
    assert open(path, "rb").read() == old
    new = bucket.put("obj.bin", random.Random(5).randbytes(3 * MiB + 100))
    seen = []

    def read_whole():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:  # ESTALE if the object changes between blocks of one read
            assert exc.errno == errno.ESTALE
            return False
        assert data in (old, new), "a read mixed old and new bytes"
        seen.append(data == new)
        return data == new

    wait_for(read_whole, timeout=10, interval=0.2, what="the new object")
    assert seen[-1] is True


def test_deleted_object_disappears_after_ttl(bucket, mount_worker):
    bucket.put("gone.txt", b"soon gone")
    bucket.put("stays.txt", b"stays")
    w = mount_worker(bucket, ttl=1.0)
    assert sorted(os.listdir(w.mnt)) == ["gone.txt", "stays.txt"]
    bucket.delete("gone.txt")
    wait_for(lambda: not os.path.exists(os.path.join(w.mnt, "gone.txt")), timeout=10, what="deletion to be seen")
    assert os.listdir(w.mnt) == ["stays.txt"]


def test_disk_cache_limit_never_exceeded(bucket, mount_worker, tmp_path):
    rng = random.Random(6)
    files = {f"d{i}.bin": rng.randbytes(6 * MiB) for i in range(5)}
    for k, v in files.items():
        bucket.put(k, v)
    cache = tmp_path / "small-cache"
    limit = 10 * MiB
    w = mount_worker(bucket, block_size=MiB, cache_dir=str(cache), disk_limit=limit)
    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_bytes(cache))
            done.wait(0.005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for name, data in files.items():  # 30 MiB through a 10 MiB cache
            assert open(os.path.join(w.mnt, name), "rb").read() == data
        wait_for(lambda: w.stats()["disk"]["blocks"] > 0, what="disk writes")
    finally:
        done.set()
        t.join()
    stats = w.stats()
    assert 0 < peak <= limit
    assert stats["disk"]["used"] <= limit and stats["disk"]["evictions"] > 0


def test_restart_with_warm_disk_cache_makes_no_get(bucket, mount_worker, tmp_path):
    data = bucket.put("warm.bin", random.Random(7).randbytes(5 * MiB + 3))
    cache = str(tmp_path / "warm-cache")
    w = mount_worker(bucket, block_size=MiB, cache_dir=cache)
    assert open(os.path.join(w.mnt, "warm.bin"), "rb").read() == data
    wait_for(lambda: w.stats()["disk"]["blocks"] == 6, what="6 blocks on disk")
    w.stop()

    w2 = mount_worker(bucket, block_size=MiB, cache_dir=cache)
    assert open(os.path.join(w2.mnt, "warm.bin"), "rb").read() == data
    stats = w2.stats()
    assert stats["store"]["get_requests"] == 0
    if stats["passthrough"]["state"] == "on":  # the kernel read the cache file (tests/mount/test_passthrough.py)
        assert stats["passthrough"]["opens"] == 1 and stats["requests"].get("read", 0) == 0, stats
    else:
        assert stats["cache"]["disk_hits"] == 6


def test_readonly_mount_refuses_writes(bucket, mount_worker):
    bucket.put("ro.txt", b"read only")
    w = mount_worker(bucket)
    for action in (
        lambda: open(os.path.join(w.mnt, "ro.txt"), "ab"),
        lambda: open(os.path.join(w.mnt, "new.txt"), "wb"),
        lambda: os.mkdir(os.path.join(w.mnt, "d")),
        lambda: os.unlink(os.path.join(w.mnt, "ro.txt")),
    ):
        with pytest.raises(OSError) as err:
            action()
        assert err.value.errno == errno.EROFS
    st = os.statvfs(w.mnt)
    assert st.f_namemax == 255 and st.f_blocks > 0


def test_unreachable_backend_gives_eio_within_deadline(tmp_path, mount_worker):
    from tests.devservers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    w = mount_worker("nobucket", options={"endpoint_url": dead}, deadline=2.0)
    with pytest.raises(OSError) as err:
        os.listdir(w.mnt)
    assert err.value.errno == errno.EIO
    assert w.stats()["errors"]


def test_file_owner_is_configurable(bucket, mount_worker):
    bucket.put("owned.txt", b"x")
    w = mount_worker(bucket, uid=1000, gid=100)
    st = os.stat(os.path.join(w.mnt, "owned.txt"))
    assert (st.st_uid, st.st_gid) == (1000, 100)
    assert shutil.disk_usage(w.mnt).total > 0


def test_listing_costs_list_calls_only(s3_bucket, mount_worker):
    bucket = s3_bucket  # S3 only: 2,500 uploads to each emulator would cost more than they prove
    count = 2001  # three LIST pages of 1000
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: bucket.put(f"many/{i:05d}.txt", b"x" * (i % 7)), range(count)))
    w = mount_worker(bucket, ttl=30.0)
    out = subprocess.run(["ls", "-l", os.path.join(w.mnt, "many")], capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == count + 1  # "total" line
    sizes = {e.name: e.stat().st_size for e in os.scandir(os.path.join(w.mnt, "many"))}
    assert sizes["00006.txt"] == 6 and len(sizes) == count
    st = w.stats()["store"]
    assert st["head_requests"] <= 1  # the lookup of "many" itself, at most
    assert st["list_requests"] <= 5  # the warm-up at start (1), the root (1) and "many" (3 pages of 1,000)
    assert st["get_requests"] == 0


def test_mounted_means_served_with_the_kernel_read_ahead_raised(s3_bucket, mount_worker):
    """`mounted` comes once the mount has answered a request, with the kernel's read-ahead
    window of the mount already raised (it can only be set after FUSE_INIT): nothing of the
    start-up is left for the first read. The kernel's bound on read-ahead requests in flight
    is raised too, through the FUSE control file system, which the worker mounts if nothing is
    mounted there (a machine without systemd's mount of it: left at 12, pyarrow's pre-buffered
    column chunks were fetched two at a time)."""
    from sidecar.worker import FUSE_CONTROL, FUSE_MAX_BACKGROUND

    if os.path.ismount(FUSE_CONTROL):  # as on a machine that never mounted it
        subprocess.run(["umount", FUSE_CONTROL], check=True)
    w = mount_worker(s3_bucket, kernel_readahead_kb=768)
    real = os.path.realpath(w.mnt)
    with open("/proc/self/mountinfo") as f:
        dev = [line.split()[2] for line in f if line.split()[4] == real][-1]
    with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
        assert int(f.read()) == 768  # read before anything of ours touched the mount
    control = f"{FUSE_CONTROL}/{os.makedev(*(int(n) for n in dev.split(':')))}"
    with open(f"{control}/max_background") as f:
        assert int(f.read()) == FUSE_MAX_BACKGROUND != 12  # the kernel's default is 12
    with open(f"{control}/congestion_threshold") as f:
        assert int(f.read()) == FUSE_MAX_BACKGROUND * 3 // 4


def test_extended_attributes_are_not_supported_and_asked_once(s3_bucket, mount_worker):
    """No xattrs are stored: the first getxattr answers ENOSYS, so the kernel answers every
    later one itself ("not supported"), instead of asking before each write of every file."""
    s3_bucket.put("x.txt", b"x")
    w = mount_worker(s3_bucket)
    path = os.path.join(w.mnt, "x.txt")
    for _ in range(3):
        with pytest.raises(OSError) as exc:
            os.getxattr(path, "user.note")
        assert exc.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as exc:
        os.listxattr(path)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert w.stats()["requests"].get("getxattr", 0) == 1


def test_column_chunks_read_at_odd_offsets_cost_two_gets_each(s3_bucket, mount_worker):
    """A Parquet-like reader: runs of 1 MiB reads at unaligned offsets, one run after another
    through one descriptor. Each run costs its first read (an exact range) and one streamed GET
    that follows it; no GET per block. Bytes are right."""
    data = random.Random(21).randbytes(40 * MiB)
    s3_bucket.put("table.parquet", data)
    w = mount_worker(s3_bucket, ttl=30.0)
    runs = [(3 * MiB + 4096 * 5, 6 * MiB), (25 * MiB + 4096 * 3, 5 * MiB), (12 * MiB + 4096, 7 * MiB)]
    fd = os.open(os.path.join(w.mnt, "table.parquet"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # the kernel reads what is asked, no more
        before = w.stats()["store"]["get_requests"]
        for start, length in runs:
            for off in range(start, start + length, MiB):
                assert os.pread(fd, MiB, off) == data[off : off + MiB]
        gets = w.stats()["store"]["get_requests"] - before
    finally:
        os.close(fd)
    assert gets <= 2 * len(runs)  # before: a GET per block of each run (18 here)


def test_an_object_named_like_a_folder_never_hides_the_folder(bucket, mount_worker):
    """Blobs `same` and `same/child` (folder markers written without a trailing slash by some
    Hadoop/WASB tools): the folder is listed and its children are reachable on every provider;
    the object of the same name is not shown, and is reported (docs/SEMANTICS.md)."""
    if bucket.backend.file_tree:
        pytest.skip("on a WebDAV server a name is a file or a folder, never both")
    bucket.put("same", b"an object named like the folder")
    bucket.put("same/child", b"the child")
    bucket.put("same/deeper/grandchild", b"deeper")
    w = mount_worker(bucket)
    assert sorted(os.listdir(w.mnt)) == ["same"]
    assert os.path.isdir(os.path.join(w.mnt, "same"))
    assert sorted(os.listdir(os.path.join(w.mnt, "same"))) == ["child", "deeper"]
    assert open(os.path.join(w.mnt, "same/child"), "rb").read() == b"the child"
    assert open(os.path.join(w.mnt, "same/deeper/grandchild"), "rb").read() == b"deeper"
    # looked up cold, without the root's listing first
    w.refresh()
    assert open(os.path.join(w.mnt, "same/child"), "rb").read() == b"the child"
    assert '"object_skipped"' in open(w.cfg["log"]).read()


def test_a_folder_held_open_past_its_ttl_is_not_hidden_by_an_object_of_its_name(bucket, mount_worker):
    """A shell sitting in folder `same` (blobs `same` and `same/child`): once the folder's
    attributes are due for a check (its TTL, forced here by a refresh), the check must not take
    the object for the folder. Before, the check's HEAD found the object, the folder was
    dropped, and the shell saw an empty folder and ENOENT for `same/child`."""
    if bucket.backend.file_tree:
        pytest.skip("on a WebDAV server a name is a file or a folder, never both")
    bucket.put("same", b"an object named like the folder")
    bucket.put("same/child", b"the child")
    w = mount_worker(bucket)
    fd = os.open(os.path.join(w.mnt, "same"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == ["child"]
        w.refresh()  # every attribute due, as after the folder TTL
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        assert os.listdir(fd) == ["child"]
        assert os.listdir(os.path.join(w.mnt, "same")) == ["child"]
        assert open(os.path.join(w.mnt, "same/child"), "rb").read() == b"the child"
    finally:
        os.close(fd)


SQLITE_QUERIES = """
import random, sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro&immutable=1", uri=True)
rng = random.Random(5)
total = 0
for _ in range(200):
    (n,) = con.execute("SELECT length(payload) + id FROM t WHERE id = ?", (rng.randrange(1, 16001),)).fetchone()
    total += n
print(total)
"""


def test_sqlite_point_queries_in_a_small_database_fetch_it_whole_not_page_by_page(s3_bucket, mount_worker, tmp_path):
    """200 indexed point queries on a 17 MB sqlite database (a random reader of small pieces, one
    after another): after a few exact ranges the file is fetched whole in parallel ranged GETs,
    so the queries cost a handful of GETs, not one or more per query; bytes stay within twice the
    file. A large file stays exact (tests/vfs/test_reader.py)."""
    import sqlite3

    db = tmp_path / "local.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
    rng = random.Random(3)
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, rng.randbytes(rng.randrange(500, 1500))) for i in range(1, 16001)))
    con.commit()
    con.close()
    data = db.read_bytes()
    s3_bucket.put("data.db", data)
    expected = subprocess.run([sys.executable, "-c", SQLITE_QUERIES, str(db)], capture_output=True, text=True, check=True).stdout
    w = mount_worker(s3_bucket, ttl=30.0)
    before = w.stats()["store"]
    got = subprocess.run([sys.executable, "-c", SQLITE_QUERIES, os.path.join(w.mnt, "data.db")], capture_output=True, text=True, check=True).stdout
    after = w.stats()["store"]
    assert got == expected
    gets = after["get_requests"] - before["get_requests"]
    fetched = after["bytes_fetched"] - before["bytes_fetched"]
    assert gets <= 8 + 2 * -(-len(data) // (8 * MiB)) + 4, gets  # before: 113 GETs here
    assert fetched <= 2 * len(data), (fetched, len(data))


def test_the_mount_measures_its_links_round_trip_from_its_own_reads(s3, proxied, mount_worker):
    """The fetch policy's estimate (docs/SEMANTICS.md, "Requests against bytes"): through a link
    that waits 80 ms before each response, the mount's own GETs of a cold sequential read give
    a round trip of at least that (moto's own time comes on top), with no request of its own."""
    proxy, bucket = proxied
    data = random.Random(44).randbytes(48 * MiB)
    s3.client().put_object(Bucket=bucket, Key="seq.bin", Body=data)
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint})
    assert w.stats()["link"]["samples"] == 0
    proxy.set(first_byte_delay=0.08)
    with open(os.path.join(w.mnt, "seq.bin"), "rb") as f:
        assert f.read() == data
    link = w.stats()["link"]
    assert link["samples"] >= 2 and link["rtt_ms"] >= 70, link


def test_a_second_session_reads_what_the_first_read_from_the_nodes_shared_cache(s3, s3_bucket, mount_worker, tmp_path):
    """Two sidecars ("sessions") of one node, each with its own disk cache, one shared folder:
    the second reads an object the first read with no GET for its bytes; once the object is
    replaced, the new version is fetched and the old blocks are never served."""
    data = random.Random(45).randbytes(24 * MiB)
    s3_bucket.put("raw.bin", data)
    shared = str(tmp_path / "node-shared")
    first = mount_worker(s3_bucket, shared_cache_dir=shared, cache_dir=str(tmp_path / "cache-1"))
    with open(os.path.join(first.mnt, "raw.bin"), "rb") as f:
        assert f.read() == data
    blocks = lambda: [p for p in (tmp_path / "node-shared").rglob("*") if len(p.name) == 64]  # noqa: E731
    wait_for(lambda: len(blocks()) == 24, what="the first session's blocks in the shared folder")
    second = mount_worker(s3_bucket, shared_cache_dir=shared, cache_dir=str(tmp_path / "cache-2"))
    before = second.stats()["store"]["get_requests"]
    with open(os.path.join(second.mnt, "raw.bin"), "rb") as f:
        assert f.read() == data
    st = second.stats()
    assert st["store"]["get_requests"] == before  # no GET for the data
    assert st["cache"]["shared_hits"] == 24

    new = random.Random(46).randbytes(24 * MiB)
    s3_bucket.put("raw.bin", new)
    third = mount_worker(s3_bucket, shared_cache_dir=shared, cache_dir=str(tmp_path / "cache-3"))
    with open(os.path.join(third.mnt, "raw.bin"), "rb") as f:
        assert f.read() == new
    assert third.stats()["cache"]["shared_hits"] == 0 and third.stats()["store"]["get_requests"] > 0


def test_a_copy_out_of_a_mapped_file_fetches_about_what_it_reads(s3_bucket, mount_worker):
    """A tensor copied out of a memory-mapped model file (safetensors, numpy memmap) on a mount
    with the kernel's 1 MiB read-ahead: the kernel reads 1 MiB around the copy's first page and
    around its last, then reads ahead from the first. The middle is fetched once, at once, and
    what the kernel reads past the end exactly: the link brings what the kernel reads, not whole
    blocks around it again."""
    import mmap

    data = random.Random(36).randbytes(64 * MiB)
    s3_bucket.put("model.bin", data)
    w = mount_worker(s3_bucket, kernel_readahead_kb=1024, ttl=30.0)
    copies = [(1 * MiB + 12345, 11 * MiB + 777), (40 * MiB + 4096, 49 * MiB + 8192 * 3), (20 * MiB, 30 * MiB + 300_000)]
    with open(os.path.join(w.mnt, "model.bin"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        before = w.stats()
        for start, end in copies:
            mm[start], mm[end - 1]  # the order a large memcpy touches them in
            assert mm[start:end] == data[start:end]
    after = w.stats()
    fetched = after["store"]["bytes_fetched"] - before["store"]["bytes_fetched"]
    read = after["bytes_read"] - before["bytes_read"]  # each page once: the copies are apart
    assert after["cache"]["fills"] == 3
    # The kernel reads half a window before each copy and half after (its windows around the
    # faults) and, depending on when its read-ahead marker is met, a window past the end: 3.0
    # MiB in all, or up to 4.7. What the link brought beyond that is the sidecar's own: whole
    # blocks around both ends again when a stream followed instead of the fill (4.47 MiB over
    # the copies once), a stream past the end fetching whole blocks, a page fault's read inside
    # a window still in flight starting a stream of its own (under load, before that read waited).
    copied = sum(end - start for start, end in copies)
    assert read - copied <= len(copies) * 2 * MiB, (read, copied)
    assert fetched <= read + MiB // 8, (fetched, read, after["cache"], after["store"])


def test_a_worker_stopped_right_after_a_read_keeps_every_block_it_fetched(s3_bucket, mount_worker, tmp_path):
    """A worker told to stop while its disk cache's writes of a read's last blocks are still
    going out waits for them (bounded) before it exits: a new mount over the cache reads the
    file without a request. (Before, the writes were cancelled: a warm read after a restart
    fetched the last blocks again, 8 of 256 in a benchmark round.)"""
    data = random.Random(38).randbytes(48 * MiB + 77)
    s3_bucket.put("f.bin", data)
    cache = str(tmp_path / "cache")
    for attempt in range(4):  # without the wait, what is lost depends on timing (1 of 3 runs failed): four tries
        shutil.rmtree(cache, ignore_errors=True)
        first = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache)
        with open(os.path.join(first.mnt, "f.bin"), "rb") as f:
            got = f.read()
        first.stop()  # at once: no wait for the blocks on disk
        assert sha(got) == sha(data)
        w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache)
        gets = w.stats()["store"]["get_requests"]
        with open(os.path.join(w.mnt, "f.bin"), "rb") as f:
            assert sha(f.read()) == sha(data)
        assert w.stats()["store"]["get_requests"] == gets, attempt
        w.stop()


def test_a_streams_next_gets_start_as_its_gets_end_not_as_its_reader_reads(s3, proxied, mount_worker):
    """Issue 34: a direct client with N connections starts a GET as soon as one ends; a stream's
    window that was topped up only as its reader read ran its GETs in waves. A reader reads the
    first 8 MiB of a file from offset 0, then holds it open and reads nothing: the GETs of its
    window (16 MiB, 4 MiB GETs) that end start the next ones, up to two windows ahead of it
    (without that, the requests stop one window ahead). The rest reads right, one GET per 4 MiB."""
    proxy, bucket = proxied
    data = random.Random(61).randbytes(64 * MiB)
    s3.client().put_object(Bucket=bucket, Key="stream.bin", Body=data)
    w = mount_worker(bucket, options={"endpoint_url": proxy.endpoint}, readahead=16 * MiB, fetch_size=4 * MiB, memory_limit=128 * MiB,
                     kernel_readahead_kb=1024, ttl=30.0)

    def furthest() -> int:
        ends = [int(r.split("-")[1]) + 1 for kind, target, r in proxy.requests if kind == "GET" and target.endswith("/stream.bin") and "-" in r]
        return max(ends, default=0)

    with open(os.path.join(w.mnt, "stream.bin"), "rb", buffering=0) as f:
        for i in range(8):
            assert f.read(MiB) == data[i * MiB : (i + 1) * MiB]
        # The reader is at most at 10 MiB (the kernel reads 1 MiB ahead): one window is 26 MiB.
        wait_for(lambda: furthest() >= 34 * MiB, timeout=20, what=f"GETs 1.5 windows ahead (furthest {furthest() / MiB:.0f} MiB)")
        assert f.read() == data[8 * MiB :]
    gets = [r for kind, target, r in proxy.requests if kind == "GET" and target.endswith("/stream.bin")]
    assert len(gets) <= 64 // 4 + 6, gets
