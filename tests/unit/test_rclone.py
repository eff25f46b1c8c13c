"""sidecar.rclone: rclone's obscured values, configs and options made into the manifest's form."""

import shutil
import subprocess

import pytest

from sidecar.rclone import RcloneError, credential_field, parse_config, reveal, storage_from_rclone


def test_reveal_undoes_what_the_real_rclone_obscure_wrote():
    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    secret = "p4ss ünïcode and spaces " + "x" * 200  # (one rclone run: each took seconds on a cold CI machine)
    obscured = subprocess.run([exe, "obscure", secret], capture_output=True, text=True, check=True).stdout.strip()
    assert obscured != secret and reveal(obscured) == secret


@pytest.mark.parametrize("value", ["", "!!!", "c2hvcnQ"])
def test_a_value_that_is_not_obscured_is_refused(value):
    with pytest.raises(ValueError, match="not an obscured value"):
        reveal(value)


def test_a_config_file_is_read_section_by_section_as_written():
    conf = parse_config("[a]\ntype = s3\nprovider = AWS\nRegion_X = 1\n\n[b b]\ntype = azureblob\naccount = acct\n")
    assert conf == {"a": {"type": "s3", "provider": "AWS", "Region_X": "1"}, "b b": {"type": "azureblob", "account": "acct"}}
    with pytest.raises(ValueError, match="not an rclone config"):
        parse_config("type = s3\n")


@pytest.mark.parametrize("config, source, expected", [
    ({"type": "s3", "provider": "AWS", "region": "eu-central-1"}, "bkt/f/g", ("s3", "s3://bkt/f/g", {"region": "eu-central-1"})),
    ({"type": "s3", "provider": "Ceph", "endpoint": "s3.example.org", "force_path_style": "true", "location_constraint": "x"}, "bkt",
     ("s3", "s3://bkt", {"endpoint_url": "https://s3.example.org"})),
    ({"type": "s3", "provider": "Other", "requester_pays": True, "env_auth": "true"}, "/bkt/", ("s3", "s3://bkt", {"requester_pays": True})),
    ({"type": "azureblob", "account": "acct1", "endpoint": "http://127.0.0.1:10000/acct1"}, "cont/x",
     ("azure", "az://acct1.blob.core.windows.net/cont/x", {"endpoint_url": "http://127.0.0.1:10000/acct1", "account_name": "acct1"})),
    ({"type": "google cloud storage", "anonymous": "true", "project_number": "12345", "bucket_policy_only": "true"}, "bkt",
     ("gcs", "gs://bkt", {"anonymous": True})),
    ({"type": "webdav", "url": "https://polybox.ethz.ch/remote.php/webdav/", "vendor": "nextcloud", "user": "me@ethz.ch"}, "My Data/raw",
     ("webdav", "davs://polybox.ethz.ch/remote.php/webdav/My%20Data/raw", {"vendor": "nextcloud", "user": "me@ethz.ch"})),
    ({"type": "webdav", "url": "http://127.0.0.1:8080", "vendor": "rclone"}, "", ("webdav", "dav://127.0.0.1:8080", {"vendor": "rclone"})),
])
def test_options_become_the_manifests_own(config, source, expected):
    got = storage_from_rclone(config, source)
    assert (got["provider"], got["url"], got["options"]) == expected and got["rclone_type"] == config["type"]


@pytest.mark.parametrize("config, source, field, message", [
    ({"type": "s3", "upload_cutoff": "1M"}, "b", "configuration.upload_cutoff", "rclone option of type s3 not supported: 'upload_cutoff'"),
    ({"type": "s3", "provider": "Nope"}, "b", "configuration.provider", "not one of rclone's S3 providers: AWS, Alibaba"),
    ({"type": "s3", "force_path_style": "false"}, "b", "configuration.force_path_style", "virtual-host addressing"),
    ({"type": "s3", "region": True}, "b", "configuration.region", "must be non-empty text"),
    ({"type": "s3", "endpoint": "https://u:p@h/"}, "b", "configuration.endpoint", "without user info"),
    ({"type": "s3", "secret_access_key": "S3CRET"}, "b", "configuration.secret_access_key", "is a secret"),
    ({"type": "azureblob"}, "c", "configuration.account", "missing"),
    ({"type": "azureblob", "account": "a1b", "env_auth": "true"}, "c", "configuration.env_auth", "Azure AD"),
    ({"type": "google cloud storage", "service_account_file": "/home/me/key.json"}, "b", "configuration.service_account_file", "a file on"),
    ({"type": "sftp", "host": "h"}, "b", "configuration.type", "'sftp' is not supported; supported: azureblob, google cloud storage, s3, webdav"),
    ({"type": "webdav", "url": "https://h", "pass": "S3CRET"}, "", "configuration.pass", "is a secret"),
    ({"type": "webdav", "url": "https://h", "vendor": "sharepoint"}, "", "configuration.vendor", "cookies from a Microsoft login"),
    ({"type": "webdav", "url": "https://h", "bearer_token_command": "S3CRET-cmd"}, "", "configuration.bearer_token_command", "a command to run"),
    ({"type": "webdav", "url": "https://h", "nextcloud_chunk_size": "10M"}, "", "configuration.nextcloud_chunk_size",
     "rclone option of type webdav not supported: 'nextcloud_chunk_size'"),
    ({"type": "webdav", "vendor": "other"}, "", "configuration.url", "missing"),
    ({"type": "webdav", "url": "https://h/base"}, "a/../b", "source_path", "'..'"),
    ({"provider": "AWS"}, "b", "configuration.type", "missing"),
    ({"type": "s3"}, "", "source_path", "must name the bucket"),
])
def test_what_cannot_be_used_is_refused_by_name(config, source, field, message):
    with pytest.raises(RcloneError, match=message) as err:
        storage_from_rclone(config, source)
    assert err.value.field == field
    assert "S3CRET" not in str(err.value)


def test_secret_options_are_named_as_rclone_names_them():
    assert credential_field("azureblob", "key") == "account_key"
    assert credential_field("google cloud storage", "service_account_credentials") == "service_account.json"
    assert credential_field("s3", "secret_access_key") == "secret_access_key"
    assert credential_field("s3", "region") is None
    assert credential_field("webdav", "pass") == "password" and credential_field("webdav", "bearer_token") == "bearer_token"


def test_a_webdav_pass_is_revealed_and_a_plain_one_refused_with_the_way_out():
    from sidecar.rclone import credential_from_option

    exe = shutil.which("rclone")
    if exe is None:
        pytest.skip("rclone is not installed (scripts/bootstrap.sh installs it)")
    obscured = subprocess.run([exe, "obscure", "dav pässword"], capture_output=True, text=True, check=True).stdout.strip()
    assert credential_from_option("webdav", "pass", obscured) == ("password", "dav pässword")
    with pytest.raises(ValueError, match="give a plain password as `password`"):
        credential_from_option("webdav", "pass", "plain")


def test_a_manifest_of_data_connectors_alone_needs_no_mounts_list():
    import json

    from sidecar.manifest import loads

    connector = {"storage_id": "01HXY", "name": "raw", "storage_type": "s3", "configuration": {"type": "s3", "provider": "AWS"},
                 "source_path": "bkt/raw", "target_path": "data/raw", "readonly": True}
    m = loads(json.dumps({"root": "/p", "storages": [connector]}))
    (mount,) = m.mounts
    assert (mount.name, mount.mountpath, m.storage_for(mount).url, m.storage_for(mount).id) == ("raw", "/p/data/raw", "s3://bkt/raw", "01HXY")
