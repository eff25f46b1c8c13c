"""A mount path is held from the daemon's start to its stop: no write lands on the local disk
under it at any transition of the mount (docs/RELIABILITY.md, "writes at every transition").

Each scenario runs a writer (tests/mount/pathwriter.py: create, rename into, mkdir, in a loop)
through a transition, many times; at the end the daemon stops, and the bare folder must be empty
(nothing landed beneath), nothing must have been rescued (nothing landed to rescue), and every
write that succeeded must be in the bucket (it went through the mount)."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sidecar.status import request
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir, one_mount
from tests.devservers import served

pytestmark = [pytest.mark.mount, needs_fuse]

PATHWRITER = str(Path(__file__).with_name("pathwriter.py"))
NOBODY = 65534


def runs(request_):
    """Transitions per scenario: 50 in `make test-reliability`, a few in `make test`."""
    return 50 if request_.config.getoption("--reliability") else 3


@contextlib.contextmanager
def writing(mnt, scratch, tag, *, user=None):
    """The writer runs for the body of the `with`; its result (tries, landed, failed) after."""
    as_user = (lambda: (os.setgid(user), os.setuid(user))) if user is not None else None
    python = "/usr/bin/python3" if user is not None else sys.executable
    proc = subprocess.Popen([python, PATHWRITER, str(mnt), str(scratch), tag], stdout=subprocess.PIPE, text=True, preexec_fn=as_user)
    result = {}
    try:
        assert proc.stdout.readline().strip() == "started"
        yield result
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        if out.strip():
            result.update(json.loads(out.strip().splitlines()[-1]))


def state(d):
    return d.get("/status")[1]["mounts"][0]


def assert_nothing_landed_beneath(d, mnt, cache, results, s3=None, bucket=None):
    """After the daemon stopped: the bare folder is empty, nothing was rescued, and every write
    that succeeded is in the bucket."""
    d.stop()
    assert not os.path.ismount(mnt)
    assert os.listdir(mnt) == [], f"landed on the local disk beneath the mount path: {os.listdir(mnt)[:10]}"
    assert not (Path(cache) / "rescued" / "one").exists() or not any((Path(cache) / "rescued" / "one").iterdir())
    tries = sum(r["tries"] for r in results)
    assert tries > 0
    if s3 is not None:
        keys = set()
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys.update(o["Key"] for o in page.get("Contents", []))
        for r in results:
            for what, name in r["landed"]:
                assert what != "rename", f"{name} was renamed in from the local disk: the path was bare"
                assert (name if what == "create" else name + "/") in keys, f"{what} {name} succeeded but is not in the bucket"


def writable_manifest(tmp_path, s3, bucket, endpoint=None):
    m = one_mount(tmp_path, s3, bucket)
    m["storages"][0]["readonly"] = False
    if endpoint:
        m["storages"][0]["options"]["endpoint_url"] = endpoint
    return m


def fresh(s3, tmp_path):
    """A new bucket, the mount path and the folder beside it (where renames come from)."""
    bucket = f"hold-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    return bucket, tmp_path / "project/one", tmp_path / "project"


def test_writes_while_a_mount_starts_never_land_on_the_local_disk(s3, tmp_path, daemons, request):
    bucket, mnt, scratch = fresh(s3, tmp_path)
    results = []
    for i in range(runs(request)):
        # /health answers once every path is held: from here the writer runs through
        # pending -> checking -> mounted
        d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket), creds=creds_dir(tmp_path, s3, ["one"]))
        with writing(mnt, scratch, f"s{i}") as r:
            assert state(d)["path"] in ("held", "served")
            d.wait_ready()
            wait_for(lambda: state(d)["state"] == "mounted", what="mounted")
        results.append(r)
        if i < runs(request) - 1:
            d.stop()
            assert os.listdir(mnt) == []
    assert_nothing_landed_beneath(d, mnt, tmp_path / "cache", results, s3, bucket)
    assert any(errno_ in r["failed"] for r in results for errno_ in ("EROFS",)), results


def test_writes_while_a_killed_worker_is_replaced_never_land_on_the_local_disk(s3, tmp_path, daemons, request):
    bucket, mnt, scratch = fresh(s3, tmp_path)
    d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    results = []
    for i in range(runs(request)):
        restarts = state(d)["restarts"]
        with writing(mnt, scratch, f"k{i}") as r:
            os.kill(int(d.worker_pids()[0]), signal.SIGKILL)
            wait_for(lambda: state(d)["restarts"] > restarts and state(d)["state"] == "mounted", timeout=60, what="mounted again")
        results.append(r)
    assert_nothing_landed_beneath(d, mnt, tmp_path / "cache", results, s3, bucket)


def test_writes_while_the_backend_is_down_and_back_never_land_on_the_local_disk(s3, proxied, tmp_path, daemons, request):
    proxy, bucket = proxied
    mnt, scratch = tmp_path / "project/one", tmp_path / "project"
    d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket, endpoint=proxy.endpoint), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    results = []
    for i in range(runs(request)):
        with writing(mnt, scratch, f"b{i}") as r:
            proxy.set(refuse=True)
            os.kill(int(d.worker_pids()[0]), signal.SIGKILL)  # the mount comes back only if the backend does
            wait_for(lambda: state(d)["state"] == "failed" and state(d)["path"] == "held", timeout=60, what="failed")
            assert os.listdir(mnt) == ["STORAGE-NOT-MOUNTED.txt"]
            proxy.set(refuse=False)
            d.post("/mounts/one/mount")
            wait_for(lambda: state(d)["state"] == "mounted", timeout=60, what="mounted after the backend returned")
        results.append(r)
    assert_nothing_landed_beneath(d, mnt, tmp_path / "cache", results, s3, bucket)
    assert any(r["failed"].get("EROFS") for r in results), results  # the placeholder refused while failed


def test_writes_while_a_mount_waits_for_credentials_never_land_on_the_local_disk(s3, tmp_path, daemons, request):
    bucket, mnt, scratch = fresh(s3, tmp_path)
    results = []
    for i in range(runs(request)):
        d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket))
        with writing(mnt, scratch, f"c{i}") as r:
            wait_for(lambda: state(d)["state"] == "needs_credentials", what="needs_credentials")
            assert state(d)["path"] == "held"
            code, _ = d.post("/mounts/one/credentials", {"access_key_id": s3.key, "secret_access_key": s3.secret})
            assert code == 200
            wait_for(lambda: state(d)["state"] == "mounted", what="mounted")
        results.append(r)
        if i < runs(request) - 1:
            d.stop()
    assert_nothing_landed_beneath(d, mnt, tmp_path / "cache", results, s3, bucket)
    assert any(r["failed"].get("EROFS") for r in results), results


@pytest.fixture
def world_root():
    """A project root that another user can reach (pytest's own tmp folders are 0700)."""
    top = tempfile.mkdtemp(prefix="hold-")
    os.chmod(top, 0o755)
    try:
        yield Path(top)
    finally:
        for m in [line.split()[1] for line in open("/proc/self/mounts") if top in line]:
            subprocess.run(["fusermount3", "-u", "-z", m], check=False)
        shutil.rmtree(top, ignore_errors=True)


def test_when_no_fuse_mount_can_be_made_the_folder_is_locked_for_the_sessions_user(s3, tmp_path, world_root, daemons, request):
    """FUSE refused (here: the mount helper is down): neither the placeholder nor the worker can
    mount, so the folder itself is made unwritable while the mount is not up; the session's user,
    who owns it, cannot write into it; its own mode comes back at stop."""
    bucket = f"hold-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    manifest = writable_manifest(tmp_path, s3, bucket)
    manifest["root"] = str(world_root / "project")
    mnt = world_root / "project/one"
    mnt.mkdir(parents=True)
    for p in (world_root / "project", mnt):
        os.chown(p, NOBODY, NOBODY)
        os.chmod(p, 0o755)
    results = []
    for i in range(runs(request)):
        d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["one"]), args=["--mount-helper", str(tmp_path / "no-helper.sock")])
        assert state(d)["path"] == "locked"
        with writing(mnt, world_root / "project", f"f{i}", user=NOBODY) as r:
            wait_for(lambda: state(d)["state"] == "failed", what="failed")
            assert state(d)["error"]["code"] == "mount_failed"
            assert state(d)["path"] == "locked"
        results.append(r)
        assert d.status_cli().stdout.count("is locked") == 1
        d.stop()
        assert os.stat(mnt).st_mode & 0o777 == 0o755  # its own mode again
    assert os.listdir(mnt) == []
    assert all(r["landed"] == [] for r in results), results
    assert all(set(r["failed"]) <= {"EACCES"} for r in results), results


def test_a_user_unmount_leaves_the_folder_bare_and_says_so(s3, tmp_path, daemons):
    bucket = f"hold-{os.urandom(4).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    assert state(d)["path"] == "served" and served(tmp_path / "project/one")
    code, body = request("/mounts/one/unmount", "POST", sock=d.sock)
    assert code == 200 and body["state"] == "unmounted"
    assert state(d)["path"] == "bare"
    assert not os.path.ismount(tmp_path / "project/one")
    out = d.status_cli().stdout
    assert "is bare (nothing holds it" in out, out
    # and when it is mounted again, what was written meanwhile is moved aside, not hidden
    (tmp_path / "project/one/meanwhile.txt").write_text("local")
    code, body = request("/mounts/one/mount", "POST", sock=d.sock, timeout=30)
    assert code == 200 and body["state"] == "mounted"
    assert [e["path"] for e in state(d)["rescued"]] == ["meanwhile.txt"]
    assert "meanwhile.txt" not in os.listdir(tmp_path / "project/one")


def test_errnos_are_what_a_session_expects(s3, proxied, tmp_path, daemons):
    """While failed, the placeholder answers every change with EROFS (not ENOSYS, not EACCES)."""
    proxy, bucket = proxied
    proxy.set(refuse=True)
    d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket, endpoint=proxy.endpoint), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    mnt = tmp_path / "project/one"
    assert state(d)["state"] == "failed" and state(d)["path"] == "held"
    (tmp_path / "project/outside.txt").write_text("x")
    for attempt in (lambda: open(mnt / "a", "w"), lambda: os.mkdir(mnt / "d"), lambda: os.symlink("x", mnt / "l"),
                    lambda: os.mknod(mnt / "fifo", 0o600 | 0o010000), lambda: os.chmod(mnt, 0o777),
                    lambda: open(mnt / "STORAGE-NOT-MOUNTED.txt", "a"), lambda: os.unlink(mnt / "STORAGE-NOT-MOUNTED.txt"),
                    lambda: os.truncate(mnt / "STORAGE-NOT-MOUNTED.txt", 0)):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS, attempt
    with pytest.raises(OSError) as exc:
        os.rename(tmp_path / "project/outside.txt", mnt / "in.txt")
    assert exc.value.errno == errno.EXDEV


def test_a_killed_placeholder_is_replaced_before_the_worker_mounts(s3, proxied, tmp_path, daemons):
    """The placeholder itself dies (SIGKILL) while the mount is failed: its dead mount refuses
    writes (ENOTCONN), and before the worker mounts, the path is held again by a new one."""
    proxy, bucket = proxied
    proxy.set(refuse=True)
    mnt = tmp_path / "project/one"
    d = daemons(tmp_path, writable_manifest(tmp_path, s3, bucket, endpoint=proxy.endpoint), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    first = state(d)["placeholder_pid"]
    assert state(d)["state"] == "failed" and first
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: _errno_of(lambda: os.listdir(mnt)) in (errno.ENOTCONN, errno.ECONNABORTED), what="the dead placeholder")
    assert _errno_of(lambda: open(mnt / "x.txt", "w")) in (errno.ENOTCONN, errno.ECONNABORTED)
    proxy.set(refuse=False)
    d.post("/mounts/one/mount")
    wait_for(lambda: state(d)["state"] == "mounted", timeout=60, what="mounted")
    second = state(d)["placeholder_pid"]
    assert second and second != first
    assert_nothing_landed_beneath(d, mnt, tmp_path / "cache", [{"tries": 1, "landed": [], "failed": {}}])


def _errno_of(action):
    try:
        action()
    except OSError as exc:
        return exc.errno
    return 0
