"""A `storage-sidecar run` daemon in a subprocess for tests, and the manifests and credentials
they give it. Used through the `daemons` fixture (tests/conftest.py), which stops every daemon."""

import json
import os
import subprocess
import sys
import uuid

from tests.devservers import stop_process, unmount_all
from sidecar.status import Unreachable, request, request_settled
from tests.conftest import wait_for


class Daemon:
    def __init__(self, tmp_path, manifest, *, creds=None, args=(), env=None, sock=None):
        self.tmp = tmp_path
        self.sock = sock or str(tmp_path / "sidecar.sock")
        self.root = manifest["root"]
        self.paths = [os.path.join(self.root, m["mountpath"]) for m in manifest["mounts"]]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        self.log_path = tmp_path / "daemon.log"
        cmd = [sys.executable, "-m", "sidecar.cli", "run", "--manifest", str(tmp_path / "manifest.json"), "--socket", self.sock,
               "--cache-dir", str(tmp_path / "cache"), "--check-deadline", "5", *args]
        if creds:
            cmd += ["--credentials-dir", str(creds)]
        self.env = dict(os.environ, **(env or {}))
        self.cmd = cmd
        self.start()

    def start(self):
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_for(self._answers, timeout=30, what="the control socket")

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-3000:]}")
        try:
            return request("/health", sock=self.sock)[0] == 200
        except Unreachable:
            return False

    def get(self, path):
        return request(path, sock=self.sock)

    def post(self, path, body=None):
        return request_settled(path, "POST", body, sock=self.sock, timeout=60)

    def wait_ready(self):
        return wait_for(lambda: self.get("/ready")[0] == 200, timeout=60, what="/ready")

    def worker_pids(self):
        """The pids of the mounts' worker processes (forked from the template: not our children)."""
        return [str(m["worker_pid"]) for m in self.get("/status")[1]["mounts"] if m.get("worker_pid")]

    def states(self):
        return {m["name"]: m["state"] for m in self.get("/status")[1]["mounts"]}

    def status_cli(self, *args):
        return subprocess.run([sys.executable, "-m", "sidecar.cli", "status", "--socket", self.sock, *args], capture_output=True, text=True)

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        stop_process(self.proc, timeout=30)
        for p in self.paths:
            unmount_all(p)


def creds_dir(tmp_path, s3, names, secret=None):
    base = tmp_path / "creds"
    for n in names:
        (base / n).mkdir(parents=True, exist_ok=True)
        (base / n / "access_key_id").write_text(s3.key)
        (base / n / "secret_access_key").write_text(secret or s3.secret)
    private(base)
    return base


def private(directory):
    """Credential files must not be readable by others (as a Secret mounted with mode 0400)."""
    for f in directory.rglob("*"):
        if f.is_file():
            f.chmod(0o600)


def one_mount(tmp_path, s3, bucket):
    """A manifest of one S3 storage "one" mounted at project/one."""
    return {
        "root": str(tmp_path / "project"),
        "storages": [{"name": "one", "provider": "s3", "url": f"s3://{bucket}", "options": {"endpoint_url": s3.endpoint}}],
        "mounts": [{"storage": "one", "mountpath": "one"}],
    }


def new_bucket(s3, files=None):
    name = f"d-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    for k, v in (files or {}).items():
        s3.client().put_object(Bucket=name, Key=k, Body=v)
    return name


