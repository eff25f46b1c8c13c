"""What is found beneath a mount path before the daemon holds it is moved aside, reported and
kept until uploaded or discarded: never hidden, never followed (docs/RELIABILITY.md)."""

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sidecar import rescue
from sidecar.status import events, request
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir, one_mount

pytestmark = [pytest.mark.mount, needs_fuse]

MTIME_NS = 1_700_000_000_123_456_789


def plant(folder: Path) -> dict[str, bytes]:
    """What a session wrote into the bare folder while no sidecar ran: every kind of entry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_bytes(b"plain")
    os.utime(folder / "a.txt", ns=(MTIME_NS, MTIME_NS))
    (folder / "nested/deeper").mkdir(parents=True)
    nested = os.urandom(65536)
    (folder / "nested/deeper/b.bin").write_bytes(nested)
    (folder / "empty").mkdir()
    os.symlink("/etc/hostname", folder / "link")  # points outside the project
    os.mkfifo(folder / "fifo")
    (folder / "STORAGE-NOT-MOUNTED.txt").write_bytes(b"mine, not the placeholder's")
    (folder / "ro.txt").write_bytes(b"read-only")
    os.chmod(folder / "ro.txt", 0o444)
    (folder / "conflict.txt").write_bytes(b"rescued version")
    return {"a.txt": b"plain", "nested/deeper/b.bin": nested, "STORAGE-NOT-MOUNTED.txt": b"mine, not the placeholder's",
            "ro.txt": b"read-only", "conflict.txt": b"rescued version"}


def cli(d, *args):
    return subprocess.run([sys.executable, "-m", "sidecar.cli", *args, "--socket", d.sock], capture_output=True, text=True, timeout=120)


def test_files_beneath_a_mount_path_are_moved_aside_reported_and_uploaded(s3, tmp_path, daemons):
    bucket = f"rescue-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    s3.client().put_object(Bucket=bucket, Key="conflict.txt", Body=b"bucket version")
    mnt = tmp_path / "project/one"
    planted = plant(mnt)
    hostname = Path("/etc/hostname").read_bytes()
    manifest = one_mount(tmp_path, s3, bucket)
    manifest["storages"][0]["readonly"] = False
    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    status = d.get("/status")[1]["mounts"][0]
    assert status["state"] == "mounted"
    # hidden by nothing: the mount shows the bucket, the planted entries are elsewhere
    assert sorted(os.listdir(mnt)) == ["conflict.txt"]
    assert (mnt / "conflict.txt").read_bytes() == b"bucket version"
    by_path = {e["path"]: e for e in status["rescued"]}
    assert set(by_path) == {"a.txt", "nested/deeper/b.bin", "empty/", "link", "fifo", "STORAGE-NOT-MOUNTED.txt", "ro.txt", "conflict.txt"}
    assert status["rescued_total"] == 8
    base = tmp_path / "cache/rescued/one"
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700 and stat.S_IMODE(os.stat(tmp_path / "cache/rescued").st_mode) == 0o700
    for path, data in planted.items():
        where = Path(by_path[path]["where"])
        assert where.is_relative_to(base) and where.read_bytes() == data
        assert by_path[path]["size"] == len(data)
    assert os.stat(by_path["a.txt"]["where"]).st_mtime_ns == MTIME_NS
    assert stat.S_IMODE(os.stat(by_path["ro.txt"]["where"]).st_mode) == 0o444
    assert os.readlink(by_path["link"]["where"]) == "/etc/hostname" and by_path["link"]["kind"] == "symlink"
    assert stat.S_ISFIFO(os.lstat(by_path["fifo"]["where"]).st_mode)
    assert Path("/etc/hostname").read_bytes() == hostname
    assert os.path.isdir(by_path["empty/"]["where"])
    # reported: the log, the events (a client connecting later sees it too), the status table
    assert '"files_rescued"' in d.log()
    stream = events(sock=d.sock, timeout=10)
    seen = [next(stream) for _ in range(2)]
    stream.close()
    assert any(e["type"] == "rescued" and e["mount"] == "one" and e["entries"] == 8 for e in seen), seen
    assert "one: 8 rescued entries" in d.status_cli().stdout
    listed = cli(d, "rescue", "one")
    assert listed.returncode == 0 and "nested/deeper/b.bin" in listed.stdout and "8 rescued entries" in listed.stderr

    up = cli(d, "rescue", "one", "--upload")
    assert up.returncode == 0, up.stderr
    c = s3.client()
    assert c.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"plain"
    assert c.get_object(Bucket=bucket, Key="nested/deeper/b.bin")["Body"].read() == planted["nested/deeper/b.bin"]
    assert c.get_object(Bucket=bucket, Key="STORAGE-NOT-MOUNTED.txt")["Body"].read() == planted["STORAGE-NOT-MOUNTED.txt"]
    assert c.get_object(Bucket=bucket, Key="ro.txt")["Body"].read() == b"read-only"
    assert c.head_object(Bucket=bucket, Key="empty/")["ContentLength"] == 0
    # the object that changed in the bucket is not overwritten: the file goes under a conflict name
    assert c.get_object(Bucket=bucket, Key="conflict.txt")["Body"].read() == b"bucket version"
    conflicted = [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].startswith("conflict.rescued-")]
    assert len(conflicted) == 1 and c.get_object(Bucket=bucket, Key=conflicted[0])["Body"].read() == b"rescued version"
    assert f"uploaded conflict.txt as {conflicted[0]}" in up.stdout
    # what a bucket cannot hold is kept, and listed
    left = request("/mounts/one/rescue", "POST", {"action": "list"}, sock=d.sock)[1]
    assert sorted(e["path"] for e in left["rescued"]) == ["fifo", "link"]
    assert "kept link" in up.stderr and "kept fifo" in up.stderr
    # the mount shows the uploads (its listing was refreshed)
    assert (mnt / "a.txt").read_bytes() == b"plain"
    gone = cli(d, "rescue", "one", "--discard")
    assert gone.returncode == 0 and "2 rescued entries removed" in gone.stdout
    assert d.get("/status")[1]["mounts"][0]["rescued_total"] == 0


def test_a_read_only_mounts_rescued_files_are_kept_until_discarded(s3, tmp_path, daemons):
    bucket = f"rescue-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    mnt = tmp_path / "project/one"
    mnt.mkdir(parents=True)
    digest = hashlib.sha256()
    chunk = os.urandom(1 << 20)
    with open(mnt / "big.bin", "wb") as f:  # 1 GiB
        for _ in range(1024):
            f.write(chunk)
            digest.update(chunk)
    d = daemons(tmp_path, one_mount(tmp_path, s3, bucket), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    status = d.get("/status")[1]["mounts"][0]
    assert status["state"] == "mounted" and os.listdir(mnt) == []
    [entry] = status["rescued"]
    assert entry["path"] == "big.bin" and entry["size"] == 1 << 30
    rescued = hashlib.sha256()
    with open(entry["where"], "rb") as f:
        while block := f.read(1 << 20):
            rescued.update(block)
    assert rescued.digest() == digest.digest()
    refused = cli(d, "rescue", "one", "--upload")
    assert refused.returncode == 1 and "read-only" in refused.stderr
    assert os.path.exists(entry["where"])
    # kept across a restart, listed until discarded
    d.stop()
    d.start()
    d.wait_ready()
    assert d.get("/status")[1]["mounts"][0]["rescued_total"] == 1
    assert cli(d, "rescue", "one", "--discard").returncode == 0
    assert not os.path.exists(entry["where"])


@pytest.fixture
def small_tmpfs():
    """A 4 MiB tmpfs (another file system, and one that fills up)."""
    top = tempfile.mkdtemp(prefix="small-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", top], check=True)
    try:
        yield Path(top)
    finally:
        subprocess.run(["umount", "-l", top], check=False)
        os.rmdir(top)


def move_aside(src, dest):
    """rescue.move_aside of the folder `src`, into `dest`; its batch folder."""
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return rescue.move_aside(fd, dest, "one")
    finally:
        os.close(fd)


def assert_moved_whole(src, batch, planted):
    assert os.listdir(src) == []
    for path, data in planted.items():
        assert (batch / path).read_bytes() == data
    assert os.readlink(batch / "link") == "/etc/hostname"


def test_a_rescue_across_file_systems_copies_every_kind_of_entry_without_following_it(tmp_path, small_tmpfs):
    src = tmp_path / "bare"
    planted = plant(src)
    assert os.stat(src).st_dev != os.stat(small_tmpfs).st_dev
    batch = move_aside(src, small_tmpfs)
    assert_moved_whole(src, batch, planted)
    assert os.stat(batch / "a.txt").st_mtime_ns == MTIME_NS
    assert stat.S_IMODE(os.stat(batch / "ro.txt").st_mode) == 0o444
    assert stat.S_ISFIFO(os.lstat(batch / "fifo").st_mode)
    assert (batch / "empty").is_dir() and not any((batch / "empty").iterdir())


def test_a_rescue_that_cannot_complete_leaves_everything_where_it_was(tmp_path, small_tmpfs):
    src = tmp_path / "bare"
    plant(src)
    (src / "big.bin").write_bytes(os.urandom(6 << 20))  # more than the 4 MiB file system holds
    before = sorted(os.listdir(src))
    with pytest.raises(rescue.RescueFailed, match="No space left"):
        move_aside(src, small_tmpfs)
    assert sorted(os.listdir(src)) == before
    assert (src / "a.txt").read_bytes() == b"plain"
    assert list((small_tmpfs / "rescued/one").iterdir()) == []  # the partial copy is gone


def test_a_mount_whose_path_cannot_be_emptied_fails_and_shows_the_files(s3, tmp_path, small_tmpfs, daemons):
    bucket = f"rescue-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    mnt = tmp_path / "project/one"
    mnt.mkdir(parents=True)
    (mnt / "big.bin").write_bytes(os.urandom(6 << 20))
    d = daemons(tmp_path, one_mount(tmp_path, s3, bucket), creds=creds_dir(tmp_path, s3, ["one"]),
                args=["--cache-dir", str(small_tmpfs)])
    wait_for(lambda: d.get("/status")[1]["mounts"][0]["state"] == "failed", what="failed")
    status = d.get("/status")[1]["mounts"][0]
    assert status["error"]["code"] == "mount_path_not_empty", status
    assert status["path"] == "locked"
    assert not os.path.ismount(mnt) and os.listdir(mnt) == ["big.bin"]  # shown, not hidden
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o555
    d.stop()
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o755


def test_a_rescue_between_two_mounts_of_one_file_system_copies(tmp_path):
    """A pod's volumes are bind mounts of one node disk: the same device, yet rename(2) between
    them is EXDEV. The rescue copies then (found in the pod test)."""
    src, dest = tmp_path / "bare", tmp_path / "cache"
    planted = plant(src)
    dest.mkdir()
    subprocess.run(["mount", "--bind", str(dest), str(dest)], check=True)
    try:
        assert os.stat(src).st_dev == os.stat(dest).st_dev
        assert_moved_whole(src, move_aside(src, dest), planted)
    finally:
        subprocess.run(["umount", "-l", str(dest)], check=False)
