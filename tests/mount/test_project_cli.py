"""`storage-sidecar add/ls/mount/umount/rm` on a laptop-like project against moto."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.devservers import fuse_mounts, served, unmount_all
from tests.conftest import needs_fuse

pytestmark = [pytest.mark.mount, needs_fuse]


@pytest.fixture
def project(tmp_path, s3):
    root = tmp_path / "my-project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3.key, AWS_SECRET_ACCESS_KEY=s3.secret,
               STORAGE_SIDECAR_SOCKET=str(tmp_path / "no-session.sock"),
               STORAGE_SIDECAR_RUNTIME_DIR=str(tmp_path / "run"), STORAGE_SIDECAR_CACHE_DIR=str(tmp_path / "cache"))

    def cli(*args, cwd=root, check=None, env_overrides=None, stdin=None):
        r = subprocess.run([sys.executable, "-m", "sidecar.cli", *args], cwd=cwd, env=dict(env, **(env_overrides or {})),
                           capture_output=True, text=True, timeout=120, stdin=stdin)
        if check is not None:
            assert r.returncode == check, f"{args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    cli.env = env
    yield root, cli
    cli("umount", "--force")
    for m in fuse_mounts():
        if m.startswith(str(tmp_path)):
            unmount_all(m)
    pid_files = list((tmp_path / "run").glob("*.pid")) if (tmp_path / "run").exists() else []
    for p in pid_files:
        try:
            os.kill(int(p.read_text()), 15)
        except (ProcessLookupError, ValueError):
            pass


def test_add_ls_mount_read_write_umount_rm(s3, project):
    root, cli = project
    c = s3.client()
    ro, rw = f"p-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    c.create_bucket(Bucket=ro)
    c.create_bucket(Bucket=rw)
    c.put_object(Bucket=ro, Key="raw/a.csv", Body=b"raw data")
    c.put_object(Bucket=ro, Key="processed/b.csv", Body=b"processed data")
    ep = f"endpoint_url={s3.endpoint}"

    r = cli("add", f"s3://{ro}", "data/raw", "--source-path", "raw", "--option", ep, "--name", "giab", check=0)
    assert "added giab" in r.stdout and "read-only" in r.stdout
    cli("add", f"s3://{ro}", "data/processed", "--source-path", "processed", "--option", ep, "--name", "giab-processed", check=0)
    cli("add", f"s3://{rw}", "results", "--writable", "--option", ep, "--check", check=0)
    config = json.loads((root / ".storage/storage.json").read_text())
    assert len(config["storages"]) == 2 and len(config["mounts"]) == 3
    gitignore = (root / ".gitignore").read_text()
    assert "/data/raw/" in gitignore and "/data/processed/" in gitignore and "/results/" in gitignore
    assert s3.secret not in json.dumps(config)

    listing = json.loads(cli("ls", "--json", check=0).stdout)
    assert [(m["name"], m["target"], m["readonly"], m["state"]) for m in listing["mounts"]] == [
        ("giab", "data/raw", True, "not mounted"),
        ("giab-processed", "data/processed", True, "not mounted"),
        (rw, "results", False, "not mounted"),
    ]
    table = cli("ls", check=0).stdout
    assert "giab-processed" in table and "data/processed" in table

    r = cli("mount", check=0)
    assert r.stdout.count(": mounted at") == 3
    assert (root / "data/raw/a.csv").read_bytes() == b"raw data"
    assert (root / "data/processed/b.csv").read_bytes() == b"processed data"
    (root / "results/out.txt").write_bytes(b"a result")
    assert c.get_object(Bucket=rw, Key="out.txt")["Body"].read() == b"a result"
    with pytest.raises(OSError):
        (root / "data/raw/new.txt").write_bytes(b"x")
    assert [m["state"] for m in json.loads(cli("ls", "--json", check=0).stdout)["mounts"]] == ["mounted"] * 3
    assert cli("mount", "giab", check=0).stdout.count("mounted at") == 1  # idempotent

    with open(root / "data/raw/a.csv") as busy:
        r = cli("umount", "giab", check=1)
        assert "in use by process" in r.stderr
        assert served(root / "data/raw")
        busy.read()
    r = cli("umount", check=0)
    assert "stopped the background sidecar" in r.stderr
    assert not [m for m in fuse_mounts() if m.startswith(str(root))]

    assert cli("rm", "giab", check=0).stdout.strip() == "removed mount giab"  # a mount's name comes first
    assert "used by mount(s) giab-processed" in cli("rm", "giab", check=2).stderr  # now the storage: still used
    assert cli("rm", "giab", "--force", check=0).stdout.strip() == "removed storage giab, mount giab-processed"
    config = json.loads((root / ".storage/storage.json").read_text())
    assert [s["name"] for s in config["storages"]] == [rw]
    assert "/data/raw/" not in (root / ".gitignore").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["add", "ftp://host/x", "data/x"], "unsupported scheme"),
        (["add", "s3://bucket-a", "../outside"], "must be a folder inside the project"),
        (["add", "s3://bucket-a", "data/ok/inner"], "nests with"),
        (["add", "gs://bucket-a", "data/other"], "already used by storages"),
        (["add", "s3://bucket-b", "data/ok"], "the same path as"),
        (["add", "s3://bucket-a", "data/full"], "already holds files"),
        (["add", "s3://bucket-c", "data\n!important.txt\n*.key"], "must not contain control characters"),
        (["rm", "nothing-here"], "no mount or storage named"),
        (["mount", "nothing-here"], "no mount named"),
        (["umount", "--socket", "/nonexistent/sock"], "no sidecar"),
        (["mount", "--socket", "/nonexistent/sock"], "no sidecar answers"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(project, args, message):
    root, cli = project
    cli("add", "s3://bucket-a", "data/ok", check=0)
    (root / "data/full").mkdir(parents=True)
    (root / "data/full/file").write_text("x")
    before = ((root / ".storage/storage.json").read_bytes(), (root / ".gitignore").read_bytes())
    r = cli(*args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert ((root / ".storage/storage.json").read_bytes(), (root / ".gitignore").read_bytes()) == before


def test_outside_a_project(tmp_path, project):
    _, cli = project
    outside = tmp_path / "not-a-project"
    outside.mkdir()
    r = cli("ls", cwd=outside)
    assert r.returncode == 2 and "no project here" in r.stderr


def test_manifest_generation(project):
    root, cli = project
    cli("add", "s3://bucket-a/data", "data/a", "--source-path", "raw", check=0)
    m = json.loads(cli("manifest", "--root", "/home/jovyan/work/p", check=0).stdout)
    assert m["root"] == "/home/jovyan/work/p"
    assert m["mounts"][0]["mountpath"] == "/home/jovyan/work/p/data/a" and m["mounts"][0]["source_path"] == "raw"


NO_CREDS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "STORAGE_SIDECAR_NO_KEYRING": "1"}


def test_interactive_mount_asks_for_credentials_and_saves_them(s3, project, tmp_path):
    import pexpect

    root, cli = project
    b = f"i-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=b)
    s3.client().put_object(Bucket=b, Key="hello.txt", Body=b"interactive")
    cli("add", f"s3://{b}", "data", "--option", f"endpoint_url={s3.endpoint}", "--name", "inter", check=0)
    env = dict(cli.env, **NO_CREDS, XDG_CONFIG_HOME=str(tmp_path / "config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    child = pexpect.spawn(sys.executable, ["-m", "sidecar.cli", "mount"], cwd=str(root), env=env, encoding="utf-8", timeout=60)
    try:
        child.expect(r"Mount inter \(s3://.*\) at data\?")
        child.sendline("y")
        child.expect("no credentials for storage 'inter'")
        child.expect("Enter credentials, or go on without this storage")
        child.sendline("enter")
        child.expect("Access key id")
        child.sendline(s3.key)
        child.expect("Secret access key")
        child.sendline(s3.secret)
        child.expect("Save them in the local credential store")
        child.sendline("y")
        child.expect("saved in ")
        child.expect("inter: mounted at")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert s3.secret not in child.before  # hidden input is not echoed
    assert (root / "data/hello.txt").read_bytes() == b"interactive"
    store = tmp_path / "config/storage-sidecar/credentials.json"
    assert store.stat().st_mode & 0o777 == 0o600
    assert json.loads(store.read_text())["inter"]["access_key_id"] == s3.key
    cli("umount", check=0)
    # the saved credentials are used next time, without asking
    r = cli("mount", "--yes", env_overrides={**NO_CREDS, "XDG_CONFIG_HOME": str(tmp_path / "config")}, stdin=subprocess.DEVNULL, check=0)
    assert "inter: mounted" in r.stdout
    # a store others can read is refused
    store.chmod(0o644)
    cli("umount", check=0)
    r = cli("mount", env_overrides={**NO_CREDS, "XDG_CONFIG_HOME": str(tmp_path / "config")}, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "needs_credentials" in r.stdout


def test_no_tty_never_blocks_and_skip_options(s3, project, tmp_path):
    root, cli = project
    b = f"n-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=b)
    cli("add", f"s3://{b}", "data", "--option", f"endpoint_url={s3.endpoint}", "--name", "notty", check=0)
    env = {**NO_CREDS, "XDG_CONFIG_HOME": str(tmp_path / "empty-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    r = cli("mount", env_overrides=env, stdin=subprocess.DEVNULL)  # would hang here if it prompted
    assert r.returncode == 1
    assert "notty: needs_credentials" in r.stdout and "run `storage-sidecar mount` in a terminal" in r.stderr
    r = cli("mount", "--skip", "notty", env_overrides=env, stdin=subprocess.DEVNULL, check=0)
    assert "notty: skipped" in r.stdout
    r = cli("mount", "--no-mount", env_overrides=env, stdin=subprocess.DEVNULL, check=0)
    assert "notty: skipped" in r.stdout


def test_status_and_the_other_commands_find_the_projects_background_sidecar(s3, project):
    """Inside a project whose storages `mount` mounted through a background sidecar, `status`,
    `refresh` and `rescue` ask that sidecar (as `mount` and `ls` do), not the session socket that
    does not answer; an explicit --socket still wins."""
    root, cli = project
    b = f"p-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=b)
    s3.client().put_object(Bucket=b, Key="a.csv", Body=b"data")
    cli("add", f"s3://{b}", "data", "--option", f"endpoint_url={s3.endpoint}", "--name", "raw", check=0)
    cli("mount", check=0)
    r = cli("status", check=0)
    assert "raw" in r.stdout and "mounted" in r.stdout
    r = cli("status", cwd=root / "data", check=0)  # from a folder inside the project, too
    assert "mounted" in r.stdout
    assert "refreshed" in cli("refresh", "raw", check=0).stdout
    assert "0 rescued entries" in cli("rescue", "raw", check=0).stderr
    r = cli("status", "--socket", str(root / "nothing.sock"), check=2)
    assert "no storage-sidecar answers" in r.stderr


def test_add_a_remote_of_an_rclone_config_written_by_rclone_config_create(s3, project, tmp_path):
    """`rclone config create` writes the remote (the real rclone); `add --rclone-config` takes it:
    the keys go to the local credential store, never into the project's configuration."""
    import shutil

    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    root, cli = project
    bucket = f"r-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    s3.client().put_object(Bucket=bucket, Key="in/a.txt", Body=b"via rclone's config")
    conf = tmp_path / "rclone.conf"
    subprocess.run([exe, "--config", str(conf), "config", "create", "lab", "s3", "provider=Minio", f"endpoint={s3.endpoint}",
                    f"access_key_id={s3.key}", f"secret_access_key={s3.secret}", "--non-interactive"], check=True, capture_output=True)
    home = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "STORAGE_SIDECAR_NO_KEYRING": "1", "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    r = cli("add", "--rclone-config", str(conf), "--remote", "lab", "data", "--source-path", f"{bucket}/in", env_overrides=home, check=0)
    assert "added lab" in r.stdout and "credentials of lab saved" in r.stderr
    stored = "".join(p.read_text() for p in root.rglob("*.json") if ".git" not in p.parts)
    assert s3.secret not in stored and s3.key not in stored and '"rclone_type": "s3"' in stored
    cli("mount", "lab", "--yes", env_overrides=home, check=0)
    assert (root / "data" / "a.txt").read_bytes() == b"via rclone's config"
    bad = cli("add", "--rclone-config", str(conf), "--remote", "nope", "x", env_overrides=home)
    assert bad.returncode != 0 and "no such remote in" in bad.stderr and "lab" in bad.stderr


@pytest.mark.parametrize("kind", ["azureblob", "google cloud storage", "webdav"])
def test_add_a_remote_of_every_other_type_from_rclone_config_create(kind, project, tmp_path, request):
    """The other three types, each written by the real `rclone config create` (a WebDAV `pass`
    obscured by rclone, as it always keeps it), added with `add --rclone-config` and mounted."""
    import shutil

    from tests.backends import AzureBackend, GCSBackend, WebDAVBackend

    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    root, cli = project
    if kind == "azureblob":
        server = request.getfixturevalue("azure")
        backend, secret = AzureBackend(server), server.key
        options = [f"account={server.account}", f"key={server.key}", f"endpoint={server.endpoint}"]
    elif kind == "google cloud storage":
        server = request.getfixturevalue("gcs")
        backend, secret = GCSBackend(server), None
        options = ["anonymous=true", f"endpoint={server.endpoint}"]
    else:
        server = request.getfixturevalue("dav_wsgidav")
        backend, secret = WebDAVBackend(server), server.password
        options = [f"url={server.endpoint}", "vendor=other", f"user={server.user}", f"pass={server.password}", "--obscure"]
    bucket = backend.create_bucket()
    bucket.put("in/a.txt", f"via rclone's {kind} config".encode())
    conf = tmp_path / "rclone.conf"
    subprocess.run([exe, "--config", str(conf), "config", "create", "lab", kind, *options, "--non-interactive"], check=True, capture_output=True)
    if kind == "webdav":
        assert server.password not in conf.read_text()  # rclone wrote it obscured
    home = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "STORAGE_SIDECAR_NO_KEYRING": "1"}
    r = cli("add", "--rclone-config", str(conf), "--remote", "lab", "data", "--source-path", f"{bucket.name}/in", env_overrides=home, check=0)
    assert "added lab" in r.stdout
    stored = "".join(p.read_text() for p in root.rglob("*.json") if ".git" not in p.parts)
    assert f'"rclone_type": "{kind}"' in stored and (secret is None or secret not in stored)
    cli("mount", "lab", "--yes", env_overrides=home, check=0)
    assert (root / "data" / "a.txt").read_bytes() == f"via rclone's {kind} config".encode()
