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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from sidecar import urls
from sidecar.protocol import CHECK_DEADLINE
from sidecar.store.base import Listing
from sidecar.store.classify import WriteDenied, chain, error_code, reason_of

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
    store: Any = None,
    listed: Callable[[Listing], None] | None = None,
) -> CheckResult:
    """Runs the pre-flight of one storage within `deadline` seconds. Never raises. `store` is
    the store to check with (the one a worker mounts with: one SDK client per storage); else
    one is built for the check. `listed` receives the listing of the storage's folder when the
    check's LIST held all of it (the mount then answers its root from it)."""
    # No credentials of our own is not yet "missing": ambient ones (a pod's IAM role through the
    # environment) may work. The backend call decides, and botocore reports when there are none.
    from sidecar.store.azure import CredentialsMissing
    from sidecar.store.factory import build_store

    try:
        with trio.fail_after(deadline):
            if store is None:
                try:
                    store = await trio.to_thread.run_sync(lambda: build_store(name, url, options, credentials))
                except CredentialsMissing:
                    return CheckResult("credentials_missing", f"no credentials for storage {name!r}")
            if url.provider == "gcs" and credentials.get("service_account.json"):
                # The token exchange first, once: gcsfs would retry a refused key until the
                # deadline (a timeout) instead of saying it was refused.
                refresh = getattr(getattr(store.fs, "credentials", None), "maybe_refresh", None)
                if refresh is not None:
                    await trio.to_thread.run_sync(refresh)
            listing = await store.probe(url.key_prefix(source_path), writable=writable, write_probe=write_probe, max_entries=CHECK_LIST_MAX)
    except trio.TooSlowError:
        # SDKs retry connection errors until the deadline: tell a closed port from a slow server.
        if not await _reachable(url, options):
            return CheckResult("endpoint_unreachable", f"the endpoint of storage {name!r} cannot be reached")
        return CheckResult("timeout", f"storage {name!r} did not answer within {deadline:g} s")
    except WriteDenied:
        return CheckResult("readonly_no_write_permission", f"storage {name!r} is writable in the manifest but the credentials may not write")
    except Exception as exc:
        return classify(exc, name)
    if listed is not None and listing is not None:
        listed(listing)
    return CheckResult("ok", "listed and, if writable, wrote a probe object")
