"""Zero-message opens (a read-only mount's `zero_message_opens`, FuseOps.open_without_requests):
the kernel opens and closes the mount's files alone, a file read before is read again from the
page cache with no request to the worker, and the versions stay apart. Real mounts on moto."""

import mmap
import os
import random

import pytest

from tests.conftest import needs_fuse, reads_back, sha, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1 << 20


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _served(requests):
    """The FUSE requests the worker served: without the IOCTL each Python open() sends (isatty),
    which the hook's device reader refuses alone (tests/mount/test_device_reader.py)."""
    return {op: n for op, n in requests.items() if op != "ioctl"}


def _zero(w):
    z = w.stats()["zero_message_opens"]
    assert z["state"] == "on", z  # the hook is built by `make install`: its absence is a failure here
    return z


def test_files_read_before_are_read_again_with_no_request(s3_bucket, mount_worker):
    """One OPEN reaches the worker (answered ENOSYS) and no RELEASE ever; a cold read, a cold
    memory mapping and reads at odd offsets get every byte right through reads that name the
    inode; opened again, read, sought and mapped, the files cost no FUSE request to the worker and no GET."""
    rnd = random.Random(51)
    files = {"a/big.bin": rnd.randbytes(3 * MiB + 5), "a/small.bin": rnd.randbytes(40_000), "b/mapped.bin": rnd.randbytes(2 * MiB + 99)}
    for k, v in files.items():
        s3_bucket.put(k, v)
    w = mount_worker(s3_bucket, block_size=MiB, ttl=300.0, zero_message_opens=True)
    _zero(w)
    for name, data in files.items():
        path = os.path.join(w.mnt, name)
        if name.endswith("mapped.bin"):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                assert m[len(data) - 7000 :] == data[-7000:] and sha(m[:]) == sha(data)
        else:
            assert sha(_read(path)) == sha(data)
    st = w.stats()
    assert st["requests"]["open"] == 1 and "release" not in st["requests"] and st["requests"]["read"] > 0, st["requests"]
    before = (_served(st["requests"]), st["store"]["get_requests"])
    for _ in range(2):
        for name, data in files.items():
            reads_back(os.path.join(w.mnt, name), data)
    st = w.stats()
    assert (_served(st["requests"]), st["store"]["get_requests"]) == before
    assert 0 < _zero(w)["readers"] <= len(files)


def test_an_object_replaced_remotely_is_seen_whole_once_its_entry_expires(s3_bucket, mount_worker):
    """Without an open to check it, the kernel's lookup after the entry's TTL finds the new
    version, a new inode: every read before gives the old bytes whole, every read after the new
    ones whole, never a mix, while the old version's pages stay in the page cache."""
    old, new = random.Random(1).randbytes(2 * MiB + 3), random.Random(2).randbytes(MiB + 77)
    s3_bucket.put("f.bin", old)
    w = mount_worker(s3_bucket, block_size=MiB, ttl=1.0, zero_message_opens=True)
    path = os.path.join(w.mnt, "f.bin")
    assert sha(_read(path)) == sha(old)
    ino = os.stat(path).st_ino
    s3_bucket.put("f.bin", new)

    def new_seen():
        got = _read(path)
        assert sha(got) in (sha(old), sha(new)), len(got)
        return got == new

    wait_for(new_seen, timeout=15, what="the new version read whole")
    assert os.stat(path).st_ino != ino and os.stat(path).st_size == len(new)
    _zero(w)
    assert w.stats()["requests"]["open"] == 1


def test_a_writable_mount_keeps_its_opens_and_without_the_hook_every_open_is_asked(s3_bucket, mount_worker, monkeypatch):
    """Zero-message opens are for read-only mounts: a writable one asked for them keeps its
    opens (its writers need them) and says why; so does a worker without the protocol hook
    (STORAGE_SIDECAR_PASSTHROUGH=0 does not load it), whose files are read as always."""
    data = random.Random(3).randbytes(300_000)
    s3_bucket.put("f.bin", data)
    rw = mount_worker(s3_bucket, block_size=MiB, readonly=False, zero_message_opens=True)
    with open(os.path.join(rw.mnt, "new.txt"), "wb") as f:
        f.write(b"written")
    assert s3_bucket.get("new.txt") == b"written" and sha(_read(os.path.join(rw.mnt, "f.bin"))) == sha(data)
    st = rw.stats()
    assert st["zero_message_opens"]["state"] == "not for a writable mount" and st["requests"]["open"] >= 1 and st["requests"]["release"] >= 1
    monkeypatch.setenv("STORAGE_SIDECAR_PASSTHROUGH", "0")
    off = mount_worker(s3_bucket, block_size=MiB, zero_message_opens=True)
    for _ in range(2):
        assert sha(_read(os.path.join(off.mnt, "f.bin"))) == sha(data)
    wait_for(lambda: off.stats()["requests"].get("release", 0) == 2, timeout=10, what="both closes told")  # (RELEASE comes after close returns)
    st = off.stats()
    assert st["zero_message_opens"]["state"] == "off" and st["requests"]["open"] == 2


def test_auto_asks_every_open_until_files_are_opened_again_then_none(s3_bucket, mount_worker):
    """`zero_message_opens: auto`: opens are asked (and passed through where they can be) until
    REOPENS_TO_SWITCH opens of files opened before; that open is answered ENOSYS and no OPEN
    comes after it. Files read before are then read again with no request to the worker (after one
    pass through the worker for those whose pages passthrough left in the cache file), a file
    open across the switch reads on and is released, and a file never read is read through
    reads that name its inode."""
    from sidecar.protocol import REOPENS_TO_SWITCH

    rnd = random.Random(52)
    files = {f"d/f{i}.bin": rnd.randbytes(50_000 + i) for i in range(4)}
    late = rnd.randbytes(MiB + 3)
    for k, v in {**files, "late.bin": late}.items():
        s3_bucket.put(k, v)
    w = mount_worker(s3_bucket, block_size=MiB, ttl=300.0, zero_message_opens="auto")
    assert w.stats()["zero_message_opens"]["state"].startswith("auto"), w.stats()["zero_message_opens"]
    names = list(files)
    for name in names:
        assert sha(_read(os.path.join(w.mnt, name))) == sha(files[name])
    held = open(os.path.join(w.mnt, names[0]), "rb")  # opened again: 1
    try:
        for i in range(REOPENS_TO_SWITCH - 2):
            with open(os.path.join(w.mnt, names[i % len(names)]), "rb"):
                pass
        st = w.stats()
        assert st["zero_message_opens"]["state"].startswith("auto") and st["requests"]["open"] == len(names) + REOPENS_TO_SWITCH - 1
        with open(os.path.join(w.mnt, names[1]), "rb"):  # the one that switches
            pass
        _zero(w)
        asked = w.stats()["requests"]["open"]
        gets = w.stats()["store"]["get_requests"]
        for name in names:
            reads_back(os.path.join(w.mnt, name), files[name])
        before = _served(w.stats()["requests"])
        for name in names:
            reads_back(os.path.join(w.mnt, name), files[name])
        st = w.stats()
        assert _served(st["requests"]) == before and st["requests"]["open"] == asked and st["store"]["get_requests"] == gets
        assert held.read() == files[names[0]]
    finally:
        held.close()
    # Linux sends no RELEASE once the connection opens alone, not even for a file open before:
    # its handle goes when the kernel forgets the inode (none of its files is open then).
    assert w.stats()["requests"]["release"] == len(names) + REOPENS_TO_SWITCH - 2 and w.stats()["handles"] >= 1

    def forgotten():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # (dentries and inodes: the kernel forgets what nothing holds)
        return w.stats()["handles"] == 0

    wait_for(forgotten, timeout=15, what="the handle open at the switch let go")
    reads = w.stats()["requests"]["read"]
    assert sha(_read(os.path.join(w.mnt, "late.bin"))) == sha(late)
    st = w.stats()
    assert st["requests"]["open"] == asked and st["requests"]["read"] > reads and st["store"]["get_requests"] > gets
