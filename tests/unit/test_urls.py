import pytest

from sidecar import urls
from sidecar.urls import StorageURL, StorageURLError


@pytest.mark.parametrize(
    "url, expected",
    [
        ("s3://giab/data", StorageURL("s3", "giab", "data", region="us-east-1")),
        ("s3://giab", StorageURL("s3", "giab", "", region="us-east-1")),
        ("s3://giab/a/b/", StorageURL("s3", "giab", "a/b", region="us-east-1")),
        ("s3://s3.eu-central-1.amazonaws.com/giab/data", StorageURL("s3", "giab", "data", region="eu-central-1")),
        ("https://s3.eu-central-1.amazonaws.com/my.bucket/x", StorageURL("s3", "my.bucket", "x", region="eu-central-1")),
        ("s3://giab.s3.us-west-2.amazonaws.com/raw/x", StorageURL("s3", "giab", "raw/x", region="us-west-2")),
        ("https://giab.s3.us-west-2.amazonaws.com/raw", StorageURL("s3", "giab", "raw", region="us-west-2")),
        ("https://os.zhdk.cloud.switch.ch/bucket/p", StorageURL("s3", "bucket", "p", endpoint="https://os.zhdk.cloud.switch.ch")),
        ("s3://minio.example.org:9000/bucket/p/q", StorageURL("s3", "bucket", "p/q", endpoint="https://minio.example.org:9000")),
        ("s3://localhost:9000/bucket", StorageURL("s3", "bucket", "", endpoint="https://localhost:9000")),
        ("az://container/path/x", StorageURL("azure", "container", "path/x")),
        ("azure://container", StorageURL("azure", "container", "")),
        ("az://acct1.dfs.core.windows.net/cont/p", StorageURL("azure", "cont", "p", account="acct1", azure_kind="dfs")),
        ("azure://acct1.blob.core.windows.net/cont", StorageURL("azure", "cont", "", account="acct1", azure_kind="blob")),
        ("gs://my-bucket/path/to", StorageURL("gcs", "my-bucket", "path/to")),
        ("gs://my_bucket.with.dots", StorageURL("gcs", "my_bucket.with.dots", "")),
        ("davs://polybox.ethz.ch/remote.php/webdav/My%20Data", StorageURL("webdav", "remote.php/webdav/My Data", "", endpoint="https://polybox.ethz.ch")),
        ("dav://127.0.0.1:8080/", StorageURL("webdav", "", "", endpoint="http://127.0.0.1:8080")),
        ("dav://Host.Example:81/a/%C3%BC/%3F%23", StorageURL("webdav", "a/ü/?#", "", endpoint="http://host.example:81")),
    ],
)
def test_supported_forms_parse(url, expected):
    parsed = urls.parse(url)
    assert parsed == expected
    # Round trip: the canonical URL parses back to the same storage.
    assert urls.parse(parsed.canonical()) == parsed


@pytest.mark.parametrize(
    "url, reason",
    [
        ("adl://store/path", "adl:// scheme is not supported"),
        ("abfs://fs@acct.dfs.core.windows.net/p", "abfs:// scheme is not supported"),
        ("abfss://fs@acct.dfs.core.windows.net/p", "abfss:// scheme is not supported"),
        ("ftp://host/bucket", "unsupported scheme 'ftp'"),
        ("http://host/bucket", "unsupported scheme 'http'"),
        ("giab/data", "no scheme"),
        ("", "empty"),
        ("s3:///path", "no bucket"),
        ("gs://", "no bucket"),
        ("az://", "no container"),
        ("s3://Upper/x", "invalid S3 bucket name"),
        ("s3://ab/x", "invalid S3 bucket name"),
        ("https://s3.eu-central-1.amazonaws.com/a..b/x", "invalid S3 bucket name"),
        ("s3://s3.eu-central-1.amazonaws.com/", "no bucket"),
        ("s3://giab.s3.nowhere.amazonaws.com/p", "invalid AWS region"),
        ("az://Bad_Container/x", "invalid Azure container name"),
        ("az://a--b/x", "invalid Azure container name"),
        ("az://UPPER.blob.core.windows.net/c/x", "invalid Azure storage account name"),
        ("az://some.other.host/c", "unknown Azure host"),
        ("gs://googbucket/x", "invalid GCS bucket name"),
        ("gs://-bad/x", "invalid GCS bucket name"),
        ("s3://giab/a\nb", "control characters"),
        ("s3://giab/a b", "whitespace"),
        ("s3://giab/../etc", "'..'"),
        ("s3://giab/x?versionId=1", "query string"),
        ("dav:///x", "no host"),
        ("davs://h/a%0Ab", "control characters once percent-decoded"),
        ("davs://h/%ff", "not UTF-8 once percent-decoded"),
        ("davs://h/a/%2E%2E/b", "'..'"),
        ("davs://user:pw@h/x", "must not be embedded"),
    ],
)
def test_rejected_forms_name_the_reason_and_the_supported_forms(url, reason):
    with pytest.raises(StorageURLError) as err:
        urls.parse(url)
    assert reason in str(err.value)
    for form in urls.SUPPORTED_FORMS:
        assert form in str(err.value)


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:wJalrXUtnFEMI@giab/data", "https://user:hunter22@host/bucket/x", "az://k:v@container/x"])
def test_credentials_in_url_rejected_without_echo(url):
    with pytest.raises(StorageURLError) as err:
        urls.parse(url)
    msg = str(err.value)
    assert "credentials must not be embedded" in msg
    for secret in ("wJalrXUtnFEMI", "hunter22", "AKIAEXAMPLE", "k:v"):
        assert secret not in msg


def test_key_prefix_joins_url_path_and_source_path():
    u = urls.parse("s3://giab/data")
    assert u.key_prefix() == "data"
    assert u.key_prefix("raw/") == "data/raw"
    assert urls.parse("s3://giab").key_prefix("/raw") == "raw"


def test_host_used_for_storage_ids():
    assert urls.parse("s3://giab").host == "amazonaws.com"
    assert urls.parse("https://os.example.org/b1c/x").host == "os.example.org"
    assert urls.parse("az://acct1.dfs.core.windows.net/c1c").host == "acct1.dfs.core.windows.net"
    assert urls.parse("gs://abc").host == "storage.googleapis.com"
