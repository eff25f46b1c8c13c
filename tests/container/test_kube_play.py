"""The shipped container/k8s/pod.yaml itself, played by `podman kube play`.

podman 4.3 cannot play three things of it (docs: README, "Kubernetes"): it panics on a `secret:`
volume (a hostPath of the same files here), it refuses probes on an init container (so the
native sidecar, an init container with `restartPolicy: Always`, becomes the pod's first regular
container, its probes kept), and it mounts a ConfigMap without its `defaultMode` (the session's
entrypoint is run with `sh`). The overlay below makes exactly those changes and points the
manifest, the image and the folders at this machine; everything else is the shipped file. Sidecar ordering (the session starts after
the sidecar's startup probe) is what the entrypoint's readiness wait and the hand-made pod test
(test_pod.py) cover.
"""

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from sidecar.mounttable import fuse_mounts
from tests.conftest import wait_for
from tests.container.test_pod import IMAGE, PODMAN, RUNTIME, _image_present, podman

ROOT = Path(__file__).resolve().parents[2]
POD = ROOT / "container/k8s/pod.yaml"

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not PODMAN, reason="podman is not installed (make test-container installs it)"),
    pytest.mark.skipif(PODMAN is not None and not _image_present(), reason=f"no image {IMAGE}: run container/build.sh (make test-container does)"),
]


def overlay(docs: list[dict], *, endpoint: str, bucket: str, creds: str, work: str, session_script: str, shared: str) -> list[dict]:
    """The shipped documents with the smallest changes podman and this machine need."""
    out = []
    for doc in docs:
        doc = json.loads(json.dumps(doc))  # a deep copy
        if doc["kind"] == "Secret":
            continue  # its files come from a folder (hostPath) instead
        if doc["kind"] == "ConfigMap" and "manifest.json" in doc["data"]:
            manifest = json.loads(doc["data"]["manifest.json"])
            for st in manifest["storages"]:
                st["url"] = f"s3://{bucket}/data"
                st.setdefault("options", {})["endpoint_url"] = endpoint
            doc["data"]["manifest.json"] = json.dumps(manifest)
        if doc["kind"] == "Pod":
            spec = doc["spec"]
            sidecar = spec.pop("initContainers")[0]
            sidecar.pop("restartPolicy")
            sidecar["image"] = IMAGE
            session = spec["containers"][0]
            session["image"] = IMAGE
            # podman mounts the entrypoint ConfigMap without its defaultMode (0555): run it with sh
            session["command"] = ["sh", *session["command"]]
            session["args"] = ["sh", "-c", session_script]
            spec["containers"] = [sidecar, *spec["containers"]]
            for volume in spec["volumes"]:
                if volume["name"] == "credentials":
                    volume.pop("secret")
                    volume["hostPath"] = {"path": creds, "type": "Directory"}
                if volume["name"] == "work":
                    volume.pop("emptyDir")
                    volume["hostPath"] = {"path": work, "type": "Directory"}
                if volume["name"] == "shared-cache":  # the node's folder, here a test's
                    volume["hostPath"]["path"] = shared
        out.append(doc)
    return out


def kube(*args, conf, timeout=300):
    """`podman kube ...` with this machine's rlimits (runc cannot raise them here: RUNBOOK)."""
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    return subprocess.run([PODMAN, *RUNTIME, "kube", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_shipped_pod_yaml_plays_and_the_session_reads_the_bucket(s3, tmp_path):
    bucket = f"kube-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    s3.client().put_object(Bucket=bucket, Key="data/raw/hello.txt", Body=b"hello from the played pod")
    base = tempfile.mkdtemp(prefix="kube-", dir="/tmp")
    os.chmod(base, 0o755)
    work, creds = os.path.join(base, "work"), os.path.join(base, "creds")
    os.makedirs(work)
    os.makedirs(creds)
    os.chmod(work, 0o777)
    subprocess.run(["mount", "--bind", work, work], check=True)
    subprocess.run(["mount", "--make-rshared", work], check=True)
    for field, value in (("access_key_id", s3.key), ("secret_access_key", s3.secret)):
        Path(creds, field).write_text(value)
        os.chmod(os.path.join(creds, field), 0o400)
    script = "cat /home/jovyan/work/my-project/data/giab/hello.txt; echo; echo SESSION-DONE; sleep 600"
    shared = os.path.join(base, "node-shared")  # (DirectoryOrCreate: made by the play)
    docs = overlay([d for d in yaml.safe_load_all(POD.read_text()) if d], endpoint=s3.endpoint, bucket=bucket, creds=creds, work=work,
                   session_script=script, shared=shared)
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n')
    played = tmp_path / "played.yaml"
    played.write_text(yaml.safe_dump_all(docs))
    pod = next(d for d in docs if d["kind"] == "Pod")["metadata"]["name"]
    try:
        r = kube("play", "--network", "host", str(played), conf=conf)
        assert r.returncode == 0, r.stderr[-3000:]
        session = f"{pod}-session"
        wait_for(lambda: "SESSION-DONE" in podman("logs", session, check=False).stdout, timeout=180, what="the session's command")
        logs = podman("logs", session, check=False)
        assert "hello from the played pod" in logs.stdout, logs.stdout + logs.stderr
        assert "storage-sidecar ready" in logs.stderr
        # the file read is a block of the node's shared cache, sealed (its bytes are not there in clear)
        wait_for(lambda: any(len(p.name) == 64 for p in Path(shared).rglob("*")), timeout=30, what="a block in the node's shared cache")
        assert not any(b"hello from the played pod" in p.read_bytes() for p in Path(shared).rglob("*") if p.is_file())
        sidecar_logs = podman("logs", f"{pod}-storage-sidecar", check=False)
        assert s3.secret not in sidecar_logs.stdout + sidecar_logs.stderr
        health = podman("healthcheck", "run", f"{pod}-storage-sidecar", check=False)
        print(f"podman healthcheck of the sidecar: rc={health.returncode} {health.stdout.strip()} {health.stderr.strip()[-300:]}")
    finally:
        kube("down", str(played), conf=conf, timeout=180)
        podman("pod", "rm", "-f", pod, check=False, timeout=120)
        for m in sorted((m for m in fuse_mounts() if m.startswith(work)), reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        subprocess.run(["umount", "-l", work], check=False)
        shutil.rmtree(base, ignore_errors=True)
