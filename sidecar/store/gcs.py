"""Google Cloud Storage through gcsfs.

Cache identity is the object's *generation* (a new upload is a new generation). Ranged reads
ask for that generation: if the object was replaced, GCS answers 404 for the old one, and a
HEAD tells "changed" (ObjectChanged) from "deleted" (NotFound).
"""

from __future__ import annotations

import json
from typing import Any

from sidecar import urls
from sidecar.errors import NotFound, ObjectChanged
from sidecar.store.azure import CredentialsMissing
from sidecar.store.base import ObjectInfo
from sidecar.store.fsspec_store import FsspecStore, _mtime, _rfc3339, _user_mtime


class GCSStore(FsspecStore):
    def _object_info(self, d: dict[str, Any]) -> ObjectInfo:
        ident = d.get("generation") or d.get("etag") or d.get("md5Hash") or ""
        mtime = _user_mtime(d.get("metadata")) or _mtime(d.get("updated") or d.get("mtime"))
        return ObjectInfo(self._key(d["name"]), int(d.get("size") or 0), str(ident), mtime)

    def _upload_options(self, mtime: float | None) -> dict[str, Any]:
        # rclone's convention on GCS: `mtime` (RFC 3339) and gsutil's `goog-reserved-file-mtime`
        return {"metadata": {"mtime": _rfc3339(mtime), "goog-reserved-file-mtime": str(int(mtime))}} if mtime is not None else {}

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        """A metadata PATCH of generation `etag` (the bytes and the generation stay)."""
        metadata = self._upload_options(mtime)["metadata"]

        async def patch() -> Any:
            return await self.fs._call("PATCH", "b/{}/o/{}", self.bucket, key, json_out=True, json={"metadata": metadata},
                                       ifGenerationMatch=etag or None)

        self.stats.put_requests += 1
        doc = await self._run(f"set mtime {key}", patch)
        if isinstance(doc, dict) and doc.get("name"):
            return self._object_info(doc)
        return ObjectInfo(key, -1, etag, mtime)

    async def _get_range_sized(self, key: str, start: int, end: int, etag: str, object_size: int | None) -> bytes:
        return await self.get_range(key, start, end, etag, object_size)

    async def get_range(self, key: str, start: int, end: int, etag: str, size: int | None = None) -> bytes:
        """Bytes of generation `etag` only: GCS answers 412 to ifGenerationMatch when the object
        is another generation now; the x-goog-generation header and the total size in
        Content-Range are checked as well (the emulator honours neither condition nor header,
        so there the size is what catches a replaced object)."""
        if end <= start:
            return b""

        async def fetch() -> bytes:
            headers, out = await self.fs._call(
                "GET", self.fs.url(self._path(key)), headers={"Range": f"bytes={start}-{end - 1}"}, ifGenerationMatch=etag or None
            )
            generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
            total = (headers.get("Content-Range") or headers.get("content-range") or "").rpartition("/")[2]
            if (generation and etag and generation != etag) or (size is not None and total.isdigit() and int(total) != size):
                raise ObjectChanged(key)
            return out

        try:
            data = await self._run(f"read {key}", fetch)
        except NotFound:
            current = await self.stat(key)
            if isinstance(current, ObjectInfo) and current.etag != etag:
                raise ObjectChanged(key) from None
            raise
        return self._fetched(data)


    async def delete(self, key: str) -> None:
        """Deletes the object named exactly `key` (a "folder/" marker too)."""
        self.stats.delete_requests += 1
        await self._run(f"delete {key}", lambda: self.fs._call("DELETE", "b/{}/o/{}", self.bucket, key))

    async def put_marker(self, key: str) -> None:
        marker = key.rstrip("/") + "/"
        await self._run(f"mkdir {key}", lambda: self.fs._pipe_file(f"{self.bucket}/{marker}", b""))


def make_gcs_filesystem(url: urls.StorageURL, options: dict[str, Any], credentials: dict[str, str]) -> Any:
    from sidecar.store.patches import sdk_environment

    sdk_environment()
    from gcsfs.core import GCSFileSystem

    if options.get("anonymous"):
        token: Any = "anon"
    elif credentials.get("service_account.json"):
        token = json.loads(credentials["service_account.json"])
    else:
        # gcsfs would try google.auth.default(), which queries the metadata server.
        raise CredentialsMissing(f"no credentials for the GCS bucket {url.bucket!r}")
    kwargs: dict[str, Any] = {"token": token, "skip_instance_cache": True, "use_listings_cache": False,
                              "project": options.get("project") or "storage-sidecar"}
    if options.get("endpoint_url"):
        kwargs["endpoint_url"] = options["endpoint_url"]
    if options.get("requester_pays"):
        kwargs["requester_pays"] = True
    return GCSFileSystem(**kwargs)
