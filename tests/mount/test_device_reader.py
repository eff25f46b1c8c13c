"""The protocol hook's device reader (sidecar/_fusept.c): a C thread reads /dev/fuse, answers
IOCTL itself (Python's open() asks isatty() of every file), and queues every other request, in
order, for pyfuse3. Real mounts on moto."""

import errno
import fcntl
import os
import random
import termios

import pytest

from tests.conftest import needs_fuse, sha

pytestmark = [pytest.mark.mount, needs_fuse]
MiB = 1 << 20


def test_ioctls_are_refused_by_the_device_reader_and_everything_else_reaches_the_worker(s3_bucket, mount_worker):
    """On a read-only mount, each Python open() of a file costs one IOCTL, refused with ENOTTY
    (what a server without an ioctl handler answers) by the device reader, not the worker's
    event loop; opens, reads, listings and stats around them are served as always."""
    rnd = random.Random(7)
    files = {f"d/f{i}.bin": rnd.randbytes(3 * MiB + i) for i in range(3)}
    for k, v in files.items():
        s3_bucket.put(k, v)
    w = mount_worker(s3_bucket, block_size=MiB)
    assert sorted(os.listdir(os.path.join(w.mnt, "d"))) == ["f0.bin", "f1.bin", "f2.bin"]
    for i in range(21):
        name = f"d/f{i % 3}.bin"
        with open(os.path.join(w.mnt, name), "rb") as f:  # (buffered: open() calls isatty())
            assert not f.isatty() and sha(f.read()) == sha(files[name])
    with open(os.path.join(w.mnt, "d/f0.bin"), "rb", buffering=0) as f:
        with pytest.raises(OSError) as refused:
            fcntl.ioctl(f.fileno(), termios.TCGETS, bytes(64))
        assert refused.value.errno == errno.ENOTTY
    st = w.stats()["requests"]
    assert st["ioctl"] >= 22 and st["open"] >= 22 and st["read"] > 0 and st["readdir"] >= 1, st


def test_a_writable_mount_and_a_mount_without_the_reader_refuse_ioctls_through_libfuse(s3_bucket, mount_worker, monkeypatch):
    """A writable mount runs no device reader (its WRITEs would be copied once more), nor does
    a mount with STORAGE_SIDECAR_DEVICE_THREAD=0: libfuse gives the same answers on the event
    loop (not counted), and writes of large pieces arrive whole."""
    data = random.Random(9).randbytes(200_000)
    s3_bucket.put("f.bin", data)
    rw = mount_worker(s3_bucket, block_size=MiB, readonly=False)
    written = random.Random(8).randbytes(2 * MiB + 5)
    with open(os.path.join(rw.mnt, "new.bin"), "wb") as f:
        f.write(written)
    assert sha(s3_bucket.get("new.bin")) == sha(written)
    monkeypatch.setenv("STORAGE_SIDECAR_DEVICE_THREAD", "0")
    off = mount_worker(s3_bucket, block_size=MiB)
    for w in (rw, off):
        for _ in range(3):
            with open(os.path.join(w.mnt, "f.bin"), "rb") as f:
                assert not f.isatty() and sha(f.read()) == sha(data)
        with open(os.path.join(w.mnt, "f.bin"), "rb", buffering=0) as f:
            with pytest.raises(OSError) as refused:
                fcntl.ioctl(f.fileno(), termios.TCGETS, bytes(64))
            assert refused.value.errno == errno.ENOTTY
        st = w.stats()
        assert "ioctl" not in st["requests"] and st["requests"]["open"] >= 4, st["requests"]
        assert st["passthrough"]["state"] != "not hooked"


def test_a_worker_stops_cleanly_while_a_file_of_its_mount_is_open(s3_bucket, mount_worker):
    """Told to stop while a file of its mount is open, a worker stops its device reader (the
    thread is woken and joined), closes the device and unmounts, and exits by itself: no kill.
    The connection ended with it: the file's close is answered ENOTCONN by the kernel."""
    s3_bucket.put("f.bin", b"x" * 100_000)
    w = mount_worker(s3_bucket, block_size=MiB)
    fd = os.open(os.path.join(w.mnt, "f.bin"), os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"x" * 10
        assert w.stats()["requests"]["open"] == 1
        w.proc.stdin.close()
        assert w.proc.wait(15) == 0  # (TimeoutExpired: the worker hung in its stop)
    finally:
        with pytest.raises(OSError) as ended:
            os.close(fd)  # (the descriptor is closed whatever the answer)
    assert ended.value.errno == errno.ENOTCONN
