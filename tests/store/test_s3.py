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
