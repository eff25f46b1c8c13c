"""The daemon in a session: states, pre-flight, control socket, status, probes, restarts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from sidecar.mounttable import mount_stack
from tests.devservers import free_port, fuse_mounts, stop_process
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir, new_bucket, one_mount, private

pytestmark = [pytest.mark.mount, needs_fuse]


def test_three_mounts_valid_missing_bucket_unreachable(s3, tmp_path, daemons):
    good = new_bucket(s3, {"hello.txt": b"hello"})
    dead = f"http://127.0.0.1:{free_port()}"
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"name": "good", "provider": "s3", "url": f"s3://{good}", "options": {"endpoint_url": s3.endpoint}},
            {"name": "nobucket", "provider": "s3", "url": "s3://does-not-exist-bucket", "options": {"endpoint_url": s3.endpoint}},
            {"name": "unreachable", "provider": "s3", "url": "s3://some-bucket", "options": {"endpoint_url": dead}},
        ],
        "mounts": [{"storage": n, "mountpath": n} for n in ("good", "nobucket", "unreachable")],
    }
    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["good", "nobucket", "unreachable"]))
    d.wait_ready()
    assert d.states() == {"good": "mounted", "nobucket": "failed", "unreachable": "failed"}
    status = d.status_cli("--json")
    assert status.returncode == 1
    by_name = {m["name"]: m for m in json.loads(status.stdout)["mounts"]}
    assert by_name["nobucket"]["error"]["code"] == "bucket_not_found"
    assert by_name["unreachable"]["error"]["code"] == "endpoint_unreachable"
    assert by_name["good"]["url"] == f"s3://{good}" and by_name["good"]["readonly"] is True
    assert open(tmp_path / "project/good/hello.txt").read() == "hello"
    table = d.status_cli()
    assert table.returncode == 1 and "bucket_not_found" in table.stdout and "good" in table.stdout
    assert d.status_cli("--probe", "liveness").returncode == 0
    assert d.status_cli("--probe", "readiness").returncode == 0
    exe = os.path.join(os.path.dirname(sys.executable), "storage-sidecar")  # the console script: the probes' fast path
    for kind in ("liveness", "readiness", "startup"):
        r = subprocess.run([exe, "status", "--probe", kind, "--socket", d.sock], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == r.stderr == ""
    r = subprocess.run([exe, "status", f"--socket={d.sock}x", "--probe=readiness"], capture_output=True, text=True)
    assert r.returncode == 1 and "cannot reach" in r.stderr
    # the counters moved with the read above
    fresh = {m["name"]: m for m in d.get("/status")[1]["mounts"]}
    assert fresh["good"]["counters"]["store"]["get_requests"] >= 1

    # unmount, then mount again, while the daemon runs
    code, body = d.post("/mounts/good/unmount")
    assert code == 200 and body["state"] == "unmounted"
    assert str(tmp_path / "project/good") not in fuse_mounts()
    code, body = d.post("/mounts/good/mount")
    assert code == 200 and body["state"] == "mounted"
    assert open(tmp_path / "project/good/hello.txt").read() == "hello"

    # bad requests get 4xx with a JSON error
    assert d.post("/mounts/nope/mount")[0] == 404
    assert d.get("/mounts/good/mount")[0] == 405
    assert d.get("/nothing")[0] == 404
    code, body = d.post("/mounts/good/credentials", {"password": "x"})
    assert code == 400 and body["code"] == "bad_credentials"
    metrics = d.get("/metrics")[1]
    assert 'storage_sidecar_mount_state{mount="good",state="mounted"} 1.0' in metrics
    assert 'storage_sidecar_backend_calls_total{mount="good"}' in metrics and 'kind="retry"' in metrics
    assert 'storage_sidecar_fuse_bytes_read_total{mount="good"}' in metrics
    assert fresh["good"]["counters"]["store"]["calls"] >= 1 and fresh["good"]["counters"]["store"]["latency_sum_s"] > 0

    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert not [p for p in d.paths if os.path.realpath(p) in fuse_mounts()]
    assert not os.path.exists(d.sock)
    assert d.status_cli().returncode == 2


def _running(pid):
    """Whether process `pid` exists and is not a zombie (it may be reaped while we look)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sigkill_then_restart_cleans_stale_mounts(s3, tmp_path, daemons):
    b = new_bucket(s3, {"f.txt": b"data"})
    d = daemons(tmp_path, one_mount(tmp_path, s3, b), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    mnt = str(tmp_path / "project/one")
    assert open(f"{mnt}/f.txt").read() == "data"
    # kill the worker, then the daemon, hard: the kernel mount stays behind, dead (killing the
    # daemon first would let the worker see its stdin close and unmount cleanly)
    worker_pids = d.worker_pids()
    os.kill(d.proc.pid, signal.SIGSTOP)  # so that it does not notice and mount again
    for pid in worker_pids:
        os.kill(int(pid), signal.SIGKILL)
    d.proc.kill()
    d.proc.wait()
    wait_for(lambda: not any(_running(p) for p in worker_pids), what="workers dead")
    assert mnt in fuse_mounts()
    with pytest.raises(OSError):
        os.listdir(mnt)  # Transport endpoint is not connected
    d.start()
    d.wait_ready()
    assert d.states() == {"one": "mounted"}
    assert open(f"{mnt}/f.txt").read() == "data"
    # the stale mounts went; the path holds the placeholder with the worker's mount on top
    assert [m.source for m in mount_stack(mnt)] == ["storage-sidecar-placeholder:one", "storage-sidecar:one"]


def test_dead_mount_is_noticed_and_mounted_again(s3, tmp_path, daemons):
    b = new_bucket(s3, {"f.txt": b"again"})
    d = daemons(tmp_path, one_mount(tmp_path, s3, b), creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    (worker,) = d.worker_pids()
    os.kill(int(worker), signal.SIGKILL)
    wait_for(lambda: d.get("/status")[1]["mounts"][0]["restarts"] == 1 and d.states()["one"] == "mounted", timeout=30, what="remount")
    assert open(tmp_path / "project/one/f.txt").read() == "again"
    assert '"mount_died"' in d.log()
    assert "the mount process was killed by SIGKILL; mounting again" in d.log()  # by name, also for a forked worker


def test_needs_credentials_then_post_credentials_or_skip(s3, tmp_path, daemons):
    b1 = new_bucket(s3, {"a.txt": b"one"})
    b2 = new_bucket(s3, {"b.txt": b"two"})
    b3 = new_bucket(s3, {"c.txt": b"three"})
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"name": "nocreds", "provider": "s3", "url": f"s3://{b1}", "options": {"endpoint_url": s3.endpoint}},
            {"name": "wrongcreds", "provider": "s3", "url": f"s3://{b2}", "options": {"endpoint_url": s3.endpoint}},
            {"name": "fine", "provider": "s3", "url": f"s3://{b3}", "options": {"endpoint_url": s3.endpoint}},
        ],
        "mounts": [{"storage": n, "mountpath": n} for n in ("nocreds", "wrongcreds", "fine")],
    }
    wrong_secret = "wrong-secret-value-0123456789"
    creds = creds_dir(tmp_path, s3, ["fine"])
    creds_dir(tmp_path, s3, ["wrongcreds"], secret=wrong_secret)
    (creds / "nocreds").mkdir()
    (creds / "nocreds" / "access_key_id").write_text(s3.key)
    (creds / "nocreds" / "secret_access_key").write_text(s3.secret)  # 0644: refused, so missing
    env = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), STORAGE_SIDECAR_NO_KEYRING="1")
    d = daemons(tmp_path, manifest, creds=creds, env=env)
    d.wait_ready()  # default: /ready does not wait for a credentials decision
    assert '"credential_file_refused"' in d.log()
    status = {m["name"]: m for m in d.get("/status")[1]["mounts"]}
    assert status["nocreds"]["state"] == "needs_credentials" and status["nocreds"]["error"]["code"] == "credentials_missing"
    assert status["wrongcreds"]["state"] == "needs_credentials" and status["wrongcreds"]["error"]["code"] == "credentials_invalid"
    assert status["fine"]["state"] == "mounted"

    code, body = d.post("/mounts/nocreds/credentials", {"access_key_id": s3.key, "secret_access_key": s3.secret})
    assert code == 200 and body["state"] == "mounted", body
    assert open(tmp_path / "project/nocreds/a.txt").read() == "one"
    code, body = d.post("/mounts/wrongcreds/skip")
    assert body["state"] == "skipped"
    assert d.states() == {"nocreds": "mounted", "wrongcreds": "skipped", "fine": "mounted"}
    assert d.status_cli().returncode == 0

    # the secrets appear nowhere: logs, status, metrics
    outputs = [d.log(), json.dumps(d.get("/status")[1]), d.get("/metrics")[1], d.status_cli().stdout, d.status_cli("--json").stdout]
    for text in outputs:
        assert s3.secret not in text and wrong_secret not in text


def test_credentials_wait_skips_after_the_wait(s3, tmp_path, daemons):
    b = new_bucket(s3)
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [{"name": "late", "provider": "s3", "url": f"s3://{b}", "options": {"endpoint_url": s3.endpoint}}],
        "mounts": [{"storage": "late", "mountpath": "late"}],
    }
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    d = daemons(tmp_path, manifest, args=("--credentials-wait", "2"), env=env)
    wait_for(lambda: d.states()["late"] == "needs_credentials", what="needs_credentials")
    assert d.get("/ready")[0] == 503  # waiting for the launcher's decision
    d.wait_ready()
    st = d.get("/status")[1]["mounts"][0]
    assert st["state"] == "skipped" and st["error"]["code"] == "credentials_missing"


def test_socket_refuses_other_users(s3, tmp_path, daemons, request):
    b = new_bucket(s3)
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [{"name": "one", "provider": "s3", "url": f"s3://{b}", "options": {"endpoint_url": s3.endpoint}}],
        "mounts": [{"storage": "one", "mountpath": "one"}],
    }
    sockdir = tempfile.mkdtemp(prefix="sidecar-sock-")  # traversable by the other user, unlike tmp_path
    os.chmod(sockdir, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["one"]), sock=os.path.join(sockdir, "s.sock"))
    st = os.stat(d.sock)
    assert st.st_mode & 0o777 == 0o660

    def as_user(uid, gid):
        """Connects from a forked child that dropped to uid/gid; returns 0 connected, 13 EACCES."""
        pid = os.fork()
        if pid == 0:  # child: no pytest machinery past this point, only os._exit
            code = 1
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                s = socket.socket(socket.AF_UNIX)
                s.connect(d.sock)
                code = 0
            except PermissionError:
                code = 13
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert as_user(65534, 65534) == 13  # another user: refused (EACCES)
    assert as_user(65534, st.st_gid) == 0  # a member of the socket's group: allowed


def test_one_daemon_three_providers_cp_between_them(s3, azure, gcs, tmp_path, daemons):
    import hashlib

    from tests.backends import AzureBackend, GCSBackend, S3Backend

    b_s3, b_az, b_gs = S3Backend(s3).create_bucket(), AzureBackend(azure).create_bucket(), GCSBackend(gcs).create_bucket()
    data = os.urandom(5 * 1024 * 1024 + 7)
    b_s3.put("from-s3.bin", data)
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"name": "s3data", "provider": "s3", "url": b_s3.storage()["url"], "readonly": False, "options": {"endpoint_url": s3.endpoint}},
            {"name": "azdata", "provider": "azure", "url": b_az.storage()["url"], "readonly": False,
             "options": {"account_name": azure.account, "endpoint_url": azure.endpoint}},
            {"name": "gsdata", "provider": "gcs", "url": b_gs.storage()["url"], "readonly": False,
             "options": {"endpoint_url": gcs.endpoint, "anonymous": True}},
        ],
        "mounts": [{"storage": n, "mountpath": n} for n in ("s3data", "azdata", "gsdata")],
    }
    creds = creds_dir(tmp_path, s3, ["s3data"])
    (creds / "azdata").mkdir()
    (creds / "azdata" / "account_key").write_text(azure.key)
    private(creds)
    d = daemons(tmp_path, manifest, creds=creds)
    d.wait_ready()
    assert d.states() == {"s3data": "mounted", "azdata": "mounted", "gsdata": "mounted"}
    root = tmp_path / "project"
    subprocess.run(["cp", str(root / "s3data/from-s3.bin"), str(root / "azdata/copied.bin")], check=True)
    subprocess.run(["cp", str(root / "azdata/copied.bin"), str(root / "gsdata/copied.bin")], check=True)
    subprocess.run(["cp", str(root / "gsdata/copied.bin"), str(root / "s3data/round-trip.bin")], check=True)
    digest = hashlib.sha256(data).hexdigest()
    for bucket, key in ((b_az, "copied.bin"), (b_gs, "copied.bin"), (b_s3, "round-trip.bin")):
        assert hashlib.sha256(bucket.get(key)).hexdigest() == digest, bucket.provider
    status = json.loads(d.status_cli("--json").stdout)
    assert {m["provider"]: m["state"] for m in status["mounts"]} == {"s3": "mounted", "azure": "mounted", "gcs": "mounted"}
    assert azure.key not in d.log() and s3.secret not in d.log()


def test_azure_credentials_missing_invalid_then_handed_in(azure, tmp_path, daemons):
    from tests.backends import AzureBackend

    b = AzureBackend(azure).create_bucket()
    b.put("x.txt", b"azure data")
    opts = {"account_name": azure.account, "endpoint_url": azure.endpoint}
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"name": "nokey", "provider": "azure", "url": b.storage()["url"], "options": opts},
            {"name": "badkey", "provider": "azure", "url": b.storage()["url"] + "/", "options": opts, "id": "https://x/storage/azure/b2/c"},
        ],
        "mounts": [{"storage": "nokey", "mountpath": "nokey"}, {"storage": "badkey", "mountpath": "badkey"}],
    }
    creds = tmp_path / "creds"
    (creds / "badkey").mkdir(parents=True)
    (creds / "badkey" / "account_key").write_text("d3Jvbmcga2V5IHdyb25nIGtleQ==")
    private(creds)
    d = daemons(tmp_path, manifest, creds=creds, env={"AZURE_STORAGE_KEY": "", "AZURE_STORAGE_CONNECTION_STRING": ""})
    d.wait_ready()
    st = {m["name"]: m for m in d.get("/status")[1]["mounts"]}
    assert st["nokey"]["error"]["code"] == "credentials_missing" and st["badkey"]["error"]["code"] == "credentials_invalid"
    code, body = d.post("/mounts/nokey/credentials", {"account_key": azure.key})
    assert body["state"] == "mounted", body
    assert open(tmp_path / "project/nokey/x.txt").read() == "azure data"
    assert azure.key not in d.log()


def test_the_check_runs_in_the_worker_with_the_client_it_mounts_with(s3, proxied, tmp_path, daemons):
    """One SDK client per storage: the pre-flight (a LIST of a read-only storage) and the mount
    share the worker's client (the check's listing warmed it up: no second listing), and the
    daemon itself never loads an SDK (its memory is not a client per storage)."""
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="f.txt", Body=b"data")
    manifest = {"root": str(tmp_path / "project"),
                "storages": [{"name": "one", "provider": "s3", "url": f"s3://{bucket}", "options": {"endpoint_url": proxy.endpoint}}],
                "mounts": [{"storage": "one", "mountpath": "one"}]}
    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    assert d.states() == {"one": "mounted"}
    assert dict(proxy.counts) == {"LIST": 1}  # the check; no second listing to warm up
    # The check's listing held the whole root: the first `ls` and lookup there cost nothing,
    # the first read its GET only.
    assert os.listdir(tmp_path / "project/one") == ["f.txt"] and (tmp_path / "project/one/f.txt").stat().st_size == 4
    assert dict(proxy.counts) == {"LIST": 1}
    assert (tmp_path / "project/one/f.txt").read_bytes() == b"data"
    assert dict(proxy.counts) == {"LIST": 1, "GET": 1}
    maps = open(f"/proc/{d.proc.pid}/maps").read()
    assert "_http_parser" not in maps and "multidict" not in maps  # aiohttp (the SDK's HTTP) is not in the daemon


def test_a_daemon_stopped_right_after_its_start_leaves_no_traceback(s3, tmp_path):
    """Stopped within 0.1 s of its start (its template still starting): a clean exit, and no
    traceback from the template writing to a daemon that is gone."""
    b = new_bucket(s3, {"f.txt": b"data"})
    (tmp_path / "m.json").write_text(json.dumps(one_mount(tmp_path, s3, b)))
    log_path = tmp_path / "daemon.log"
    for delay in (0.02, 0.05, 0.1, 0.3):
        with open(log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "run", "--manifest", str(tmp_path / "m.json"), "--socket",
                                     str(tmp_path / "s.sock"), "--credentials-dir", str(creds_dir(tmp_path, s3, ["one"]))],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: proc.poll() is not None or os.path.exists(f"/proc/{proc.pid}"), what="the daemon")
            import time

            time.sleep(delay)  # the point of the test: a stop at this moment of the start
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) in (0, -signal.SIGTERM)  # before its handler exists, the default action
        finally:
            stop_process(proc)
    text = log_path.read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text[-3000:]
    assert not os.path.ismount(tmp_path / "project/one")


def test_a_mount_whose_backend_errors_is_degraded_then_mounted_again(s3, proxied, tmp_path, daemons):
    """The daemon's poller sees the worker's error counter move: the mount's supervisor makes it
    `degraded` (backend_errors), and `mounted` again at the first poll without new errors."""
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    manifest = {"root": str(tmp_path / "project"),
                "storages": [{"name": "p", "provider": "s3", "url": f"s3://{bucket}", "options": {"endpoint_url": proxy.endpoint}}],
                "mounts": [{"storage": "p", "mountpath": "p", "deadline": 3}]}
    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["p"]))
    d.wait_ready()
    assert d.states() == {"p": "mounted"}
    proxy.set(error_fraction=1.0)  # every answer a 503: the read fails once the retries are spent
    with pytest.raises(OSError):
        open(tmp_path / "project/p/a.txt", "rb").read()
    wait_for(lambda: d.states()["p"] == "degraded", timeout=30, what="degraded")
    (st,) = d.get("/status")[1]["mounts"]
    assert st["error"]["code"] == "backend_errors"
    proxy.set(error_fraction=0.0)
    wait_for(lambda: d.states()["p"] == "mounted", timeout=30, what="mounted again")
