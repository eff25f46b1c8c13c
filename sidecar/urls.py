"""Storage URLs: parse every supported form into a typed `StorageURL`, reject everything else.

Supported forms (anything else raises `StorageURLError`, whose message lists these):

S3
  s3://<bucket>/<path>                                   AWS, default region
  (s3|https)://s3.<region>.amazonaws.com/<bucket>/<path> AWS, path style
  (s3|https)://<bucket>.s3.<region>.amazonaws.com/<path> AWS, virtual-host style
  (s3|https)://<host>/<bucket>/<path>                    other S3 providers; host becomes the endpoint
Azure Blob
  (az|azure)://<container>/<path>                        account from options.account_name
  (az|azure)://<account>.dfs.core.windows.net/<container>/<path>
  (az|azure)://<account>.blob.core.windows.net/<container>/<path>
GCS
  gs://<bucket>/<path>
WebDAV
  (davs|dav)://<host>[:<port>]/<path>                     https (davs) or http (dav); the whole
                                                         path is the folder served (percent-encoded)

With the `s3://` scheme the first name is a *host* when it contains a dot, a port, or is
`localhost`; otherwise it is a bucket. Bucket names with dots are therefore written path style
(`https://s3.<region>.amazonaws.com/my.bucket/...`). Error messages never echo URL user info,
because that is where people paste secrets.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

Provider = Literal["s3", "azure", "gcs", "webdav"]

SUPPORTED_FORMS = (
    "s3://<bucket>/<path>",
    "(s3|https)://s3.<region>.amazonaws.com/<bucket>/<path>",
    "(s3|https)://<bucket>.s3.<region>.amazonaws.com/<path>",
    "(s3|https)://<host>/<bucket>/<path>",
    "(az|azure)://<container>/<path>",
    "(az|azure)://<account>.dfs.core.windows.net/<container>/<path>",
    "(az|azure)://<account>.blob.core.windows.net/<container>/<path>",
    "gs://<bucket>/<path>",
    "(davs|dav)://<host>[:<port>]/<path>",
)

DEFAULT_S3_REGION = "us-east-1"

_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AZ_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_AZ_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_AWS_PATH_STYLE = re.compile(r"^s3[.-](?P<region>[A-Za-z0-9-]+)\.amazonaws\.com$", re.I)
_AWS_VHOST = re.compile(r"^(?P<bucket>.+)\.s3[.-](?P<region>[A-Za-z0-9-]+)\.amazonaws\.com$", re.I)
_AZ_HOST = re.compile(r"^(?P<account>[^.]+)\.(?P<kind>dfs|blob)\.core\.windows\.net$", re.I)
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class StorageURLError(ValueError):
    """A storage URL that is not one of the supported forms."""

    def __init__(self, reason: str):
        self.reason = reason
        forms = "\n  ".join(SUPPORTED_FORMS)
        super().__init__(f"{reason}. Supported storage URL forms:\n  {forms}")


@dataclass(frozen=True)
class StorageURL:
    provider: Provider
    bucket: str  # S3/GCS bucket or Azure container; WebDAV: the served folder's path (decoded)
    path: str = ""  # folder inside the bucket, no leading or trailing slash
    region: str | None = None  # S3 only
    endpoint: str | None = None  # S3 third-party host, as https://host[:port]; WebDAV: http(s)://host[:port]
    account: str | None = None  # Azure storage account
    azure_kind: Literal["blob", "dfs"] | None = None

    @property
    def host(self) -> str:
        """The service host used in storage ids (`.../storage/<provider>/<host>/<bucket>`)."""
        if self.provider in ("s3", "webdav"):
            return urlsplit(self.endpoint).netloc if self.endpoint else "amazonaws.com"
        if self.provider == "azure":
            kind = self.azure_kind or "blob"
            return f"{self.account}.{kind}.core.windows.net" if self.account else f"{kind}.core.windows.net"
        return "storage.googleapis.com"

    @property
    def label(self) -> str:
        """What a storage of this URL is called when it is not named: the bucket (container);
        for WebDAV the served folder's last name, else the host."""
        if self.provider == "webdav":
            return self.bucket.rsplit("/", 1)[-1] or urlsplit(self.endpoint or "").hostname or "webdav"
        return self.bucket

    def canonical(self) -> str:
        """Renders back to one URL of the supported forms; `parse(u.canonical()) == u`."""
        tail = f"/{self.path}" if self.path else ""
        if self.provider == "webdav":
            from urllib.parse import quote

            scheme, _, netloc = (self.endpoint or "").partition("://")
            return f"{'davs' if scheme == 'https' else 'dav'}://{netloc}/{quote(self.bucket)}".rstrip("/")
        if self.provider == "gcs":
            return f"gs://{self.bucket}{tail}"
        if self.provider == "azure":
            if self.account:
                return f"az://{self.account}.{self.azure_kind or 'blob'}.core.windows.net/{self.bucket}{tail}"
            return f"az://{self.bucket}{tail}"
        if self.endpoint:
            return f"{self.endpoint}/{self.bucket}{tail}"
        if self.region and self.region != DEFAULT_S3_REGION:
            return f"https://s3.{self.region}.amazonaws.com/{self.bucket}{tail}"
        return f"s3://{self.bucket}{tail}"

    def key_prefix(self, source_path: str = "") -> str:
        """The object-key prefix that a mount of this URL (plus an optional sub-folder) exposes."""
        parts = [p for p in (self.path, source_path.strip("/")) if p]
        return "/".join(parts)


def _clean_path(path: str) -> str:
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise StorageURLError("the path must not contain '.' or '..' segments")
    return "/".join(segments)


def _check_s3_bucket(bucket: str) -> str:
    if not bucket:
        raise StorageURLError("the URL names no bucket")
    if not _S3_BUCKET.match(bucket) or ".." in bucket or _is_ip(bucket):
        raise StorageURLError(
            f"invalid S3 bucket name {bucket!r}: 3-63 characters of lowercase letters, digits, '.' "
            "and '-', starting and ending with a letter or digit, not an IP address"
        )
    return bucket


def _check_region(region: str) -> str:
    if not _REGION.match(region):
        raise StorageURLError(f"invalid AWS region {region!r} (e.g. eu-central-1)")
    return region


def _check_container(container: str) -> str:
    if not container:
        raise StorageURLError("the URL names no container")
    if not _AZ_CONTAINER.match(container):
        raise StorageURLError(
            f"invalid Azure container name {container!r}: 3-63 characters of lowercase letters, digits "
            "and single hyphens, starting and ending with a letter or digit"
        )
    return container


def _check_gcs_bucket(bucket: str) -> str:
    if not bucket:
        raise StorageURLError("the URL names no bucket")
    parts_ok = all(0 < len(p) <= 63 for p in bucket.split("."))
    if not _GCS_BUCKET.match(bucket) or not parts_ok or bucket.startswith("goog") or _is_ip(bucket):
        raise StorageURLError(
            f"invalid GCS bucket name {bucket!r}: 3-63 characters (222 with dots) of lowercase letters, "
            "digits, '-', '_' and '.', starting and ending with a letter or digit, not starting with 'goog'"
        )
    return bucket


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _split_first(path: str) -> tuple[str, str]:
    first, _, rest = path.strip("/").partition("/")
    return first, rest


def parse(url: str) -> StorageURL:
    """Parses a storage URL; raises `StorageURLError` naming what is wrong and the supported forms."""
    if not isinstance(url, str) or not url:
        raise StorageURLError("the storage URL is empty")
    if _CONTROL.search(url):
        raise StorageURLError("the storage URL contains whitespace or control characters")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise StorageURLError("the storage URL has no scheme (like s3://)")
    scheme = scheme.lower()
    if scheme in ("adl", "abfs", "abfss", "wasb", "wasbs"):
        raise StorageURLError(f"the {scheme}:// scheme is not supported; write Azure URLs as az://")
    if scheme not in ("s3", "https", "az", "azure", "gs", "dav", "davs"):
        raise StorageURLError(f"unsupported scheme {scheme!r}")
    # urlsplit would happily keep "user:secret@" in netloc: detect user info without echoing it.
    netloc_raw = url[len(scheme) + 3 :].split("/", 1)[0]
    if "@" in netloc_raw:
        raise StorageURLError("credentials must not be embedded in the storage URL (use the credentials mechanism)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # bad port, bad IPv6 literal
        raise StorageURLError(f"malformed URL ({exc})") from None
    if parts.query or parts.fragment:
        raise StorageURLError("the storage URL must not have a query string or fragment")
    # Names are case-sensitive (an upper-case bucket is invalid), so keep the host as written;
    # only the AWS/Azure service suffixes are matched case-insensitively below.
    host = netloc_raw.rsplit(":", 1)[0] if port is not None else netloc_raw
    path = parts.path

    if scheme in ("dav", "davs"):
        return _webdav(scheme, host, netloc_raw, path)

    if scheme == "gs":
        bucket, rest = host, path
        return StorageURL("gcs", _check_gcs_bucket(bucket), _clean_path(rest))

    if scheme in ("az", "azure"):
        m = _AZ_HOST.match(host)
        if m:
            account = m.group("account")
            if not _AZ_ACCOUNT.match(account):
                raise StorageURLError(f"invalid Azure storage account name {account!r}: 3-24 lowercase letters and digits")
            container, rest = _split_first(path)
            return StorageURL(
                "azure", _check_container(container), _clean_path(rest), account=account, azure_kind=m.group("kind").lower()  # type: ignore[arg-type]
            )
        if "." in host or port is not None:
            raise StorageURLError(f"unknown Azure host {host!r}; use <account>.blob.core.windows.net or <account>.dfs.core.windows.net")
        return StorageURL("azure", _check_container(host), _clean_path(path))

    # S3 and https
    m = _AWS_VHOST.match(host)
    if m:
        return StorageURL(
            "s3", _check_s3_bucket(m.group("bucket")), _clean_path(path), region=_check_region(m.group("region"))
        )
    m = _AWS_PATH_STYLE.match(host)
    if m:
        bucket, rest = _split_first(path)
        return StorageURL("s3", _check_s3_bucket(bucket), _clean_path(rest), region=_check_region(m.group("region")))
    if host.lower().endswith("amazonaws.com"):
        raise StorageURLError(f"unrecognised AWS host {host!r}")
    is_host = scheme == "https" or "." in host or port is not None or host.lower() == "localhost"
    if not is_host:
        return StorageURL("s3", _check_s3_bucket(host), _clean_path(path), region=DEFAULT_S3_REGION)
    if not host:
        raise StorageURLError("the URL names no host")
    bucket, rest = _split_first(path)
    netloc = netloc_raw.lower()
    return StorageURL("s3", _check_s3_bucket(bucket), _clean_path(rest), endpoint=f"https://{netloc}")


def _webdav(scheme: str, host: str, netloc: str, path: str) -> StorageURL:
    from urllib.parse import unquote

    if not host:
        raise StorageURLError("the URL names no host")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise StorageURLError("the path is not UTF-8 once percent-decoded") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise StorageURLError("the path holds control characters once percent-decoded")
    http = "https" if scheme == "davs" else "http"
    return StorageURL("webdav", _clean_path(decoded), "", endpoint=f"{http}://{netloc.lower()}")
