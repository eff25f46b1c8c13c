"""Ranged GETs of S3 objects without the SDK's per-call machinery.

A GetObject through aiobotocore cost the worker about 2 ms of CPU (py-spy: the event system,
parameter validation and serialisation, endpoint rules, the user agent rebuilt per call, the
response parser), as much as the rest of a small file's whole read: in a training epoch of
small files the worker was bound by it. Here a ranged GET is a plain HTTP/1.1 request signed
with botocore's own SigV4 signer, to the URL botocore itself builds for the bucket (taken once
from a presigned URL, so the addressing style, endpoint and signing region are the SDK's), on
connections whose bodies are received straight into the reader's buffers
(sidecar.store.httpbody). Where the environment names a proxy for the endpoint, the SDK answers.

Only the common answer is handled here: the range asked for (206, or 200 with its Content-Range). A missing key
(404) or a changed version (412) is raised as the SDK's ClientError with the server's code, so
it is classified as before. Anything else (a redirect, a throttle, a server error, a
connection that fails) is left to the SDK path (`None`), which retries and classifies it as it
always did (after a 5xx or a 429, for COOL_DOWN_S: its backoff then paces the reads); an answer that says the request itself was wrong for this bucket (a redirect, a
malformed signature) also turns the fast path off for the store.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import quote, urlsplit

from sidecar.log import get_logger
from sidecar.store.httpbody import ConnectFailed, ConnectionPool, Response, proxied

log = get_logger(__name__)

CONNECTIONS = 32  # in use at once, as the SDK's pool (max_pool_connections)
COOL_DOWN_S = 10.0  # after a 5xx or 429, seconds of reads left to the SDK
_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_WRONG_FOR_BUCKET = {"PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed", "SignatureDoesNotMatch",
                     "IllegalLocationConstraintException", "InvalidRequest", "InvalidArgument"}


class LeanGets:
    """Plain signed ranged GETs for one bucket, on fsspec's loop (`open` must run there)."""

    def __init__(self, fs: Any, bucket: str) -> None:
        self.fs = fs
        self.bucket = bucket
        self.enabled = not getattr(fs, "req_kw", None)  # requester-pays and such: the SDK adds what they need
        self._prefix: str | None = None  # the bucket's URL up to the key
        self._path = ""  # its path (the request's target up to the key)
        self._region = ""  # (set with the prefix)
        self._unsigned = False
        self._pool: ConnectionPool | None = None
        self._resume_at = 0.0  # monotonic time before which the SDK answers (after a 5xx)

    async def _setup(self, client: Any) -> None:
        import botocore

        url = await client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": "k"}, ExpiresIn=60)
        base = url.split("?", 1)[0]
        if not base.endswith("/k"):
            raise ValueError(f"unexpected object URL form: {urlsplit(base).path!r}")
        self._prefix = base[:-1]
        # (the presigned form may be SigV2's: the region is the client's; a bucket elsewhere
        # answers a redirect or a malformed-authorization error, and the path turns off)
        self._region = client.meta.region_name or "us-east-1"
        self._unsigned = client.meta.config.signature_version is botocore.UNSIGNED
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unexpected object URL scheme: {parts.scheme!r}")
        if proxied(base):
            raise ValueError("the environment names a proxy for the endpoint")
        self._host = parts.netloc.rsplit("@", 1)[-1]  # the Host header (and what is signed)
        self._path = parts.path[:-1]
        self._pool = ConnectionPool(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), CONNECTIONS)

    async def prepare(self) -> None:
        """Builds what the first GET would (the bucket's URL, the session) and signs once, so
        the session's first read does not pay for it. Best effort."""
        client = getattr(self.fs, "_s3", None)
        if not self.enabled or client is None or self._pool is not None:
            return
        try:
            await self._setup(client)
            await self._headers(client, self._prefix + "k", 0, 1, "0")  # type: ignore[operator]
        except Exception as exc:  # the first GET tries again, or the SDK answers
            log.debug("lean_gets_not_prepared", error=type(exc).__name__)

    async def _headers(self, client: Any, url: str, start: int, end: int, etag: str) -> dict[str, str]:
        headers = {"Host": self._host, "Range": f"bytes={start}-{end - 1}", "If-Match": f'"{etag}"', "Accept-Encoding": "identity"}
        if self._unsigned:
            return headers
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = await client._request_signer._credentials.get_frozen_credentials()
        request = AWSRequest(method="GET", url=url, headers=headers)
        S3SigV4Auth(credentials, "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    async def open(self, key: str, start: int, end: int, etag: str) -> Response | None:
        """The body of bytes [start, end) of `key` at `etag`, or None: ask the SDK."""
        client = getattr(self.fs, "_s3", None)
        if not self.enabled or client is None or time.monotonic() < self._resume_at:
            return None
        try:
            if self._pool is None:
                await self._setup(client)
            quoted = quote(key, safe="/~")
            headers = await self._headers(client, self._prefix + quoted, start, end, etag)  # type: ignore[operator]
            response = await self._pool.get(self._path + quoted, headers)  # type: ignore[union-attr]
        except ConnectFailed as exc:
            # The SDK may reach what this cannot (its own CA bundle, its proxy settings): it
            # answers from now on; a reset or a slow answer is only this request's.
            self._off("connect", exc)
            return None
        except (OSError, asyncio.TimeoutError):
            return None
        except (AttributeError, ValueError, TypeError) as exc:  # an SDK without what this needs
            self._off("setup", exc)
            return None
        if response.status in (200, 206) and _is_range(response.headers, start, end):
            return response
        return await self._refused(response)

    async def _refused(self, response: Response) -> None:
        status = response.status
        try:
            head = await response.read(4096) if status >= 300 else b""
        except (OSError, asyncio.TimeoutError):
            head = b""
        finally:
            response.close()
        found = _CODE.search(head)
        code = found.group(1).decode("ascii", "replace") if found else str(status)
        if status in (404, 412):
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
        if status in (301, 307, 400) or code in _WRONG_FOR_BUCKET:
            self._off(code, None, status)
        elif status == 429 or status >= 500:
            # A throttle or a server in trouble: the SDK's retries with their backoff answer
            # for a while, rather than one more request of this path per read.
            self._resume_at = time.monotonic() + COOL_DOWN_S
        return None

    def _off(self, reason: str, exc: BaseException | None, status: int | None = None) -> None:
        if self.enabled:
            log.info("lean_gets_off", reason=reason, status=status, error=type(exc).__name__ if exc else None, prefix=self._prefix)
        self.enabled = False

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _is_range(headers: Any, start: int, end: int) -> bool:
    """The answer holds bytes [start, end): its Content-Range says so (some servers answer a
    range with 200 and the Content-Range), or, without one, it is the whole object from 0."""
    given = headers.get("content-range")
    if given is None:
        return start == 0 and headers.get("content-length") == str(end - start)
    return given.startswith(f"bytes {start}-{end - 1}/")
