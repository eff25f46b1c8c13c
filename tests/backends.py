"""One interface over the three test backends, for suites that run against every provider.

Objects are put and read *around* the sidecar (boto3, azure-storage-blob, the GCS JSON API over
plain HTTP), so a test checks the bucket itself, not the sidecar's view of it.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any


class Backend:
    provider: str
    file_tree = False  # True: a server of files and folders (WebDAV), where a name is one or the other

    def create_bucket(self) -> "Bucket":
        name = f"t-{uuid.uuid4().hex[:12]}"
        self._create(name)
        return Bucket(self, name)

    def _create(self, name: str) -> None: ...
    def put(self, bucket: str, key: str, data: bytes) -> None: ...
    def get(self, bucket: str, key: str) -> bytes: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def keys(self, bucket: str) -> list[str]: ...
    def url(self, bucket: str, prefix: str = "") -> str: ...
    options: dict[str, Any]
    credentials: dict[str, str]


class S3Backend(Backend):
    provider = "s3"

    def __init__(self, server):
        self.server = server
        self.client = server.client()
        self.options = {"endpoint_url": server.endpoint}
        self.credentials = {"access_key_id": server.key, "secret_access_key": server.secret}

    def _create(self, name):
        self.client.create_bucket(Bucket=name)

    def put(self, bucket, key, data):
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, bucket, key):
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def delete(self, bucket, key):
        self.client.delete_object(Bucket=bucket, Key=key)

    def keys(self, bucket):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def url(self, bucket, prefix=""):
        return f"s3://{bucket}/{prefix}".rstrip("/")


class AzureBackend(Backend):
    provider = "azure"

    def __init__(self, server):
        from azure.storage.blob import BlobServiceClient

        self.service = BlobServiceClient.from_connection_string(server.connection_string)
        self.options = {"account_name": server.account, "endpoint_url": server.endpoint}
        self.credentials = {"account_key": server.key}

    def _create(self, name):
        self.service.create_container(name)

    def put(self, bucket, key, data):
        self.service.get_blob_client(bucket, key).upload_blob(data, overwrite=True)

    def get(self, bucket, key):
        return self.service.get_blob_client(bucket, key).download_blob().readall()

    def delete(self, bucket, key):
        self.service.get_blob_client(bucket, key).delete_blob()

    def keys(self, bucket):
        return sorted(b.name for b in self.service.get_container_client(bucket).list_blobs())

    def url(self, bucket, prefix=""):
        return f"az://{bucket}/{prefix}".rstrip("/")


class GCSBackend(Backend):
    """The emulator has no authentication: mounts use `anonymous: true`."""

    provider = "gcs"

    def __init__(self, server):
        self.ep = server.endpoint
        self.options = {"endpoint_url": server.endpoint, "anonymous": True}
        self.credentials = {}

    def _req(self, method, path, data=None, headers=None):
        req = urllib.request.Request(self.ep + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read()

    def _create(self, name):
        self._req("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode(), {"content-type": "application/json"})

    def put(self, bucket, key, data):
        if not data:
            # Emulator difference: its media upload crashes on an empty body; a multipart upload
            # (metadata + empty media) stores the same empty object.
            boundary = "sidecar-test-boundary"
            body = (f"--{boundary}\r\ncontent-type: application/json\r\n\r\n{json.dumps({'name': key})}\r\n"
                    f"--{boundary}\r\ncontent-type: application/octet-stream\r\n\r\n\r\n--{boundary}--\r\n").encode()
            self._req("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart", body,
                      {"content-type": f"multipart/related; boundary={boundary}"})
            return
        q = urllib.parse.urlencode({"uploadType": "media", "name": key})
        self._req("POST", f"/upload/storage/v1/b/{bucket}/o?{q}", data, {"content-type": "application/octet-stream"})

    def get(self, bucket, key):
        return self._req("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}?alt=media")

    def delete(self, bucket, key):
        self._req("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}")

    def keys(self, bucket):
        out, token = [], None
        while True:
            q = urllib.parse.urlencode({"pageToken": token} if token else {})
            doc = json.loads(self._req("GET", f"/storage/v1/b/{bucket}/o?{q}"))
            out += [o["name"] for o in doc.get("items", [])]
            token = doc.get("nextPageToken")
            if not token:
                return sorted(out)

    def url(self, bucket, prefix=""):
        return f"gs://{bucket}/{prefix}".rstrip("/")


class WebDAVBackend(Backend):
    """A "bucket" is a new folder at the top of the server's tree, read and written over plain
    HTTP (httpx): through the server, whose own caches (rclone's directory cache) stay true."""

    provider = "webdav"
    file_tree = True

    def __init__(self, server):
        import httpx

        self.server = server
        self.http = httpx.Client(base_url=server.endpoint, auth=(server.user, server.password), timeout=60)
        self.options = {"user": server.user}
        self.credentials = {"password": server.password}

    def _path(self, bucket, key=""):
        return "/" + urllib.parse.quote(f"{bucket}/{key}")

    def _ok(self, resp, *codes):
        if resp.status_code not in codes:
            raise RuntimeError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code}")
        return resp

    def _create(self, name):
        self._ok(self.http.request("MKCOL", self._path(name)), 201)

    def put(self, bucket, key, data):
        parts = key.rstrip("/").split("/")
        for n in range(1, len(parts) + (1 if key.endswith("/") else 0)):  # the folders above (and a "folder/" itself)
            self._ok(self.http.request("MKCOL", self._path(bucket, "/".join(parts[:n]) + "/")), 201, 405)
        if not key.endswith("/"):
            self._ok(self.http.put(self._path(bucket, key), content=data), 200, 201, 204)

    def get(self, bucket, key):
        return self._ok(self.http.get(self._path(bucket, key)), 200).content

    def delete(self, bucket, key):
        self._ok(self.http.delete(self._path(bucket, key)), 200, 204)

    def keys(self, bucket):
        """Every file, and every folder as "name/" (as the object stores' markers)."""
        from webdav4.multistatus import parse_multistatus_response

        out, todo, base = [], [""], f"/{bucket}/"
        while todo:
            folder = todo.pop()
            resp = self._ok(self.http.request("PROPFIND", self._path(bucket, folder), headers={"Depth": "1"}), 207)
            for r in parse_multistatus_response(resp).responses.values():
                rel = r.path[len(base):] if r.path.startswith(base) else ""
                if not rel or rel.rstrip("/") == folder.rstrip("/"):
                    continue
                if r.properties.collection:
                    out.append(rel.rstrip("/") + "/")
                    todo.append(rel.rstrip("/") + "/")
                else:
                    out.append(rel)
        return sorted(out)

    def url(self, bucket, prefix=""):
        host = self.server.endpoint.split("://", 1)[1]
        return f"dav://{host}/{bucket}/{urllib.parse.quote(prefix)}".rstrip("/")


@dataclass
class Bucket:
    backend: Backend
    name: str

    @property
    def provider(self) -> str:
        return self.backend.provider

    def put(self, key: str, data: bytes) -> bytes:
        self.backend.put(self.name, key, data)
        return data

    def get(self, key: str) -> bytes:
        return self.backend.get(self.name, key)

    def delete(self, key: str) -> None:
        self.backend.delete(self.name, key)

    def keys(self) -> list[str]:
        return self.backend.keys(self.name)

    def storage(self, prefix: str = "") -> dict[str, Any]:
        """The worker configuration fields that point a mount at this bucket."""
        return {"url": self.backend.url(self.name, prefix), "storage_id": f"test-{self.provider}-{self.name}",
                "options": dict(self.backend.options), "credentials": dict(self.backend.credentials)}
