"""Hostile or careless users, tenants and files (docs/SECURITY.md quotes these tests)."""

import json
import os
import shutil
import subprocess

import pytest

from sidecar.control import HTTPError
from sidecar.api import parse_credentials
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir, new_bucket, one_mount

pytestmark = [pytest.mark.mount, needs_fuse]
NOBODY = 65534


def _as_nobody(*cmd):
    return subprocess.run(list(cmd), user=NOBODY, group=NOBODY, capture_output=True, text=True)


def test_cache_staging_and_files_are_private_to_the_daemon_user(s3, tmp_path, daemons):
    b = new_bucket(s3, {"data.bin": b"cached bucket data" * 1000})
    m = one_mount(tmp_path, s3, b)
    m["storages"][0]["readonly"] = False
    os.chmod(tmp_path, 0o755)  # nobody may traverse to the cache folder: only its mode protects it
    d = daemons(tmp_path, m, creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    mnt = tmp_path / "project/one"
    assert (mnt / "data.bin").read_bytes()[:18] == b"cached bucket data"
    f = open(mnt / "being-written.txt", "wb")
    f.write(b"staged, not closed")
    f.flush()
    try:
        cache = tmp_path / "cache"
        # the disk tier writes a block to a temporary name, then renames it: let it settle
        wait_for(lambda: not [p for p in cache.rglob(".tmp*")], what="the cached block's rename")
        files = [p for p in cache.rglob("*") if p.is_file()]
        assert any(p.suffix == ".data" for p in files) and any(p.name == "journal.jsonl" for p in files)
        assert len(files) >= 3  # a cached block, the staged data and its metadata
        for p in [*files, *[q for q in cache.rglob("*") if q.is_dir()]]:
            assert p.stat().st_mode & 0o077 == 0, f"{p} is {oct(p.stat().st_mode)}"
        for p in files:
            r = _as_nobody("cat", str(p))
            assert r.returncode != 0 and "Permission denied" in r.stderr, (p, r)
        r = _as_nobody("ls", str(cache))
        assert r.returncode != 0
    finally:
        f.close()


def test_mount_path_swapped_for_a_symlink_after_validation_is_refused(s3, tmp_path, daemons):
    b = new_bucket(s3, {"f.txt": b"data"})
    m = one_mount(tmp_path, s3, b)
    m["mounts"][0]["mountpath"] = "data/one"
    d = daemons(tmp_path, m, creds=creds_dir(tmp_path, s3, ["one"]), args=["--only", "none"])
    outside = tmp_path / "outside"
    outside.mkdir()
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(project / "data")
    os.symlink(outside, project / "data")  # the parent swapped after the manifest was loaded
    code, body = d.post("/mounts/one/mount")
    assert body["state"] == "failed" and body["error"]["code"] == "mount_path_unsafe", body
    assert not os.path.ismount(outside / "one") and not (outside / "one").exists()
    from sidecar.mounttable import fuse_mounts

    assert not [p for p in fuse_mounts() if p.startswith(str(outside))]


def _creds_case(tmp_path, s3, kind):
    base = tmp_path / "creds"
    (base / "one").mkdir(parents=True)
    key = base / "one" / "access_key_id"
    secret = base / "one" / "secret_access_key"
    key.write_text(s3.key)
    if kind == "symlink_outside":
        target = tmp_path / "root-only"
        target.write_text("the contents of a root-only file")
        target.chmod(0o600)
        os.symlink(target, secret)
    elif kind == "symlink_loop":
        os.symlink(base / "one" / "loop2", secret)
        os.symlink(secret, base / "one" / "loop2")
    elif kind == "binary":
        secret.write_bytes(b"\xff\xfe\x00\x01binary")
    elif kind == "fifo":
        os.mkfifo(secret)
    elif kind == "huge":
        with open(secret, "wb") as f:
            f.truncate(2 << 30)  # 2 GiB, sparse
    elif kind == "dir_world_writable":
        secret.write_text(s3.secret)
        (base / "one").chmod(0o777)
    elif kind == "dir_other_owner":
        secret.write_text(s3.secret)
        os.chown(base / "one", NOBODY, NOBODY)
    for p in (key, secret):
        if p.is_file() and not p.is_symlink():
            p.chmod(0o600)
    return base


@pytest.mark.parametrize("kind", ["symlink_outside", "symlink_loop", "binary", "fifo", "huge", "dir_world_writable", "dir_other_owner"])
def test_unusable_credential_sources_are_credentials_invalid_never_a_crash(s3, tmp_path, daemons, kind):
    b = new_bucket(s3, {"f.txt": b"data"})
    m = one_mount(tmp_path, s3, b)
    m["storages"].append({"name": "two", "provider": "s3", "url": f"s3://{new_bucket(s3)}", "options": {"endpoint_url": s3.endpoint}})
    m["mounts"].append({"storage": "two", "mountpath": "two"})
    creds = _creds_case(tmp_path, s3, kind)
    good = creds_dir(tmp_path / "x", s3, ["two"])
    shutil.copytree(good / "two", creds / "two")
    d = daemons(tmp_path, m, creds=creds, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    d.wait_ready()
    st = {x["name"]: x for x in d.get("/status")[1]["mounts"]}
    assert st["one"]["state"] == "needs_credentials" and st["one"]["error"]["code"] == "credentials_invalid", st["one"]
    assert "creds/one" in st["one"]["error"]["reason"]  # the sentence names the source
    assert st["two"]["state"] == "mounted"  # one bad storage never stops the others
    assert d.get("/health")[0] == 200 and d.proc.poll() is None
    assert "the contents of a root-only file" not in json.dumps(st)


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"one": ["a"]}'])
def test_a_corrupt_local_credential_store_is_credentials_invalid(s3, tmp_path, daemons, content):
    b = new_bucket(s3, {"f.txt": b"data"})
    store = tmp_path / "cfg" / "storage-sidecar" / "credentials.json"
    store.parent.mkdir(parents=True)
    store.write_text(content)
    store.chmod(0o600)
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "STORAGE_SIDECAR_NO_KEYRING": "1"}
    d = daemons(tmp_path, one_mount(tmp_path, s3, b), env=env)
    d.wait_ready()
    (st,) = d.get("/status")[1]["mounts"]
    assert st["state"] == "needs_credentials" and st["error"]["code"] == "credentials_invalid", st
    assert "credentials.json" in st["error"]["reason"]


def test_a_worker_environment_holds_no_secret(s3, tmp_path, daemons):
    b = new_bucket(s3, {"f.txt": b"data"})
    m = one_mount(tmp_path, s3, b)
    m["storages"].append({"name": "other", "provider": "s3", "url": f"s3://{new_bucket(s3)}", "options": {"endpoint_url": s3.endpoint}})
    m["mounts"].append({"storage": "other", "mountpath": "other"})
    env = {"ONE_AWS_ACCESS_KEY_ID": s3.key, "ONE_AWS_SECRET_ACCESS_KEY": s3.secret,
           "OTHER_AWS_ACCESS_KEY_ID": s3.key, "OTHER_AWS_SECRET_ACCESS_KEY": "other-storage-secret-0123",
           "AZURE_STORAGE_KEY": "azure-secret-0123"}
    d = daemons(tmp_path, m, env=env)
    d.wait_ready()
    assert d.states()["one"] == "mounted"
    # every process the daemon started: the template, and what it forked (workers, placeholders)
    children, todo = [], [str(d.proc.pid)]
    while todo:
        found = subprocess.run(["pgrep", "-P", todo.pop()], capture_output=True, text=True).stdout.split()
        children += found
        todo += found
    workers = set(children) | set(d.worker_pids())
    assert len(workers) >= 4  # the template, one's worker, both placeholders
    for pid in workers:
        environ = open(f"/proc/{pid}/environ", "rb").read()
        for secret in (s3.secret, "other-storage-secret-0123", "azure-secret-0123"):
            assert secret.encode() not in environ, f"worker {pid} inherited a secret"


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[" * 30000, b'{"access_key_id": ' + b"9" * 5000 + b"}", b'{"access_key_id": {"a": 1}}'])
def test_credentials_post_bodies_get_a_400(body):
    with pytest.raises(HTTPError) as exc:
        parse_credentials(body, "s3")
    assert exc.value.status == 400


def test_a_webdav_pass_posted_under_rclones_name_is_revealed_and_a_plain_one_refused():
    import json
    import shutil
    import subprocess

    from sidecar.log import redact_text as redact

    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    obscured = subprocess.run([exe, "obscure", "posted-dav-secret"], capture_output=True, text=True, check=True).stdout.strip()
    assert parse_credentials(json.dumps({"pass": obscured}).encode(), "webdav") == {"password": "posted-dav-secret"}
    assert "posted-dav-secret" not in redact(f"x posted-dav-secret {obscured} y") and obscured not in redact(f"{obscured}")
    with pytest.raises(HTTPError) as exc:
        parse_credentials(b'{"pass": "plain-text"}', "webdav")
    assert exc.value.status == 400 and "give a plain password as `password`" in str(exc.value)


def test_laptop_runtime_dir_made_by_another_user_is_refused(tmp_path, monkeypatch):
    from sidecar import local

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("STORAGE_SIDECAR_RUNTIME_DIR", raising=False)
    trap = tmp_path / "trap"
    trap.mkdir(mode=0o777)
    trap.chmod(0o777)
    os.chown(trap, NOBODY, NOBODY)
    monkeypatch.setenv("STORAGE_SIDECAR_RUNTIME_DIR", str(trap))
    with pytest.raises(local.UnsafeRuntimeDir):
        local.runtime_dir()
    own = tmp_path / "own"
    monkeypatch.setenv("STORAGE_SIDECAR_RUNTIME_DIR", str(own))
    assert local.runtime_dir() == own and own.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("value, problem", [('"\\udcff"', "is not text"), ('"AKIA\\u0000X"', "control characters"),
                                            ('"key\\u001b[31m"', "control characters")])
def test_a_credential_that_is_not_text_is_a_400_naming_the_field(value, problem):
    body = ('{"access_key_id": "AKIAOK", "secret_access_key": ' + value + "}").encode()
    with pytest.raises(HTTPError) as exc:
        parse_credentials(body, "s3")
    assert exc.value.status == 400 and "'secret_access_key'" in exc.value.message and problem in exc.value.message


def test_a_pem_key_with_line_breaks_is_accepted():
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEv\r\nQIBADAN\tBg\n-----END PRIVATE KEY-----\n"
    import json as _json

    assert parse_credentials(_json.dumps({"account_key": pem}).encode(), "azure") == {"account_key": pem}


def test_an_environment_credential_that_is_not_text_is_credentials_invalid(monkeypatch):
    from sidecar import credentials

    monkeypatch.setenv("BAD_AWS_ACCESS_KEY_ID", "AKIA")
    monkeypatch.setenv("BAD_AWS_SECRET_ACCESS_KEY", os.fsdecode(b"abc\xff"))  # stray bytes: a lone surrogate
    with pytest.raises(credentials.CredentialProblem, match="secret_access_key is not text"):
        credentials.lookup("bad", "s3")


def test_credentials_posted_under_rclones_names_become_the_providers_own():
    """A launcher holding a data connector's sensitive fields posts them as rclone names them."""
    import json as _json

    assert parse_credentials(_json.dumps({"key": "azure-key"}).encode(), "azure") == {"account_key": "azure-key"}
    got = parse_credentials(_json.dumps({"sas_url": "https://acct.blob.core.windows.net/c?sv=2024&sig=abc"}).encode(), "azure")
    assert got == {"sas_token": "sv=2024&sig=abc"}
    assert parse_credentials(_json.dumps({"service_account_credentials": "{}"}).encode(), "gcs") == {"service_account.json": "{}"}
    with pytest.raises(HTTPError) as err:
        parse_credentials(_json.dumps({"sas_url": "https://acct.blob.core.windows.net/c"}).encode(), "azure")
    assert err.value.status == 400 and "'sas_url': a SAS URL must carry its signature" in err.value.message
