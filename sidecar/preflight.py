"""The pre-flight check of one storage, run before it is mounted (by its worker, with the client
it mounts with; by `storage-sidecar check` on its own).

It lists one page of the mount's folder and, for writable storages (unless disabled), writes and
deletes a small probe object named `.storage-sidecar-write-probe-<random>` so users recognise it.
The outcome is one stable reason code:

  ok, credentials_missing, credentials_invalid, access_denied, bucket_not_found,
  endpoint_unreachable, timeout, readonly_no_write_permission

Missing or invalid credentials put the mount in `needs_credentials`; the others in `failed`.
Reasons are sentences for people and never contain secrets or request signatures.
"""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from sidecar import urls
from sidecar.protocol import CHECK_DEADLINE
from sidecar.store.bridge import run_on_loop
from sidecar.store.classify import chain, error_code, reason_of

CHECK_LIST_MAX = 1000  # entries the check's LIST asks for: a folder that fits is the mount's first listing

CREDENTIAL_CODES = {"credentials_missing", "credentials_invalid"}


@dataclass(frozen=True)
class CheckResult:
    code: str
    reason: str

    @property
    def ok(self) -> bool:
        return self.code == "ok"


REASONS = {
    "credentials_missing": "no credentials for storage {storage!r}",
    "credentials_invalid": "the credentials for storage {storage!r} were refused{detail}",
    "bucket_not_found": "the bucket of storage {storage!r} does not exist",
    "access_denied": "access to storage {storage!r} was denied",
    "endpoint_unreachable": "the endpoint of storage {storage!r} cannot be reached",
    "timeout": "storage {storage!r} did not answer in time",
}


def classify(exc: BaseException, storage: str) -> CheckResult:
    """The check's reason code for an exception of a backend call (sidecar.store.classify reads
    it, as it does for the mount's calls): a missing object during the check is a missing bucket,
    and anything unknown is an unreachable endpoint, named by its type."""
    reason = reason_of(exc)
    if reason == "not_found":
        reason = "bucket_not_found"
    if reason not in REASONS:
        return CheckResult("endpoint_unreachable", f"storage {storage!r} failed its check ({type(exc).__name__})")
    detail = ""
    if reason == "credentials_invalid":
        errors = chain(exc)
        code = next((c for c in map(error_code, errors) if c), "")
        detail = " (token exchange)" if any(type(e).__name__ == "RefreshError" for e in errors) else f" ({code})" if code else ""
    return CheckResult(reason, REASONS[reason].format(storage=storage, detail=detail))


async def check_s3(fs: Any, bucket: str, prefix: str, *, writable: bool, write_probe: bool) -> list[dict[str, Any]] | None:
    """Raises what the backend raises; returns when the storage is usable as configured, with
    the folder's entries (as s3fs lists them) when its listing fitted in the one page asked."""

    async def listing() -> Any:
        return await fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/",
                                 MaxKeys=CHECK_LIST_MAX)

    page = await run_on_loop(fs.loop, listing)
    if writable and write_probe:
        key = f"{prefix + '/' if prefix else ''}.storage-sidecar-write-probe-{pysecrets.token_hex(6)}"

        async def probe() -> None:
            await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=b"storage-sidecar write probe; safe to delete\n")
            await fs._call_s3("delete_object", Bucket=bucket, Key=key)

        try:
            await run_on_loop(fs.loop, probe)
        except Exception as exc:
            result = classify(exc, "")
            if result.code == "access_denied":
                raise WriteDenied() from exc
            raise
    if page.get("IsTruncated"):
        return None
    entries: list[dict[str, Any]] = []
    for p in page.get("CommonPrefixes", []):
        entries.append({"name": f"{bucket}/{p['Prefix'][:-1]}", "Size": 0, "size": 0, "type": "directory"})
    for c in page.get("Contents", []):
        entries.append({**c, "name": f"{bucket}/{c['Key']}", "size": c["Size"], "type": "file"})
    return entries


class WriteDenied(Exception):
    pass


async def check_fsspec(fs: Any, bucket: str, prefix: str, *, writable: bool, write_probe: bool) -> list[dict[str, Any]] | None:
    """The same check through any async fsspec file system (Azure, GCS); returns the folder's
    entries as the file system lists them."""
    path = f"{bucket}/{prefix}" if prefix else bucket

    async def listing() -> list[dict[str, Any]]:
        if not await fs._exists(bucket):
            raise FileNotFoundError(bucket)
        try:
            return list(await fs._ls(path, detail=True))
        except FileNotFoundError:
            if prefix:  # an empty or new folder inside an existing bucket is fine
                return []
            raise

    entries = await run_on_loop(fs.loop, listing)
    if writable and write_probe:
        key = f"{path}/.storage-sidecar-write-probe-{pysecrets.token_hex(6)}"

        async def probe() -> None:
            await fs._pipe_file(key, b"storage-sidecar write probe; safe to delete\n")
            await fs._rm_file(key)

        try:
            await run_on_loop(fs.loop, probe)
        except Exception as exc:
            if classify(exc, "").code == "access_denied":
                raise WriteDenied() from exc
            raise
    return entries


def _endpoint(url: urls.StorageURL, options: dict[str, Any]) -> tuple[str, int] | None:
    from urllib.parse import urlsplit

    ep = options.get("endpoint_url") or url.endpoint
    if not ep:
        if url.provider == "azure" and url.account:
            return f"{url.account}.blob.core.windows.net", 443
        return None
    parts = urlsplit(ep)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


async def _reachable(url: urls.StorageURL, options: dict[str, Any]) -> bool:
    target = _endpoint(url, options)
    if target is None:
        return True
    with trio.move_on_after(2):
        try:
            stream = await trio.open_tcp_stream(*target)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


async def check(
    name: str,
    url: urls.StorageURL,
    options: dict[str, Any],
    credentials: dict[str, str],
    *,
    source_path: str,
    writable: bool,
    write_probe: bool = True,
    deadline: float = CHECK_DEADLINE,
    fs: Any = None,
    listed: Callable[[list[dict[str, Any]]], None] | None = None,
) -> CheckResult:
    """Runs the pre-flight of one storage within `deadline` seconds. Never raises. `fs` is the
    file system (SDK client) to check with, e.g. the one a worker mounts with; else one is
    built for the check. `listed` receives the entries of the storage's folder when the
    check's listing holds all of them (the mount then answers its root from it)."""
    # No credentials of our own is not yet "missing": ambient ones (a pod's IAM role through the
    # environment) may work. The backend call decides, and botocore reports when there are none.
    try:
        with trio.fail_after(deadline):
            if url.provider == "s3":
                from sidecar.store.s3 import make_s3_filesystem

                if fs is None:
                    fs = await trio.to_thread.run_sync(lambda: make_s3_filesystem(options, credentials, url.endpoint, url.region))
                # One try: the check reports what it finds, it does not insist.
                retries, fs.retries = fs.retries, 1
                try:
                    entries = await check_s3(fs, url.bucket, url.key_prefix(source_path), writable=writable, write_probe=write_probe)
                finally:
                    fs.retries = retries
            else:
                from sidecar.store.azure import CredentialsMissing, make_azure_filesystem
                from sidecar.store.gcs import make_gcs_filesystem

                make = make_azure_filesystem if url.provider == "azure" else make_gcs_filesystem
                try:
                    if fs is None:
                        fs = await trio.to_thread.run_sync(make, url, options, credentials)
                except CredentialsMissing:
                    return CheckResult("credentials_missing", f"no credentials for storage {name!r}")
                if url.provider == "gcs" and credentials.get("service_account.json"):
                    # The token exchange first, once: gcsfs would retry a refused key until the
                    # deadline (a timeout) instead of saying it was refused.
                    refresh = getattr(getattr(fs, "credentials", None), "maybe_refresh", None)
                    if refresh is not None:
                        await trio.to_thread.run_sync(refresh)
                entries = await check_fsspec(fs, url.bucket, url.key_prefix(source_path), writable=writable, write_probe=write_probe)
    except trio.TooSlowError:
        # SDKs retry connection errors until the deadline: tell a closed port from a slow server.
        if not await _reachable(url, options):
            return CheckResult("endpoint_unreachable", f"the endpoint of storage {name!r} cannot be reached")
        return CheckResult("timeout", f"storage {name!r} did not answer within {deadline:g} s")
    except WriteDenied:
        return CheckResult("readonly_no_write_permission", f"storage {name!r} is writable in the manifest but the credentials may not write")
    except Exception as exc:
        return classify(exc, name)
    if listed is not None and entries is not None and len(entries) <= CHECK_LIST_MAX:
        listed(entries)  # (Azure and GCS list the whole folder: a big one is not handed over)
    return CheckResult("ok", "listed and, if writable, wrote a probe object")
