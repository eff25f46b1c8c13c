"""The mount manifest: which storages a project has (`RemoteStorage`) and where they appear
(`StorageMount`). The launcher writes it, the daemon reads it.

Invariants after `load`/`parse_manifest` succeeds:
- every storage has an id and a unique slug `name`; every mount has an id, a unique `name` and a
  resolved `storage` object; mount paths are absolute, inside `root`, unique and not nested;
- no field holds a secret (names that look like one are refused before validation);
- `options` only holds keys from the provider's allowlist, so nothing can make a backend read
  local files or run commands.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sidecar import urls
from sidecar.protocol import DEADLINE, KERNEL_READAHEAD_KB, METADATA_TTL, METADATA_TTL_READONLY, REOPENS_TO_SWITCH, WRITEBACK_DELAY
from sidecar.rclone import WEBDAV_VENDORS

DEFAULT_INSTANCE = "renkulab.io"

# Allowed `options` per provider and their types. Nothing here names a local file or a command.
PROVIDER_OPTIONS: dict[str, dict[str, type]] = {
    "s3": {"endpoint_url": str, "region": str, "anonymous": bool, "requester_pays": bool},
    "azure": {"account_name": str, "endpoint_url": str, "anonymous": bool},
    "gcs": {"endpoint_url": str, "project": str, "anonymous": bool, "requester_pays": bool},
    "webdav": {"vendor": str, "user": str, "anonymous": bool},
}

# The shape of string options other than endpoint_url: what the providers' own names allow, so a
# value that is a URL, holds a secret or a control character never reaches a backend or a log.
OPTION_PATTERNS: dict[str, tuple[re.Pattern[str], str]] = {
    # AWS: us-east-1, eu-central-2, us-gov-west-1, cn-north-1; S3-compatible hosts use names as
    # free as "ch-gva-2", "nyc3", "fr-par", "garage": letters, digits, dashes and underscores.
    "region": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"), "a region name: letters, digits, '-' and '_' (e.g. us-east-1)"),
    # Azure: 3-24 lower-case letters and digits (devstoreaccount1 for Azurite).
    "account_name": (re.compile(r"^[a-z0-9]{3,24}$"), "an Azure storage account name: 3-24 lower-case letters and digits"),
    # rclone's WebDAV vendors that the sidecar serves (sidecar.store.webdav).
    "vendor": (re.compile(f"^({'|'.join(sorted(WEBDAV_VENDORS))})$"), f"one of {', '.join(sorted(WEBDAV_VENDORS))}"),
    # A user name for HTTP basic authentication: printable, no ':' (it ends the name there).
    "user": (re.compile(r"^[^\x00-\x1f\x7f:]{1,256}$"), "a user name: 1-256 printable characters, no ':'"),
    # GCP project ids: 6-30 characters, a letter first, no dash last; legacy domain-scoped
    # ids ("example.com:my-project") are accepted too.
    "project": (re.compile(r"^([a-z][a-z0-9.-]{0,62}:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$"), "a Google Cloud project id: 6-30 lower-case letters, digits and '-'"),
}

# Substrings that mark a secret anywhere in a field name, and short words that only do as a whole
# word (so "accessKey", "account_key" and "sas" match, while "keywords" or "sasquatch" do not).
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "signature", "connectionstring", "privatekey")
_SECRET_WORDS = {"key", "sas", "pwd"}
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


MAX_MANIFEST_BYTES = 1 << 20
MAX_DEPTH = 32


def _no_control_characters(v: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise ValueError("must not contain control characters (NUL, newline, tab, ...)")


class ManifestError(ValueError):
    """A manifest that cannot be used; `errors` holds (field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in errors)
        super().__init__(f"invalid manifest ({len(errors)} error{'s' if len(errors) != 1 else ''}):\n{lines}")


def _looks_secret(field: str) -> bool:
    squashed = re.sub(r"[^a-z0-9]", "", field.lower())
    if any(part in squashed for part in _SECRET_PARTS):
        return True
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", field)}
    return bool(words & _SECRET_WORDS)


def find_secret_fields(doc: Any, loc: str = "") -> list[tuple[str, str]]:
    """Field paths in a raw document whose names look like they hold a secret."""
    found: list[tuple[str, str]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{loc}.{k}" if loc else str(k)
            if isinstance(k, str) and _looks_secret(k):
                found.append(
                    (
                        here,
                        "looks like a secret; a manifest never holds secrets. Provide credentials through "
                        "the credentials directory, environment variables or the control socket (README: Credentials)",
                    )
                )
            else:
                found.extend(find_secret_fields(v, here))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found.extend(find_secret_fields(v, f"{loc}[{i}]"))
    return found


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:63]
    return slug or "storage"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, validate_assignment=False)


class RemoteStorage(_Model):
    id: str | None = None
    name: str | None = None
    provider: Literal["s3", "azure", "gcs", "webdav"]
    url: str
    readonly: bool = True
    options: dict[str, Any] = Field(default_factory=dict)
    rclone_type: str | None = None  # given in rclone's terms (an rclone remote, a data connector): its type

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, v: str | None) -> str | None:
        if v is not None and not _SLUG.match(v):
            raise ValueError("must be a slug: 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RemoteStorage":
        try:
            parsed = urls.parse(self.url)
        except urls.StorageURLError as exc:
            raise ValueError(f"url: {exc}") from None
        if parsed.provider != self.provider:
            raise ValueError(f"url is a {parsed.provider} URL but provider is {self.provider!r}")
        allowed = PROVIDER_OPTIONS[self.provider]
        for key, value in self.options.items():
            if key not in allowed:
                raise ValueError(
                    f"options.{key}: unknown option for provider {self.provider!r}; allowed: {', '.join(sorted(allowed))}"
                )
            if not isinstance(value, allowed[key]):
                raise ValueError(f"options.{key}: must be a {allowed[key].__name__}")
            if key in OPTION_PATTERNS and not OPTION_PATTERNS[key][0].fullmatch(value):
                raise ValueError(f"options.{key}: must be {OPTION_PATTERNS[key][1]}")
            if key == "endpoint_url" and not re.fullmatch(r"https?://[^/\s@?#]+(/[^\s@?#]*)?", value):
                # no user info, query or fragment: a signature or SAS token could hide there
                raise ValueError("options.endpoint_url: must be an http:// or https:// URL without user info, query string or fragment")
        return self

    @property
    def parsed(self) -> urls.StorageURL:
        return urls.parse(self.url)


class StorageMount(_Model):
    id: str | None = None
    name: str | None = None
    storage: str
    mountpath: str
    source_path: str = ""
    metadata_ttl: float | None = Field(
        default=None, ge=0, le=86400,
        description=f"seconds listings and attributes are cached (default: {METADATA_TTL_READONLY:g} for read-only storages, {METADATA_TTL:g} for writable ones)",
    )
    deadline: float = Field(default=DEADLINE, gt=0, le=600, description="seconds before a backend call fails with EIO (transfers: seconds without progress)")
    mode: Literal["mount", "copy"] = Field(default="mount", description="mount: a FUSE mount; copy: downloaded into the mount path as ordinary files")
    copy_limit: int | None = Field(default=None, gt=0, description="bytes a copy may hold (default: the daemon's --copy-limit)")
    prefetch: list[str] = Field(default_factory=list, description="folders or files (in the mount) to warm the disk cache with at start")
    mtime_source: Literal["listing", "metadata"] = Field(
        default="listing",
        description="listing: mtimes from the listing (Last-Modified, or a time set through this mount); "
        "metadata: also each object's `mtime` metadata (rclone's), one HEAD per new object version",
    )
    write_mode: Literal["durable", "writeback"] = Field(
        default="durable", description="durable: close returns once stored; writeback: once staged on local disk, uploaded in the background"
    )
    writeback_delay: float = Field(
        default=WRITEBACK_DELAY, ge=0, le=3600,
        description="writeback: seconds a closed file waits before its upload (a file written again meanwhile waits again, and is sent once)",
    )

    kernel_readahead_kb: int | None = Field(
        default=None, ge=128, le=65536,
        description=f"KiB the kernel reads ahead of a reader and around a page fault of a memory-mapped file (default: "
        f"the daemon's, {KERNEL_READAHEAD_KB}); 1024 suits model files loaded by mmap (safetensors), see the README",
    )
    passthrough: bool = Field(
        default=True,
        description="a file whose whole version is in the disk cache is read by the kernel from the cache "
        "file itself (FUSE passthrough, Linux 6.9+, a sidecar with CAP_SYS_ADMIN); false: every read through the sidecar",
    )
    zero_message_opens: bool | Literal["auto"] = Field(
        default=False,
        description="read-only storages: files are opened and closed by the kernel without asking the sidecar, and a file "
        "read before is read again from the page cache with no request (training epochs); no passthrough then. "
        f"auto: opens are asked (and passed through) until {REOPENS_TO_SWITCH} files were opened again, then no longer",
    )

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, v: str | None) -> str | None:
        return RemoteStorage._name_is_slug(v)

    @field_validator("source_path")
    @classmethod
    def _source_path(cls, v: str) -> str:
        _no_control_characters(v)
        segments = [s for s in v.split("/") if s]
        if any(s in (".", "..") for s in segments):
            raise ValueError("must be a folder inside the storage, without '.' or '..'")
        return "/".join(segments)

    @field_validator("mountpath")
    @classmethod
    def _mountpath(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        _no_control_characters(v)
        return v


class Manifest(_Model):
    root: str
    instance: str = DEFAULT_INSTANCE
    storages: list[RemoteStorage]
    mounts: list[StorageMount]

    @field_validator("root")
    @classmethod
    def _root_absolute(cls, v: str) -> str:
        _no_control_characters(v)
        if not os.path.isabs(v):
            raise ValueError("must be an absolute path")
        return os.path.normpath(v)

    @field_validator("instance")
    @classmethod
    def _instance_host(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9.-]+(:\d+)?$", v):
            raise ValueError("must be a host name like renkulab.io")
        return v

    def storage_for(self, mount: StorageMount) -> RemoteStorage:
        for s in self.storages:
            if mount.storage in (s.id, s.name):
                return s
        raise KeyError(mount.storage)

    def mount_named(self, name: str) -> StorageMount:
        for m in self.mounts:
            if m.name == name:
                return m
        raise KeyError(name)


def storage_id(instance: str, parsed: urls.StorageURL) -> str:
    """`https://<instance>/storage/<provider>/<host>/<bucket|container>`, as the project metadata model does."""
    return f"https://{instance}/storage/{parsed.provider}/{parsed.host}/{parsed.bucket}"


def _resolve(m: Manifest) -> list[tuple[str, str]]:
    """Fills derived fields and checks cross-references; returns (field path, message) errors."""
    errors: list[tuple[str, str]] = []
    seen_ids: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    for i, s in enumerate(m.storages):
        parsed = s.parsed
        if s.id is None:
            s.id = storage_id(m.instance, parsed)
        if s.name is None:
            s.name = slugify(parsed.label)
        if s.id in seen_ids:
            errors.append((f"storages[{i}].id", f"duplicates storages[{seen_ids[s.id]}].id; give each storage its own id"))
        seen_ids.setdefault(s.id, i)
        if s.name in seen_names:
            errors.append((f"storages[{i}].name", f"{s.name!r} is already used by storages[{seen_names[s.name]}]; set a unique name"))
        seen_names.setdefault(s.name, i)

    root = Path(os.path.realpath(m.root))
    use_count: dict[str, int] = {}
    targets: list[tuple[int, Path]] = []
    mount_names: dict[str, int] = {}
    for i, mt in enumerate(m.mounts):
        try:
            storage = m.storage_for(mt)
        except KeyError:
            errors.append((f"mounts[{i}].storage", f"{mt.storage!r} is not the id or name of any storage in storages"))
            continue
        mt.storage = storage.id  # type: ignore[assignment]
        use_count[storage.id] = use_count.get(storage.id, 0) + 1  # type: ignore[index]
        raw = mt.mountpath
        joined = Path(raw) if os.path.isabs(raw) else Path(m.root) / raw
        # realpath resolves symlinks of the parts that exist, so a symlink out of root is caught.
        target = Path(os.path.realpath(joined))
        if target == root or root not in target.parents:
            errors.append((f"mounts[{i}].mountpath", f"{raw!r} must be a folder inside root {m.root!r} (no '..', no symlinks out of it)"))
            continue
        mt.mountpath = str(target)
        for j, other in targets:
            if other == target:
                errors.append((f"mounts[{i}].mountpath", f"the same path as mounts[{j}].mountpath"))
            elif other in target.parents or target in other.parents:
                errors.append((f"mounts[{i}].mountpath", f"nests with mounts[{j}].mountpath; mount paths must not be inside each other"))
        targets.append((i, target))

    for i, mt in enumerate(m.mounts):
        if not mt.mountpath.startswith("/") or mt.storage not in use_count:
            continue
        storage = m.storage_for(mt)
        if mt.name is None:
            if use_count[storage.id] == 1:  # type: ignore[index]
                mt.name = storage.name
            else:
                mt.name = slugify(f"{storage.name}-{Path(mt.mountpath).name}")
        if mt.name in mount_names:
            errors.append((f"mounts[{i}].name", f"{mt.name!r} is already used by mounts[{mount_names[mt.name]}]; set a unique name"))
        mount_names.setdefault(mt.name, i)  # type: ignore[arg-type]
        if mt.id is None:
            mt.id = f"https://{m.instance}/storage/mounts/{mt.name}"
    return errors


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def _depth(doc: Any) -> int:
    """Nesting depth of a decoded document, without recursion."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, d = todo.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        if isinstance(node, dict):
            todo.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, d + 1) for v in node)
    return deepest


RCLONE_FORM = {"id", "name", "rclone", "source_path", "readonly"}
# A Renku data connector's storage, field for field as Renku's data services return it.
DATA_CONNECTOR_FORM = {"storage_id", "project_id", "name", "storage_type", "configuration", "source_path", "target_path", "readonly"}


def _from_rclone_forms(doc: dict[str, Any], skip: set[str]) -> tuple[dict[str, Any], list[tuple[str, str]], bool]:
    """The document with every storage given in rclone's terms (an rclone remote, a data
    connector) written in the manifest's own form, and a data connector's `target_path` made a
    mount; the errors, by field path (those in `skip` are reported already)."""
    from sidecar.rclone import RcloneError, storage_from_rclone

    storages = doc.get("storages")
    if not isinstance(storages, list):
        return doc, [], False
    errors: list[tuple[str, str]] = []
    failed = False  # a storage in rclone's terms could not be read (its errors may be in `skip`)
    out: list[Any] = []
    mounts = list(doc["mounts"]) if isinstance(doc.get("mounts"), list) else doc["mounts"] if "mounts" in doc else []
    for i, st in enumerate(storages):
        loc = f"storages[{i}]"
        connector = isinstance(st, dict) and ("storage_type" in st or "configuration" in st)
        if not isinstance(st, dict) or not ("rclone" in st or connector):
            out.append(st)
            continue
        allowed = DATA_CONNECTOR_FORM if connector else RCLONE_FORM
        unknown = sorted(set(st) - allowed)
        if unknown:
            errors.extend((f"{loc}.{k}", f"unknown field of {'a data connector' if connector else 'an rclone remote'}; allowed: "
                                         f"{', '.join(sorted(allowed))}") for k in unknown if f"{loc}.{k}" not in skip)
            failed = True
            continue
        config = st.get("configuration") if connector else st.get("rclone")
        source = st.get("source_path", "")
        try:
            if connector and isinstance(config, dict) and st.get("storage_type") not in (None, config.get("type")):
                raise RcloneError(f"{loc}.storage_type", f"must be the configuration's type ({config.get('type')!r})")
            if not isinstance(source, str):
                raise RcloneError(f"{loc}.source_path", "must be text: bucket/folder")
            ours = storage_from_rclone(config, source, loc=f"{loc}.{'configuration' if connector else 'rclone'}", source_loc=f"{loc}.source_path")
        except RcloneError as exc:
            if exc.field not in skip:
                errors.append((exc.field, str(exc)))
            failed = True
            continue
        name = st.get("name") or slugify(source.strip("/").partition("/")[0])
        ours.update({k: st[k] for k in ("id", "readonly") if k in st}, name=name)
        if connector and st.get("storage_id") is not None:
            ours["id"] = st["storage_id"]
        out.append(ours)
        if connector and isinstance(mounts, list):
            target = st.get("target_path")
            if not isinstance(target, str) or not target:
                errors.append((f"{loc}.target_path", "must be the folder (relative to root) the storage appears at"))
            else:
                mounts.append({"storage": name, "mountpath": target})
    if "mounts" in doc or mounts:  # (a manifest without mounts stays one: the schema says so)
        doc = {**doc, "mounts": mounts}
    return {**doc, "storages": out}, errors, failed


def parse_manifest(doc: Any) -> Manifest:
    """Validates a decoded manifest document. Raises `ManifestError` with field-level errors."""
    if not isinstance(doc, dict):
        raise ManifestError([("(document)", "must be a JSON object with root, storages and mounts")])
    if _depth(doc) > MAX_DEPTH:
        raise ManifestError([("(document)", f"nested more than {MAX_DEPTH} levels deep")])
    # Every independent error at once: fields that look secret, then the schema's.
    errors = find_secret_fields(doc)
    secret_locs = {loc for loc, _ in errors}
    doc, form_errors, failed = _from_rclone_forms(doc, secret_locs)
    errors += form_errors
    if failed:  # the schema's errors of a storage not translated would only repeat these
        raise ManifestError(errors)
    try:
        manifest = Manifest.model_validate(doc)
    except ValidationError as exc:
        for e in exc.errors(include_input=False, include_url=False):
            msg = e["msg"].removeprefix("Value error, ")
            loc = _format_loc(e["loc"])
            # A model-level check names its own sub-field ("options.x: ..."): fold it into the path.
            m = re.match(r"^(url|options\.\w+): (.*)$", msg, re.S)
            if m:
                loc, msg = f"{loc}.{m.group(1)}", m.group(2)
            if loc not in secret_locs:  # "looks like a secret" says more than "unknown option"
                errors.append((loc, msg))
        raise ManifestError(errors) from None
    errors += _resolve(manifest)
    if errors:
        raise ManifestError(errors)
    return manifest


def load(path: str | os.PathLike[str]) -> Manifest:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError([("(document)", f"cannot read {path}: {exc.strerror}")]) from None
    return loads(raw)


def loads(text: str | bytes) -> Manifest:
    """Parses a manifest from JSON text or bytes. Never raises anything but ManifestError."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError([("(document)", f"larger than {MAX_MANIFEST_BYTES} bytes")])
    if isinstance(text, bytes):
        if text.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(text) > 1 and (text[0] == 0 or text[1] == 0)):
            raise ManifestError([("(document)", "must be UTF-8 (this looks like UTF-16)")])
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError([("(document)", f"must be UTF-8: invalid byte at offset {exc.start}")]) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError([("(document)", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]) from None
    except RecursionError:
        raise ManifestError([("(document)", f"nested more than {MAX_DEPTH} levels deep")]) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ManifestError([("(document)", f"not usable JSON: {str(exc).split(';')[0]}")]) from None
    return parse_manifest(doc)


def load_from_env(var: str = "STORAGE_SIDECAR_MANIFEST") -> Manifest | None:
    text = os.environ.get(var)
    return loads(text) if text else None
