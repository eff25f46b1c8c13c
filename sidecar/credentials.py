"""Credential sources, looked up per storage name; first match wins.

1. A credentials directory in the layout of a mounted Kubernetes Secret:
   `<credentials-dir>/<storage-name>/<field>`, read at each lookup so a rotated Secret is seen.
   A file readable by others (mode o+r) is refused: mount the Secret with `defaultMode: 0400`
   (or 0440 with the session's group).
2. Environment variables, per provider (see `ENV_FIELDS`), optionally prefixed with the storage
   name: `<NAME>_AWS_ACCESS_KEY_ID` wins over `AWS_ACCESS_KEY_ID` (name upper-cased, '-' -> '_').
3. On a laptop, the local store: the system keyring when the `keyring` package and a usable
   backend exist, else `~/.config/storage-sidecar/credentials.json`, which must be mode 0600
   (a looser file is refused, never read).
(Credentials the launcher POSTs to the control socket are kept in the daemon's memory and win
over all of these; see sidecar.daemon.)

Values are registered with the log redactor as soon as they are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sidecar.log import get_logger, register_secret

log = get_logger(__name__)


class InsecureCredentials(Exception):
    """A credentials file that others can read."""

FIELDS: dict[str, tuple[str, ...]] = {
    "s3": ("access_key_id", "secret_access_key", "session_token"),
    "azure": ("account_key", "sas_token", "connection_string"),
    "gcs": ("service_account.json",),
}

ENV_FIELDS: dict[str, dict[str, str]] = {
    "s3": {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY", "session_token": "AWS_SESSION_TOKEN"},
    "azure": {"account_key": "AZURE_STORAGE_KEY", "sas_token": "AZURE_STORAGE_SAS_TOKEN", "connection_string": "AZURE_STORAGE_CONNECTION_STRING"},
    "gcs": {"service_account.json": "GOOGLE_APPLICATION_CREDENTIALS_JSON"},
}


def from_directory(directory: str | os.PathLike[str] | None, name: str, provider: str) -> dict[str, str]:
    if not directory:
        return {}
    base = Path(directory) / name
    found: dict[str, str] = {}
    for field in FIELDS[provider]:
        path = base / field
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if mode & 0o004:
            log.error("credential_file_refused", path=str(path), reason="readable by other users; use mode 0400 or 0440")
            continue
        try:
            found[field] = path.read_text().strip()
        except (IsADirectoryError, PermissionError):
            continue
    return found


def local_store_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "storage-sidecar" / "credentials.json"


def _keyring():  # type: ignore[no-untyped-def]
    if os.environ.get("STORAGE_SIDECAR_NO_KEYRING"):
        return None
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    backend = keyring.get_keyring()
    return None if isinstance(backend, fail.Keyring) or "fail" in type(backend).__module__ else keyring


def from_local_store(name: str, provider: str) -> dict[str, str]:
    kr = _keyring()
    if kr is not None:
        raw = kr.get_password("storage-sidecar", name)
        return json.loads(raw) if raw else {}
    path = local_store_path()
    if not path.exists():
        return {}
    if path.stat().st_mode & 0o077:
        raise InsecureCredentials(f"{path} is readable by others; run `chmod 600 {path}`")
    doc = json.loads(path.read_text() or "{}")
    return {k: v for k, v in doc.get(name, {}).items() if k in FIELDS[provider]}


def save_local(name: str, values: dict[str, str]) -> str:
    """Saves credentials in the local store; returns where."""
    kr = _keyring()
    if kr is not None:
        kr.set_password("storage-sidecar", name, json.dumps(values))
        return "the system keyring"
    path = local_store_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {}
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise InsecureCredentials(f"{path} is readable by others; run `chmod 600 {path}`")
        doc = json.loads(path.read_text() or "{}")
    doc[name] = values
    fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(f"{path}.tmp", path)
    return str(path)


def from_environment(name: str, provider: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    prefix = name.upper().replace("-", "_") + "_"
    found: dict[str, str] = {}
    for field, var in ENV_FIELDS[provider].items():
        value = env.get(prefix + var) or env.get(var)
        if value:
            found[field] = value
    return found


def _local_or_empty(name: str, provider: str) -> dict[str, str]:
    try:
        return from_local_store(name, provider)
    except InsecureCredentials as exc:
        log.error("credential_store_refused", reason=str(exc))
        return {}


def lookup(name: str, provider: str, *, directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Credentials for storage `name`: the first source that has any wins."""
    for source in (from_directory(directory, name, provider), from_environment(name, provider), _local_or_empty(name, provider)):
        if source:
            for value in source.values():
                register_secret(value)
            return source
    return {}
