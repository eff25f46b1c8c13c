"""`storage-sidecar prefetch` (sidecar.cache.warmup)."""


import pytest

from sidecar.cache.blocks import BlockCache
from sidecar.store.memory import MemoryStore
from tests.fshelpers import BS, run


def test_prefetch_plan_walks_folders_takes_files_and_refuses_missing_paths():
    from sidecar.cache.warmup import Prefetcher, PrefetchRefused

    store = MemoryStore()
    for key in ("data/a/one.bin", "data/a/deep/two.bin", "data/b.bin", "data/c/three.bin", "other/x.bin"):
        store.put(key, b"x" * 10)
    adopted = []

    async def adopt(folder, listing):
        adopted.append(folder)

    async def main():
        p = Prefetcher(store, BlockCache(store, block_size=BS, memory_limit=BS * 4), "data", adopt=adopt)
        keys = lambda infos: [i.key for i in infos]  # noqa: E731
        assert keys(await p.plan(["a"])) == ["data/a/deep/two.bin", "data/a/one.bin"]
        assert keys(await p.plan(["b.bin", "/a/deep/"])) == ["data/a/deep/two.bin", "data/b.bin"]
        assert keys(await p.plan([])) == ["data/a/deep/two.bin", "data/a/one.bin", "data/b.bin", "data/c/three.bin"]
        for missing in (["nope"], ["a/nope"], ["b.bin/x"]):
            with pytest.raises(PrefetchRefused):
                await p.plan(missing)

    run(main)
    assert "data" in adopted and "data/a" in adopted and "data/a/deep" in adopted  # the file system gets every listing
