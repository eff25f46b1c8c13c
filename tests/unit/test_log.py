import io
import json
import logging

import pytest

from sidecar import log


@pytest.fixture
def stream():
    s = io.StringIO()
    log.configure("debug", json=True, stream=s)
    yield s
    log.forget_secrets()


def lines(stream):
    return [json.loads(x) for x in stream.getvalue().splitlines() if x.strip()]


def test_json_lines_with_iso_utc_timestamp(stream):
    log.get_logger("t").info("mount_ready", mount="giab")
    (rec,) = lines(stream)
    assert rec["event"] == "mount_ready" and rec["mount"] == "giab" and rec["level"] == "info"
    assert rec["timestamp"].endswith("Z")


def test_registered_secret_is_masked_everywhere(stream):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    log.register_secret(secret)
    logger = log.get_logger("t")
    logger.info("something", detail=f"url with {secret} inside", nested={"a": [secret]})
    logging.getLogger("botocore.test").warning("library says %s", secret)
    try:
        raise RuntimeError(f"failed with {secret}")
    except RuntimeError:
        logger.exception("boom")
    out = stream.getvalue()
    assert secret not in out
    assert out.count(log.REDACTED) >= 4
    assert len(lines(stream)) == 3


def test_secret_looking_fields_are_masked(stream):
    log.get_logger("t").info("creds", secret_access_key="abc", sas_token="zzz", bucket="giab")
    (rec,) = lines(stream)
    assert rec["secret_access_key"] == log.REDACTED and rec["sas_token"] == log.REDACTED
    assert rec["bucket"] == "giab"


def test_stdlib_logs_go_through_the_same_processors(stream):
    logging.getLogger("sidecar.lib").info("plain %d", 3)
    (rec,) = lines(stream)
    assert rec["event"] == "plain 3" and rec["logger"] == "sidecar.lib" and "timestamp" in rec


def test_console_renderer_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    log.configure("info", stream=s)
    log.get_logger("t").info("hello_console", n=1)
    assert "hello_console" in s.getvalue() and not s.getvalue().lstrip().startswith("{")
