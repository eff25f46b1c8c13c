import copy
import json
import os

import pytest

from sidecar.manifest import ManifestError, loads, parse_manifest

BASE = {
    "root": "/home/jovyan/work/my-project",
    "storages": [
        {
            "id": "https://renkulab.io/storage/s3/amazonaws.com/giab",
            "name": "giab",
            "provider": "s3",
            "url": "s3://giab/data",
            "readonly": True,
            "options": {"endpoint_url": "http://127.0.0.1:5000", "region": "us-east-1", "anonymous": False},
        }
    ],
    "mounts": [
        {
            "id": "https://renkulab.io/storage/mounts/giab-raw",
            "storage": "https://renkulab.io/storage/s3/amazonaws.com/giab",
            "mountpath": "data/giab",
            "source_path": "raw",
        }
    ],
}


def doc(**changes):
    d = copy.deepcopy(BASE)
    for path, value in changes.items():
        target = d
        parts = path.split("__")
        for p in parts[:-1]:
            target = target[int(p)] if p.isdigit() else target[p]
        last = parts[-1]
        if value is DELETE:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return d


DELETE = object()


def errors_of(d):
    with pytest.raises(ManifestError) as err:
        parse_manifest(d)
    return dict(err.value.errors), str(err.value)


def test_example_manifest_is_valid_and_resolved():
    m = parse_manifest(copy.deepcopy(BASE))
    mt = m.mounts[0]
    assert mt.mountpath == "/home/jovyan/work/my-project/data/giab"
    assert mt.name == "giab"
    assert m.storage_for(mt).name == "giab"
    assert m.storage_for(mt).readonly is True


def test_readonly_defaults_to_true():
    m = parse_manifest(doc(storages__0__readonly=DELETE))
    assert m.storages[0].readonly is True


def test_ids_and_names_are_derived():
    d = doc(storages__0__id=DELETE, storages__0__name=DELETE, mounts__0__storage="giab", mounts__0__id=DELETE)
    m = parse_manifest(d)
    assert m.storages[0].id == "https://renkulab.io/storage/s3/amazonaws.com/giab"
    assert m.storages[0].name == "giab"
    assert m.mounts[0].id == "https://renkulab.io/storage/mounts/giab"


def test_instance_host_configurable_in_ids():
    d = doc(storages__0__id=DELETE, mounts__0__storage="giab")
    d["instance"] = "data.example.org"
    d["storages"].append({"provider": "azure", "url": "az://acct1.blob.core.windows.net/cont1/x"})
    d["storages"].append({"provider": "gcs", "url": "gs://bucket-1"})
    m = parse_manifest(d)
    assert m.storages[0].id == "https://data.example.org/storage/s3/amazonaws.com/giab"
    assert m.storages[1].id == "https://data.example.org/storage/azure/acct1.blob.core.windows.net/cont1"
    assert m.storages[2].id == "https://data.example.org/storage/gcs/storage.googleapis.com/bucket-1"
    assert [s.name for s in m.storages] == ["giab", "cont1", "bucket-1"]


def test_one_storage_several_mounts_get_distinct_names():
    d = doc()
    d["mounts"].append({"storage": "giab", "mountpath": "data/other", "source_path": "processed"})
    m = parse_manifest(d)
    assert [mt.name for mt in m.mounts] == ["giab-giab", "giab-other"]
    assert {mt.storage for mt in m.mounts} == {BASE["storages"][0]["id"]}


@pytest.mark.parametrize(
    "change, loc, words",
    [
        ({"storages__0__provider": "ftp"}, "storages[0].provider", "'s3', 'azure', 'gcs' or 'webdav'"),
        ({"storages__0__url": "adl://x/y"}, "storages[0].url", "adl:// scheme is not supported"),
        ({"storages__0__url": "gs://bucket/x"}, "storages[0]", "gcs URL but provider is 's3'"),
        ({"storages__0__options": {"profile": "dev"}}, "storages[0].options.profile", "allowed: anonymous, endpoint_url"),
        ({"storages__0__options": {"anonymous": "yes"}}, "storages[0].options.anonymous", "must be a bool"),
        ({"storages__0__options": {"endpoint_url": "file:///etc/passwd"}}, "storages[0].options.endpoint_url", "http:// or https://"),
        ({"storages__0__name": "Bad Name"}, "storages[0].name", "slug"),
        ({"storages__0__colour": "blue"}, "storages[0].colour", "Extra inputs are not permitted"),
        ({"mounts__0__storage": "nope"}, "mounts[0].storage", "not the id or name of any storage"),
        ({"mounts__0__mountpath": "../outside"}, "mounts[0].mountpath", "inside root"),
        ({"mounts__0__mountpath": "/etc/x"}, "mounts[0].mountpath", "inside root"),
        ({"mounts__0__mountpath": "."}, "mounts[0].mountpath", "inside root"),
        ({"mounts__0__source_path": "../x"}, "mounts[0].source_path", "without '.' or '..'"),
        ({"mounts__0__deadline": 0}, "mounts[0].deadline", "greater than 0"),
        ({"root": "relative/root"}, "root", "absolute path"),
        ({"mounts": DELETE}, "mounts", "Field required"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(change, loc, words):
    errs, text = errors_of(doc(**change))
    assert loc in errs, errs
    assert words in errs[loc]
    assert f"  {loc}: " in text


def test_absolute_mountpath_inside_root_is_accepted():
    m = parse_manifest(doc(mounts__0__mountpath="/home/jovyan/work/my-project/d"))
    assert m.mounts[0].mountpath == "/home/jovyan/work/my-project/d"


def test_mountpaths_unique_and_not_nested():
    d = doc()
    d["mounts"].append({"storage": "giab", "mountpath": "data/giab", "name": "b"})
    d["mounts"].append({"storage": "giab", "mountpath": "data/giab/inner", "name": "c"})
    d["mounts"][0]["name"] = "a"
    errs, _ = errors_of(d)
    assert "the same path as mounts[0].mountpath" in errs["mounts[1].mountpath"]
    assert "nests with mounts[" in errs["mounts[2].mountpath"]


def test_symlink_out_of_root_is_refused(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    d = doc(root=str(root), mounts__0__mountpath="link/data")
    errs, _ = errors_of(d)
    assert "inside root" in errs["mounts[0].mountpath"]


def test_duplicate_storage_names_refused():
    d = doc()
    d["storages"].append({"provider": "gcs", "url": "gs://giab"})
    errs, _ = errors_of(d)
    assert "already used by storages[0]" in errs["storages[1].name"]


@pytest.mark.parametrize(
    "field",
    ["secret_access_key", "aws_secret_access_key", "account_key", "sas_token", "connection_string", "password", "accessKey", "token", "sas"],
)
def test_secret_fields_rejected_pointing_to_credentials(field):
    value = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    d = doc()
    d["storages"][0]["options"][field] = value
    errs, text = errors_of(d)
    loc = f"storages[0].options.{field}"
    assert loc in errs
    assert "credentials" in errs[loc]
    assert value not in text


def test_secret_at_top_level_of_storage_rejected_too():
    d = doc()
    d["storages"][0]["secret"] = "hunter2hunter2"
    errs, text = errors_of(d)
    assert "storages[0].secret" in errs and "hunter2hunter2" not in text


def test_pydantic_errors_never_echo_values():
    d = doc(storages__0__readonly="maybe-a-secret-value")
    _, text = errors_of(d)
    assert "maybe-a-secret-value" not in text
    assert "storages[0].readonly" in text


def test_loads_reports_bad_json_position():
    with pytest.raises(ManifestError) as err:
        loads('{"root": ')
    assert "not valid JSON" in str(err.value)


def test_non_secret_words_are_not_mistaken_for_secrets():
    m = parse_manifest(json.loads(json.dumps(BASE)))
    assert m.storages[0].options["anonymous"] is False
    assert os.path.isabs(m.root)


@pytest.mark.parametrize(
    "raw, where, says",
    [
        (b"\xff\xfe{\x00}\x00", "(document)", "UTF-16"),
        ('{"root": "/p"}'.encode("utf-16"), "(document)", "UTF-16"),
        (b'{"root": "/p", "x": \x80}', "(document)", "must be UTF-8"),
        (b'{"root": "/p", "storages": [], "mounts": [], "n": ' + b"7" * 5000 + b"}", "(document)", "not usable JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "(document)", "nested more than"),
        (json.dumps({"root": "/p", "storages": [], "mounts": [], "a": json.loads("[" * 40 + "1" + "]" * 40)}).encode(), "(document)", "nested more than"),
        (json.dumps({"root": "/p\u0000x", "storages": [], "mounts": []}).encode(), "root", "control characters"),
        (b"{" * 10 + b"x" * (2 << 20), "(document)", "larger than"),
    ],
)
def test_hostile_manifest_bytes_give_a_clear_error_not_a_traceback(raw, where, says):
    with pytest.raises(ManifestError) as exc:
        loads(raw)
    assert any(loc == where and says in msg for loc, msg in exc.value.errors), exc.value.errors


def test_every_independent_error_is_reported_with_its_field_path():
    doc = copy.deepcopy(BASE)
    doc["storages"][0]["options"]["endpoint_url"] = "http://127.0.0.1:5000/?X-Amz-Signature=0123456789abcdef"
    doc["mounts"][0]["mountpath"] = "data/\nsecret"
    doc["unknown"] = 1
    doc["secret_key"] = "abc"
    with pytest.raises(ManifestError) as exc:
        parse_manifest(doc)
    locs = [loc for loc, _ in exc.value.errors]
    assert {"storages[0].options.endpoint_url", "mounts[0].mountpath", "unknown", "secret_key"} <= set(locs), locs
    assert all(loc for loc in locs)  # every error has a field path
    assert "0123456789abcdef" not in str(exc.value)  # the query string's secret is not echoed


@pytest.mark.parametrize("provider, url, option, value", [
    ("s3", "s3://giab/data", "region", "https://u:SECRET@h/"),
    ("s3", "s3://giab/data", "region", "us-east-1\n"),
    ("s3", "s3://giab/data", "region", ""),
    ("azure", "az://cont/data", "account_name", "https://u:SECRET@h/"),
    ("azure", "az://cont/data", "account_name", "Has-Capitals"),
    ("gcs", "gs://bucket/data", "project", "x"),
    ("gcs", "gs://bucket/data", "project", "proj\u001bSECRET"),
])
def test_option_values_are_checked_by_shape_and_never_echoed(provider, url, option, value):
    d = doc()
    d["storages"][0].update(provider=provider, url=url, options={option: value})
    errs, text = errors_of(d)
    assert list(errs) == [f"storages[0].options.{option}"], errs
    assert "must be" in errs[f"storages[0].options.{option}"]
    assert "SECRET" not in text and (value not in text or value == "")


@pytest.mark.parametrize("option, value", [("region", "us-gov-west-1"), ("region", "ch-gva-2"), ("region", "garage"),
                                           ("account_name", "devstoreaccount1"), ("project", "my-project-123"),
                                           ("project", "example.com:my-project")])
def test_real_option_values_are_accepted(option, value):
    provider = {"region": "s3", "account_name": "azure", "project": "gcs"}[option]
    url = {"s3": "s3://giab/data", "azure": "az://cont/data", "gcs": "gs://bucket/data"}[provider]
    d = doc()
    d["storages"][0].update(provider=provider, url=url, options={option: value})
    parse_manifest(d)


def test_an_endpoint_with_a_trailing_newline_is_refused():
    d = doc()
    d["storages"][0]["options"]["endpoint_url"] = "http://127.0.0.1:5000/\n"
    errs, _ = errors_of(d)
    assert list(errs) == ["storages[0].options.endpoint_url"]


@pytest.mark.parametrize("value, parsed", [(True, True), (False, False), ("auto", "auto")])
def test_zero_message_opens_is_a_bool_or_auto_and_nothing_else(value, parsed):
    d = doc()
    d["mounts"][0]["zero_message_opens"] = value
    assert parse_manifest(d).mounts[0].zero_message_opens == parsed
    d["mounts"][0]["zero_message_opens"] = "sometimes"
    errs, _ = errors_of(d)
    assert any(loc.startswith("mounts[0].zero_message_opens") for loc in errs), errs
