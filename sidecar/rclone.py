"""Storages in rclone's terms: rclone remotes and Renku's data connectors, made into ours.

Renku keeps every cloud storage as an rclone configuration (`{"type": "s3", "provider": "AWS",
...}`) plus a `source_path` ("bucket/folder"); users paste sections of their own `rclone.conf`.
`storage_from_rclone` turns one such configuration into the manifest's own form (provider, url,
options), option by option: every option is either translated, accepted with a stated reason
(it only matters when creating buckets, which the sidecar never does), or refused by name with
the reason. Nothing is ignored silently. Secret options never belong in a manifest (they come
from the credentials sources, named as rclone names them: `credential_field` maps them); values
rclone wrote in its obscured form are revealed with `reveal`.

The table of what each option becomes is in the README ("Storages in rclone's terms").
"""

from __future__ import annotations

import base64
import configparser
import re
from typing import Any

# rclone's fixed key for "obscured" config values (not encryption: it keeps passwords from being
# read over a shoulder; rclone documents it as such, and `rclone reveal` undoes it).
_OBSCURE_KEY = bytes.fromhex("9c935b48730a554d6bfd7c63c886a92bd390198eb8128afbf4de162b8b95f638")

TYPES = {"s3": "s3", "azureblob": "azure", "google cloud storage": "gcs", "webdav": "webdav"}

# The S3 providers rclone names; the name changes rclone's own defaults, not the S3 API the
# sidecar speaks (ranged GETs with If-Match, conditional PUTs, multipart uploads). Which were
# mounted in the tests: the README's table.
S3_PROVIDERS = {
    "AWS", "Alibaba", "ArvanCloud", "Ceph", "ChinaMobile", "Cloudflare", "DigitalOcean", "Dreamhost", "GCS", "HuaweiOBS", "IBMCOS",
    "IDrive", "IONOS", "LyveCloud", "Leviia", "Liara", "Linode", "Magalu", "Minio", "Netease", "Outscale", "Petabox", "RackCorp",
    "Rclone", "Scaleway", "SeaweedFS", "Selectel", "StackPath", "Storj", "Synology", "TencentCOS", "Wasabi", "Qiniu", "Other",
}

# Secret options: never in a manifest; from the credentials sources, under these names.
SECRETS: dict[str, dict[str, str]] = {  # rclone type -> rclone option -> our credential field
    "s3": {"access_key_id": "access_key_id", "secret_access_key": "secret_access_key", "session_token": "session_token"},
    "azureblob": {"key": "account_key", "sas_url": "sas_token", "connection_string": "connection_string", "client_secret": ""},
    "google cloud storage": {"service_account_credentials": "service_account.json", "client_secret": "", "token": ""},
    "webdav": {"pass": "password", "bearer_token": "bearer_token"},
}

UNUSED = "accepted, without effect: it only matters when creating buckets, which the sidecar never does"


class RcloneError(ValueError):
    """One option (or the type) that cannot be used: `field` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def reveal(value: str) -> str:
    """The plain text of a value `rclone obscure` wrote (base64url of a 16-byte IV and the text
    under AES-CTR with rclone's fixed key). ValueError if it is not one."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError):
        raise ValueError("not an obscured value (not base64)") from None
    if len(raw) < 16:
        raise ValueError("not an obscured value (too short)")
    decryptor = Cipher(algorithms.AES(_OBSCURE_KEY), modes.CTR(raw[:16])).decryptor()
    try:
        return (decryptor.update(raw[16:]) + decryptor.finalize()).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not an obscured value (not text once revealed)") from None


def parse_config(text: str) -> dict[str, dict[str, str]]:
    """The remotes of an rclone.conf: {name: {option: value}} (values as written)."""
    parser = configparser.RawConfigParser(default_section="\0none", interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # option names are case-sensitive
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise ValueError(f"not an rclone config: {str(exc).splitlines()[0]}") from None
    return {name: dict(parser.items(name)) for name in parser.sections()}


def _bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RcloneError(field, "must be true or false")


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(ord(c) < 0x20 for c in value):
        raise RcloneError(field, "must be non-empty text without control characters")
    return value


def _endpoint(field: str, value: Any) -> str:
    url = _text(field, value)
    if not re.match(r"^https?://", url):
        url = "https://" + url  # rclone takes a bare host name
    if not re.fullmatch(r"https?://[^/\s@?#]+(/[^\s@?#]*)?", url):
        raise RcloneError(field, "must be a host name or an http(s) URL without user info, query string or fragment")
    return url.rstrip("/")


def _split_source(source_path: str, loc: str) -> tuple[str, str]:
    bucket, _, folder = source_path.strip("/").partition("/")
    if not bucket:
        raise RcloneError(loc, "must name the bucket (or container): bucket/folder")
    return bucket, folder


def storage_from_rclone(config: dict[str, Any], source_path: str, *, loc: str = "configuration", source_loc: str = "source_path") -> dict[str, Any]:
    """Our storage form ({provider, url, options, rclone_type}) of an rclone configuration and
    its `source_path` ("bucket/folder"). Raises RcloneError naming the first unusable field."""
    if not isinstance(config, dict):
        raise RcloneError(loc, "must be an object of rclone options")
    kind = config.get("type")
    supported = ", ".join(sorted(TYPES))
    if not isinstance(kind, str):
        raise RcloneError(f"{loc}.type", f"missing: the rclone type ({supported})")
    if kind not in TYPES:
        shown = repr(kind) if re.fullmatch(r"[a-z0-9 ]{1,30}", kind) else "this"  # a value, never echoed unless a plain name
        raise RcloneError(f"{loc}.type", f"rclone type {shown} is not supported; supported: {supported}")
    for name in config:
        if name in SECRETS.get(kind, {}):
            raise RcloneError(f"{loc}.{name}", "is a secret; a manifest never holds secrets. Give it through the credentials "
                                               "directory (<dir>/<storage>/<option>), the environment or the control socket")
    options = {k: v for k, v in config.items() if k != "type"}
    if kind == "webdav":
        provider, url, ours = _webdav(options, source_path, loc, source_loc)
    else:
        bucket, folder = _split_source(source_path, source_loc)
        translate = {"s3": _s3, "azureblob": _azure, "google cloud storage": _gcs}[kind]
        provider, url, ours = translate(options, bucket, folder, loc)
    return {"provider": provider, "url": url, "options": ours, "rclone_type": kind}


def _s3(options: dict[str, Any], bucket: str, folder: str, loc: str) -> tuple[str, str, dict[str, Any]]:
    ours: dict[str, Any] = {}
    for name, value in options.items():
        field = f"{loc}.{name}"
        if name == "provider":
            if not isinstance(value, str) or value not in S3_PROVIDERS:
                raise RcloneError(field, f"not one of rclone's S3 providers: {', '.join(sorted(S3_PROVIDERS))}")
        elif name == "region":
            ours["region"] = _text(field, value)
        elif name == "endpoint":
            ours["endpoint_url"] = _endpoint(field, value)
        elif name == "requester_pays":
            ours["requester_pays"] = _bool(field, value)
        elif name == "env_auth":
            _bool(field, value)  # credentials from the environment are used when none are given, either way
        elif name == "force_path_style":
            if not _bool(field, value):
                raise RcloneError(field, "rclone option of type s3 not supported: false (virtual-host addressing); the sidecar addresses custom endpoints path-style")
        elif name in ("location_constraint", "no_check_bucket", "bucket_acl"):
            pass  # UNUSED (see the README's table)
        else:
            raise RcloneError(field, f"rclone option of type s3 not supported: {name!r}")
    return "s3", f"s3://{bucket}/{folder}".rstrip("/"), ours


EMULATOR_ACCOUNT = "devstoreaccount1"
EMULATOR_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"


def _azure(options: dict[str, Any], container: str, folder: str, loc: str) -> tuple[str, str, dict[str, Any]]:
    ours: dict[str, Any] = {}
    account = None
    for name, value in options.items():
        field = f"{loc}.{name}"
        if name == "account":
            account = _text(field, value)
        elif name == "endpoint":
            ours["endpoint_url"] = _endpoint(field, value)
        elif name == "use_emulator":
            if _bool(field, value):
                ours.setdefault("endpoint_url", EMULATOR_ENDPOINT)
                account = account or EMULATOR_ACCOUNT
        elif name == "env_auth":
            if _bool(field, value):
                raise RcloneError(field, "rclone option of type azureblob not supported: true (Azure AD credentials); give an account key or a SAS")
        else:
            raise RcloneError(field, f"rclone option of type azureblob not supported: {name!r}")
    if account is None:
        raise RcloneError(f"{loc}.account", "missing: the storage account's name")
    ours["account_name"] = account
    return "azure", f"az://{account}.blob.core.windows.net/{container}/{folder}".rstrip("/"), ours


def _gcs(options: dict[str, Any], bucket: str, folder: str, loc: str) -> tuple[str, str, dict[str, Any]]:
    ours: dict[str, Any] = {}
    for name, value in options.items():
        field = f"{loc}.{name}"
        if name == "anonymous":
            ours["anonymous"] = _bool(field, value)
        elif name == "endpoint":
            ours["endpoint_url"] = _endpoint(field, value)
        elif name in ("project_number", "location", "bucket_acl", "bucket_policy_only"):
            pass  # UNUSED (see the README's table)
        elif name == "service_account_file":
            raise RcloneError(field, "a file on the machine that wrote the config; give the key itself as the credential "
                                     "service_account_credentials")
        elif name == "env_auth":
            if _bool(field, value):
                raise RcloneError(field, "rclone option of type google cloud storage not supported: true (application default "
                                         "credentials); give a service account key, or anonymous = true")
        else:
            raise RcloneError(field, f"rclone option of type google cloud storage not supported: {name!r}")
    return "gcs", f"gs://{bucket}/{folder}".rstrip("/"), ours


WEBDAV_VENDORS = {"other", "nextcloud", "owncloud", "rclone", "fastmail"}
WEBDAV_REFUSED = {
    "sharepoint": "SharePoint signs in with cookies from a Microsoft login, which the sidecar does not do",
    "sharepoint-ntlm": "NTLM authentication is not supported",
}


def _webdav(options: dict[str, Any], source_path: str, loc: str, source_loc: str) -> tuple[str, str, dict[str, Any]]:
    """The server's `url` plus `source_path` (a folder below it, which may be empty) is the
    served folder: dav(s)://host/path."""
    from urllib.parse import quote, unquote, urlsplit

    ours: dict[str, Any] = {}
    base = None
    for name, value in options.items():
        field = f"{loc}.{name}"
        if name == "url":
            base = _endpoint(field, value)
        elif name == "vendor":
            value = _text(field, value)
            if value in WEBDAV_REFUSED:
                raise RcloneError(field, f"rclone option of type webdav not supported: {value!r} ({WEBDAV_REFUSED[value]})")
            if value not in WEBDAV_VENDORS:
                raise RcloneError(field, f"not one of rclone's WebDAV vendors: {', '.join(sorted(WEBDAV_VENDORS | set(WEBDAV_REFUSED)))}")
            ours["vendor"] = value
        elif name == "user":
            ours["user"] = _text(field, value)
        elif name == "bearer_token_command":
            raise RcloneError(field, "rclone option of type webdav not supported: a command to run; give the token itself as the credential bearer_token")
        else:
            raise RcloneError(field, f"rclone option of type webdav not supported: {name!r}")
    if base is None:
        raise RcloneError(f"{loc}.url", "missing: the WebDAV server's URL")
    parts = urlsplit(base)
    path = "/".join(p for p in (unquote(parts.path).strip("/"), source_path.strip("/")) if p)
    if any(s in (".", "..") for s in path.split("/")):
        raise RcloneError(source_loc, "must not contain '.' or '..' segments")
    scheme = "davs" if parts.scheme == "https" else "dav"
    return "webdav", f"{scheme}://{parts.netloc}/{quote(path)}".rstrip("/"), ours


def credential_field(rclone_type: str, option: str) -> str | None:
    """Our credential field for a secret option rclone names (None: not one we use)."""
    return SECRETS.get(rclone_type, {}).get(option) or None


def options_for(provider: str) -> list[str]:
    """The secret options, as rclone names them, that give credentials of `provider` (ours:
    s3, azure, gcs, webdav) under a name of their own."""
    kinds = [k for k, ours in TYPES.items() if ours == provider]
    return [o for k in kinds for o, field in SECRETS[k].items() if field and o != field]


def credential_from_option(provider: str, option: str, value: str) -> tuple[str, str]:
    """(our field, its value) of a secret option rclone names: an Azure `sas_url` gives its query
    string as the SAS token; a WebDAV `pass` is in rclone's obscured form (rclone keeps it only
    so) and is revealed. ValueError if the value cannot be used."""
    kinds = [k for k, ours in TYPES.items() if ours == provider]
    field = next(SECRETS[k][option] for k in kinds if SECRETS[k].get(option))
    if option == "sas_url":
        from urllib.parse import urlsplit

        query = urlsplit(value).query
        if not query:
            raise ValueError("a SAS URL must carry its signature as a query string")
        return field, query
    if option == "pass":
        try:
            return field, reveal(value)
        except ValueError as exc:
            raise ValueError(f"{exc}: rclone's `pass` is obscured (rclone obscure); give a plain password as `password`") from None
    return field, value
