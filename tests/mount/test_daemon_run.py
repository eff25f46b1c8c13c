"""`storage-sidecar run`: every mount of a manifest in one daemon, unmounted on SIGTERM/SIGINT."""

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.devservers import fuse_mounts, served, stop_process, unmount_all
from tests.conftest import needs_fuse, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]


def write_credentials(directory, name, s3):
    d = directory / name
    d.mkdir(parents=True)
    (d / "access_key_id").write_text(s3.key)
    (d / "secret_access_key").write_text(s3.secret + "\n")
    for f in d.iterdir():
        f.chmod(0o400)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_mounts_all_and_unmounts_on_signal(s3, tmp_path, sig):
    c = s3.client()
    b1, b2 = f"r1-{uuid.uuid4().hex[:8]}", f"r2-{uuid.uuid4().hex[:8]}"
    for b in (b1, b2):
        c.create_bucket(Bucket=b)
    c.put_object(Bucket=b1, Key="raw/a.txt", Body=b"from one")
    c.put_object(Bucket=b1, Key="processed/p.txt", Body=b"processed")
    c.put_object(Bucket=b2, Key="b.txt", Body=b"from two")
    root = tmp_path / "project"
    manifest = {
        "root": str(root),
        "storages": [
            {"name": "one", "provider": "s3", "url": f"s3://{b1}", "options": {"endpoint_url": s3.endpoint}},
            {"name": "two", "provider": "s3", "url": f"s3://{b2}", "options": {"endpoint_url": s3.endpoint}},
        ],
        "mounts": [
            {"storage": "one", "mountpath": "data/raw", "source_path": "raw"},
            {"storage": "one", "mountpath": "data/processed", "source_path": "processed"},
            {"storage": "two", "mountpath": "two"},
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    creds = tmp_path / "creds"
    write_credentials(creds, "one", s3)
    write_credentials(creds, "two", s3)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "run", "--manifest", str(tmp_path / "m.json"), "--credentials-dir", str(creds), "--cache-dir", str(tmp_path / "cache"), "--socket", str(tmp_path / "s.sock")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    paths = [str(root / "data/raw"), str(root / "data/processed"), str(root / "two")]
    try:
        wait_for(lambda: all(served(p) for p in paths), what="three mounts")
        assert open(root / "data/raw/a.txt").read() == "from one"
        assert open(root / "data/processed/p.txt").read() == "processed"
        assert open(root / "two/b.txt").read() == "from two"
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert not [p for p in paths if p in fuse_mounts()]
    finally:
        stop_process(proc)
        for p in paths:
            unmount_all(p)
    text = (tmp_path / "daemon.log").read_text()
    assert s3.secret not in text
    assert '"mounted"' in text and '"daemon_stopped"' in text


def test_one_bad_mount_does_not_stop_the_others(s3, tmp_path):
    c = s3.client()
    good = f"g-{uuid.uuid4().hex[:8]}"
    c.create_bucket(Bucket=good)
    c.put_object(Bucket=good, Key="ok.txt", Body=b"ok")
    root = tmp_path / "project"
    blocker = root / "blocked"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where a mount should go")  # cannot mount over a regular file
    manifest = {
        "root": str(root),
        "storages": [{"name": "good", "provider": "s3", "url": f"s3://{good}", "options": {"endpoint_url": s3.endpoint}}],
        "mounts": [{"storage": "good", "mountpath": "blocked", "name": "bad"}, {"storage": "good", "mountpath": "fine", "name": "fine"}],
    }
    env = dict(os.environ, STORAGE_SIDECAR_MANIFEST=json.dumps(manifest), AWS_ACCESS_KEY_ID=s3.key, AWS_SECRET_ACCESS_KEY=s3.secret)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "run", "--socket", str(tmp_path / "s.sock")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: served(root / "fine"), what="the good mount")
        assert open(root / "fine/ok.txt").read() == "ok"
        wait_for(lambda: '"failed"' in (tmp_path / "daemon.log").read_text(), what="the failure to be logged")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        unmount_all(root / "fine")
    assert str(root / "fine") not in fuse_mounts()
