"""sidecar.store.s3 and the counters every store keeps (sidecar.store.fsspec_store, patches)."""

import trio

from sidecar import urls
from sidecar.store.factory import build_store


def _store(s3, bucket, endpoint):
    url = urls.parse(f"s3://{bucket}")
    return build_store(f"test-{endpoint}", url, {"endpoint_url": endpoint}, {"access_key_id": s3.key, "secret_access_key": s3.secret},
                       deadline=20.0)


def test_each_store_counts_its_own_sdk_retries(s3, proxied):
    """Two stores in one process (as the copy worker and a check may be): 503 SlowDown answers
    to one store's calls, which s3fs retries, are counted by that store alone. Before, the s3fs
    part of the count was the process's, so every store reported every other's retries."""
    proxy, bucket = proxied
    s3.client().put_object(Bucket=bucket, Key="f.bin", Body=b"x" * 1000)
    slow = _store(s3, bucket, proxy.endpoint)
    calm = _store(s3, bucket, s3.endpoint)

    async def main():
        await calm.warm_up()
        await slow.warm_up()
        proxy.set(errors_next=3)
        listing = await slow.list_dir("")
        assert [f.key for f in listing.files] == ["f.bin"]
        assert [f.key for f in (await calm.list_dir("")).files] == ["f.bin"]

    trio.run(main)
    assert proxy.errors_injected == 3
    assert slow.stats.sdk_retries >= 3
    assert calm.stats.sdk_retries == 0


def _resident_pages(buffer) -> int:
    """Pages of `buffer` (an anonymous mapping) the kernel has given it memory for (mincore)."""
    import ctypes
    import mmap

    n = -(-len(buffer) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * n)()
    address = ctypes.c_char.from_buffer(buffer)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(ctypes.addressof(address)), ctypes.c_size_t(len(buffer)), vec) == 0, ctypes.get_errno()
    finally:
        del address
    return sum(b & 1 for b in vec)


def test_whole_blocks_arrive_in_page_aligned_buffers_populated_at_once(s3):
    """A store that fills buffers makes a new one as a `Buffer`: page-aligned (the disk tier
    reads into it with O_DIRECT when it is recycled) and with all its pages in memory before the
    body arrives (one call, not a fault per page as the body lands). A block's last piece, not a
    whole block, stays plain bytes."""
    import mmap

    from sidecar.store.base import Buffer

    fresh = Buffer.new(8 << 20)
    assert _resident_pages(fresh) == (8 << 20) // mmap.PAGESIZE  # (without MAP_POPULATE: 0)
    client = s3.client()
    bucket = "blocks-in-buffers"
    client.create_bucket(Bucket=bucket)
    block = 256 << 10
    data = bytes(range(256)) * (block * 3 // 256) + b"tail"
    etag = client.put_object(Bucket=bucket, Key="f.bin", Body=data)["ETag"].strip('"')
    store = _store(s3, bucket, s3.endpoint)
    got = {}

    async def main():
        await store.get_blocks("f.bin", 0, len(data), etag, block, got.__setitem__, buffers=lambda i: None)

    trio.run(main)
    assert [type(got[i]) for i in range(4)] == [Buffer, Buffer, Buffer, bytes]
    assert b"".join(bytes(got[i]) for i in range(4)) == data
    assert all(_resident_pages(got[i]) == block // mmap.PAGESIZE for i in range(3))
