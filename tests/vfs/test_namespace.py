"""The namespace (sidecar.vfs.namespace): listings, lookups, inodes, attributes, directories."""

import dataclasses
import errno
import os
import random

import pytest
import trio
import trio.testing

from sidecar.cache.blocks import BlockCache
from sidecar.errors import NotFound, ObjectChanged, SidecarError, errno_for
from sidecar.store.memory import MemoryStore
from sidecar.vfs.core import ROOT_INO, Filesystem
from sidecar.vfs.staging import StagingArea
from tests.fshelpers import BS, mounted, names, path_ino, read_all, run


def test_directories_from_prefixes_and_markers_with_sizes_from_listing():
    store = MemoryStore()
    store.put("data/a.txt", b"hello", mtime=1_700_000_000)
    store.put("data/sub/b.bin", b"x" * 10)
    store.put("data/empty/", b"")  # folder marker
    store.put("other/c", b"not mounted")

    async def main():
        async with mounted(store, prefix="data") as fs:
            top = await names(fs)
            assert set(top) == {"a.txt", "sub", "empty"}
            assert top["a.txt"].size == 5 and top["a.txt"].mtime == 1_700_000_000
            assert top["sub"].is_dir and top["empty"].is_dir
            assert top["a.txt"].uid == 1000 and top["a.txt"].gid == 100
            assert top["a.txt"].mode & 0o777 == 0o444
            assert await names(fs, "empty") == {}
            assert store.stats.head_requests == 0  # sizes came from the listing
            assert await read_all(fs, "sub/b.bin") == b"x" * 10

    run(main)


def test_unrepresentable_names_are_skipped_with_one_warning(monkeypatch):
    from sidecar.vfs import listings

    warnings = []
    monkeypatch.setattr(listings.log, "warning", lambda event, **kw: warnings.append((event, kw["key"], kw["reason"])))

    store = MemoryStore()
    store.put("ok", b"1")
    store.put("a//b", b"2")
    store.put("x" * 256, b"3")
    store.put("dup", b"file")
    store.put("dup/inner", b"dir wins")
    store.put("./dot", b"4")

    async def main():
        async with mounted(store) as fs:
            listed = await names(fs)
            assert await names(fs, "a") == {}  # "a//b": the empty segment cannot be shown
            await trio.sleep(6)  # past the TTL: listed again, warned no more
            await names(fs)
            await names(fs, "a")
            await trio.testing.wait_all_tasks_blocked()
            # the root and "a" twice each; a walker going down into "a" gets the next folder of
            # the root, "dup", listed ahead (ListAhead), twice too
            assert store.stats.list_requests == 6
            return listed

    listed = run(main)
    assert sorted(k for _, k, _ in warnings) == sorted(["a//", "x" * 256, "dup", "./"])  # once each
    assert {e for e, _, _ in warnings} == {"object_skipped"}
    assert set(listed) == {"ok", "a", "dup"}
    assert listed["dup"].is_dir
    assert sorted(listed) == ["a", "dup", "ok"]


def test_lookup_counts_and_forget_drop_inodes():
    store = MemoryStore()
    store.put("f", b"1")

    async def main():
        async with mounted(store) as fs:
            a1 = await fs.lookup(ROOT_INO, "f")
            a2 = await fs.lookup(ROOT_INO, "f")
            assert a1.ino == a2.ino
            assert fs.node(a1.ino).lookups == 2
            fs.forget([(a1.ino, 1)])
            assert fs.node(a1.ino).lookups == 1
            fs.forget([(a1.ino, 1)])
            assert fs.inode_count == 1
            fs.forget([(999, 1), (ROOT_INO, 5)])  # unknown inodes and the root: never raise
            # readdir entries not accepted by the kernel are dropped at releasedir
            fh = await fs.opendir(ROOT_INO)
            (name, attr, _), = fs.readdir(fh, 0)
            fs.releasedir(fh)
            assert fs.inode_count == 1

    run(main)


@pytest.mark.parametrize("seed", range(20))
def test_two_directory_handles_and_lookups_forgets_never_answer_an_unknown_inode(seed):
    """A randomized kernel: opendir/readdir/releasedir on two handles of one folder, lookups,
    forgets of what it was given, and remote changes; every inode answered must be in the table
    until the kernel forgets it (the bug: releasedir dropped nodes another handle still listed)."""
    rng = random.Random(seed)
    store = MemoryStore()
    for i in range(8):
        store.put(f"d/f{i}", b"x" * i)

    async def main():
        async with mounted(store, ttl=0.5) as fs:
            d = await path_ino(fs, "d")
            kernel: dict[int, int] = {d: 1}  # what the "kernel" holds: ino -> lookup count
            handles: list[int] = []
            for step in range(300):
                op = rng.random()
                if op < 0.2 or not handles:
                    handles.append(await fs.opendir(d))
                elif op < 0.45:
                    fh = rng.choice(handles)
                    start = rng.randrange(0, 9)
                    for name, attr, _ in fs.readdir(fh, start):
                        assert attr.ino in fs.inodes, f"step {step}: readdir answered unknown inode {attr.ino}"
                        if rng.random() < 0.5:  # the kernel accepted the readdirplus entry
                            fs.remember(attr.ino)
                            kernel[attr.ino] = kernel.get(attr.ino, 0) + 1
                elif op < 0.6:
                    fs.releasedir(handles.pop(rng.randrange(len(handles))))
                elif op < 0.75:
                    try:
                        attr = await fs.lookup(d, f"f{rng.randrange(10)}")
                    except Exception:
                        continue
                    kernel[attr.ino] = kernel.get(attr.ino, 0) + 1
                elif op < 0.9 and kernel:
                    ino = rng.choice(list(kernel))
                    if ino == d:
                        continue
                    n = kernel.pop(ino)
                    fs.forget([(ino, n)])
                else:
                    i = rng.randrange(10)
                    if rng.random() < 0.5:
                        store.put(f"d/f{i}", rng.randbytes(3))
                    elif f"d/f{i}" in store.objects:
                        store.remove(f"d/f{i}")
                    await trio.sleep(0.3)
                for ino in kernel:  # everything the kernel holds is known to the table
                    assert ino in fs.inodes, f"step {step}: the kernel holds {ino}, the table lost it"
            for fh in handles:
                fs.releasedir(fh)
            for ino, n in kernel.items():
                if ino != d:
                    fs.forget([(ino, n)])
            fs.forget([(d, 1)])
            assert fs.inode_count == 1  # nothing leaks once every reference is given back

    run(main)


def test_readdir_offsets_stable_while_directory_changes():
    store = MemoryStore()
    for i in range(10):
        store.put(f"f{i:02d}", b"x")

    async def main():
        async with mounted(store, ttl=0) as fs:
            fh = await fs.opendir(ROOT_INO)
            first = fs.readdir(fh, 0)[:4]
            store.remove("f00")
            store.put("a-new", b"y")
            rest = fs.readdir(fh, first[-1][2])
            fs.releasedir(fh)
            seen = [n for n, _, _ in first] + [n for n, _, _ in rest]
            assert seen == [f"f{i:02d}" for i in range(10)]  # no entry lost or repeated
            assert [off for _, _, off in first + rest] == list(range(1, 11))

    run(main)


def test_metadata_ttl_and_negative_cache():
    store = MemoryStore()
    store.put("a", b"1")

    async def main():
        async with mounted(store, ttl=5) as fs:
            with pytest.raises(SidecarError) as err:
                await fs.lookup(ROOT_INO, "missing")
            assert errno_for(err.value) == errno.ENOENT
            heads = store.stats.head_requests
            store.put("missing", b"now here")
            with pytest.raises(NotFound):
                await fs.lookup(ROOT_INO, "missing")  # negative entry still fresh
            assert store.stats.head_requests == heads
            await trio.sleep(5.1)
            lists = store.stats.list_requests
            assert (await fs.lookup(ROOT_INO, "missing")).size == 8
            # the lookup listed the folder (one LIST, no HEAD): the listings after it are cached
            assert store.stats.list_requests == lists + 1 and store.stats.head_requests == heads
            await names(fs)
            await names(fs)
            assert store.stats.list_requests == lists + 1

    run(main)


def test_replaced_object_seen_after_ttl_never_mixed():
    store = MemoryStore()
    old = bytes(random.Random(1).randbytes(BS * 3))
    new = bytes(random.Random(2).randbytes(BS * 3 + 5))
    store.put("obj", old)

    async def main():
        async with mounted(store, ttl=2) as fs:
            ino = await path_ino(fs, "obj")
            fh, keep = await fs.open(ino, os.O_RDONLY)
            assert keep is False
            assert await fs.read(fh, 0, 100) == old[:100]
            store.put("obj", new)
            # the open handle pins the old etag: a block it has not read yet cannot be mixed in
            with pytest.raises(ObjectChanged) as err:
                await fs.read(fh, BS * 2, 100)
            assert errno_for(err.value) == errno.ESTALE
            fs.release(fh)
            await trio.sleep(2.1)
            # An inode is one version: the old one is stale (the kernel then looks the name up
            # again), and the name now leads to a new inode with the new size.
            with pytest.raises(ObjectChanged):
                await fs.getattr(ino)
            new_ino = await path_ino(fs, "obj")
            assert new_ino != ino and (await fs.getattr(new_ino)).size == len(new)
            assert await read_all(fs, "obj") == new
            store.remove("obj")
            await trio.sleep(2.1)
            with pytest.raises(SidecarError) as err:
                await fs.getattr(new_ino)
            assert errno_for(err.value) == errno.ENOENT

    run(main)


def test_a_new_version_gets_a_new_inode_and_open_handles_keep_theirs():
    """The kernel caches pages per inode: a reader of the old version must never share an inode
    with a reader of the new one (DESIGN: versions and the page cache)."""
    store = MemoryStore()
    old, new_small = random.Random(3).randbytes(BS * 3), random.Random(4).randbytes(BS + 7)
    store.put("obj", old)

    async def main():
        async with mounted(store, ttl=1) as fs:
            ino = await path_ino(fs, "obj")
            fh_old, _ = await fs.open(ino, os.O_RDONLY)
            assert await fs.read(fh_old, 0, 10) == old[:10]
            store.put("obj", new_small)  # replaced by a smaller object
            await trio.sleep(1.1)
            # a second reader opening through the kernel's cached dentry gets ESTALE (the kernel
            # retries with a fresh lookup), never the old inode with the new bytes
            with pytest.raises(ObjectChanged):
                await fs.open(ino, os.O_RDONLY)
            ino_new = await path_ino(fs, "obj")
            assert ino_new != ino
            fh_new, keep = await fs.open(ino_new, os.O_RDONLY)
            assert keep is False
            assert await fs.read(fh_new, 0, BS + 7) == new_small
            # the old handle's inode still has the old size (no silent EOF at the new size),
            # and bytes it has not read yet are an error, never the new version's
            assert (await fs.getattr(ino)).size == len(old)
            with pytest.raises(ObjectChanged):
                await fs.read(fh_old, BS * 2, 100)
            fs.release(fh_old)
            fs.release(fh_new)
            fs.forget([(ino, 1)])
            assert ino not in fs.inodes  # dropped once no handle and no kernel reference holds it

    run(main)


def test_keep_cache_only_when_etag_unchanged():
    store = MemoryStore()
    store.put("k", b"one")

    async def main():
        async with mounted(store, ttl=1) as fs:
            ino = await path_ino(fs, "k")
            fh, keep = await fs.open(ino, os.O_RDONLY)
            fs.release(fh)
            fh, keep2 = await fs.open(ino, os.O_RDONLY)
            fs.release(fh)
            store.put("k", b"two!")
            await trio.sleep(1.1)
            with pytest.raises(ObjectChanged):  # that inode is the old version
                await fs.open(ino, os.O_RDONLY)
            fh, keep3 = await fs.open(await path_ino(fs, "k"), os.O_RDONLY)
            fs.release(fh)
            assert (keep, keep2, keep3) == (False, True, False)

    run(main)


@pytest.mark.parametrize("ttl", [0.0, 5.0])
def test_deep_walk_costs_one_call_per_folder(ttl):
    """A walk down 50 nested folders, resolving each path from the root as the kernel does
    when its entries have expired: at most one backend call per folder, never one per ancestor
    per step (before: 1,275 HEADs at depth 50 with metadata_ttl 0)."""
    depth = 50
    store = MemoryStore()
    store.put("/".join(f"d{i}" for i in range(depth)) + "/leaf.txt", b"x")

    async def main():
        async with mounted(store, ttl=ttl) as fs:
            for d in range(1, depth + 1):
                await path_ino(fs, "/".join(f"d{i}" for i in range(d)))
                await trio.sleep(0.2)  # a 10 s walk: the 5 s TTL expires part way (0 s: at once)
            return store.stats.head_requests + store.stats.list_requests

    calls = run(main)
    assert calls <= depth, calls


def test_lookups_are_answered_from_one_listing_single_flight():
    store = MemoryStore()
    for i in range(300):
        store.put(f"d/f{i:03d}", b"x")
    for i in range(1200):
        store.put(f"big/f{i:04d}", b"y")

    async def main():
        async with mounted(store, ttl=60) as fs:
            d = await path_ino(fs, "d")
            big = await path_ino(fs, "big")
            store.stats.list_requests = store.stats.head_requests = 0
            store.delay = 0.05  # every call takes a while: concurrent lookups overlap

            async def look(parent, name):
                await fs.lookup(parent, name)

            async with trio.open_nursery() as n:
                for i in range(300):
                    n.start_soon(look, d, f"f{i:03d}")
            # 300 concurrent lookups in an unlisted folder: one LIST between them, no HEAD
            assert (store.stats.list_requests, store.stats.head_requests) == (1, 0)
            with pytest.raises(NotFound):
                await fs.lookup(d, "absent")  # answered by the listing too
            assert (store.stats.list_requests, store.stats.head_requests) == (1, 0)
            # a folder of more than one page (1,200 names): listed whole, once; no HEAD
            for i in range(0, 1200, 7):
                await fs.lookup(big, f"f{i:04d}")
            assert (store.stats.list_requests, store.stats.head_requests) == (2, 0)

    run(main)


def test_lookups_in_a_5000_entry_folder_cost_lists_only_cold_and_after_the_ttl():
    """Every name of a 5,000-entry folder looked up (a Dataset's stat of each file), cold, then
    again once the listing has expired: one listing each time, never a HEAD (before: a folder of
    more than one page was looked up by HEAD, one per name, on every pass)."""
    store = MemoryStore()
    for i in range(5000):
        store.put(f"images/img{i:05d}.jpg", b"z")

    async def main():
        async with mounted(store, ttl=0.5) as fs:
            images = await path_ino(fs, "images")
            store.stats.list_requests = store.stats.head_requests = 0
            for _ in range(2):
                for i in range(5000):
                    await fs.lookup(images, f"img{i:05d}.jpg")
                await trio.sleep(0.6)  # the listing and the entries expire
            return store.stats.list_requests, store.stats.head_requests

    lists, heads = run(main)
    assert heads == 0 and 2 <= lists <= 4, (lists, heads)


def test_a_folder_over_the_listing_bound_is_looked_up_name_by_name(monkeypatch):
    """Past FOLDER_LIST_MAX entries a folder is not kept: one bounded LIST, then a HEAD per name
    (and the folder is remembered as big: no LIST again while that holds)."""
    from sidecar.vfs import namespace

    monkeypatch.setattr(namespace, "FOLDER_LIST_MAX", 1000)
    store = MemoryStore()
    for i in range(1200):
        store.put(f"big/f{i:04d}", b"y")

    async def main():
        async with mounted(store, ttl=60) as fs:
            big = await path_ino(fs, "big")
            store.stats.list_requests = store.stats.head_requests = 0
            for i in range(5):
                await fs.lookup(big, f"f{i:04d}")
            assert (store.stats.list_requests, store.stats.head_requests) == (1, 5)

    run(main)


def test_mtime_set_through_the_mount_is_stored_and_shown_after_a_remount(tmp_path):
    from sidecar.vfs.mtimes import MtimeIndex

    store = MemoryStore()
    store.put("f.txt", b"data", mtime=1_000_000.0)

    async def main():
        cache = BlockCache(store, block_size=BS, memory_limit=BS * 4)
        async with trio.open_nursery() as n:
            await n.start(cache.run)
            fs = Filesystem(store, cache, readonly=False, staging=StagingArea(tmp_path / "staging"),
                            mtimes=MtimeIndex(tmp_path / "mtimes.db"))
            ino = (await fs.lookup(ROOT_INO, "f.txt")).ino
            assert (await fs.getattr(ino)).mtime == 1_000_000.0
            await fs.setattr(ino, mtime=1_234_567_890.5)  # touch -d / rsync -t
            assert store.objects["f.txt"][1].mtime == 1_234_567_890.5  # stored with the object
            fs.mtimes.close()
            # a new mount with the same cache folder: the listing shows the time that was set
            store.objects["f.txt"] = (store.objects["f.txt"][0], dataclasses.replace(store.objects["f.txt"][1], mtime=2_000_000.0))
            fs2 = Filesystem(store, cache, readonly=True, mtimes=MtimeIndex(tmp_path / "mtimes.db"))
            assert (await fs2.lookup(ROOT_INO, "f.txt")).mtime == 1_234_567_890.5
            n.cancel_scope.cancel()

    run(main)


def test_the_listing_caches_stay_bounded_over_a_long_session(monkeypatch):
    """Millions of missing names looked up and thousands of folders walked in one session: the
    "does not exist" answers and the cached listings stay within their bounds (the expired
    ones go first, then the oldest) and the newest answers are still served."""
    from sidecar.vfs import listings as lmod

    monkeypatch.setattr(lmod, "NEGATIVE_MAX", 100)
    monkeypatch.setattr(lmod, "FOLDERS_MAX", 50)
    ls = lmod.Listings(ttl=5.0)
    now = 0.0
    for i in range(1000):
        now += 0.01  # all still in force: the oldest go
        ls.set_absent(f"k{i}", now)
        ls.store(f"d{i}", {}, now)
        assert len(ls._negative) <= 100 and len(ls._dirs) <= 50
    assert ls.absent("k999", now) and ls.fresh("d999", now) == {}
    assert not ls.absent("k0", now) and ls.fresh("d0", now) is None  # forgotten: asked again
    now += 10  # all expired: the next insertion beyond the bound clears them
    for i in range(101):
        ls.set_absent(f"late{i}", now)
    assert len(ls._negative) <= 100 and all(k.startswith("late") for k in ls._negative)
