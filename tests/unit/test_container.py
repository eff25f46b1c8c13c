"""The container pieces: the pod manifests validate, the entrypoint waits for readiness."""

import os
import socketserver
import subprocess
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
POD = ROOT / "container/k8s/pod.yaml"
ENTRYPOINT = ROOT / "container/entrypoint.sh"


def docs():
    return [d for d in yaml.safe_load_all(POD.read_text()) if d]


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_pod_manifests_validate_against_kubernetes_schemas(version):
    for doc in docs():
        kubernetes_validate.validate(doc, version, strict=True)


def test_native_sidecar_with_fuse_propagation_and_probes():
    pod = next(d for d in docs() if d["kind"] == "Pod")
    (sidecar,) = pod["spec"]["initContainers"]
    (session,) = pod["spec"]["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert "SYS_ADMIN" in sidecar["securityContext"]["capabilities"]["add"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["work"]["mountPropagation"] == "Bidirectional" and mounts["fuse"]["mountPath"] == "/dev/fuse"
    assert {m["name"]: m for m in session["volumeMounts"]}["work"]["mountPropagation"] == "HostToContainer"
    for probe, kind in (("startupProbe", "startup"), ("readinessProbe", "readiness"), ("livenessProbe", "liveness")):
        assert sidecar[probe]["exec"]["command"][:4] == ["storage-sidecar", "status", "--probe", kind]
    cm = next(d for d in docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "storage-sidecar-entrypoint")
    assert cm["data"]["entrypoint.sh"] == ENTRYPOINT.read_text()
    manifest_cm = next(d for d in docs() if d["kind"] == "ConfigMap" and "manifest.json" in d.get("data", {}))
    from sidecar.manifest import loads

    assert loads(manifest_cm["data"]["manifest.json"]).mounts[0].name == "giab"


class _Ready(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.server.calls += 1
        ok = self.server.calls > self.server.not_ready_for
        body = b'{"ready": true, "states": {"giab": "mounted"}}' if ok else b'{"ready": false, "states": {"giab": "checking"}}'
        status = b"200 OK" if ok else b"503 Service Unavailable"
        self.wfile.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


@pytest.fixture
def fake_sidecar(tmp_path):
    path = str(tmp_path / "s.sock")
    server = socketserver.UnixStreamServer(path, _Ready)
    server.calls, server.not_ready_for = 0, 3
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, path
    server.shutdown()
    server.server_close()


def test_entrypoint_waits_for_ready_then_execs(fake_sidecar):
    server, path = fake_sidecar
    env = dict(os.environ, STORAGE_SIDECAR_SOCKET=path, STORAGE_SIDECAR_WAIT="20")
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), "sh", "-c", "echo session started as $$"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert server.calls == 4  # three "not ready" answers, then ready
    assert out.strip() == f"session started as {proc.pid}"  # exec: the command replaced the entrypoint
    assert "giab=mounted" in err
    # each state change is printed once while it waits, so the session log says why
    assert err.count("storage-sidecar: giab: checking") == 1 and "storage-sidecar: giab: mounted" in err


def test_entrypoint_fails_clearly_if_never_ready(tmp_path):
    env = dict(os.environ, STORAGE_SIDECAR_SOCKET=str(tmp_path / "none.sock"), STORAGE_SIDECAR_WAIT="1")
    r = subprocess.run(["sh", str(ENTRYPOINT), "echo", "should not run"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "did not become ready within 1 s" in r.stderr and "should not run" not in r.stdout


def test_entrypoint_needs_a_command():
    assert subprocess.run(["sh", str(ENTRYPOINT)], capture_output=True).returncode == 64


HELPER = ROOT / "container/k8s/mount-helper.yaml"
UNPRIVILEGED = ROOT / "container/k8s/pod-unprivileged.yaml"


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_helper_daemonset_and_unprivileged_pod_validate(version):
    for path in (HELPER, UNPRIVILEGED):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, version, strict=True)


def test_the_unprivileged_pod_needs_neither_privileged_nor_sys_admin():
    (pod,) = [d for d in yaml.safe_load_all(UNPRIVILEGED.read_text()) if d]
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        sc = c.get("securityContext", {})
        assert not sc.get("privileged") and "SYS_ADMIN" not in sc.get("capabilities", {}).get("add", [])
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    (sidecar,) = pod["spec"]["initContainers"]
    assert any(a.startswith("--mount-helper=") for a in sidecar["args"])
    assert not any(m["mountPath"] == "/dev/fuse" for m in sidecar["volumeMounts"])
