"""Credential sources, looked up per storage name; first match wins.

1. A credentials directory in the layout of a mounted Kubernetes Secret:
   `<credentials-dir>/<storage-name>/<field>`, read at each lookup so a rotated Secret is seen.
2. Environment variables, per provider (see `ENV_FIELDS`), optionally prefixed with the storage
   name: `<NAME>_AWS_ACCESS_KEY_ID` wins over `AWS_ACCESS_KEY_ID` (name upper-cased, '-' -> '_').

Values are registered with the log redactor as soon as they are read.
"""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.log import register_secret

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
        try:
            found[field] = (base / field).read_text().strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
    return found


def from_environment(name: str, provider: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    prefix = name.upper().replace("-", "_") + "_"
    found: dict[str, str] = {}
    for field, var in ENV_FIELDS[provider].items():
        value = env.get(prefix + var) or env.get(var)
        if value:
            found[field] = value
    return found


def lookup(name: str, provider: str, *, directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Credentials for storage `name`: the first source that has any wins."""
    for source in (from_directory(directory, name, provider), from_environment(name, provider)):
        if source:
            for value in source.values():
                register_secret(value)
            return source
    return {}
