"""No privilege in the sidecar: a root mount helper hands /dev/fuse fds to a daemon running as an
ordinary user with no capabilities (issue: the image built and run, fd passing)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from tests.devservers import stop_process
from sidecar.mounthelper import HelperError, request_fuse_fd
from sidecar.mounttable import fuse_mounts
from sidecar.status import Unreachable, request
from tests.conftest import needs_fuse, wait_for

pytestmark = [pytest.mark.mount, needs_fuse, pytest.mark.skipif(os.getuid() != 0, reason="the helper must run as root")]
NOBODY = 65534


@pytest.fixture
def world(tmp_path):
    """A folder every uid can traverse (pytest's tmp folders are root's alone)."""
    base = tempfile.mkdtemp(prefix="helper-", dir="/tmp")
    os.chmod(base, 0o755)
    yield base
    for m in fuse_mounts():
        if m.startswith(base):
            subprocess.run(["umount", "-l", m], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def helper(world):
    sock = os.path.join(world, "helper", "helper.sock")
    roots = os.path.join(world, "sessions")
    os.makedirs(roots)
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "mount-helper", "--socket", sock, "--allowed-root", roots],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(world, "helper.log"), "w"))
    wait_for(lambda: os.path.exists(sock), timeout=20, what="the helper socket")
    yield sock, roots
    stop_process(proc)


def test_a_daemon_without_privilege_mounts_reads_writes_through_the_helper(s3, world, helper):
    sock, roots = helper
    bucket = f"h-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=bucket)
    s3.client().put_object(Bucket=bucket, Key="hello.txt", Body=b"hello from s3")
    project = os.path.join(roots, "session-1")
    os.makedirs(project)
    creds = os.path.join(world, "creds", "one")
    os.makedirs(creds)
    for field, value in (("access_key_id", s3.key), ("secret_access_key", s3.secret)):
        with open(os.path.join(creds, field), "w") as f:
            f.write(value)
        os.chmod(os.path.join(creds, field), 0o600)
    for path in (os.path.join(world, "creds"), creds, *[os.path.join(creds, x) for x in os.listdir(creds)], project):
        os.chown(path, NOBODY, NOBODY)
    manifest = {"root": project, "storages": [{"name": "one", "provider": "s3", "url": f"s3://{bucket}", "readonly": False,
                                               "options": {"endpoint_url": s3.endpoint}}],
                "mounts": [{"storage": "one", "mountpath": "data"}]}
    mpath = os.path.join(world, "manifest.json")
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    run = os.path.join(world, "run")
    os.makedirs(run)
    os.chown(run, NOBODY, NOBODY)
    dsock = os.path.join(run, "sidecar.sock")
    env = dict(os.environ, HOME=run, XDG_CACHE_HOME=os.path.join(run, "cache"))
    python = _python_for_others(env)
    # uid/gid 65534, no supplementary groups, no capabilities at all (none inheritable or bounding)
    cmd = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
           python, "-m", "sidecar.cli", "run", "--manifest", mpath, "--socket", dsock, "--credentials-dir", os.path.join(world, "creds"),
           "--cache-dir", os.path.join(run, "cache"), "--mount-helper", sock]
    log = open(os.path.join(world, "daemon.log"), "w")
    daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def ready():
            if daemon.poll() is not None:
                raise RuntimeError(open(os.path.join(world, "daemon.log")).read()[-3000:])
            try:
                return request("/ready", sock=dsock)[0] == 200
            except Unreachable:
                return False

        wait_for(ready, timeout=60, what="the unprivileged daemon")
        status = request("/status", sock=dsock)[1]["mounts"][0]
        assert status["state"] == "mounted", status
        caps = open(f"/proc/{daemon.pid}/status").read()
        assert "CapEff:\t0000000000000000" in caps and f"Uid:\t{NOBODY}" in caps
        mnt = os.path.join(project, "data")
        assert open(os.path.join(mnt, "hello.txt"), "rb").read() == b"hello from s3"
        with open(os.path.join(mnt, "result.txt"), "wb") as f:
            f.write(b"written without privilege")
        assert s3.client().get_object(Bucket=bucket, Key="result.txt")["Body"].read() == b"written without privilege"
        daemon.terminate()
        assert daemon.wait(60) == 0
        wait_for(lambda: os.path.realpath(mnt) not in fuse_mounts(), timeout=20, what="the helper to unmount")
    finally:
        stop_process(daemon)


def _python_for_others(env):
    """An interpreter another uid can run: the venv's may live under /root (0700), as here with
    pyenv; then the system's Python of the same version with the venv's packages on its path."""
    import site
    import sysconfig

    if os.access(sys.executable, os.X_OK) and _others_can_reach(os.path.realpath(sys.executable)):
        return sys.executable
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(system):
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that uid {NOBODY} can run")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo, sysconfig.get_paths()["purelib"], *site.getsitepackages()])
    return system


def _others_can_reach(path):
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        if not mode & 0o001:
            return False
    return True


def test_the_helper_refuses_a_path_outside_its_allowed_root(world, helper):
    sock, roots = helper
    outside = os.path.join(world, "elsewhere")
    os.makedirs(outside)
    with pytest.raises(HelperError, match="not inside an allowed root"):
        request_fuse_fd(sock, os.path.join(outside, "m"), fsname="x", readonly=True)
    # a symlink below the root that leads outside it is refused too
    os.symlink(outside, os.path.join(roots, "link"))
    with pytest.raises(HelperError):
        request_fuse_fd(sock, os.path.join(roots, "link", "m"), fsname="x", readonly=True)
    assert not [m for m in fuse_mounts() if m.startswith(world)]
