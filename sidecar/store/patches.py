"""What the SDKs are made to do differently, in one place: counting s3fs's and botocore's own
retries per store, answering plain values without an awaitable check (aiobotocore), parsing S3's
timestamps without dateutil, sending small bodies without `100 Continue`, parsing a whole listing
page once, and sharing botocore's parsed data between the workers a template forks. Each patch
says why and is a no-op where the SDK no longer has what it replaces."""

from __future__ import annotations

import contextvars
import email.utils
import inspect
import logging
import os
from datetime import datetime
from typing import Any

INLINE_BODY = 256 << 10  # a body up to this size is sent without waiting for `100 Continue`


def retry_attempts(response: Any) -> int:
    """How many times botocore sent a request again before this answer (its own retries of 5xx,
    throttling and broken connections, which s3fs never sees)."""
    if not isinstance(response, dict):
        return 0
    n = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    return n if isinstance(n, int) else 0


def sdk_environment() -> None:
    """What the SDKs must find in the environment before they are imported: gcsfs (2026 and
    later) asks a gRPC control API about every bucket unless told not to, which hangs against
    emulators and private endpoints."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# The store whose call runs in this asyncio task (FsspecStore._run sets it inside the task, and
# the tasks a call starts inherit it): s3fs logs its retries there, so each store counts its own.
calling_store: contextvars.ContextVar[Any] = contextvars.ContextVar("sidecar_calling_store", default=None)


def _count_retry() -> None:
    store = calling_store.get()
    if store is not None:
        store.sdk_retried += 1


class _RetryCounter(logging.Filter):
    """Counts the retries s3fs really makes inside one call and drops its debug records, so the
    counter costs no log output. s3fs logs every ClientError as "maybe retryable" (404s too):
    only those it retries count, i.e. its retryable errors, throttling, and the 5xx answers our
    error handler asks it to retry."""

    THROTTLED = ("SlowDown", "reduce your request rate", "XAmzContentSHA256Mismatch")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("Retryable error"):
            _count_retry()
        elif record.msg.startswith("Client error") and any(p in str(record.args) for p in self.THROTTLED):
            _count_retry()
        return False


def _retry_server_errors(exc: BaseException) -> bool:
    """s3fs's hook for errors it does not retry by itself: 500/502/503/504 are transient (the
    S3 guidance is to retry them)."""
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") if hasattr(exc, "response") else None
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    if status in (500, 502, 503, 504) and code not in _RetryCounter.THROTTLED:
        _count_retry()
        return True
    return False


def count_s3fs_retries() -> None:
    s3fs_log = logging.getLogger("s3fs")
    if not any(isinstance(f, _RetryCounter) for f in s3fs_log.filters):
        s3fs_log.addFilter(_RetryCounter())
        s3fs_log.setLevel(logging.DEBUG)
        import s3fs.core

        s3fs.core.set_custom_error_handler(_retry_server_errors)


_PLAIN = frozenset({type(None), bool, int, float, str, bytes, dict, list, tuple})


async def _resolve_plain_quickly(obj: Any) -> Any:
    """aiobotocore's `resolve_awaitable` with a fast path: a plain value (most event handlers
    return None) is returned without `inspect.isawaitable`, whose ABC check ran ~130 times per
    request. Same result for every input."""
    if type(obj) in _PLAIN:
        return obj
    if inspect.isawaitable(obj):
        return await obj
    return obj


def quick_plain_results() -> None:
    """Puts `_resolve_plain_quickly` in place of aiobotocore's `resolve_awaitable` in the modules
    that imported it (where a module no longer has it, nothing changes): a small PUT's client
    CPU is mostly such event dispatch."""
    import importlib

    for name in ("hooks", "context", "parsers", "regions", "retryhandler", "httpchecksum", "retries.standard", "credentials"):
        try:
            module = importlib.import_module(f"aiobotocore.{name}")
        except ImportError:
            continue
        if getattr(module, "resolve_awaitable", None) is not None and module.resolve_awaitable is not _resolve_plain_quickly:
            module.resolve_awaitable = _resolve_plain_quickly


def fast_timestamp(value: Any) -> Any:
    """botocore's timestamp parser for the two forms S3 sends, an HTTP date in headers
    (Last-Modified) and ISO 8601 in listings, without dateutil, which took a sixth of a small
    GET's CPU in the worker (py-spy); anything else goes to botocore's own parser."""
    if isinstance(value, str):
        try:
            if value.endswith(" GMT"):
                parsed = email.utils.parsedate_to_datetime(value)
            else:
                parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed
        except (TypeError, ValueError, IndexError):
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def small_bodies_at_once(params: dict[str, Any], **_: Any) -> None:
    """botocore asks for `100 Continue` before sending any body (it turns bytes into a file
    object first): a round trip more per PUT, which for a small body costs more than sending
    it. A body up to INLINE_BODY goes at once; a larger one still waits for the go-ahead (a
    refusal, e.g. a failed precondition, then costs no body)."""
    headers = params.get("headers") or {}
    if "Expect" in headers:
        from botocore.utils import determine_content_length

        size = determine_content_length(params.get("body"))
        if size is not None and size <= INLINE_BODY:
            del headers["Expect"]


def quick_200_check(session: Any) -> None:
    """botocore parses every S3 response body of 200 twice: once to see whether it is an error
    document S3 sent with a 200 (CopyObject, CompleteMultipartUpload), and then for its data. For
    a listing page that is a tenth of a tree walk's CPU (py-spy). A listing that ends with its
    own closing tag is whole and not an error, and skips the first parse; everything else (a cut
    body, any other operation) still gets botocore's check."""
    from botocore import handlers

    original = getattr(handlers, "_handle_200_error", None)
    if original is None:
        return

    def check(operation_model: Any, response_dict: Any, **kwargs: Any) -> Any:
        if operation_model.name in ("ListObjectsV2", "ListObjects") and response_dict and response_dict.get("status_code") == 200:
            body = response_dict.get("body")
            if isinstance(body, (bytes, bytearray)) and body.rstrip().endswith(b"</ListBucketResult>"):
                return None
        return original(operation_model, response_dict, **kwargs)

    emitter = session.get_component("event_emitter")
    emitter.unregister("before-parse.s3.*", original)
    emitter.register_first("before-parse.s3.*", check)


_SHARED: dict[tuple, object] = {}  # what the template built once for every worker it forks


def shared(key: tuple, make):  # type: ignore[no-untyped-def]
    """`make()`, built once per `key` in this process (made in the template: shared by forks)."""
    if key not in _SHARED:
        _SHARED[key] = make()
    return _SHARED[key]


def share_botocore_data() -> None:
    """botocore parses its JSON data (the S3 model, endpoints, partitions: tens of MiB of Python
    objects) once per loader instance, and every SDK client has its own loader. Cached per
    process instead, and loaded here, the parsed data is made once in the template and shared by
    every forked worker (copy-on-write), instead of parsed again, privately, by each."""
    try:
        import botocore.loaders
    except ImportError:
        return
    loader_cls = botocore.loaders.Loader
    if getattr(loader_cls, "_sidecar_shared", False):
        return
    load_service_model, load_data_with_path = loader_cls.load_service_model, loader_cls.load_data_with_path
    list_available_services = loader_cls.list_available_services

    def shared_service_model(self, service_name, type_name, api_version=None):  # type: ignore[no-untyped-def]
        return shared(("model", tuple(self.search_paths), service_name, type_name, api_version),
                      lambda: load_service_model(self, service_name, type_name, api_version))

    def shared_data_with_path(self, name):  # type: ignore[no-untyped-def]
        return shared(("data", tuple(self.search_paths), name), lambda: load_data_with_path(self, name))

    def shared_services(self, type_name="service-2"):  # type: ignore[no-untyped-def]
        return shared(("services", tuple(self.search_paths), type_name), lambda: list_available_services(self, type_name))

    loader_cls.load_service_model = shared_service_model
    loader_cls.load_data_with_path = shared_data_with_path
    loader_cls.list_available_services = shared_services
    loader_cls._sidecar_shared = True
    share_endpoint_providers()
    share_service_models()
    try:
        loader = botocore.loaders.create_loader()
        for type_name in ("service-2", "endpoint-rule-set-1", "paginators-1"):
            loader.load_service_model("s3", type_name)
        for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
            try:
                loader.load_data(name)
            except Exception:
                pass
        import botocore.session

        session = botocore.session.get_session()
        # A client built here leaves the shared parts (the rule tree, the service model with
        # the operations a mount calls and their shapes) for the workers' clients.
        client = session.create_client("s3", region_name="us-east-1", aws_access_key_id="template", aws_secret_access_key="template")
        model = client.meta.service_model
        for name in S3_OPERATIONS:
            operation = model.operation_model(name)
            for shape in (operation.input_shape, operation.output_shape):
                _resolve_shapes(shape, set())
    except Exception:
        pass


# What a mount asks of S3 (sidecar.store.fsspec_store, sidecar.preflight, the writer).
S3_OPERATIONS = ("ListObjectsV2", "GetObject", "HeadObject", "PutObject", "DeleteObject", "DeleteObjects", "CopyObject",
                 "CreateMultipartUpload", "UploadPart", "UploadPartCopy", "CompleteMultipartUpload", "AbortMultipartUpload")


def _resolve_shapes(shape, seen: set[int]) -> None:  # type: ignore[no-untyped-def]
    """Builds a shape's members (botocore resolves them lazily, on first use, per model)."""
    if shape is None or id(shape) in seen:
        return
    seen.add(id(shape))
    for name in ("members", "member", "key", "value"):
        part = getattr(shape, name, None)
        if isinstance(part, dict):
            for member in part.values():
                _resolve_shapes(member, seen)
        elif part is not None:
            _resolve_shapes(part, seen)


def share_service_models() -> None:
    """One service model per service and version for every client of the process: botocore
    builds a new one per client and resolves its operations and shapes again on their first
    call (a session's first read would pay for it). The model is read-only once built."""
    try:
        import botocore.client
    except ImportError:
        return
    creator = botocore.client.ClientCreator
    load = creator._load_service_model

    def shared_model(self, service_name, api_version=None):  # type: ignore[no-untyped-def]
        return shared(("client model", tuple(self._loader.search_paths), service_name, api_version),
                      lambda: load(self, service_name, api_version))

    creator._load_service_model = shared_model


def share_endpoint_providers() -> None:
    """Every SDK client parses its service's endpoint rule set (S3's is thousands of nodes) into
    a rule tree of its own, and walking the shared JSON to do so writes to every page holding it
    (reference counts), so each forked worker would end up with a private copy of both. The
    provider is stateless (a pure function of its rule set and of the request's parameters, with
    a cache of resolved endpoints), so one per rule set is built in the template and shared."""
    try:
        import botocore.regions
    except ImportError:
        return
    make = botocore.regions.EndpointProvider

    def shared_provider(ruleset_data, partition_data, excluded_params=None):  # type: ignore[no-untyped-def]
        key = ("endpoint provider", id(ruleset_data), id(partition_data), frozenset(excluded_params or ()))
        # the data is kept alive with the provider, so its id is never reused
        return shared(key, lambda: (make(ruleset_data, partition_data, excluded_params), ruleset_data, partition_data))[0]

    botocore.regions.EndpointProvider = shared_provider
