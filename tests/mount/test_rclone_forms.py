"""Storages in rclone's terms (sidecar.rclone): an rclone remote and a Renku data connector mount
and behave as the same storage given as a URL."""

import json
import os
import shutil
import subprocess

import pytest

from sidecar.manifest import ManifestError, loads
from tests.conftest import needs_fuse
from tests.daemons import creds_dir, new_bucket

pytestmark = [pytest.mark.mount, needs_fuse]


def test_a_data_connector_an_rclone_remote_and_a_url_mount_the_same_storage(s3, tmp_path, daemons):
    bucket = new_bucket(s3, {"data/hello.txt": b"hello", "data/sub/x.bin": b"x" * 1000})
    rclone = {"type": "s3", "provider": "Minio", "endpoint": s3.endpoint, "env_auth": "false", "force_path_style": "true"}
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            # one storage, three times: each its own id (derived ids are per bucket)
            {"id": "as-url", "name": "as-url", "provider": "s3", "url": f"s3://{bucket}/data", "options": {"endpoint_url": s3.endpoint}},
            {"id": "as-remote", "name": "as-remote", "rclone": rclone, "source_path": f"{bucket}/data"},
            # field for field as Renku's data services return a data connector's storage
            {"storage_id": "01HXYZDATACONNECTOR0000001", "project_id": "01HXYZPROJECT000000000001", "name": "as-connector",
             "storage_type": "s3", "configuration": rclone, "source_path": f"{bucket}/data", "target_path": "connected",
             "readonly": False},
        ],
        "mounts": [{"storage": "as-url", "mountpath": "url"}, {"storage": "as-remote", "mountpath": "remote"}],
    }
    d = daemons(tmp_path, manifest, creds=creds_dir(tmp_path, s3, ["as-url", "as-remote", "as-connector"]))
    d.wait_ready()
    assert d.states() == {"as-url": "mounted", "as-remote": "mounted", "as-connector": "mounted"}
    root = tmp_path / "project"
    for folder in ("url", "remote", "connected"):
        assert sorted(os.listdir(root / folder)) == ["hello.txt", "sub"]
        assert (root / folder / "hello.txt").read_bytes() == b"hello"
    # the data connector is writable (readonly: false): a file written there is in the bucket
    (root / "connected" / "result.txt").write_text("42\n")
    assert s3.client().get_object(Bucket=bucket, Key="data/result.txt")["Body"].read() == b"42\n"
    with pytest.raises(OSError):
        (root / "remote" / "nope.txt").write_text("read-only")
    mounts = {m["name"]: m for m in d.get("/status")[1]["mounts"]}
    assert mounts["as-remote"]["url"] == mounts["as-url"]["url"] == f"s3://{bucket}/data"
    assert mounts["as-connector"]["storage_id"] == "01HXYZDATACONNECTOR0000001"
    assert (mounts["as-connector"]["rclone_type"], mounts["as-url"]["rclone_type"]) == ("s3", None)


def test_an_rclone_config_written_by_rclone_config_create_mounts(s3, tmp_path, daemons):
    """`rclone config create` (the real one) writes the remote; its section, pasted as it is,
    mounts, with the keys in the credentials directory under rclone's names."""
    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    from sidecar.rclone import parse_config

    conf = tmp_path / "rclone.conf"
    subprocess.run([exe, "--config", str(conf), "config", "create", "moto", "s3", "provider=Other", f"endpoint={s3.endpoint}",
                    "env_auth=false", f"access_key_id={s3.key}", f"secret_access_key={s3.secret}", "--non-interactive"],
                   check=True, capture_output=True)
    section = parse_config(conf.read_text())["moto"]
    secrets = {k: section.pop(k) for k in ("access_key_id", "secret_access_key")}
    bucket = new_bucket(s3, {"a.txt": b"from rclone's config"})
    creds = tmp_path / "creds" / "moto"
    creds.mkdir(parents=True)
    for k, v in secrets.items():
        (creds / k).write_text(v)
        (creds / k).chmod(0o600)
    manifest = {"root": str(tmp_path / "project"), "storages": [{"name": "moto", "rclone": section, "source_path": bucket}],
                "mounts": [{"storage": "moto", "mountpath": "m"}]}
    d = daemons(tmp_path, manifest, creds=tmp_path / "creds")
    d.wait_ready()
    assert (tmp_path / "project/m/a.txt").read_bytes() == b"from rclone's config"
    assert s3.secret not in json.dumps(d.get("/status")[1]) and s3.secret not in json.dumps(manifest)


def test_an_unsupported_option_or_type_is_one_error_naming_the_field():
    base = {"root": "/tmp/p", "mounts": []}
    with pytest.raises(ManifestError) as err:
        loads(json.dumps({**base, "storages": [{"name": "a", "rclone": {"type": "s3", "chunk_size": "5M"}, "source_path": "b"}]}))
    assert err.value.errors == [("storages[0].rclone.chunk_size", "rclone option of type s3 not supported: 'chunk_size'")]
    with pytest.raises(ManifestError) as err:
        loads(json.dumps({**base, "storages": [{"name": "a", "storage_type": "dropbox", "configuration": {"type": "dropbox"},
                                                "source_path": "b", "target_path": "t"}]}))
    (field, message), = err.value.errors
    assert field == "storages[0].configuration.type" and "'dropbox' is not supported; supported: azureblob, google cloud storage, s3" in message


def test_rclone_remotes_of_azure_and_gcs_mount_with_credentials_named_as_rclone_names_them(azure, gcs, tmp_path, daemons):
    """azureblob with its `key` in the credentials directory under rclone's name (a Secret built
    from a data connector's sensitive fields), on Azurite; google cloud storage, anonymous, on the
    emulator."""
    from tests.backends import AzureBackend, GCSBackend

    az, gs = AzureBackend(azure), GCSBackend(gcs)
    container, bucket = az.create_bucket(), gs.create_bucket()
    az.put(container.name, "in/a.txt", b"azure")
    gs.put(bucket.name, "b.txt", b"gcs")
    creds = tmp_path / "creds" / "blob"
    creds.mkdir(parents=True)
    (creds / "key").write_text(azure.key)
    (creds / "key").chmod(0o600)
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"name": "blob", "rclone": {"type": "azureblob", "account": azure.account, "endpoint": azure.endpoint}, "source_path": f"{container.name}/in"},
            {"name": "gcs", "rclone": {"type": "google cloud storage", "anonymous": "true", "endpoint": gcs.endpoint}, "source_path": bucket.name},
        ],
        "mounts": [{"storage": "blob", "mountpath": "blob"}, {"storage": "gcs", "mountpath": "gcs"}],
    }
    d = daemons(tmp_path, manifest, creds=tmp_path / "creds")
    d.wait_ready()
    assert d.states() == {"blob": "mounted", "gcs": "mounted"}
    assert (tmp_path / "project/blob/a.txt").read_bytes() == b"azure"
    assert (tmp_path / "project/gcs/b.txt").read_bytes() == b"gcs"


def _obscure(secret):
    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    return subprocess.run([exe, "obscure", secret], capture_output=True, text=True, check=True).stdout.strip()


def test_webdav_as_a_data_connector_an_rclone_remote_and_a_url_on_rclones_server(dav_rclone, tmp_path, daemons):
    """One WebDAV folder (`rclone serve webdav`), three spellings: a URL with the password under
    our name, an rclone remote and a data connector (writable) with `pass` in rclone's obscured
    form under rclone's name. All mount and read the same files; a file written through the
    connector is on the server; neither form of the password is in the status, the metrics or
    the daemon's log."""
    from tests.backends import WebDAVBackend

    dav = WebDAVBackend(dav_rclone)
    folder = dav.create_bucket()
    folder.put("data/hello.txt", b"hello")
    folder.put("data/sub/x.bin", b"x" * 1000)
    obscured = _obscure(dav_rclone.password)
    creds = tmp_path / "creds"
    for name, field, value in (("as-url", "password", dav_rclone.password), ("as-remote", "pass", obscured),
                               ("as-connector", "pass", obscured)):
        (creds / name).mkdir(parents=True)
        (creds / name / field).write_text(value)
        (creds / name / field).chmod(0o600)
    rclone = {"type": "webdav", "url": dav_rclone.endpoint, "vendor": "rclone", "user": dav_rclone.user}
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"id": "as-url", "name": "as-url", "provider": "webdav", "url": dav.url(folder.name, "data"), "options": {"user": dav_rclone.user}},
            {"id": "as-remote", "name": "as-remote", "rclone": rclone, "source_path": f"{folder.name}/data"},
            {"storage_id": "01HXYZDATACONNECTORDAV0001", "project_id": "01HXYZPROJECT000000000001", "name": "as-connector",
             "storage_type": "webdav", "configuration": rclone, "source_path": f"{folder.name}/data", "target_path": "connected",
             "readonly": False},
        ],
        "mounts": [{"storage": "as-url", "mountpath": "url"}, {"storage": "as-remote", "mountpath": "remote"}],
    }
    d = daemons(tmp_path, manifest, creds=creds)
    d.wait_ready()
    # (the status in the message: its reasons name why a mount failed, and carry no secret)
    assert d.states() == {"as-url": "mounted", "as-remote": "mounted", "as-connector": "mounted"}, \
        {m["name"]: (m["state"], m.get("error")) for m in d.get("/status")[1]["mounts"]}
    root = tmp_path / "project"
    for where in ("url", "remote", "connected"):
        assert sorted(os.listdir(root / where)) == ["hello.txt", "sub"]
        assert (root / where / "hello.txt").read_bytes() == b"hello"
        assert (root / where / "sub" / "x.bin").read_bytes() == b"x" * 1000
    (root / "connected" / "result.txt").write_text("42\n")
    assert folder.get("data/result.txt") == b"42\n"
    with pytest.raises(OSError):
        (root / "remote" / "nope.txt").write_text("read-only")
    status = d.get("/status")[1]
    mounts = {m["name"]: m for m in status["mounts"]}
    assert mounts["as-remote"]["url"] == mounts["as-url"]["url"] == dav.url(folder.name, "data")
    assert (mounts["as-connector"]["rclone_type"], mounts["as-url"]["rclone_type"]) == ("webdav", None)
    seen = json.dumps(status) + str(d.get("/metrics")[1]) + d.log() + json.dumps(manifest)
    for secret in (dav_rclone.password, obscured):
        assert secret not in seen


def test_a_wrong_or_missing_webdav_password_is_reported_as_such(dav_wsgidav, tmp_path, daemons):
    """On WsgiDAV: a refused password is `credentials_invalid`, none where the server asks for
    one `credentials_missing`, a served folder that is not there `bucket_not_found`."""
    from tests.backends import WebDAVBackend

    dav = WebDAVBackend(dav_wsgidav)
    folder = dav.create_bucket()
    creds = tmp_path / "creds"
    for name, password in (("wrong", "not-the-password"), ("nofolder", dav_wsgidav.password)):
        (creds / name).mkdir(parents=True)
        (creds / name / "password").write_text(password)
        (creds / name / "password").chmod(0o600)
    manifest = {
        "root": str(tmp_path / "project"),
        "storages": [
            {"id": "wrong", "name": "wrong", "provider": "webdav", "url": dav.url(folder.name), "options": {"user": dav_wsgidav.user}},
            {"id": "none", "name": "none", "provider": "webdav", "url": dav.url(folder.name)},
            {"name": "nofolder", "provider": "webdav", "url": dav.url("no-such-folder"), "options": {"user": dav_wsgidav.user}},
        ],
        "mounts": [{"storage": "wrong", "mountpath": "w"}, {"storage": "none", "mountpath": "n"}, {"storage": "nofolder", "mountpath": "m"}],
    }
    d = daemons(tmp_path, manifest, creds=creds)
    wait = lambda: all(s in ("needs_credentials", "failed", "mounted") for s in d.states().values())  # noqa: E731
    from tests.conftest import wait_for

    wait_for(wait, timeout=60, what="every check done")
    reasons = {m["name"]: (m["state"], (m.get("error") or {}).get("code")) for m in d.get("/status")[1]["mounts"]}
    assert reasons["wrong"] == ("needs_credentials", "credentials_invalid")
    assert reasons["none"] == ("needs_credentials", "credentials_missing")  # the server asked for credentials; none were given
    assert reasons["nofolder"] == ("failed", "bucket_not_found")
    assert "not-the-password" not in d.log()
