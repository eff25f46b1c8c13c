"""Finding or starting the sidecar that serves a project's mounts.

Inside a session a sidecar already runs: its socket ($STORAGE_SIDECAR_SOCKET or
/run/storage-sidecar/sidecar.sock) answers, and the commands ask it. On a laptop nothing answers
there, so `mount` starts a background sidecar for the project, with its socket, manifest, pid
and log under the user's runtime directory and its cache under the user's cache directory; it
lives until `umount` has unmounted its last mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.private import UnsafeFolder, private_folder
from sidecar.project import Project, ProjectError
from sidecar.status import Unreachable, default_socket, request, request_settled


class UnsafeRuntimeDir(ProjectError):
    """The folder for the socket, pid and log is not ours alone."""


def private_dir(path: Path) -> Path:
    """A runtime folder only this user can use. In a shared location (/tmp) another user could
    have created it first to watch or replace our socket: then it is refused, never used."""
    try:
        return private_folder(path, fix_mode=False)
    except UnsafeFolder as exc:
        raise UnsafeRuntimeDir(f"{exc}; remove it or set XDG_RUNTIME_DIR") from None


def runtime_dir() -> Path:
    if os.environ.get("STORAGE_SIDECAR_RUNTIME_DIR"):
        return private_dir(Path(os.environ["STORAGE_SIDECAR_RUNTIME_DIR"]))
    if os.getuid() == 0:  # /run is root's alone
        base = Path("/run/storage-sidecar")
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        return base
    if os.environ.get("XDG_RUNTIME_DIR"):
        return private_dir(Path(os.environ["XDG_RUNTIME_DIR"]) / "storage-sidecar")
    # No per-user runtime folder: one of our own in /tmp, checked, never one someone else made.
    return private_dir(private_dir(Path(f"/tmp/storage-sidecar-{os.getuid()}")) / "storage-sidecar")


def cache_dir() -> Path:
    if os.environ.get("STORAGE_SIDECAR_CACHE_DIR"):
        return Path(os.environ["STORAGE_SIDECAR_CACHE_DIR"])
    if os.getuid() == 0:
        return Path("/var/cache/storage-sidecar")
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "storage-sidecar"


@dataclass
class Sidecar:
    socket: str
    local: bool  # started by us for this project (laptop mode)

    def request(self, path: str, method: str = "GET", body: object = None, timeout: float = 120.0) -> tuple[int, object]:
        return request_settled(path, method, body, sock=self.socket, timeout=timeout)


def answers(sock: str) -> bool:
    try:
        return request("/health", sock=sock, timeout=2.0)[0] == 200
    except Unreachable:
        return False


def project_paths(project: Project) -> dict[str, Path]:
    key = hashlib.sha256(str(project.root).encode()).hexdigest()[:12]
    base = runtime_dir()
    return {name: base / f"{key}.{name}" for name in ("sock", "manifest.json", "pid", "log")}


def find(project: Project, socket: str | None = None) -> Sidecar | None:
    """The running sidecar for this project, if any: an explicit socket, the session's, or the
    project's own background one."""
    if socket:
        return Sidecar(socket, local=False) if answers(socket) else None
    session = default_socket()
    if answers(session):
        return Sidecar(session, local=False)
    own = str(project_paths(project)["sock"])
    return Sidecar(own, local=True) if answers(own) else None


def start_background(project: Project, only: list[str], *, wait: float = 60.0, extra_args: list[str] | None = None) -> Sidecar:
    """Starts a background sidecar for the project, mounting `only` at start."""
    paths = project_paths(project)
    manifest = project.manifest()
    paths["manifest.json"].write_text(json.dumps(manifest.model_dump()))
    exe = [sys.executable, "-m", "sidecar.cli", "run", "--manifest", str(paths["manifest.json"]), "--socket", str(paths["sock"]),
           "--cache-dir", str(cache_dir()), "--only", ",".join(only), *(extra_args or [])]
    with open(paths["log"], "a") as log:
        proc = subprocess.Popen(exe, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    paths["pid"].write_text(str(proc.pid))
    end = time.monotonic() + wait
    while not answers(str(paths["sock"])):
        if proc.poll() is not None:
            raise RuntimeError(f"the background sidecar exited ({proc.returncode}); see {paths['log']}")
        if time.monotonic() > end:
            proc.terminate()
            raise RuntimeError(f"the background sidecar did not start within {wait:g} s; see {paths['log']}")
        time.sleep(0.1)
    return Sidecar(str(paths["sock"]), local=True)


def stop_background(project: Project, timeout: float = 60.0) -> bool:
    paths = project_paths(project)
    try:
        pid = int(paths["pid"].read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        paths["pid"].unlink(missing_ok=True)
        return False
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # our own child when started in this process (tests): reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.1)
    paths["pid"].unlink(missing_ok=True)
    return True
