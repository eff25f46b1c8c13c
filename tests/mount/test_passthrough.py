"""FUSE passthrough (sidecar.passthrough): a file whose whole version is in the disk cache is read
by the kernel from the cache file, on a read-only mount, and the kernel's rules on mixing such
opens with others are kept. Skipped where the kernel or the process's rights do not allow it
(the worker says so in its stats)."""

import os
import random

import pytest

from tests.conftest import needs_fuse, reads_back, sha, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1 << 20


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _cached(s3_bucket, mount_worker, cache, files, **cfg):
    """A first mount reads `files` whole (so each is whole on disk) and stops."""
    first = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache, **cfg)
    for name, data in files.items():
        assert sha(_read(os.path.join(first.mnt, name))) == sha(data)
    blocks = sum(-(-len(d) // MiB) for d in files.values())
    wait_for(lambda: first.stats()["disk"]["blocks"] >= blocks, timeout=30, what="the blocks on disk")
    first.stop()


def _passing(w):
    state = w.stats()["passthrough"]["state"]
    if state != "on":
        pytest.skip(f"no FUSE passthrough here: {state}")


def test_a_file_whole_in_the_disk_cache_is_read_by_the_kernel_from_it(s3_bucket, mount_worker, tmp_path):
    """After a restart over the disk cache, a file of several blocks and a small one are read,
    read at odd offsets and mapped, all right, with not one READ reaching the worker and no
    request to the server; a file not cached yet is served by the worker as before."""
    rnd = random.Random(41)
    files = {"big.bin": rnd.randbytes(5 * MiB + 321), "small.bin": rnd.randbytes(50_000)}
    for k, v in files.items():
        s3_bucket.put(k, v)
    s3_bucket.put("later.bin", later := rnd.randbytes(2 * MiB))
    cache = str(tmp_path / "cache-pt")
    _cached(s3_bucket, mount_worker, cache, files)
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache)
    _passing(w)
    gets = w.stats()["store"]["get_requests"]
    for name, data in files.items():
        for _ in range(2):  # (a second open of the inode while the first's release may be on its way)
            reads_back(os.path.join(w.mnt, name), data)
    st = w.stats()
    assert st["requests"].get("read", 0) == 0 and st["store"]["get_requests"] == gets, (st["requests"], st["passthrough"])
    assert st["passthrough"]["opens"] == 2 * len(files)
    wait_for(lambda: w.stats()["passthrough"]["open"] == 0, timeout=10, what="the worker told of every close")  # (RELEASE comes after close returns)
    assert sha(_read(os.path.join(w.mnt, "later.bin"))) == sha(later)  # not cached: the worker reads it
    st = w.stats()
    assert st["requests"]["read"] > 0 and st["passthrough"]["opens"] == 2 * len(files)


def test_an_inode_open_the_worker_way_is_not_passed_through_until_it_closes(s3_bucket, mount_worker, tmp_path):
    """The kernel refuses (EIO) a passthrough open of an inode open otherwise, and the reverse:
    while a handle served by the worker is open, a second open of the same file is served by the
    worker too, though the file is whole on disk by then; once both close, the next open is
    passed through, and while it is open a second one is passed through as well."""
    data = random.Random(42).randbytes(3 * MiB + 7)
    s3_bucket.put("f.bin", data)
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=str(tmp_path / "cache-mix"))
    _passing(w)
    path = os.path.join(w.mnt, "f.bin")
    with open(path, "rb") as cold:
        assert sha(cold.read()) == sha(data)
        wait_for(lambda: (d := w.stats()["disk"])["blocks"] >= 4 and not d["writing"], timeout=30, what="the blocks on disk")
        with open(path, "rb") as second:  # would be EIO if passed through now
            assert sha(second.read()) == sha(data)
        assert w.stats()["passthrough"]["opens"] == 0
    wait_for(lambda: w.stats()["passthrough"]["served"] == 0, timeout=10, what="the worker told of both closes")  # (RELEASE comes after close returns)
    with open(path, "rb") as a, open(path, "rb") as b:
        assert a.read(MiB) == data[:MiB] and b.read() == data
        assert w.stats()["passthrough"]["open"] == 2
    assert w.stats()["passthrough"]["opens"] == 2
    wait_for(lambda: w.stats()["passthrough"]["open"] == 0, timeout=10, what="the worker told of both closes")


def test_a_cache_file_older_than_the_boot_is_read_the_checked_way(s3_bucket, mount_worker, tmp_path):
    """A power loss can leave a cache file's table written and its data not, which only the
    per-block checksums find: a file written before the machine booted is never passed
    through (its blocks are read and checked by the worker); nor is any with `passthrough`
    off in the mount's settings."""
    data = random.Random(43).randbytes(2 * MiB + 1)
    s3_bucket.put("old.bin", data)
    cache = str(tmp_path / "cache-old")
    _cached(s3_bucket, mount_worker, cache, {"old.bin": data})
    for root, _, names in os.walk(cache):
        for n in names:
            if n.startswith("seg-"):
                os.utime(os.path.join(root, n), (1_000_000, 1_000_000))
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache)
    _passing(w)
    gets = w.stats()["store"]["get_requests"]
    assert sha(_read(os.path.join(w.mnt, "old.bin"))) == sha(data)
    st = w.stats()
    assert st["passthrough"]["opens"] == 0 and st["requests"]["read"] > 0 and st["store"]["get_requests"] == gets
    w.stop()
    off = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache, passthrough=False)
    assert sha(_read(os.path.join(off.mnt, "old.bin"))) == sha(data)
    assert off.stats()["passthrough"] is None and off.stats()["requests"]["read"] > 0


def test_a_writer_of_a_file_read_by_the_kernel_gets_a_new_inode_and_its_readers_keep_theirs(s3_bucket, mount_worker, tmp_path):
    """A writable mount passes read-only opens through too. The kernel would refuse a writer's
    open of an inode passed through (EIO): the writer, and a truncation by path, are sent to a
    new inode of the key instead, as if another client had replaced the object; the reader
    goes on reading the version it opened, whole; the next open reads what was written."""
    old = random.Random(44).randbytes(3 * MiB + 5)
    s3_bucket.put("f.bin", old)
    s3_bucket.put("g.bin", g := random.Random(45).randbytes(MiB + 9))
    cache = str(tmp_path / "cache-rw")
    _cached(s3_bucket, mount_worker, cache, {"f.bin": old, "g.bin": g})
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache, readonly=False)
    _passing(w)
    path = os.path.join(w.mnt, "f.bin")
    new = random.Random(46).randbytes(2 * MiB + 1)
    with open(path, "rb") as reader:
        assert reader.read(MiB) == old[:MiB]
        assert w.stats()["passthrough"]["open"] == 1
        with open(path, "r+b") as writer:  # EIO, were it answered on the reader's inode
            assert os.fstat(writer.fileno()).st_ino != os.fstat(reader.fileno()).st_ino
            writer.write(new)
            writer.truncate()
        assert reader.read() == old[MiB:]  # the version it opened, whole
    assert _read(path) == new and s3_bucket.get("f.bin") == new
    gpath = os.path.join(w.mnt, "g.bin")
    with open(gpath, "rb") as reader:
        assert reader.read(10) == g[:10] and w.stats()["passthrough"]["open"] >= 1
        os.truncate(gpath, 100)  # by path: retried by the kernel on the new inode
        assert _read(gpath) == g[:100]  # (on the reader's inode, it would get the reader's backing file)
        assert reader.read() == g[10:]
    assert _read(gpath) == g[:100]
    assert w.stats()["passthrough"]["opens"] >= 2


def test_a_small_file_the_page_cache_holds_is_answered_from_it_and_one_passed_through_stays_so(s3_bucket, mount_worker, tmp_path):
    """A small file read through the worker is opened again as before (its bytes in the mounted
    file's page cache: no READ, no passthrough open, which would cost the worker more); on a new
    mount over the cache it is passed through, and so is every later open of it there (its
    pages are the cache file's)."""
    data = random.Random(47).randbytes(60_000)
    s3_bucket.put("s.bin", data)
    cache = str(tmp_path / "cache-small")
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache)
    _passing(w)
    path = os.path.join(w.mnt, "s.bin")
    assert _read(path) == data
    wait_for(lambda: (d := w.stats()["disk"])["blocks"] >= 1 and not d["writing"], timeout=30, what="the file on disk")
    reads = w.stats()["requests"]["read"]
    assert _read(path) == data
    st = w.stats()
    assert st["passthrough"]["opens"] == 0 and st["requests"]["read"] == reads
    w.stop()
    w = mount_worker(s3_bucket, block_size=MiB, cache_dir=cache)
    path = os.path.join(w.mnt, "s.bin")
    assert _read(path) == data and _read(path) == data
    st = w.stats()
    assert st["passthrough"]["opens"] == 2 and st["requests"].get("read", 0) == 0
