"""`python -m benchmarks.training`: what training does to a mount (issue 36), on the emulated link.

The server is `rclone serve s3` behind tests/netproxy.LinkProxy (25 MB/s per connection, 30 ms
before each response), as in benchmarks.link; its folder is on the same disk as the caches, so
the served files are the local-disk reference. Workloads:

- epochs: a tree of small files (default 20,000 of 16-256 KiB in 100 folders) walked and stat-ed
  once, as a Dataset does, then read whole by 8 worker processes in a new shuffled order per epoch,
  3 epochs; the sidecar (and a mount with zero-message opens over its kept cache), `rclone mount
  --vfs-cache-mode full --use-server-modtime`, a direct client at the same
  concurrency (boto3 GETs in 8 processes), the local disk (page cache dropped before epoch 1) and
  the floor of any pyfuse3 + trio file system here (benchmarks/ramfs.py: the same names and sizes
  from memory).
- listing: the same walk + stat on a new mount against a direct paginated LIST of the prefix.
- checkpoint: a file written as `ckpt.tmp`, fsync, `os.replace` to `ckpt`, in durable and in
  write-back mode: requests and bytes uploaded per round; then the worker SIGKILLed between the
  write and the rename, and during or after the rename before the new name is stored: the bucket
  must hold a whole previous or a whole new checkpoint.
- mmap: a safetensors file of 200 tensors opened with `safe_open(framework="numpy")`, 20% of its
  tensors read in a random order: link bytes over the tensors' bytes, seconds against `rclone
  mount` off and full and the local file (page cache dropped).

Every reader runs in processes of its own (the proxy is threads of this one). Figures go to
benchmarks/results/<date>-training.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import ramfs
from benchmarks.link import BUCKET, KEY, SECRET, LinkBench, clean_up, cpu_seconds, drop_page_cache, save_results

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TREE = "train"
TENSORS = 200


# -- the readers, each run in a process of its own: `python -m benchmarks.training <what> ...` ----

def walk(root: str) -> dict[str, Any]:
    """os.walk + stat of every file, as a Dataset indexes its tree: names and sizes."""
    started = time.monotonic()
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            files.append((os.path.relpath(p, root), os.stat(p).st_size))
    files.sort()
    return {"seconds": time.monotonic() - started, "files": len(files), "bytes": sum(s for _, s in files), "names": [n for n, _ in files]}


def _read_whole(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        data = f.read()
    return len(data), hashlib.blake2b(data, digest_size=8).hexdigest()


_S3 = None


def _s3_init(endpoint: str) -> None:
    global _S3
    import boto3
    from botocore.config import Config

    _S3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1",
                       config=Config(max_pool_connections=4, retries={"max_attempts": 3}))


def _get_whole(key: str) -> tuple[int, str]:
    data = _S3.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[union-attr]
    return len(data), hashlib.blake2b(data, digest_size=8).hexdigest()


def epoch(root: str, names: list[str], seed: int, workers: int, endpoint: str = "") -> dict[str, Any]:
    """Reads every file whole, `workers` processes, in the order a seeded shuffle gives (a
    DataLoader's sampler); `endpoint`: by boto3 GETs instead of through `root`. The digest of
    every file (sorted by name) is returned to compare clients."""
    from multiprocessing import get_context

    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    ctx = get_context("fork")
    if endpoint:
        pool = ctx.Pool(workers, initializer=_s3_init, initargs=(endpoint,))
        jobs = [f"{root}/{names[i]}" for i in order]
        fn = _get_whole
    else:
        pool = ctx.Pool(workers)
        jobs = [os.path.join(root, names[i]) for i in order]
        fn = _read_whole
    started = time.monotonic()
    with pool:
        got = pool.map(fn, jobs, chunksize=4)
    secs = time.monotonic() - started
    digests = dict(zip((names[i] for i in order), (d for _, d in got)))
    total = hashlib.blake2b(" ".join(digests[n] for n in names).encode(), digest_size=8).hexdigest()
    return {"seconds": secs, "files": len(got), "bytes": sum(n for n, _ in got), "files_per_s": len(got) / secs, "digest": total}


def tensors(path: str, names: list[str]) -> dict[str, Any]:
    """safe_open (mmap) and get_tensor of `names` in that order: seconds and a checksum."""
    from safetensors import safe_open

    started = time.monotonic()
    total = 0.0
    with safe_open(path, framework="numpy") as f:
        for n in names:
            total += float(f.get_tensor(n).sum(dtype="float64"))
    return {"seconds": time.monotonic() - started, "sum": round(total, 3)}


def run_child(what: str, *args: Any, timeout: float = 3600) -> dict[str, Any]:
    """One reader in a process of its own; its JSON answer."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # a list of 20,000 names is past an argument's 128 KiB
        json.dump(args, f)
        f.flush()
        out = subprocess.run([sys.executable, "-m", "benchmarks.training", "--child", what, f.name], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{what} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the benchmark --------------------------------------------------------------------------

class TrainingBench(LinkBench):
    def requests(self) -> dict[str, int]:
        return {k: v for k, v in self.proxy.counts.items() if v}

    def measured(self, what: str, *args: Any) -> dict[str, Any]:
        """A child's answer with the requests and link bytes it caused."""
        self.proxy.reset_counts()
        out = run_child(what, *args)
        out.update(requests=self.requests(), link_bytes_down=self.proxy.bytes_down)
        return out

    # -- the tree ---------------------------------------------------------------------------

    def make_tree(self) -> Path:
        """The epochs' files (seeded sizes 16-256 KiB, random bytes), made once."""
        a = self.args
        base = self.served / BUCKET / TREE
        rng = random.Random(17)
        for i in range(a.files):
            path = base / f"class{i % a.folders:03d}" / f"img{i:06d}.bin"
            size = rng.randrange(16 << 10, 256 << 10)
            if not path.exists() or path.stat().st_size != size:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(size))
                self._dirty = True
        return base

    def epochs(self) -> None:
        a = self.args
        local = str(self.make_tree())
        out: dict[str, Any] = {"files": a.files, "folders": a.folders, "workers": a.workers}
        drop_page_cache()
        listed = run_child("walk", local)
        names = listed.pop("names")
        out["bytes"] = listed["bytes"]
        expected: dict[int, str] = {}

        def run(who: str, root: str, n: int, endpoint: str = "", same_bytes: bool = True, pid: int | None = None) -> list[dict[str, Any]]:
            rows = []
            for e in range(n):
                cpu = cpu_seconds(pid) if pid else 0.0
                r = self.measured("epoch", root, names, 1000 + e, a.workers, endpoint)
                if pid:  # the file system's process, all its threads (the floor's or the sidecar worker's)
                    r["fs_cpu_us_per_file"] = 1e6 * (cpu_seconds(pid) - cpu) / r["files"]
                if same_bytes and expected.setdefault(e, r["digest"]) != r["digest"]:
                    raise AssertionError(f"{who} epoch {e + 1}: other bytes than the local files")
                rows.append(r)
                print(f"  {who} epoch {e + 1}: {r['files_per_s']:.0f} files/s {r['requests']}", flush=True)
            return rows

        drop_page_cache()
        out["local"] = run("local", local, a.epochs)
        # The floor of any pyfuse3 + trio file system here: the same names and sizes (zeros) from
        # memory, the page cache kept from the second open on; what a FUSE request costs, nothing else.
        spec = self.work / "tree.json"
        spec.write_text(json.dumps({n: os.path.getsize(os.path.join(local, n)) for n in names}))
        floor = self.work / "floor"
        floor.mkdir(exist_ok=True)
        with ramfs.mounted(str(floor), "0", "--tree", str(spec)) as proc:
            out["pyfuse3_floor"] = run("pyfuse3_floor", str(floor), a.epochs, same_bytes=False, pid=proc.pid)
        w = self.worker(Path(tempfile.mkdtemp(dir=self.work)))
        out["sidecar_walk"] = self.measured("walk", f"{w.mnt}/{TREE}")
        out["sidecar_walk"].pop("names")
        out["sidecar"] = run("sidecar", f"{w.mnt}/{TREE}", a.epochs, pid=w.proc.pid)
        out["sidecar_worker_stats"] = {k: v for k, v in w.stats().items() if k in ("store", "cache", "passthrough", "requests")}
        w.stop()
        # A new session over the kept disk cache, its files no longer in the page cache (a restart,
        # a node whose page cache went elsewhere): one epoch against the local disk's first, with
        # FUSE passthrough and with the worker serving the reads (`passthrough: false`).
        cache = Path(w.cfg["cache_dir"])
        for row, cfg in (("sidecar_restart", {}), ("sidecar_restart_worker", {"passthrough": False})):
            drop_page_cache()
            w = self.worker(cache, **cfg)
            self.measured("walk", f"{w.mnt}/{TREE}")
            drop_page_cache()
            out[row] = run(row, f"{w.mnt}/{TREE}", 1, pid=w.proc.pid)
            out[row + "_stats"] = {k: v for k, v in w.stats().items() if k in ("store", "passthrough", "requests")}
            w.stop()
        # Zero-message opens (`zero_message_opens: true`): the kernel opens the files alone. A new
        # mount over the kept cache after the drop: its first epoch is a restart's (no
        # passthrough: the worker reads the cache), the next ones reach the worker not at all.
        drop_page_cache()
        w = self.worker(cache, zero_message_opens=True)
        self.measured("walk", f"{w.mnt}/{TREE}")
        drop_page_cache()
        out["sidecar_zero"] = run("sidecar_zero", f"{w.mnt}/{TREE}", a.epochs, pid=w.proc.pid)
        out["sidecar_zero_stats"] = {k: v for k, v in w.stats().items() if k in ("store", "zero_message_opens", "requests")}
        # The same page-cached epochs side by side with the local disk's, alternating (this
        # machine's speed drifts between minutes: one epoch of each minutes apart is no ratio).
        run("local (warm-up)", local, 1)
        out["alternating"] = alternating = []
        for r in range(a.alternations):
            pair = {}
            for who, root in ((("local", local), ("sidecar_zero", f"{w.mnt}/{TREE}")) if r % 2 == 0 else
                              (("sidecar_zero", f"{w.mnt}/{TREE}"), ("local", local))):
                pair[who] = self.measured("epoch", root, names, 5000 + r, a.workers, "")["files_per_s"]
            alternating.append(pair)
            print(f"  alternating {r + 1}: {pair}", flush=True)
        w.stop()
        # `zero_message_opens: auto`: the same over the kept cache after the drop, its first epoch
        # passed through (opens asked), the switch early in the second.
        drop_page_cache()
        auto = self.worker(cache, zero_message_opens="auto")
        self.measured("walk", f"{auto.mnt}/{TREE}")
        drop_page_cache()
        out["sidecar_auto"] = run("sidecar_auto", f"{auto.mnt}/{TREE}", a.epochs, pid=auto.proc.pid)
        out["sidecar_auto_stats"] = {k: v for k, v in auto.stats().items() if k in ("store", "zero_message_opens", "passthrough", "requests")}
        auto.stop()
        # And on a new mount with an empty cache: epoch 1 from the link, through the sidecar (the
        # files' pages kept), the switch early in epoch 2.
        auto = self.worker(Path(tempfile.mkdtemp(dir=self.work)), zero_message_opens="auto")
        self.measured("walk", f"{auto.mnt}/{TREE}")
        out["sidecar_auto_cold"] = run("sidecar_auto_cold", f"{auto.mnt}/{TREE}", a.epochs, pid=auto.proc.pid)
        out["sidecar_auto_cold_stats"] = {k: v for k, v in auto.stats().items() if k in ("store", "zero_message_opens", "passthrough", "requests")}
        auto.stop()
        out["sidecar_prefetch"] = self.prefetched_epoch(names, expected[0])
        out["direct"] = run("direct", TREE, 1, self.proxy.endpoint)
        # rclone's best mode for this: without --use-server-modtime its stat of an S3 object is a
        # HEAD (for the mtime in its metadata), 20,000 of them one after another in the walk.
        proc, mnt = self.rclone_mount("full", "--dir-cache-time", "1h", "--use-server-modtime")
        out["rclone_full_walk"] = self.measured("walk", f"{mnt}/{TREE}")
        out["rclone_full_walk"].pop("names")
        out["rclone_full"] = run("rclone_full", f"{mnt}/{TREE}", a.epochs)
        self.rclone_unmount(proc, mnt)
        fps = {k: [r["files_per_s"] for r in out[k]] for k in ("local", "pyfuse3_floor", "sidecar", "sidecar_zero", "direct", "rclone_full")}
        out["ratios"] = {"epoch1 sidecar/direct": fps["sidecar"][0] / fps["direct"][0],
                         "epoch1 sidecar/rclone_full": fps["sidecar"][0] / fps["rclone_full"][0],
                         "epoch1 with the tree prefetched/rclone_full": out["sidecar_prefetch"]["files_per_s"] / fps["rclone_full"][0],
                         "epoch1 with the tree prefetched/direct": out["sidecar_prefetch"]["files_per_s"] / fps["direct"][0],
                         "epochs2+ sidecar/local": [s / l for s, l in zip(fps["sidecar"][1:], fps["local"][1:])],
                         "epochs2+ rclone_full/local": [s / l for s, l in zip(fps["rclone_full"][1:], fps["local"][1:])],
                         "epochs2+ pyfuse3_floor/local": [s / l for s, l in zip(fps["pyfuse3_floor"][1:], fps["local"][1:])],
                         "epochs2+ sidecar/pyfuse3_floor": [s / l for s, l in zip(fps["sidecar"][1:], fps["pyfuse3_floor"][1:])],
                         "epochs2+ zero-message opens/local": [s / l for s, l in zip(fps["sidecar_zero"][1:], fps["local"][1:])],
                         "restart epoch, zero-message opens/local epoch 1": fps["sidecar_zero"][0] / fps["local"][0],
                         "zero_message_opens auto, epochs (restart, 2, 3)/local's (1, 2, 3)": [s["files_per_s"] / l for s, l in zip(out["sidecar_auto"], fps["local"])],
                         "zero_message_opens auto on an empty cache, epochs 2-3/local's": [s["files_per_s"] / l for s, l in zip(out["sidecar_auto_cold"][1:], fps["local"][1:])],
                         "alternating page-cached epochs, zero-message opens/local, per round": [p["sidecar_zero"] / p["local"] for p in alternating],
                         "alternating page-cached epochs, zero-message opens/local, median": statistics.median(p["sidecar_zero"] / p["local"] for p in alternating) if alternating else None,
                         "restart epoch (page cache dropped) sidecar/local epoch 1": out["sidecar_restart"][0]["files_per_s"] / fps["local"][0],
                         "restart epoch, the worker's way/local epoch 1": out["sidecar_restart_worker"][0]["files_per_s"] / fps["local"][0]}
        self.results["epochs"] = out

    def prefetched_epoch(self, names: list[str], digest: str) -> dict[str, Any]:
        """Epoch 1 on a new mount with an empty cache whose manifest prefetches the tree
        (`prefetch: [train]`): the prefetch runs from the mount on, beside the walk and the
        readers. Its files/s, the requests of the walk, the epoch and after it, and seconds from
        the mount until the whole tree was in the disk cache."""
        self.proxy.reset_counts()
        mounted = time.monotonic()
        w = self.worker(Path(tempfile.mkdtemp(dir=self.work)), prefetch=[TREE])
        walk = run_child("walk", f"{w.mnt}/{TREE}")
        during_walk = self.requests()
        r = self.measured("epoch", f"{w.mnt}/{TREE}", names, 1000, self.args.workers, "")
        if r["digest"] != digest:
            raise AssertionError("prefetched epoch 1: other bytes than the local files")
        print(f"  sidecar_prefetch epoch 1: {r['files_per_s']:.0f} files/s {r['requests']}", flush=True)
        self.proxy.reset_counts()
        deadline = time.monotonic() + 1800
        while (st := w.stats())["prefetch"]["state"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
        r.update(walk_s=walk["seconds"], prefetch=st["prefetch"], prefetch_done_s=time.monotonic() - mounted,
                 requests_during_walk=during_walk, requests_after_epoch=self.requests())
        w.stop()
        return r

    def listing(self) -> None:
        """The walk on a new mount against a direct paginated LIST, alternating, 2 rounds each,
        after one unmeasured LIST: the first listing of a new `rclone serve s3` costs it each
        file's MD5 (its ETag), which whoever lists first would pay."""
        self.make_tree()
        out: dict[str, Any] = {"files": self.args.files, "sidecar_rounds": [], "direct_list_rounds": []}
        out["first_list_after_start"] = run_child("list", self.proxy.endpoint, TREE + "/")  # (not compared)
        for _ in range(2):
            self.proxy.reset_counts()
            d = run_child("list", self.proxy.endpoint, TREE + "/")
            d["requests"] = self.requests()
            out["direct_list_rounds"].append(d)
            w = self.worker(None)
            r = self.measured("walk", f"{w.mnt}/{TREE}")
            r.pop("names")
            out["sidecar_rounds"].append(r)
            w.stop()
        out["sidecar"] = min(out["sidecar_rounds"], key=lambda r: r["seconds"])
        out["direct_list"] = min(out["direct_list_rounds"], key=lambda r: r["seconds"])
        proc, mnt = self.rclone_mount("off", "--use-server-modtime")
        r = self.measured("walk", f"{mnt}/{TREE}")
        r.pop("names")
        out["rclone_off"] = r
        self.rclone_unmount(proc, mnt)
        out["ratios"] = {"sidecar/direct_list seconds": out["sidecar"]["seconds"] / out["direct_list"]["seconds"],
                         "rclone_off/direct_list seconds": out["rclone_off"]["seconds"] / out["direct_list"]["seconds"]}
        self.results["listing"] = out

    # -- checkpoints ------------------------------------------------------------------------

    def _ckpt_path(self, name: str) -> Path:
        return self.served / BUCKET / name  # in the bucket's root: rclone serve s3 cannot keep a folder marker beside files in it

    def _write_ckpt(self, mnt: str, round_: int, block: bytes) -> str:
        """ckpt.tmp written in 8 MiB writes, fsynced, closed; returns its digest."""
        h = hashlib.sha256()
        with open(f"{mnt}/ckpt.tmp", "wb") as f:
            for i in range(self.args.ckpt_mib // 8):
                chunk = b"%08d%08d" % (round_, i) + block[16:]
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        return h.hexdigest()

    def _served_digest(self, name: str) -> str | None:
        path = self._ckpt_path(name)
        if not path.exists():
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        return h.hexdigest()

    def _settled(self, w: Any, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while (u := w.stats()["unsynced"])["files"] or u["old_names"]:  # uploads and the renamed names' deletes
            if time.monotonic() > end:
                raise TimeoutError("the write-back queue did not drain")
            time.sleep(0.1)

    def checkpoint(self) -> None:
        block = os.urandom(8 * MiB)
        size = self.args.ckpt_mib * MiB
        out: dict[str, Any] = {"bytes": size}
        for mode in ("durable", "writeback"):
            cache = Path(tempfile.mkdtemp(dir=self.work))
            w = self.worker(cache, readonly=False, write_mode=mode)
            rounds = []
            for r in range(self.args.ckpt_rounds):
                self.proxy.reset_counts()
                started = time.monotonic()
                digest = self._write_ckpt(w.mnt, r, block)
                os.replace(f"{w.mnt}/ckpt.tmp", f"{w.mnt}/ckpt")
                returned = time.monotonic() - started
                self._settled(w)
                stored = time.monotonic() - started
                assert self._served_digest("ckpt") == digest, f"{mode} round {r}: the bucket's ckpt is not the one written"
                assert not self._ckpt_path("ckpt.tmp").exists(), f"{mode} round {r}: ckpt.tmp left in the bucket"
                rounds.append({"seconds_to_return": returned, "seconds_to_stored": stored, "requests": self.requests(),
                               "bytes_up": self.proxy.bytes_up, "bytes_up_ratio": self.proxy.bytes_up / size})
                print(f"  {mode} round {r}: {rounds[-1]}", flush=True)
            w.stop()
            out[mode] = {"rounds": rounds, "crashes": self._crashes(mode, cache, block)}
        self.results["checkpoint"] = out

    def _crashes(self, mode: str, cache: Path, block: bytes) -> dict[str, Any]:
        """The worker SIGKILLed (1) after ckpt.tmp is written and before the rename, (2) during
        the rename (durable: while its server-side copy is held at the link) or right after it
        (write-back: before the delayed upload); a new worker over the same cache, once settled:
        the bucket's ckpt is the previous or the new one, whole."""
        out: dict[str, Any] = {}
        for point in ("before_rename", "at_rename"):
            # The restart is the same mount (its name keys its staging area), as a restarted sidecar's
            w = self.worker(cache, readonly=False, write_mode=mode, name=f"ckpt-{mode}", mountpath=str(self.work / f"ckpt-{mode}"),
                            writeback_delay=600.0)  # write-back: nothing leaves before the kill
            previous = self._served_digest("ckpt")
            new = self._write_ckpt(w.mnt, 100 + len(out), block)
            if point == "at_rename" and mode == "durable":
                self.proxy.stall_kinds = frozenset({"COPY"})
                t = threading.Thread(target=_replace_quietly, args=(f"{w.mnt}/ckpt.tmp", f"{w.mnt}/ckpt"), daemon=True)
                t.start()
                end = time.monotonic() + 60
                while not self.proxy.counts["COPY"] and time.monotonic() < end:
                    time.sleep(0.01)
            elif point == "at_rename":
                os.replace(f"{w.mnt}/ckpt.tmp", f"{w.mnt}/ckpt")
            os.kill(w.proc.pid, signal.SIGKILL)
            w.proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", w.mnt], check=False)
            self.proxy.stall_kinds = frozenset()
            w2 = self.worker(cache, readonly=False, write_mode=mode, name=f"ckpt-{mode}", mountpath=w.mnt)
            self._settled(w2)
            w2.stop()
            got = self._served_digest("ckpt")
            out[point] = {"bucket_holds": "previous" if got == previous else "new" if got == new else "NEITHER"}
            assert got in (previous, new), f"{mode} {point}: the bucket's ckpt is neither the previous nor the new one"
        return out

    # -- mmap'd model files ----------------------------------------------------------------

    def make_model(self) -> tuple[Path, int]:
        import numpy as np
        from safetensors.numpy import save_file

        path = self.served / BUCKET / "model.safetensors"
        each = self.args.model_mib * MiB // TENSORS // 4
        if not path.exists():
            self._dirty = True
            rng = np.random.default_rng(9)
            save_file({f"layer{i:03d}.weight": rng.random(each, dtype="float32") for i in range(TENSORS)}, str(path))
        return path, each * 4

    def mmap(self) -> None:
        path, each = self.make_model()
        names = random.Random(4).sample([f"layer{i:03d}.weight" for i in range(TENSORS)], TENSORS // 5)
        needed = each * len(names)
        drop_page_cache()
        local = run_child("tensors", str(path), names)
        out: dict[str, Any] = {"file_bytes": path.stat().st_size, "tensors_read": len(names), "tensor_bytes": needed, "local_dropped": local}

        def row(who: str, mounted: str) -> None:
            r = self.measured("tensors", f"{mounted}/model.safetensors", names)
            assert r["sum"] == local["sum"], (who, r["sum"], local["sum"])
            r["link_bytes_ratio"] = r["link_bytes_down"] / needed
            out[who] = r
            print(f"  {who}: {r['seconds']:.2f} s, {r['requests']}, {r['link_bytes_ratio']:.2f}x", flush=True)

        w = self.worker(None)
        row("sidecar", w.mnt)
        w.stop()
        # The same on a mount set up for model files (`kernel_readahead_kb: 1024` in its manifest)
        # instead of the default 8 MiB: the kernel reads that window around each page fault.
        w = self.worker(None, kernel_readahead_kb=1024)
        row("sidecar_kernel_readahead_1m", w.mnt)
        w.stop()
        for mode in ("off", "full"):
            proc, mnt = self.rclone_mount(mode)
            row(f"rclone_{mode}", mnt)
            self.rclone_unmount(proc, mnt)
        out["ratios"] = {"sidecar/rclone_full seconds": out["sidecar"]["seconds"] / out["rclone_full"]["seconds"],
                         "sidecar/rclone_off seconds": out["sidecar"]["seconds"] / out["rclone_off"]["seconds"]}
        self.results["mmap"] = out

    def prepare(self, workload: str) -> None:
        if workload in ("epochs", "listing"):
            self.make_tree()
        elif workload == "mmap":
            self.make_model()
        if self._dirty:
            self.restart()
            self._dirty = False


def _replace_quietly(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except OSError:
        pass  # the worker was killed under it


def direct_list(endpoint: str, prefix: str) -> dict[str, Any]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1")
    started = time.monotonic()
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        n += len(page.get("Contents", []))
    return {"seconds": time.monotonic() - started, "files": n}


CHILDREN = {"walk": walk, "epoch": epoch, "tensors": tensors, "list": direct_list}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](*json.loads(Path(sys.argv[3]).read_text()))))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.training")
    p.add_argument("--bandwidth", type=float, default=25e6, help="bytes/s per connection")
    p.add_argument("--first-byte", type=float, default=0.03, help="seconds before each response")
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--folders", type=int, default=100)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--alternations", type=int, default=6, help="page-cached epochs of the zero-message mount and the local disk, alternating")
    p.add_argument("--ckpt-mib", type=int, default=1024)
    p.add_argument("--ckpt-rounds", type=int, default=5)
    p.add_argument("--model-mib", type=int, default=2048)
    p.add_argument("--only", default="epochs,listing,checkpoint,mmap")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-training-"))
    bench = TrainingBench(args, work)
    bench.results["conditions"]["note"] = "local = the served files on the same disk; page cache dropped before local epoch 1 and local mmap"  # type: ignore[index]
    bench.start()
    try:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            bench.prepare(name)
            {"epochs": bench.epochs, "listing": bench.listing, "checkpoint": bench.checkpoint, "mmap": bench.mmap}[name]()
            print(json.dumps(bench.results[name], indent=1)[:4000], flush=True)
    finally:
        bench.stop()
        clean_up(work, "training")
    bench.results["conditions"]["load_after"] = os.getloadavg()  # type: ignore[index]
    save_results(bench.results, "training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
