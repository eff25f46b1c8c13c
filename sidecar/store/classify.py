"""What an error of a backend call means, read once for every provider and every caller.

The SDKs raise their own exceptions (botocore's ClientError with an S3 error code, azure-core's
HttpResponseError with a StorageErrorCode, gcsfs's HttpError with a status, aiohttp's and the
OS's connection errors), often wrapped by fsspec. `reason_of` walks the exception's chain and
names it with one stable reason code; the store raises the domain error of that code
(`domain_error`), and the pre-flight check reports the code itself (sidecar.preflight).
"""

from __future__ import annotations

import asyncio

from sidecar.errors import AccessDenied, BackendTimeout, BackendUnavailable, NoCredentials, NotFound, ObjectChanged, SidecarError

NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
CREDENTIALS_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthenticationFailed",
                       "InvalidAuthenticationInfo", "Unauthorized"}
CHANGED = {"PreconditionFailed", "412", "ConditionNotMet"}
NO_BUCKET = {"NoSuchBucket", "ContainerNotFound", "BucketNotFound"}
NO_OBJECT = {"NoSuchKey", "404", "NotFound", "BlobNotFound"}
DENIED = {"AccessDenied", "403", "AuthorizationFailure", "AuthorizationPermissionMismatch", "Forbidden", "AllAccessDisabled"}
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError", "ServerDisconnectedError",
               "ClientOSError", "gaierror", "ServiceRequestError", "ConnectError", "ConnectTimeout"}
TIMED_OUT = {"ReadTimeoutError", "TimeoutError", "ServerTimeoutError", "ReadTimeout", "WriteTimeout", "PoolTimeout"}
SDK_MODULES = ("botocore", "aiobotocore", "aiohttp", "azure", "google", "gcsfs", "adlfs", "httpx", "httpcore", "webdav4")
HTTP_STATUS = {401: "Unauthorized", 403: "403", 404: "404", 412: "412"}  # of an HTTP client's error (httpx, webdav4)


class WriteDenied(Exception):
    """The pre-flight's probe object could not be written: the credentials may read, not write."""


PROBE_BODY = b"storage-sidecar write probe; safe to delete\n"


def probe_name() -> str:
    """The name of a pre-flight's probe object: recognisable, and never one a user chose."""
    import secrets

    return f".storage-sidecar-write-probe-{secrets.token_hex(6)}"  # hidden in listings (sidecar.vfs.listings.PROBE_PREFIX)


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (explicit or implicit), each once."""
    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def error_code(e: BaseException) -> str:
    """The provider's error code of one exception ("" if it carries none)."""
    status = getattr(e, "code", None)
    if isinstance(status, int) and status in (403, 404, 412):  # gcsfs HttpError
        return str(status)
    http = getattr(e, "status_code", None)
    if isinstance(http, int) and type(e).__module__.startswith(("webdav4", "httpx")):
        return HTTP_STATUS.get(http, str(http))
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        return str(err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    az = getattr(e, "error_code", None)  # azure-core errors carry a StorageErrorCode
    code = str(getattr(az, "value", az) or "")
    if code == "AuthorizationFailure" and "failed to authenticate" in str(e):
        return "AuthenticationFailed"  # Azurite's answer to a wrong account key
    if not code and "PreconditionFailed" in str(e):
        return "PreconditionFailed"
    return code


def _named(e: BaseException) -> str | None:
    name, code = type(e).__name__, error_code(e)
    if isinstance(e, SidecarError):
        return e.code
    if name == "RefreshError":  # google-auth: the token endpoint refused the service account's key
        return "credentials_invalid"
    if name in NO_CREDENTIALS:
        return "credentials_missing"
    if name == "ClientAuthenticationError" or code in CREDENTIALS_REFUSED:
        return "credentials_invalid"
    for codes, reason in ((CHANGED, "object_changed"), (NO_BUCKET, "bucket_not_found"), (NO_OBJECT, "not_found"), (DENIED, "access_denied")):
        if code in codes:
            return reason
    if name in UNREACHABLE:
        return "endpoint_unreachable"
    if name in TIMED_OUT:
        return "timeout"
    return None


def reason_of(exc: BaseException) -> str | None:
    """The reason code of an exception raised by a backend call: `not_found`,
    `bucket_not_found`, `object_changed`, `access_denied`, `credentials_missing`,
    `credentials_invalid`, `endpoint_unreachable`, `timeout` (or a SidecarError's own code);
    None when it is no backend error at all (a programming error)."""
    errors = chain(exc)
    for e in errors:
        if (reason := _named(e)) is not None:
            return reason
    for e in errors:
        if isinstance(e, FileNotFoundError):
            return "not_found"
        if isinstance(e, PermissionError):
            return "access_denied"
        if isinstance(e, asyncio.TimeoutError):
            return "timeout"
        if isinstance(e, OSError) or error_code(e) or type(e).__module__.startswith(SDK_MODULES):
            return "endpoint_unreachable"
    return None


DOMAIN_ERRORS: dict[str, type[SidecarError]] = {
    "not_found": NotFound,
    "bucket_not_found": NotFound,
    "object_changed": ObjectChanged,
    "access_denied": AccessDenied,
    "credentials_invalid": AccessDenied,
    "credentials_missing": NoCredentials,
    "timeout": BackendTimeout,
    "endpoint_unreachable": BackendUnavailable,
}


def domain_error(exc: BaseException, what: str) -> SidecarError:
    """The domain error a store raises for `exc` (its message names the call, never the request:
    no URL, header or signature). Raises `exc` itself when it is no backend error, so its
    traceback is logged where it is caught."""
    if isinstance(exc, SidecarError):
        return exc
    reason = reason_of(exc)
    if reason is None:
        raise exc
    cls = DOMAIN_ERRORS.get(reason, BackendUnavailable)
    if cls is NotFound or cls is ObjectChanged:
        return cls(what)
    if cls is AccessDenied:
        return cls(f"access denied: {what}")
    if cls is NoCredentials:
        return cls(f"no usable credentials: {what}")
    return cls(f"{what}: {type(exc).__name__}")
