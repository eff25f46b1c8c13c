"""Azure Blob Storage through adlfs.

Cache identity is the blob's ETag; ranged reads are conditional on it (If-Match), so a blob
replaced between two blocks of one handle fails with ObjectChanged rather than mixing versions.
Flat-namespace (blob) and hierarchical (dfs) accounts are both served through the Blob endpoint:
folders are name prefixes (plus empty "folder/" marker blobs, which adlfs and the portal create;
on hierarchical accounts real directories list as prefixes the same way).
"""

from __future__ import annotations

from typing import Any

from sidecar import urls
from sidecar.errors import BackendUnavailable, NotFound, ObjectChanged
from sidecar.store.base import ObjectInfo, block_pieces
from sidecar.store.bridge import MIN_RATE, Progress
from sidecar.store.fsspec_store import FsspecStore, _mtime, _rfc3339, _user_mtime


BLOCK_CONCURRENCY = 8


class CredentialsMissing(Exception):
    """No credentials were found for a storage that is not anonymous."""


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


class AzureStore(FsspecStore):
    def _object_info(self, d: dict[str, Any]) -> ObjectInfo:
        info = super()._object_info(d)
        mtime = _user_mtime(d.get("metadata"))  # rclone's `mtime` (RFC 3339), listed with the blob
        return ObjectInfo(info.key, info.size, info.etag, mtime) if mtime else info

    async def put_file(self, key: str, path: str, size: int, *, expected: Any = ..., reuse: Any = (), mtime: float | None = None) -> ObjectInfo:
        """One upload with the precondition in the request (If-None-Match: * for a new blob,
        If-Match for a replacement: a 412 is ObjectChanged) and the mtime as metadata."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        cond: dict[str, Any]
        if expected is None:
            cond = {"overwrite": False}  # If-None-Match: *
        elif expected is not ...:
            cond = {"overwrite": True, "etag": _quoted(expected), "match_condition": MatchConditions.IfNotModified}
        else:
            cond = {"overwrite": True}
        metadata = {"is_directory": "false"}  # as adlfs writes it
        if mtime is not None:
            metadata["mtime"] = _rfc3339(mtime)
        progress = Progress(grace=size / MIN_RATE)

        async def tick(current: int, total: int | None) -> None:
            progress.tick()

        async def put() -> Any:
            async with self.fs.service_client.get_blob_client(container=self.bucket, blob=key) as bc:
                with open(path, "rb") as f:
                    try:
                        return await bc.upload_blob(f, length=size, metadata=metadata, max_concurrency=BLOCK_CONCURRENCY, progress_hook=tick, **cond)
                    except (ResourceExistsError, ResourceModifiedError):
                        raise ObjectChanged(f"write {key}") from None

        resp = await self._run(f"write {key}", put, progress=progress)
        self.stats.put_requests += 1
        self.stats.bytes_stored += size
        etag = str(resp.get("etag") or "").strip('"')
        if not etag:
            raise BackendUnavailable(f"write {key}: no etag in the answer")
        return ObjectInfo(key, size, etag, mtime if mtime is not None else _mtime(resp.get("last_modified")))

    async def set_mtime(self, key: str, etag: str, mtime: float) -> ObjectInfo | None:
        """The blob's metadata with `mtime` set, conditional on its etag (the bytes are not sent
        again; Azure gives the blob a new etag)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError

        async def patch() -> Any:
            async with self.fs.service_client.get_blob_client(container=self.bucket, blob=key) as bc:
                try:
                    props = await bc.get_blob_properties(etag=_quoted(etag), match_condition=MatchConditions.IfNotModified)
                    metadata = dict(props.metadata or {}, mtime=_rfc3339(mtime))
                    return await bc.set_blob_metadata(metadata, etag=_quoted(etag), match_condition=MatchConditions.IfNotModified)
                except ResourceModifiedError:
                    raise ObjectChanged(f"set mtime {key}") from None

        resp = await self._run(f"set mtime {key}", patch)
        self.stats.put_requests += 1
        return ObjectInfo(key, -1, str(resp.get("etag") or "").strip('"'), mtime)

    async def _download(self, bc: Any, key: str, start: int, end: int, etag: str) -> bytes:
        """One conditional ranged download (runs on fsspec's loop)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        try:
            stream = await bc.download_blob(
                offset=start, length=end - start, etag=_quoted(etag),
                match_condition=MatchConditions.IfNotModified,
            )
            return await stream.readall()
        except ResourceModifiedError:
            raise ObjectChanged(key) from None
        except ResourceNotFoundError:
            raise NotFound(key) from None

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        if end <= start:
            return b""

        async def fetch() -> bytes:
            async with self.fs.service_client.get_blob_client(container=self.bucket, blob=key) as bc:
                return await self._download(bc, key, start, end, etag)

        return self._fetched(await self._run(f"read {key}", fetch))

    async def get_blocks(self, key, start, end, etag, block_size, on_block, object_size=None, gate=None) -> None:  # type: ignore[no-untyped-def]
        """A run of blocks as parallel ranged downloads (Blob storage serves ranges well), each
        block handed over as soon as it has arrived."""
        import asyncio

        import trio

        token = trio.lowlevel.current_trio_token()
        stats = self.stats

        def deliver(i: int, data: bytes) -> None:
            stats.get_requests += 1
            stats.bytes_fetched += len(data)
            on_block(i, data)

        async def fetch_all() -> None:
            gate = asyncio.Semaphore(BLOCK_CONCURRENCY)
            async with self.fs.service_client.get_blob_client(container=self.bucket, blob=key) as bc:

                async def one(i: int, lo: int, hi: int) -> None:
                    async with gate:
                        data = await self._download(bc, key, lo, hi, etag)
                    progress.tick()
                    token.run_sync_soon(deliver, i, data)

                await asyncio.gather(*(one(i, lo, hi) for i, lo, hi in block_pieces(start, end, block_size)))

        # Each block is its own download: the run fails when no block arrives for a deadline.
        progress = Progress()
        await self._run(f"read {key}", fetch_all, progress=progress)


    async def delete(self, key: str) -> None:
        """Deletes the blob named exactly `key` (a "folder/" marker too, which adlfs would strip)."""
        from azure.core.exceptions import ResourceNotFoundError

        async def remove() -> None:
            async with self.fs.service_client.get_blob_client(container=self.bucket, blob=key) as bc:
                try:
                    await bc.delete_blob()
                except ResourceNotFoundError:
                    raise NotFound(key) from None

        self.stats.delete_requests += 1
        await self._run(f"delete {key}", remove)


def make_azure_filesystem(url: urls.StorageURL, options: dict[str, Any], credentials: dict[str, str]) -> Any:
    import adlfs

    account = url.account or options.get("account_name")
    endpoint = options.get("endpoint_url")
    kwargs: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}  # our own cache decides
    if credentials.get("connection_string"):
        kwargs["connection_string"] = credentials["connection_string"]
    elif options.get("anonymous") or credentials:
        if not account:
            raise ValueError("an Azure storage needs an account: use az://<account>.blob.core.windows.net/... or options.account_name")
        if endpoint:
            # A custom endpoint (an emulator, a private link) only goes through a connection string.
            parts = [f"BlobEndpoint={endpoint.rstrip('/')}", f"AccountName={account}"]
            if credentials.get("account_key"):
                parts.append(f"AccountKey={credentials['account_key']}")
            elif credentials.get("sas_token"):
                parts.append(f"SharedAccessSignature={credentials['sas_token'].lstrip('?')}")
            kwargs["connection_string"] = ";".join(parts) + ";"
        else:
            kwargs["account_name"] = account
            if credentials.get("account_key"):
                kwargs["account_key"] = credentials["account_key"]
            elif credentials.get("sas_token"):
                kwargs["sas_token"] = credentials["sas_token"]
            else:
                kwargs["anon"] = True
    else:
        # adlfs would fall back to DefaultAzureCredential, which reaches for instance metadata
        # and login endpoints: report missing credentials instead.
        raise CredentialsMissing(f"no credentials for the Azure storage of container {url.bucket!r}")
    return adlfs.AzureBlobFileSystem(**kwargs)
