"""Logging: structlog configured once for the whole process.

JSON lines when stderr is not a terminal, readable console output when it is; ISO UTC
timestamps; stdlib loggers of libraries (botocore, fsspec, ...) go through the same processors.
The last processor before rendering redacts every secret value the process knows of
(`register_secret`) and any field whose name looks like a secret, so a credential never reaches
a log line, whatever code logged it.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog

REDACTED = "***"
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_configured = False

_SECRET_FIELD_PARTS = ("secret", "password", "token", "credential", "account_key", "sas", "connection_string", "signature")


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it would appear in a log line."""
    if value and len(value) >= 4:  # masking very short strings would garble unrelated text
        with _secrets_lock:
            _secrets.add(value)


def forget_secrets() -> None:
    with _secrets_lock:
        _secrets.clear()


def redact_text(text: str) -> str:
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for s in known:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: (REDACTED if _is_secret_field(k) else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    return value


def _is_secret_field(name: Any) -> bool:
    return isinstance(name, str) and any(p in name.lower() for p in _SECRET_FIELD_PARTS)


def redact_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: (REDACTED if _is_secret_field(k) else _redact_value(v)) for k, v in event_dict.items()}


def _redact_rendered(_logger: Any, _method: str, event_dict: Any) -> Any:
    # Tracebacks are rendered from exceptions only in format_exc_info; mask what they print too.
    return redact_text(event_dict) if isinstance(event_dict, str) else event_dict


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog and stdlib logging once (later calls only change the level)."""
    global _configured
    stream = stream or sys.stderr
    lvl = getattr(logging, level.upper(), logging.INFO)
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        final = [structlog.processors.format_exc_info, redact_processor, renderer, _redact_rendered]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        final = [redact_processor, renderer, _redact_rendered]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # Chatty libraries stay at warning unless we debug.
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "azure", "adlfs", "gcsfs", "asyncio", "httpx", "httpcore", "webdav4"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
