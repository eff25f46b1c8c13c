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

Every source is untrusted input: a credential file must be a regular file (symlinks are followed
only within the credentials directory, as a mounted Secret's `..data` links are), at most
MAX_FILE_BYTES, UTF-8 text (`service_account.json`: a JSON object); the directory must belong to
the daemon's user or root and not be writable by others; the local store must be a JSON object.
Anything else raises `CredentialProblem` naming the source, which the daemon reports as
`credentials_invalid` for that one storage. Files are opened non-blocking, so a FIFO never
hangs a read, and the daemon calls `lookup` in a worker thread under a deadline.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
from pathlib import Path

from sidecar.log import get_logger, register_secret

log = get_logger(__name__)


class InsecureCredentials(Exception):
    """A credentials file that others can read."""


class CredentialProblem(Exception):
    """A credential source that cannot be used; the message names it and says why."""


MAX_FILE_BYTES = 64 * 1024
FIELDS: dict[str, tuple[str, ...]] = {
    "s3": ("access_key_id", "secret_access_key", "session_token"),
    "azure": ("account_key", "sas_token", "connection_string"),
    "gcs": ("service_account.json",),
    "webdav": ("password", "bearer_token"),
}

ENV_FIELDS: dict[str, dict[str, str]] = {
    "s3": {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY", "session_token": "AWS_SESSION_TOKEN"},
    "azure": {"account_key": "AZURE_STORAGE_KEY", "sas_token": "AZURE_STORAGE_SAS_TOKEN", "connection_string": "AZURE_STORAGE_CONNECTION_STRING"},
    "gcs": {"service_account.json": "GOOGLE_APPLICATION_CREDENTIALS_JSON"},
    "webdav": {"password": "WEBDAV_PASSWORD", "bearer_token": "WEBDAV_BEARER_TOKEN"},
}


def _check_directory(path: Path, *, sticky_ok: bool = False) -> None:
    """Owned by the daemon's user or root, not writable by others. (`sticky_ok`: a world-writable
    directory with the sticky bit, as a Kubernetes Secret volume's root can be, where nobody can
    replace another's entries; the per-storage folder below it is checked strictly.)"""
    st = os.stat(path)
    if st.st_uid not in (os.getuid(), 0):
        raise CredentialProblem(f"{path} belongs to another user (uid {st.st_uid}); it must be the daemon's or root's")
    if st.st_mode & 0o002 and not (sticky_ok and st.st_mode & stat_mod.S_ISVTX):
        raise CredentialProblem(f"{path} is writable by other users; it must not be")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be a credential (None if it can): it must be text an HTTP client can
    sign and send: encodable as UTF-8 (no lone surrogate, as a POSTed "\\udcff" or an environment
    variable of stray bytes gives), no control characters but the line breaks and tabs of a PEM key."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not text (a lone surrogate, or bytes that are not UTF-8)"
    if any((ord(c) < 0x20 and c not in "\n\r\t") or ord(c) == 0x7F for c in value):
        return "holds control characters"
    return None


def read_credential_file(path: Path, root: Path) -> str:
    """The text of one credential file, checked as the module docstring says."""
    try:
        real = Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        raise CredentialProblem(f"{path}: {exc.strerror or exc}") from None
    real_root = Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise CredentialProblem(f"{path} links outside the credentials directory {root}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialProblem(f"{path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat_mod.S_ISREG(st.st_mode):
            raise CredentialProblem(f"{path} is not a regular file")
        if st.st_uid not in (os.getuid(), 0):
            raise CredentialProblem(f"{path} belongs to another user (uid {st.st_uid})")
        if st.st_mode & 0o004:
            raise InsecureCredentials(f"{path} is readable by other users; use mode 0400 or 0440")
        if st.st_size > MAX_FILE_BYTES:
            raise CredentialProblem(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise CredentialProblem(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialProblem(f"{path} is not UTF-8 text") from None
    if any(ord(c) < 0x20 and c not in "\n\r\t" for c in text):
        raise CredentialProblem(f"{path} holds control characters; it must be text")
    if path.name.endswith(".json"):
        try:
            if not isinstance(json.loads(text), dict):
                raise ValueError
        except (ValueError, RecursionError):
            raise CredentialProblem(f"{path} is not a JSON object") from None
    return text


def from_directory(directory: str | os.PathLike[str] | None, name: str, provider: str) -> dict[str, str]:
    if not directory:
        return {}
    root = Path(directory)
    base = root / name
    if not base.is_dir():
        return {}
    _check_directory(root, sticky_ok=True)
    _check_directory(base)
    found: dict[str, str] = {}
    for field in FIELDS[provider]:
        path = base / field
        if not os.path.lexists(path):
            continue
        try:
            found[field] = read_credential_file(path, root)
        except InsecureCredentials as exc:
            log.error("credential_file_refused", path=str(path), reason=str(exc))
    from sidecar.rclone import credential_from_option, options_for

    for option in options_for(provider):  # as rclone names them (a Secret built from a data connector)
        path = base / option
        if not os.path.lexists(path):
            continue
        try:
            field, value = credential_from_option(provider, option, read_credential_file(path, root))
        except InsecureCredentials as exc:
            log.error("credential_file_refused", path=str(path), reason=str(exc))
            continue
        except ValueError as exc:
            raise CredentialProblem(f"{path}: {exc}") from None
        found.setdefault(field, value)
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
    if not os.path.lexists(path):
        return {}
    try:
        if os.lstat(path).st_mode & 0o077:
            raise InsecureCredentials(f"{path} is readable by others; run `chmod 600 {path}`")
        doc = json.loads(read_credential_file(path, path.parent) or "{}")
    except (OSError, ValueError) as exc:
        raise CredentialProblem(f"the local credential store {path} cannot be read: {exc}") from None
    entry = doc.get(name, {})
    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
        raise CredentialProblem(f"the local credential store {path} has a malformed entry for {name!r}")
    return {k: v for k, v in entry.items() if k in FIELDS[provider]}


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


def secret_variables(environ: dict[str, str] | None = None) -> list[str]:
    """Names of environment variables that hold credentials of some storage (any prefix)."""
    env = os.environ if environ is None else environ
    names = {var for fields in ENV_FIELDS.values() for var in fields.values()}
    return [k for k in env if any(k == n or k.endswith("_" + n) for n in names)]


def lookup(name: str, provider: str, *, directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Credentials for storage `name`: the first source that has any wins. Raises
    CredentialProblem for a source that cannot be used (never anything else)."""
    sources = (lambda: from_directory(directory, name, provider), lambda: from_environment(name, provider),
               lambda: _local_or_empty(name, provider))
    for read in sources:
        try:
            source = read()
        except OSError as exc:
            raise CredentialProblem(f"credentials of {name!r}: {exc.strerror or exc}") from None
        if source:
            for field, value in source.items():
                problem = text_problem(value)
                if problem:
                    raise CredentialProblem(f"credentials of {name!r}: {field} {problem}")
                register_secret(value)
            return source
    return {}
