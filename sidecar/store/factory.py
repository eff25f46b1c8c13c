"""Builds the store for one storage from its parsed URL, options and credentials."""

from __future__ import annotations

from typing import Any

from sidecar import urls
from sidecar.errors import NotSupported
from sidecar.store.calls import CallingStore
from sidecar.store.s3 import S3Store, make_s3_filesystem


def build_store(
    storage_id: str, url: urls.StorageURL, options: dict[str, Any], credentials: dict[str, str], *, deadline: float = 30.0
) -> CallingStore:
    if url.provider == "s3":
        fs = make_s3_filesystem(options, credentials, url.endpoint, url.region)
        return S3Store(fs, url.bucket, storage_id, deadline=deadline)
    if url.provider == "azure":
        from sidecar.store.azure import AzureStore, make_azure_filesystem

        return AzureStore(make_azure_filesystem(url, options, credentials), url.bucket, storage_id, deadline=deadline)
    if url.provider == "gcs":
        from sidecar.store.gcs import GCSStore, make_gcs_filesystem

        return GCSStore(make_gcs_filesystem(url, options, credentials), url.bucket, storage_id, deadline=deadline)
    if url.provider == "webdav":
        from sidecar.store.webdav import make_webdav_store

        return make_webdav_store(storage_id, url, options, credentials, deadline=deadline)
    raise NotSupported(f"provider {url.provider!r} is not supported")
