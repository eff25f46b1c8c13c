"""Each pre-flight reason code, produced by a real situation against real local servers."""

import json
import socket
import uuid

import boto3
import pytest
import trio

from sidecar import preflight, urls
from tests.devservers import free_port


def check(url, options, creds, *, writable=False, deadline=8.0):
    return trio.run(lambda: preflight.check("st", urls.parse(url), options, creds, source_path="", writable=writable, deadline=deadline))


def iam_user(s3, name, actions):
    """A second IAM user of the moto server, allowed only `actions`."""
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.key, aws_secret_access_key=s3.secret)
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    return {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}


@pytest.fixture
def s3_bucket_name(s3):
    name = f"pf-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    return name


def test_ok_and_write_probe_leaves_nothing(s3, s3_bucket_name):
    creds = {"access_key_id": s3.key, "secret_access_key": s3.secret}
    assert check(f"s3://{s3_bucket_name}", {"endpoint_url": s3.endpoint}, creds, writable=True).code == "ok"
    assert s3.client().list_objects_v2(Bucket=s3_bucket_name).get("KeyCount", 0) == 0  # the probe object is gone


def test_access_denied(s3, s3_bucket_name):
    creds = iam_user(s3, f"nolist-{uuid.uuid4().hex[:6]}", ["s3:GetObject"])
    assert check(f"s3://{s3_bucket_name}", {"endpoint_url": s3.endpoint}, creds).code == "access_denied"


def test_readonly_no_write_permission(s3, s3_bucket_name):
    creds = iam_user(s3, f"reader-{uuid.uuid4().hex[:6]}", ["s3:ListBucket", "s3:GetObject"])
    opts = {"endpoint_url": s3.endpoint}
    assert check(f"s3://{s3_bucket_name}", opts, creds).code == "ok"  # fine for a read-only storage
    assert check(f"s3://{s3_bucket_name}", opts, creds, writable=True).code == "readonly_no_write_permission"


def test_credentials_invalid_and_missing(s3, s3_bucket_name, monkeypatch):
    opts = {"endpoint_url": s3.endpoint}
    assert check(f"s3://{s3_bucket_name}", opts, {"access_key_id": s3.key, "secret_access_key": "wrong"}).code == "credentials_invalid"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert check(f"s3://{s3_bucket_name}", opts, {}).code == "credentials_missing"


def test_bucket_not_found_and_unreachable(s3):
    creds = {"access_key_id": s3.key, "secret_access_key": s3.secret}
    assert check("s3://no-such-bucket-here", {"endpoint_url": s3.endpoint}, creds).code == "bucket_not_found"
    assert check("s3://any-bucket", {"endpoint_url": f"http://127.0.0.1:{free_port()}"}, creds).code == "endpoint_unreachable"


def test_timeout_when_the_server_never_answers():
    # A server that accepts connections and never answers (a hung endpoint).
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        ep = f"http://127.0.0.1:{srv.getsockname()[1]}"
        result = check("s3://any-bucket", {"endpoint_url": ep}, {"access_key_id": "a", "secret_access_key": "b"}, deadline=2.0)
        assert result.code == "timeout" and "within 2 s" in result.reason
    finally:
        srv.close()


def test_azure_key_sas_connection_string_and_anonymous(azure):
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    svc = BlobServiceClient.from_connection_string(azure.connection_string)
    private, public = f"c{uuid.uuid4().hex[:10]}", f"p{uuid.uuid4().hex[:10]}"
    svc.create_container(private)
    svc.create_container(public, public_access="container")
    opts = {"account_name": azure.account, "endpoint_url": azure.endpoint}
    sas = generate_container_sas(azure.account, private, account_key=azure.key, permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    assert check(f"az://{private}", opts, {"account_key": azure.key}, writable=True).code == "ok"
    assert check(f"az://{private}", opts, {"sas_token": sas}).code == "ok"
    assert check(f"az://{private}", opts, {"sas_token": sas}, writable=True).code == "readonly_no_write_permission"
    assert check(f"az://{private}", {}, {"connection_string": azure.connection_string}).code == "ok"
    assert check(f"az://{public}", {**opts, "anonymous": True}, {}).code == "ok"
    # anonymous on a private container is refused (Azure: 404/409; Azurite: an authentication error)
    assert check(f"az://{private}", {**opts, "anonymous": True}, {}).code in ("access_denied", "bucket_not_found", "credentials_invalid")
    assert check(f"az://{private}", opts, {}).code == "credentials_missing"


@pytest.mark.parametrize("prefix", ["", "sub"])
def test_the_checks_listing_is_the_mounts_first_listing_on_every_provider(bucket, prefix, monkeypatch):
    """The check lists the storage's folder anyway: when that one LIST holds all of it, the
    worker gets the entries, and they make the same listing as the store's own LIST."""
    from sidecar.store.factory import build_store

    base = f"{prefix}/" if prefix else ""
    for key in ("a.txt", "d/b.txt", "e.bin"):
        bucket.put(base + key, b"x" * 3)
    where = bucket.storage(prefix)
    url = urls.parse(where["url"])

    async def main(limit):
        monkeypatch.setattr(preflight, "CHECK_LIST_MAX", limit)
        store = build_store(where["storage_id"], url, where["options"], where["credentials"])
        got = []
        result = await preflight.check("st", url, where["options"], where["credentials"], source_path="", writable=False, store=store,
                                       listed=got.append)
        assert result.code == "ok"
        own = await store.list_dir(url.key_prefix(""))
        return got, own

    (handed,), own = trio.run(main, 1000)
    keyed = f"{url.key_prefix('')}/" if url.key_prefix("") else ""  # WebDAV: the URL's path is the served folder, keys below it
    assert sorted(f.key for f in handed.files) == sorted(f.key for f in own.files) == [keyed + "a.txt", keyed + "e.bin"]
    assert [f.size for f in handed.files] == [3, 3] and all(f.etag for f in handed.files)
    assert handed.dirs == own.dirs == [keyed + "d"]
    handed, _ = trio.run(main, 2)  # more entries than the check may hand over: none (the mount lists)
    assert handed == []
