"""Small pieces of the stores, without a server."""

import time

import pytest
from botocore.utils import parse_timestamp

from sidecar.store.patches import fast_timestamp
from sidecar.store.s3 import make_s3_filesystem


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


def closed_port_store():
    """An S3 store whose endpoint is a port where nothing listens: any request fails."""
    from sidecar.store.s3 import S3Store

    fs = make_s3_filesystem({"endpoint_url": "http://127.0.0.1:9"}, {"access_key_id": "a", "secret_access_key": "b"}, None, "us-east-1")
    return S3Store(fs, "bucket", "s", deadline=5.0)


def test_the_s3_rehearsal_answers_reads_without_a_request_and_leaves_no_handler():
    """The worker's rehearsal of GetObject and HeadObject is answered inside the SDK: against a
    port where nothing listens it succeeds; afterwards a real call goes to the network again."""
    import trio

    from sidecar.errors import BackendUnavailable
    from sidecar.protocol import WorkerConfig
    from sidecar.worker import rehearse_read

    store = closed_port_store()
    fs = store.fs
    rehearsed = []

    async def main():
        await store.warm_up()
        client = fs.s3
        client.meta.events.register("after-call.s3", lambda **kw: rehearsed.append(kw["model"].name))
        await rehearse_read(store, WorkerConfig(name="t", storage_id="t", url="s3://bucket", mountpath="/nonexistent", credentials={"access_key_id": "a", "secret_access_key": "b"}))
        with pytest.raises(BackendUnavailable):  # a real call: the closed port answers
            await store.get_range(".storage-sidecar-rehearsal", 0, 1, "0")

    trio.run(main)
    assert rehearsed == ["GetObject", "HeadObject"]  # both answered without a request
    assert store.stats.errors == 1  # only the real call went to the (closed) port


def test_the_quick_resolver_gives_what_aiobotocores_gives():
    """aiobotocore's resolve_awaitable is replaced by one with a fast path for plain values:
    the same result for plain values, awaitables and other objects."""
    import asyncio

    import aiobotocore.hooks
    from aiobotocore import _helpers

    from sidecar.store.patches import _resolve_plain_quickly

    make_s3_filesystem({"endpoint_url": "http://127.0.0.1:9"}, {"access_key_id": "a", "secret_access_key": "b"}, None, None)
    assert aiobotocore.hooks.resolve_awaitable is _resolve_plain_quickly

    async def seven():
        return 7

    class Odd:  # neither plain nor awaitable
        pass

    odd = Odd()

    async def main():
        for value in (None, 0, "x", b"y", {"a": 1}, [1], (2,), 1.5, True, odd):
            assert await _resolve_plain_quickly(value) is await _helpers.resolve_awaitable(value)
        assert await _resolve_plain_quickly(seven()) == await _helpers.resolve_awaitable(seven()) == 7

    asyncio.run(main())


def test_a_gate_wakes_a_waiter_on_another_threads_asyncio_loop():
    """The S3 stream waits at its gate on the SDK's asyncio loop; the reader opens or closes the
    gate from the trio thread. Opened: the waiter goes on; closed: it stops; left alone: it
    stops after its idle time."""
    import asyncio
    import threading

    from sidecar.store.base import Gate

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        def waiting(gate, i):
            future = asyncio.run_coroutine_threadsafe(gate.wait_asyncio(i), loop)
            deadline = time.monotonic() + 5
            while gate._wake is None and time.monotonic() < deadline:  # the waiter is parked
                time.sleep(0.001)
            assert gate._wake is not None and not future.done()
            return future

        gate = Gate(idle=30)
        gate.open_to(1)
        assert asyncio.run_coroutine_threadsafe(gate.wait_asyncio(0), loop).result(5) is True  # allowed already
        future = waiting(gate, 1)
        gate.open_to(2)
        assert future.result(5) is True
        future = waiting(gate, 2)
        gate.close()
        assert future.result(5) is False
        quiet = Gate(idle=0.05)
        assert asyncio.run_coroutine_threadsafe(quiet.wait_asyncio(0), loop).result(5) is False
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_the_read_rehearsal_runs_a_whole_read_without_a_request():
    """A worker rehearses a reader's first read (FUSE operations down to the store) against an
    object answered inside the SDK: against a closed port it reads the whole object, and the
    store's counters show nothing afterwards."""
    import trio

    from sidecar.protocol import WorkerConfig
    from sidecar.store.s3 import REHEARSAL_KEY, REHEARSAL_SIZE
    from sidecar.worker import rehearse_read

    store = closed_port_store()
    delivered = []

    async def main():
        await store.warm_up()
        real = store.get_blocks

        async def watched(key, start, end, etag, block_size, on_block, **kw):
            def seen(i, data):
                delivered.append((key, len(data)))
                on_block(i, data)

            await real(key, start, end, etag, block_size, seen, **kw)

        store.get_blocks = watched
        await rehearse_read(store, WorkerConfig(name="t", storage_id="t", url="s3://bucket", mountpath="/nonexistent", credentials={"access_key_id": "a", "secret_access_key": "b"}))

    trio.run(main)
    assert sum(n for key, n in delivered if key == REHEARSAL_KEY) == REHEARSAL_SIZE
    assert store.stats.get_requests == 0 and store.stats.errors == 0


@pytest.mark.parametrize("start,end", [(0, 10), (3, 10), (4, 8), (5, 6), (0, 4), (7, 7)])
def test_block_pieces_end_at_block_boundaries(start, end):
    from sidecar.store.base import block_pieces

    pieces = list(block_pieces(start, end, 4))
    assert [i for i, _, _ in pieces] == list(range(len(pieces)))
    assert b"".join(bytes(range(lo, hi)) for _, lo, hi in pieces) == bytes(range(start, end))  # consecutive, whole
    assert all(hi % 4 == 0 or hi == end for _, _, hi in pieces)
    assert all(lo // 4 == (hi - 1) // 4 for _, lo, hi in pieces)  # none crosses a boundary


def test_a_held_back_stream_lowers_its_own_aiohttp_buffer_and_receive_buffer():
    """`_hold_back` reaches into the response (the installed aiohttp's StreamReader and the
    connection's socket): a rename there would silently let 4x more be buffered."""
    import asyncio
    import socket
    from types import SimpleNamespace

    import aiohttp

    from sidecar.store.s3 import FOLLOW_RCVBUF, GATED_READ, _hold_back

    async def main():
        a, b = socket.socketpair()
        try:
            transport = SimpleNamespace(get_extra_info=lambda name: a if name == "socket" else None)
            content = aiohttp.StreamReader(SimpleNamespace(), limit=2**18, loop=asyncio.get_running_loop())
            other = aiohttp.StreamReader(SimpleNamespace(), limit=2**18, loop=asyncio.get_running_loop())
            body = SimpleNamespace(_raw_stream=SimpleNamespace(connection=SimpleNamespace(transport=transport), content=content))
            assert content.get_read_buffer_limits() == (2**18, 2**19)
            assert _hold_back(body) is transport
            assert content.get_read_buffer_limits() == (GATED_READ, 2 * GATED_READ)
            assert other.get_read_buffer_limits() == (2**18, 2**19)  # this response only
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * FOLLOW_RCVBUF
        finally:
            a.close()
            b.close()

    asyncio.run(main())


_REGION = """
import ctypes, sys
from sidecar.worker import return_freed_blocks

def region(b):
    addr = ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b))
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5] if len(fields) > 5 else "anonymous"

if sys.argv[1] == "on":
    assert return_freed_blocks()
b = bytearray(1 << 20)
del b  # glibc's default threshold rises past 1 MiB here
b = bytearray(1 << 20)
print(region(b))
"""


def test_a_worker_gives_each_block_its_own_mapping_so_freed_blocks_leave_its_memory():
    """After one block was freed, glibc would serve the next from its heap, whose holes stay
    resident; the worker's setting keeps blocks in mappings of their own, unmapped when freed."""
    import subprocess
    import sys

    def where(setting: str) -> str:
        return subprocess.run([sys.executable, "-c", _REGION, setting], capture_output=True, text=True, check=True).stdout.strip()

    assert where("off") == "[heap]"
    assert where("on") == "anonymous"


def test_a_whole_listing_page_is_parsed_once_and_an_error_with_200_still_is_one(monkeypatch):
    """S3's 200-with-an-error-document check skips a listing page that ends with its closing tag
    (so its body is parsed once) and still turns any other 200 body that is an error, or a cut
    listing, into a 500 for botocore's retry."""
    import botocore.session
    from botocore import handlers

    from sidecar.store.patches import quick_200_check

    checked = []
    real = handlers._looks_like_special_case_error
    monkeypatch.setattr(handlers, "_looks_like_special_case_error", lambda status, body: checked.append(body) or real(status, body))
    session = botocore.session.Session()
    quick_200_check(session)
    s3 = session.get_service_model("s3")
    emitter = session.get_component("event_emitter")

    def parse(op, body):
        response = {"status_code": 200, "body": body, "headers": {}}
        emitter.emit(f"before-parse.s3.{op}", operation_model=s3.operation_model(op), response_dict=response, customized_response_dict={})
        return response["status_code"]

    listing = b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult><Name>b</Name><KeyCount>0</KeyCount></ListBucketResult>\n'
    assert parse("ListObjectsV2", listing) == 200 and checked == []
    error = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>x</Message></Error>'
    assert parse("ListObjectsV2", error) == 500
    assert parse("ListObjectsV2", listing[:60]) == 500  # cut: botocore's check sees it
    assert parse("CompleteMultipartUpload", error) == 500
    assert len(checked) == 3


def test_a_worker_collects_garbage_less_often_than_pythons_default():
    import gc

    from sidecar.worker import GC_THRESHOLDS, collect_less_often

    before = gc.get_threshold()
    try:
        collect_less_often()
        assert gc.get_threshold() == GC_THRESHOLDS and GC_THRESHOLDS[0] > before[0]
    finally:
        gc.set_threshold(*before)


def test_a_worker_closes_its_store_within_a_bound_and_whatever_the_store_raises(monkeypatch):
    """A store whose close never returns holds the worker's exit CLOSE_STORE_S at most (a mock
    clock: no waiting), and one whose close fails does not turn the exit into an error."""
    import trio.testing

    from sidecar import worker

    closed = []

    class Hangs:
        async def close(self):
            await trio.sleep_forever()

    class Fails:
        async def close(self):
            closed.append("fails")
            raise RuntimeError("connection reset")

    class Closes:
        async def close(self):
            closed.append("closes")

    async def main():
        start = trio.current_time()
        await worker.close_store(Hangs())
        assert trio.current_time() - start == pytest.approx(worker.CLOSE_STORE_S)
        await worker.close_store(Fails())
        await worker.close_store(Closes())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert closed == ["fails", "closes"]
