"""Small pieces of the stores, without a server."""

import pytest
from botocore.utils import parse_timestamp

from sidecar.store.fsspec_store import fast_timestamp, make_s3_filesystem


@pytest.mark.parametrize("value", [
    "Wed, 25 Nov 2026 10:00:00 GMT",  # Last-Modified of a GET or HEAD
    "Mon, 01 Jan 1990 23:59:59 GMT",
    "2026-11-25T10:00:00.000Z",  # LastModified in a listing
    "2026-11-25T10:00:00Z",
    "2026-11-25T10:00:00.123456+02:00",
    "2026-11-25T10:00:00",  # no zone: botocore's parser decides
    "1700000000",  # epoch seconds
    1700000000.5,
])
def test_the_fast_timestamp_parser_agrees_with_botocores(value):
    fast, slow = fast_timestamp(value), parse_timestamp(value)
    assert fast == slow and (fast.tzinfo is None) == (slow.tzinfo is None)
    if fast.tzinfo is not None:
        assert fast.utcoffset() == slow.utcoffset()


def test_the_s3_client_parses_timestamps_with_the_fast_parser():
    fs = make_s3_filesystem({"endpoint_url": "http://127.0.0.1:9"}, {"access_key_id": "a", "secret_access_key": "b"}, None, None)
    factory = fs.session.get_component("response_parser_factory")
    assert factory._defaults.get("timestamp_parser") is fast_timestamp


def test_a_timestamp_that_is_not_one_is_refused_as_botocore_does():
    with pytest.raises(ValueError):
        parse_timestamp("not a date")
    with pytest.raises(ValueError):
        fast_timestamp("not a date")
