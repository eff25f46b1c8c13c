"""WebDAV (NextCloud, ownCloud, PolyBox, `rclone serve webdav`, WsgiDAV) over webdav4's client.

The storage is one collection on the server (the URL's path); object keys are paths below it.
A WebDAV server is a file tree, not a flat key space: a name is a file or a folder, never both,
and a folder exists on its own (MKCOL), so every folder is listed as a folder and an object's
parent must exist before it is written (a PUT into a missing folder is 409: the folders are
made, top down, and the PUT sent again).

Cache identity is the ETag (`getetag`); where a server lists none, the size and last-modified
time stand in for it (`lm:<mtime>-<size>`). Ranged GETs carry `If-Match` with a strong ETag and
the answer's own ETag is compared too, so a file replaced between two blocks of one handle is
ObjectChanged, never a mix of versions. Uploads carry `If-Match` / `If-None-Match: *` and, as
not every server honours them on PUT (rclone's does not), a PROPFIND checks the precondition
just before (as on Azure and GCS without conditions: a small window remains); the new ETag is
read back with a PROPFIND. For NextCloud and ownCloud, `X-OC-Mtime` carries the file's mtime
(whole seconds); not for other servers: rclone's serve webdav honours it too, but derives its
ETag from the modification time and size, so whole seconds would give two versions written in
one second with one size the same ETag. A WebDAV server keeps no metadata of ours: mtimes set
through the mount live in the mount's own index (sidecar.vfs.mtimes).

webdav4's `Client` holds the configured httpx client (auth, limits, timeouts) and parses the
multistatus answers; the requests are built here, because keys may hold characters ('?', '#',
'%') that its path joining refuses. The client is synchronous: each call runs in a worker thread
(sidecar.store.bridge.run_in_thread), at most CONNECTIONS at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import trio

from sidecar import urls
from sidecar.errors import BackendUnavailable, NoCredentials, NotEmpty, NotFound, ObjectChanged
from sidecar.store.base import DirInfo, Gate, Listing, ObjectInfo, block_pieces
from sidecar.store.bridge import MIN_RATE, Progress, run_in_thread
from sidecar.store.calls import CallingStore
from sidecar.store.classify import PROBE_BODY, WriteDenied, probe_name, reason_of

CONNECTIONS = 24  # requests in flight per mount (the read path runs up to 16 fetches at once)
CHUNK = 1 << 20  # bytes per read of a body, and per piece of an upload
PROPFIND_TRIES = 5  # answers that do not parse (a listing that raced a delete) before the call fails

PROPS = (
    '<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop>'
    "<d:resourcetype/><d:getcontentlength/><d:getetag/><d:getlastmodified/></d:prop></d:propfind>"
)
SYNTHETIC = "lm:"
MTIME_VENDORS = {"nextcloud", "owncloud"}  # X-OC-Mtime sets the mtime, and the ETag is not made of it  # an identity made of last-modified and size, for servers without ETags


def _identity(etag: str | None, mtime: float, size: int) -> str:
    """The cache identity of a listed file: its ETag without quotes ("W/" kept: a weak one is
    compared, never sent as a condition), else last-modified and size."""
    if etag:
        weak = etag.startswith("W/")
        value = etag[2:] if weak else etag
        return ("W/" if weak else "") + value.strip('"')
    return f"{SYNTHETIC}{int(mtime)}-{size}"


def _condition(etag: str) -> str | None:
    """The If-Match value for an identity (None: one that cannot be sent as a condition)."""
    if etag.startswith((SYNTHETIC, "W/")) or not etag:
        return None
    return f'"{etag}"'


def _answered(headers: Any) -> str | None:
    raw = headers.get("etag")
    return _identity(raw, 0, 0) if raw else None


class WebDAVStore(CallingStore):
    streams = False  # get_blocks streams one GET without a gate

    def __init__(self, base_url: str, name: str, *, auth: Any = None, headers: dict[str, str] | None = None, vendor: str = "other",
                 deadline: float = 30.0) -> None:
        import httpx
        from webdav4.client import Client

        super().__init__(name, deadline)
        self.base = base_url.rstrip("/")
        self.base_path = unquote(urlsplit(self.base).path).rstrip("/")
        self.sends_mtime = vendor in MTIME_VENDORS
        self.authenticated = auth is not None or bool(headers and "Authorization" in headers)
        self.client = Client(
            self.base + "/", auth=auth, retry=False, headers=headers or {}, follow_redirects=True,
            timeout=httpx.Timeout(deadline, connect=min(deadline, 10.0)),
            limits=httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS),
        )
        self.http = self.client.http
        self.limiter = trio.CapacityLimiter(CONNECTIONS)

    # -- requests ----------------------------------------------------------------------------

    async def _submit(self, call: Callable[[], Any], progress: Progress | None) -> Any:
        return await run_in_thread(call, self.limiter, stall=self.deadline if progress is not None else None, progress=progress)

    def _url(self, key: str, collection: bool = False) -> str:
        tail = quote(key, safe="/") if key else ""
        url = f"{self.base}/{tail}" if tail else self.base
        return url + "/" if collection and not url.endswith("/") else url

    def _key(self, path: str) -> str | None:
        """The key of a path in a multistatus answer (decoded), None if not below the base."""
        path = path.rstrip("/")
        if path == self.base_path:
            return ""
        if not path.startswith(self.base_path + "/"):
            return None
        return path[len(self.base_path) + 1 :]

    def _ok(self, resp: Any) -> Any:
        """The answer, or webdav4's HTTPError of its status (sidecar.store.classify reads it); a
        server that wants credentials where none were given: NoCredentials."""
        if resp.status_code >= 400:
            from webdav4.client import HTTPError

            if resp.status_code == 401 and not self.authenticated:
                raise NoCredentials(f"the WebDAV server wants credentials ({self.name})")
            raise HTTPError(resp)
        return resp

    def _propfind(self, key: str, depth: str, collection: bool = False) -> Any:
        return multistatus(lambda: self._ok(self.http.request("PROPFIND", self._url(key, collection), content=PROPS,
                                                              headers={"Depth": depth, "Content-Type": "application/xml; charset=utf-8"})),
                           self.stats)

    def _entries(self, result: Any) -> Iterator[tuple[str, bool, ObjectInfo | None]]:
        """(key, is a folder, the file's info) of each resource of a multistatus answer."""
        for resp in result.responses.values():
            key = self._key(resp.path)
            if key is None:
                continue
            props = resp.properties
            if props.collection:
                yield key, True, None
                continue
            size = props.content_length or 0
            mtime = props.modified.timestamp() if props.modified is not None else 0.0
            yield key, False, ObjectInfo(key, size, _identity(props.etag, mtime, size), mtime)

    def _listing(self, result: Any, prefix: str) -> Listing:
        """The folder `prefix` of a depth-1 multistatus answer (without the folder itself)."""
        out = Listing()
        for key, is_dir, info in self._entries(result):
            if key == prefix:
                continue
            if is_dir:
                out.dirs.append(key)
            elif info is not None:
                out.files.append(info)
        return out

    async def _stored(self, key: str, what: str) -> ObjectInfo:
        """The file `key` just stored, copied or moved there (one PROPFIND): its new ETag."""
        info = await self.stat(key)
        if not isinstance(info, ObjectInfo):
            raise BackendUnavailable(f"{what}: the file is not there afterwards")
        return info

    # -- reads -------------------------------------------------------------------------------

    async def list_dir(self, prefix: str, *, max_entries: int | None = None) -> Listing:
        """One PROPFIND of depth 1 (the whole folder: WebDAV has no pages)."""
        self.stats.list_requests += 1

        def call() -> Listing:
            from webdav4.client import HTTPError

            try:
                result = self._propfind(prefix, "1", collection=True)
            except HTTPError as exc:
                if exc.status_code == 404 and prefix:
                    return Listing()  # a folder that is not there (yet) is empty, as a prefix is
                raise
            return self._listing(result, prefix)

        return await self._run(f"list {prefix or '/'}", call)  # type: ignore[no-any-return]

    async def stat(self, key: str, *, folder_first: bool = False) -> ObjectInfo | DirInfo | None:
        """One PROPFIND of depth 0 (a name is a file or a folder: `folder_first` changes nothing)."""
        if not key:
            return DirInfo("")
        self.stats.head_requests += 1

        def call() -> ObjectInfo | DirInfo | None:
            for found, is_dir, info in self._entries(self._propfind(key, "0")):
                if found == key:
                    return DirInfo(key) if is_dir else info
            return None

        try:
            return await self._run(f"stat {key}", call)  # type: ignore[no-any-return]
        except NotFound:
            return None

    def _get(self, key: str, start: int, end: int, etag: str, progress: Progress, sink: Callable[[bytes], None]) -> None:
        """One ranged GET of [start, end) of version `etag`, its body handed to `sink` in order
        (runs in a worker thread)."""
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        condition = _condition(etag)
        if condition:
            headers["If-Match"] = condition
        with self.http.stream("GET", self._url(key), headers=headers) as resp:
            progress.tick()
            if resp.status_code == 412:
                raise ObjectChanged(key)
            self._ok(resp)
            answered = _answered(resp.headers)
            if answered is not None and not etag.startswith(SYNTHETIC) and answered != etag:
                raise ObjectChanged(key)
            total = (resp.headers.get("content-range") or "").rpartition("/")[2]
            if etag.startswith(SYNTHETIC) and total.isdigit() and etag.rpartition("-")[2] != total:
                raise ObjectChanged(key)
            skip = start if resp.status_code == 200 else 0  # a server that ignored the range
            want = end - start
            for chunk in resp.iter_bytes(CHUNK):
                progress.tick()
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if chunk:
                    chunk = chunk[:want]
                    want -= len(chunk)
                    sink(chunk)
                if want <= 0:
                    break
        if want > 0:
            raise BackendUnavailable(f"read {key}: the body ended {want} bytes short")

    async def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        if end <= start:
            return b""
        progress = Progress()
        parts: list[bytes] = []
        await self._run(f"read {key}", lambda: self._get(key, start, end, etag, progress, parts.append), progress=progress)
        return self._fetched(b"".join(parts))

    async def get_blocks(
        self, key: str, start: int, end: int, etag: str, block_size: int, on_block: Callable[[int, bytes], None],
        object_size: int | None = None, gate: Gate | None = None,
    ) -> None:
        """One GET for the run, each block handed over (on the trio thread) as it completes."""
        token = trio.lowlevel.current_trio_token()
        stats = self.stats
        pieces = block_pieces(start, end, block_size)
        state: dict[str, Any] = {"piece": next(pieces, None), "buf": bytearray()}

        def deliver(i: int, data: bytes) -> None:
            stats.bytes_fetched += len(data)
            on_block(i, data)

        def sink(chunk: bytes) -> None:
            buf = state["buf"]
            buf += chunk
            while state["piece"] is not None:
                i, lo, hi = state["piece"]
                if len(buf) < hi - lo:
                    return
                data = bytes(buf[: hi - lo])
                del buf[: hi - lo]
                token.run_sync_soon(deliver, i, data)
                state["piece"] = next(pieces, None)

        progress = Progress()
        stats.get_requests += 1
        await self._run(f"read {key}", lambda: self._get(key, start, end, etag, progress, sink), progress=progress)

    # -- writes ------------------------------------------------------------------------------

    def _mkcols(self, key: str) -> None:
        """Makes the folders above `key`, top down (one exists already: 405; rclone's: 201)."""
        parts = key.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            resp = self.http.request("MKCOL", self._url("/".join(parts[:n]), collection=True))
            if resp.status_code not in (405,):
                self._ok(resp)

    def _with_parents(self, key: str, send: Callable[[], Any]) -> Any:
        """`send()`; if the server answers 409 (a folder above is missing), the folders are made
        and it is sent once more. 404 too: Go's x/net/webdav (rclone serve webdav) answers 404
        to a PUT whose folder lookup failed in another way than "does not exist"."""
        resp = send()
        if resp.status_code in (404, 409) and "/" in key:
            self._mkcols(key)
            resp = send()
        return resp

    async def put_file(self, key: str, path: str, size: int, *, expected: Any = ..., reuse: Any = (), mtime: float | None = None) -> ObjectInfo:
        if expected is not ...:
            current = await self.stat(key)
            if (current.etag if isinstance(current, ObjectInfo) else None if current is None else "") != expected:
                raise ObjectChanged(f"write {key}")
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if expected is None:
            headers["If-None-Match"] = "*"
        elif expected is not ... and _condition(expected):
            headers["If-Match"] = _condition(expected)  # type: ignore[assignment]
        if mtime is not None and self.sends_mtime:
            headers["X-OC-Mtime"] = str(int(mtime))
        progress = Progress(grace=size / MIN_RATE)

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    progress.tick()
                    yield chunk

        def call() -> None:
            resp = self._with_parents(key, lambda: self.http.request("PUT", self._url(key), content=body(), headers=headers))
            if resp.status_code == 412:
                raise ObjectChanged(f"write {key}")
            self._ok(resp)

        await self._run(f"write {key}", call, progress=progress)
        self.stats.put_requests += 1
        self.stats.bytes_stored += size
        return await self._stored(key, f"write {key}")

    async def delete(self, key: str) -> None:
        """A file (gone already: nothing to do, as on S3), or an empty folder ("name/"): a folder
        that is not empty is never deleted (DELETE of a collection takes all it holds)."""
        self.stats.delete_requests += 1
        folder = key.endswith("/")
        name = key.rstrip("/")
        if folder:
            listing = await self.list_dir(name)
            if listing.files or listing.dirs:
                raise NotEmpty(key)

        def call() -> None:
            resp = self.http.request("DELETE", self._url(name, collection=folder))
            if resp.status_code == 404 and not folder:
                return
            self._ok(resp)

        await self._run(f"delete {key}", call)

    async def copy(self, src: str, dst: str, size: int | None = None) -> ObjectInfo:
        """A server-side COPY (Depth 0, replacing `dst`)."""
        headers = {"Destination": self._url(dst), "Overwrite": "T", "Depth": "0"}
        await self._run(f"copy {src}", lambda: self._ok(self._with_parents(dst, lambda: self.http.request("COPY", self._url(src), headers=headers))))
        self.stats.put_requests += 1
        return await self._stored(dst, f"copy {src}")

    moves_folders = True

    async def _move(self, src: str, dst: str, folder: bool) -> None:
        headers = {"Destination": self._url(dst, folder), "Overwrite": "T"}
        self.stats.put_requests += 1
        await self._run(f"move {src}", lambda: self._ok(self._with_parents(dst, lambda: self.http.request("MOVE", self._url(src, folder), headers=headers))))

    async def rename(self, src: str, dst: str, size: int | None = None, *, mtime: float | None = None) -> ObjectInfo:
        """One MOVE (replacing `dst`): the server renames, nothing is copied."""
        await self._move(src, dst, folder=False)
        return await self._stored(dst, f"move {src}")

    async def rename_folder(self, src: str, dst: str) -> None:
        """One MOVE of the collection with all it holds."""
        await self._move(src, dst, folder=True)

    async def put_marker(self, key: str) -> None:
        """A folder: MKCOL (one that exists already is fine)."""
        name = key.rstrip("/")

        def call() -> None:
            resp = self._with_parents(name, lambda: self.http.request("MKCOL", self._url(name, collection=True)))
            if resp.status_code != 405:
                self._ok(resp)

        self.stats.put_requests += 1
        await self._run(f"mkdir {name}", call)

    async def probe(self, prefix: str, *, writable: bool, write_probe: bool, max_entries: int) -> Listing | None:
        """The pre-flight's calls, raw: the served folder must exist (404: `bucket_not_found`);
        the mount's folder inside it may be missing (empty). A writable storage gets a probe file
        written and deleted (its folder made if missing: the mount needs it to write)."""
        from webdav4.client import HTTPError

        def listing() -> Listing:
            try:
                result = self._propfind(prefix, "1", collection=True)
            except HTTPError as exc:
                if exc.status_code != 404 or not prefix:
                    raise
                self._propfind("", "0", collection=True)  # the served folder itself
                return Listing()
            return self._listing(result, prefix)

        found = await run_in_thread(listing, self.limiter)
        if writable and write_probe:
            key = f"{prefix}/{probe_name()}" if prefix else probe_name()

            def write() -> None:
                self._ok(self._with_parents(key, lambda: self.http.request("PUT", self._url(key), content=PROBE_BODY)))
                self._ok(self.http.request("DELETE", self._url(key)))

            try:
                await run_in_thread(write, self.limiter)
            except Exception as exc:
                if reason_of(exc) == "access_denied":
                    raise WriteDenied() from exc
                raise
        return found if len(found.files) + len(found.dirs) <= max_entries else None

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.http.close)


def multistatus(propfind: Callable[[], Any], stats: Any) -> Any:
    """A PROPFIND's multistatus answer, parsed. One that does not parse is asked again: `rclone
    serve webdav` answers a listing that raced a file's delete (in this mount, in another
    client) with a whole document followed by "Internal Server Error", its walk cut short at
    that file, so the listing itself may lack entries (40-54% of the listings of a folder
    another client churned, measured)."""
    from xml.etree.ElementTree import ParseError

    from webdav4.multistatus import parse_multistatus_response

    for _ in range(PROPFIND_TRIES):
        resp = propfind()
        if resp.status_code != 207:
            raise BackendUnavailable(f"PROPFIND answered {resp.status_code}, not a multistatus")
        try:
            return parse_multistatus_response(resp)
        except ParseError:
            stats.retries += 1
    raise BackendUnavailable(f"PROPFIND answered {PROPFIND_TRIES} times with a multistatus that does not parse")


def make_webdav_store(storage_id: str, url: urls.StorageURL, options: dict[str, Any], credentials: dict[str, str], *, deadline: float) -> WebDAVStore:
    """Basic authentication with `options.user` and the `password` credential, or a bearer
    token; no credentials and no user: anonymous requests (a public share)."""
    from sidecar.store.azure import CredentialsMissing

    base = f"{url.endpoint}/{quote(url.bucket)}".rstrip("/")
    auth: Any = None
    headers: dict[str, str] = {}
    if options.get("anonymous"):
        pass
    elif credentials.get("bearer_token"):
        headers["Authorization"] = f"Bearer {credentials['bearer_token']}"
    elif credentials.get("password"):
        if not options.get("user"):
            raise CredentialsMissing(f"a password but no user for the WebDAV storage {storage_id!r}: set options.user")
        import httpx

        auth = httpx.BasicAuth(options["user"], credentials["password"])
    elif options.get("user"):
        raise CredentialsMissing(f"no password for the WebDAV storage {storage_id!r}")
    return WebDAVStore(base, storage_id, auth=auth, headers=headers, vendor=options.get("vendor") or "other", deadline=deadline)
