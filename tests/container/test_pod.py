"""The image built and run: a session pod of two containers, as container/k8s/pod.yaml has it.

The sidecar container gets /dev/fuse, SYS_ADMIN and the work folder with rshared propagation;
the session container the same folder as rslave, no capability, another uid; the control socket
is on a shared volume. They run in one podman pod against a local S3 server on the host.
`make test-container` builds the image (container/build.sh) and runs these; elsewhere they skip
when podman or the image is missing, saying why.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from sidecar.mounttable import fuse_mounts
from tests.conftest import wait_for

IMAGE = os.environ.get("STORAGE_SIDECAR_IMAGE", "localhost/storage-sidecar:dev")
PODMAN = shutil.which("podman")
RUNTIME = ["--runtime", "runc", "--cgroup-manager=cgroupfs"]


def _image_present() -> bool:
    if not PODMAN:
        return False
    return subprocess.run([PODMAN, *RUNTIME, "image", "exists", IMAGE], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not PODMAN, reason="podman is not installed (make test-container installs it)"),
    pytest.mark.skipif(PODMAN is not None and not _image_present(), reason=f"no image {IMAGE}: run container/build.sh (make test-container does)"),
]


def podman(*args, check=True, timeout=120):
    r = subprocess.run([PODMAN, *RUNTIME, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {r.stderr[-2000:]}")
    return r


@pytest.fixture
def pod_env(s3, tmp_path):
    base = tempfile.mkdtemp(prefix="pod-", dir="/tmp")
    os.chmod(base, 0o755)
    work, control, etc, creds = (os.path.join(base, d) for d in ("work", "control", "etc", "creds"))
    for d in (work, control, etc, os.path.join(creds, "ro"), os.path.join(creds, "rw")):
        os.makedirs(d)
    os.chmod(work, 0o777)
    os.chmod(control, 0o777)
    for d in ("project", "project/data", "project/results"):  # the project is the session user's
        os.makedirs(os.path.join(work, d))
        os.chown(os.path.join(work, d), 1000, 100)
    cache = os.path.join(base, "cache")  # an emptyDir in pod.yaml: it outlives a sidecar container
    os.makedirs(cache)
    # the work folder is a shared mount, so FUSE mounts made in the sidecar reach the host and
    # the session container (Kubernetes' Bidirectional / HostToContainer)
    subprocess.run(["mount", "--bind", work, work], check=True)
    subprocess.run(["mount", "--make-rshared", work], check=True)
    ro, rw = f"p-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=ro)
    s3.client().create_bucket(Bucket=rw)
    s3.client().put_object(Bucket=ro, Key="hello.txt", Body=b"hello from the bucket")
    manifest = {"root": "/home/jovyan/work/project",
                "storages": [{"name": "ro", "provider": "s3", "url": f"s3://{ro}", "options": {"endpoint_url": s3.endpoint}},
                             {"name": "rw", "provider": "s3", "url": f"s3://{rw}", "readonly": False, "options": {"endpoint_url": s3.endpoint}}],
                "mounts": [{"storage": "ro", "mountpath": "data"}, {"storage": "rw", "mountpath": "results", "write_mode": "writeback"}]}
    with open(os.path.join(etc, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    for name in ("ro", "rw"):
        for field, value in (("access_key_id", s3.key), ("secret_access_key", s3.secret)):
            p = os.path.join(creds, name, field)
            with open(p, "w") as f:
                f.write(value)
            os.chmod(p, 0o400)
    pod = f"sidecar-test-{uuid.uuid4().hex[:6]}"
    podman("pod", "create", "--name", pod, "--infra=false")  # the infra container cannot take our rlimits here
    env = {"pod": pod, "work": work, "control": control, "etc": etc, "creds": creds, "ro": ro, "rw": rw, "cache": cache}
    try:
        yield env
    finally:
        podman("pod", "rm", "-f", "-t", "5", pod, check=False, timeout=120)
        for m in sorted((m for m in fuse_mounts() if m.startswith(work)), reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        subprocess.run(["umount", "-l", work], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _start_sidecar(env, name="sidecar"):
    name = f"{env['pod']}-{name}"  # unique: another run's leftovers never collide
    podman("run", "-d", "--pod", env["pod"], "--network", "host", "--name", name, "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN",
           "--security-opt", "apparmor=unconfined", "--security-opt", "seccomp=unconfined",
           "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
           "-v", f"{env['work']}:/home/jovyan/work:rshared", "-v", f"{env['control']}:/run/storage-sidecar",
           "-v", f"{env['etc']}:/etc/storage-sidecar:ro", "-v", f"{env['creds']}:/var/run/storage-sidecar/credentials:ro",
           "-v", f"{env['cache']}:/var/cache/storage-sidecar",
           IMAGE, "run", "--manifest", "/etc/storage-sidecar/manifest.json", "--credentials-dir", "/var/run/storage-sidecar/credentials",
           "--cache-dir", "/var/cache/storage-sidecar", "--socket", "/run/storage-sidecar/sidecar.sock", "--socket-group", "100",
           "--uid", "1000", "--gid", "100", "--allow-other", "--grace-period", "20")


def _session(env, script, name, *, wait=True):
    """A session container running `script` (after the entrypoint's readiness wait, unless not)."""
    entry = ["/opt/storage-sidecar/entrypoint.sh", "sh"] if wait else []
    return podman("run", "--pod", env["pod"], "--network", "host", "--name", f"{env['pod']}-{name}", "--rm", "--user", "1000:100", "--cap-drop", "ALL",
                  "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                  "-v", f"{env['work']}:/home/jovyan/work:rslave", "-v", f"{env['control']}:/run/storage-sidecar",
                  "-e", "STORAGE_SIDECAR_SOCKET=/run/storage-sidecar/sidecar.sock", "--entrypoint", "sh",
                  IMAGE, *entry, "-c", script, check=False, timeout=180)


def test_session_pod_reads_writes_stops_cleanly_and_survives_a_killed_sidecar(s3, pod_env):
    env = pod_env
    started = time.monotonic()
    _start_sidecar(env)
    r = _session(env, "cat /home/jovyan/work/project/data/hello.txt && echo; "
                      "echo 'result of the session' > /home/jovyan/work/project/results/out.txt && "
                      "storage-sidecar status --socket /run/storage-sidecar/sidecar.sock", "session1")
    ready_s = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hello from the bucket" in r.stdout
    assert "storage-sidecar ready" in r.stderr and "mounted" in r.stdout
    print(f"\npod: start to the session command done {ready_s:.1f} s")
    # the pod stops: the sidecar uploads pending writes (write-back) and unmounts in its grace period
    podman("stop", "-t", "30", f"{env['pod']}-sidecar", timeout=60)
    assert s3.client().get_object(Bucket=env["rw"], Key="out.txt")["Body"].read() == b"result of the session\n"
    assert not [m for m in fuse_mounts() if m.startswith(env["work"] + "/")], fuse_mounts()
    logs = podman("logs", f"{env['pod']}-sidecar").stdout + podman("logs", f"{env['pod']}-sidecar").stderr
    assert "daemon_stopped" in logs

    # second run: the sidecar is killed hard; the session sees a dead mount, a restart recovers
    podman("rm", "-f", f"{env['pod']}-sidecar")
    _start_sidecar(env, "sidecar2")
    r = _session(env, "cat /home/jovyan/work/project/data/hello.txt", "session2")
    assert r.returncode == 0 and "hello from the bucket" in r.stdout, r.stderr
    podman("kill", "-s", "KILL", f"{env['pod']}-sidecar2")
    wait_for(lambda: podman("inspect", "-f", "{{.State.Running}}", f"{env['pod']}-sidecar2").stdout.strip() == "false", timeout=30, what="the kill")
    r = _session(env, "ls /home/jovyan/work/project/data 2>&1; exit 0", "session3")
    print(f"what the session sees after SIGKILL: {r.stdout.strip()!r}")
    assert "Transport endpoint is not connected" in r.stdout or "No such file" in r.stdout or r.stdout.strip() == ""
    # Once the node drops the dead mounts, the session sees its bare folders and can write there
    # (it owns the project). The restarted sidecar moves that file aside, never hides it, and
    # uploads it when asked.
    for m in sorted((m for m in fuse_mounts() if m.startswith(env["work"] + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    r = _session(env, "echo 'written while no sidecar ran' > /home/jovyan/work/project/results/after-kill.txt", "session-bare", wait=False)
    assert r.returncode == 0, r.stderr
    podman("rm", "-f", f"{env['pod']}-sidecar2")
    _start_sidecar(env, "sidecar3")  # a restarted sidecar clears the stale mounts and mounts again
    r = _session(env, "cat /home/jovyan/work/project/data/hello.txt; ls /home/jovyan/work/project/results; "
                      "storage-sidecar status --socket /run/storage-sidecar/sidecar.sock; "
                      "storage-sidecar status --json --socket /run/storage-sidecar/sidecar.sock", "session4")
    assert "hello from the bucket" in r.stdout, r.stderr
    assert "after-kill.txt" not in r.stdout.split("NAME")[0], r.stdout + r.stderr  # not in the mount: moved aside
    assert "rw: 1 rescued entry" in r.stdout, r.stdout
    status = json.loads(r.stdout[r.stdout.index("{"):])
    [rescued] = next(m for m in status["mounts"] if m["name"] == "rw")["rescued"]
    assert rescued["path"] == "after-kill.txt" and rescued["where"].startswith("/var/cache/storage-sidecar/rescued/rw/")
    r = _session(env, "storage-sidecar rescue rw --upload --socket /run/storage-sidecar/sidecar.sock && "
                      "cat /home/jovyan/work/project/results/after-kill.txt", "session5")
    assert r.returncode == 0 and "written while no sidecar ran" in r.stdout, r.stdout + r.stderr
    assert s3.client().get_object(Bucket=env["rw"], Key="after-kill.txt")["Body"].read() == b"written while no sidecar ran\n"
    podman("stop", "-t", "30", f"{env['pod']}-sidecar3", timeout=60)
    assert not [m for m in fuse_mounts() if m.startswith(env["work"] + "/")]
