"""sidecar.store.s3get: a ranged GET is one request signed as the SDK signs it (moto checks every
signature), without the SDK's per-call work; its errors are classified as before, and anything
it does not handle is left to the SDK."""

import gzip

import pytest
import trio

from sidecar.errors import NotFound, ObjectChanged
from tests.store.test_s3 import _store

KEYS = ["plain.bin", "folder/with space/ü+%?#&=;~.bin", "a/b/c/d/e.bin"]


def _sdk_gets(store) -> list[str]:
    """Counts the SDK's GetObject calls (the path that must not be needed)."""
    calls: list[str] = []
    original = store.fs._call_s3

    async def spy(method, *args, **kwargs):
        if method == "get_object":
            calls.append(kwargs.get("Key", ""))
        return await original(method, *args, **kwargs)

    store.fs._call_s3 = spy
    return calls


def test_ranged_gets_are_one_signed_request_each_without_the_sdk(s3, proxied):
    proxy, bucket = proxied
    client = s3.client()
    data = bytes(range(256)) * 400
    etags = {key: client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"') for key in KEYS}
    store = _store(s3, bucket, proxy.endpoint)
    sdk = _sdk_gets(store)

    async def main():
        await store.warm_up()
        proxy.reset_counts()
        for key in KEYS:
            assert await store.get_range(key, 1000, 5000, etags[key]) == data[1000:5000]
            assert await store.get_range(key, 0, len(data), etags[key]) == data

    trio.run(main)
    assert proxy.counts["GET"] == 2 * len(KEYS)
    assert sdk == []
    assert store._lean.enabled


def test_a_changed_or_missing_object_is_classified_from_the_one_answer(s3, proxied):
    proxy, bucket = proxied
    client = s3.client()
    old = client.put_object(Bucket=bucket, Key="f.bin", Body=b"old" * 1000)["ETag"].strip('"')
    client.put_object(Bucket=bucket, Key="f.bin", Body=b"new" * 1000)
    store = _store(s3, bucket, proxy.endpoint)
    sdk = _sdk_gets(store)

    async def main():
        await store.warm_up()
        proxy.reset_counts()
        with pytest.raises(ObjectChanged):
            await store.get_range("f.bin", 0, 100, old)
        with pytest.raises(NotFound):
            await store.get_range("gone.bin", 0, 100, old)

    trio.run(main)
    assert proxy.counts["GET"] == 2
    assert sdk == []
    assert store._lean.enabled


def test_an_object_stored_with_a_content_encoding_is_served_as_its_bytes(s3, proxied):
    """aiohttp inflates a gzip body by default; the SDK does not, and neither may this."""
    proxy, bucket = proxied
    packed = gzip.compress(b"a line of text\n" * 5000)
    etag = s3.client().put_object(Bucket=bucket, Key="t.gz", Body=packed, ContentEncoding="gzip")["ETag"].strip('"')
    store = _store(s3, bucket, proxy.endpoint)
    sdk = _sdk_gets(store)

    async def main():
        await store.warm_up()
        assert await store.get_range("t.gz", 0, len(packed), etag) == packed
        assert await store.get_range("t.gz", 10, 60, etag) == packed[10:60]

    trio.run(main)
    assert sdk == []


def test_an_answer_it_does_not_handle_is_left_to_the_sdk(s3, proxied):
    """A 503 to the plain GET: the SDK path asks again (with its retries) and the read succeeds.
    Reads go to the SDK (and its backoff) for a while after it, not one more request each; then
    the fast path takes them again (it was the server's state, not the bucket's)."""
    proxy, bucket = proxied
    etag = s3.client().put_object(Bucket=bucket, Key="f.bin", Body=b"x" * 5000)["ETag"].strip('"')
    store = _store(s3, bucket, proxy.endpoint)
    sdk = _sdk_gets(store)

    async def main():
        await store.warm_up()
        proxy.set(errors_next=1)
        proxy.reset_counts()
        assert await store.get_range("f.bin", 100, 200, etag) == b"x" * 100
        assert await store.get_range("f.bin", 0, 10, etag) == b"x" * 10
        assert proxy.counts["GET"] == 3  # the 503, the SDK's answer, the SDK again
        assert sdk == ["f.bin", "f.bin"]
        store._lean._resume_at = 0.0  # (the cool-down over)
        assert await store.get_range("f.bin", 10, 20, etag) == b"x" * 10

    trio.run(main)
    assert proxy.errors_injected == 1
    assert sdk == ["f.bin", "f.bin"]
    assert store._lean.enabled


def test_a_request_wrong_for_the_bucket_turns_the_fast_path_off(s3, proxied):
    """A signature the server refuses (SignatureDoesNotMatch) is not tried again for every read:
    the SDK answers from then on."""
    proxy, bucket = proxied
    etag = s3.client().put_object(Bucket=bucket, Key="f.bin", Body=b"y" * 5000)["ETag"].strip('"')
    store = _store(s3, bucket, proxy.endpoint)
    sdk = _sdk_gets(store)

    lean = store._lean
    signed = lean._headers

    async def refused(*args):
        headers = await signed(*args)
        headers["Authorization"] = headers["Authorization"][:-8] + "00000000"
        return headers

    lean._headers = refused

    async def main():
        await store.warm_up()
        assert await store.get_range("f.bin", 0, 10, etag) == b"y" * 10
        assert await store.get_range("f.bin", 10, 20, etag) == b"y" * 10

    trio.run(main)
    assert not store._lean.enabled
    assert sdk == ["f.bin", "f.bin"]


def test_a_server_that_answers_a_range_with_200_and_its_content_range(rclone_s3):
    """`rclone serve s3` answers a ranged GET with 200 and the Content-Range: still the fast
    path's answer (taking only 206 sent every read to the SDK too: two requests per read)."""
    data = bytes(range(256)) * 64
    bucket, etag = _rclone_bucket(rclone_s3, data)
    store = _store(rclone_s3, bucket, rclone_s3.endpoint)
    sdk = _sdk_gets(store)

    async def main():
        await store.warm_up()
        assert await store.get_range("f.bin", 300, 4000, etag) == data[300:4000]
        assert await store.get_range("f.bin", 0, len(data), etag) == data

    trio.run(main)
    assert sdk == []


def _rclone_bucket(rclone_s3, data: bytes):
    import uuid

    bucket = f"r-{uuid.uuid4().hex[:12]}"
    client = rclone_s3.client()
    client.create_bucket(Bucket=bucket)
    etag = client.put_object(Bucket=bucket, Key="f.bin", Body=data)["ETag"].strip('"')
    return bucket, etag


def test_gets_reuse_a_kept_alive_connection_and_closing_the_store_closes_it(rclone_s3):
    """moto answers `Connection: close`; `rclone serve s3` keeps connections alive."""
    data = bytes(range(256)) * 64
    bucket, etag = _rclone_bucket(rclone_s3, data)
    store = _store(rclone_s3, bucket, rclone_s3.endpoint)

    async def main():
        await store.warm_up()
        assert await store.get_range("f.bin", 0, 100, etag) == data[:100]
        kept = list(store._lean._pool._idle)  # the GET's connection, kept alive for the next
        assert len(kept) == 1 and not kept[0].transport.is_closing()
        assert await store.get_range("f.bin", 100, 5000, etag) == data[100:5000]
        assert store._lean._pool._idle == kept  # the same connection again
        await store.close()
        assert kept[0].transport.is_closing()

    trio.run(main)
