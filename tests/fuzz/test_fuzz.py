"""Fuzzing the front doors with hypothesis: manifests, storage URLs, credentials POST bodies,
raw HTTP on the control socket, object key names. Each must answer every input with its own
clear error (or a result), never a traceback, never echoing a secret.

`make test` runs a quick profile; `make test-fuzz` the long one (>= 100,000 inputs in all, counted
and printed at the end). Inputs that once crashed are kept as explicit `@example`s.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from collections import Counter

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar import urls
from sidecar.control import HTTPError, serve
from sidecar.api import parse_credentials
from sidecar.manifest import ManifestError, loads
from sidecar.store.base import Listing, ObjectInfo
from sidecar.vfs.listings import NAME_MAX, Listings

LONG = os.environ.get("FUZZ_PROFILE") == "long"
N = 25_000 if LONG else 150  # examples per target (five targets, one with two tests)
INPUTS: Counter[str] = Counter()
SECRET = "S3CR3T-do-not-echo-4242"

fuzz = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(INPUTS.values())
    print(f"\nfuzz: {total} inputs ({', '.join(f'{k} {v}' for k, v in sorted(INPUTS.items()))})")


# -- manifests ------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)), max_leaves=20)
names = st.sampled_from(["root", "storages", "mounts", "name", "provider", "url", "options", "mountpath", "source_path",
                         "readonly", "endpoint_url", "metadata_ttl", "deadline", "write_mode", "secret_access_key", "sas_token", "id", "storage"])
path_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)


@st.composite
def manifest_like(draw):
    """Documents near the schema (so validation goes deep), with hostile values."""
    url = draw(st.one_of(st.sampled_from(["s3://bucket-a/x", "az://acct/cont", "gs://bucket-b", "s3://h:9000/b", "ftp://x", "davs://h/remote.php/webdav"]), st.text(max_size=60)))
    storage = {"name": draw(st.text(max_size=10)), "provider": draw(st.sampled_from(["s3", "azure", "gcs", "webdav", "x"])), "url": url}
    if draw(st.booleans()):
        storage["options"] = {"endpoint_url": draw(st.sampled_from([f"http://h/?X-Amz-Signature={SECRET}", f"http://u:{SECRET}@h", "http://127.0.0.1:9"]))}
    if draw(st.booleans()):  # option values of every shape, a secret among them
        option = draw(st.sampled_from(["region", "account_name", "project", "endpoint_url", "user", "vendor"]))
        storage.setdefault("options", {})[option] = draw(st.one_of(st.sampled_from([f"https://u:{SECRET}@h/", f"us-east-1\n{SECRET}", SECRET.lower()]),
                                                                     st.text(max_size=40)))
    if draw(st.booleans()):
        storage[draw(names)] = draw(json_value)
    mount = {"storage": storage["name"], "mountpath": draw(path_text)}
    if draw(st.booleans()):
        mount[draw(names)] = draw(json_value)
    doc = {"root": draw(st.one_of(path_text, st.just("/p"))), "storages": [storage], "mounts": [mount]}
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["secret_key", "token", "x"]))] = SECRET
    return doc


RCLONE_TYPES = st.sampled_from(["s3", "azureblob", "google cloud storage", "webdav", "drive", "", None])
RCLONE_OPTIONS = st.sampled_from(["provider", "region", "endpoint", "account", "use_emulator", "anonymous", "env_auth", "force_path_style",
                                  "service_account_file", "chunk_size", "secret_access_key", "key", "pass", "sas_url", "type",
                                  "url", "vendor", "user", "bearer_token", "bearer_token_command"])


@st.composite
def rclone_manifest_like(draw):
    """A storage in rclone's terms (an rclone remote or a Renku data connector), near the schema,
    with hostile values and secrets among the options."""
    config = {"type": draw(RCLONE_TYPES)}
    for _ in range(draw(st.integers(0, 4))):
        config[draw(RCLONE_OPTIONS)] = draw(st.one_of(st.sampled_from(["true", "false", "AWS", "Minio", f"https://u:{SECRET}@h/", SECRET,
                                                                        "http://127.0.0.1:9", "acct1", "nextcloud", "sharepoint",
                                                                        f"https://h/dav/{SECRET}%0A"]), json_value))
    source = draw(st.one_of(st.sampled_from(["bucket-a/x", "/", "", "cont/../x", "b\x00"]), path_text, json_value))
    if draw(st.booleans()):
        storage = {"name": draw(st.text(max_size=10)), "rclone": config, "source_path": source}
    else:
        storage = {"name": draw(st.text(max_size=10)), "storage_type": config.get("type"), "configuration": config, "source_path": source,
                   "target_path": draw(st.one_of(path_text, json_value)), "readonly": draw(st.one_of(st.booleans(), json_value))}
    if draw(st.booleans()):
        storage[draw(names)] = draw(json_value)
    return {"root": "/p", "storages": [storage], "mounts": draw(st.one_of(st.just([]), json_value))}


def _check_manifest(raw):
    INPUTS["manifest"] += 1
    try:
        loads(raw)
    except ManifestError as exc:
        assert exc.errors and all(loc for loc, _ in exc.errors), exc.errors
        assert SECRET not in str(exc)


@fuzz
@given(manifest_like())
def test_manifest_documents(doc):
    _check_manifest(json.dumps(doc).encode())


@fuzz
@given(rclone_manifest_like())
@example({"root": "/p", "storages": [{"name": "", "storage_type": "webdav", "configuration": {"type": "webdav", "vendor": []},
                                      "source_path": "bucket-a/x", "target_path": "", "readonly": False}], "mounts": []})
def test_manifest_documents_in_rclones_terms(doc):
    _check_manifest(json.dumps(doc).encode())


@fuzz
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-16")), json_value.map(lambda v: json.dumps(v).encode())))
@example(b"\xff\xfe{\x00}\x00")
@example(b'{"root": "/p", "storages": [], "mounts": [], "n": ' + b"7" * 5000 + b"}")
@example(b"[" * 100_000)
@example(b'{"root": "/p\\u0000", "storages": [], "mounts": [{"storage": "a", "mountpath": "x\\u0000y"}]}')
def test_manifest_bytes(raw):
    _check_manifest(raw)


# -- storage URLs -----------------------------------------------------------------------------


@fuzz
@given(st.one_of(st.text(max_size=120), st.builds(lambda s, r: s + r, st.sampled_from(["s3://", "gs://", "az://", "abfss://", "https://", "dav://", "davs://"]), st.text(max_size=80))))
@example("s3://user:" + SECRET + "@bucket/x")
@example("davs://user:" + SECRET + "@host/remote.php/webdav")
@example("dav://h/%ff%fe")
@example("davs://h/a%0A" + SECRET)
@example("s3://bucket/x?X-Amz-Signature=" + SECRET)
def test_storage_urls(text):
    INPUTS["url"] += 1
    try:
        parsed = urls.parse(text)
    except urls.StorageURLError as exc:
        assert SECRET not in str(exc)
        return
    assert urls.parse(parsed.canonical()).canonical() == parsed.canonical()


# -- credentials POST bodies ------------------------------------------------------------------


# any code point, lone surrogates and control characters included (json.dumps escapes them)
credential_text = st.text(alphabet=st.characters(blacklist_categories=()), min_size=1, max_size=40)


@fuzz
@given(st.one_of(st.binary(max_size=200), json_value.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["access_key_id", "secret_access_key", "x"]), json_value).map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["access_key_id", "secret_access_key"]), credential_text, min_size=1).map(lambda v: json.dumps(v).encode())))
@example(b"[" * 30_000)
@example(b'{"access_key_id": ' + b"9" * 5000 + b"}")
@example(b'{"access_key_id": "AKIA", "secret_access_key": "\\udcff"}')
def test_credentials_bodies(body):
    INPUTS["credentials"] += 1
    try:
        creds = parse_credentials(body, "s3")
    except HTTPError as exc:
        assert exc.status == 400
        return
    assert creds and all(isinstance(v, str) and v for v in creds.values())
    for v in creds.values():  # what is accepted can be signed and sent
        v.encode("utf-8")
        assert not any(ord(c) < 0x20 and c not in "\n\r\t" for c in v)


# -- raw HTTP on the control socket -----------------------------------------------------------


class _Server:
    """The real control server on a unix socket in a thread, with a handler like the daemon's."""

    def __init__(self):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "s.sock")
        self.ready = threading.Event()
        self.crashed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _handle(self, method, target, body):
        from sidecar.control import route

        path, params = route(target)
        if method not in ("GET", "POST"):
            raise HTTPError(405, "method_not_allowed", "no")
        if path.endswith("credentials"):
            return 200, {"fields": sorted(parse_credentials(body, "s3"))}
        return 200, {"path": path}

    def _run(self):
        async def main():
            async with trio.open_nursery() as n:
                self.cancel = n.cancel_scope
                self.token = trio.lowlevel.current_trio_token()
                await n.start(lambda task_status: serve(self.path, self._handle, task_status=task_status))
                self.ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # the server must never die
            self.crashed.append(exc)

    def stop(self):
        self.token.run_sync_soon(self.cancel.cancel)
        self.thread.join(10)


@pytest.fixture(scope="module")
def control_server():
    server = _Server()
    yield server
    server.stop()
    assert not server.crashed, server.crashed


http_line = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda m, t, h, b: m + b" " + t + b" HTTP/1.1\r\n" + h + b"\r\n" + b,
              st.sampled_from([b"GET", b"POST", b"PUT", b"\xff", b""]),
              st.one_of(st.sampled_from([b"/health", b"/mounts/a/credentials", b"/status?x"]), st.binary(max_size=30)),
              st.one_of(st.just(b"Host: x\r\n"), st.binary(max_size=60), st.just(b"Content-Length: 99999999\r\n"), st.just(b"Content-Length: -1\r\n"),
                        st.just(b"Transfer-Encoding: chunked\r\n")),
              st.binary(max_size=100)),
)


@settings(max_examples=max(N // 5, 100), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(http_line, st.booleans())
def test_raw_http_on_the_control_socket(control_server, data, hang_up):
    INPUTS["http"] += 1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    try:
        s.connect(control_server.path)
        try:
            s.sendall(data)
            if hang_up:
                return
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            return
        assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
        assert not answer.startswith(b"HTTP/1.1 500")
    finally:
        s.close()


def test_the_control_server_still_answers_after_the_fuzzing(control_server):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(control_server.path)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.close()


# -- object key names -------------------------------------------------------------------------

key_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


class _Quiet:
    def warning(self, *a, **k):
        pass


@pytest.fixture(scope="module", autouse=True)
def quiet_listings():
    from sidecar.vfs import listings

    saved, listings.log = listings.log, _Quiet()  # one warning per skipped key: thousands here
    yield
    listings.log = saved


@fuzz
@given(st.lists(key_text, max_size=20), st.sampled_from(["", "folder", "a/b"]))
@example(["a\nb", "a\x00b", "a//b", ".", "..", "x" * 256, "dup", "dup/inner"], "")
def test_object_key_names(keys, prefix):
    INPUTS["keys"] += 1
    base = f"{prefix}/" if prefix else ""
    listing = Listing(files=[ObjectInfo(base + k, 1, "e", 0.0) for k in keys if "/" not in k],
                      dirs=[base + k.split("/")[0] for k in keys if "/" in k])
    entries = Listings(5.0).entries_of(prefix, listing)
    for name in entries:
        assert name and name not in (".", "..") and "/" not in name
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        assert len(name.encode()) <= NAME_MAX
        name.encode("utf-8")  # every listed name can be given to the kernel
