"""`make bench` / `python -m benchmarks`: the mount side by side with direct fsspec reads, rclone
and a local file, in one run against one local S3 server, reported as ratios.

Cold = a fresh mount (new FUSE connection, so an empty page cache) with an empty disk cache;
warm = a fresh mount over a filled disk cache (its files in the page cache; `benchmarks.link`
also measures it after `drop_caches`); hot = a
re-read in the same mount (page cache kept). Each workload runs --repeat times (default 3);
the table shows the median and the JSON file keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from tests.devservers import WorkerProcess, fuse_mounts, moto_server, stop_process

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
BUCKET = "bench"


def dataset(size: int, seed: int) -> Path:
    """A local file of `size` random bytes, made once and reused between runs (keyed by size)."""
    DATA.mkdir(exist_ok=True)
    path = DATA / f"random-{size}-{seed}.bin"
    if not path.exists() or path.stat().st_size != size:
        rng = random.Random(seed)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            left = size
            while left:
                n = min(left, 16 * MiB)
                f.write(rng.randbytes(n))
                left -= n
        tmp.rename(path)
    return path


class Bench:
    def __init__(self, args: argparse.Namespace, s3, work: Path) -> None:
        self.args = args
        self.s3 = s3
        self.work = work
        self.results: dict[str, dict] = {}
        self.block = args.block_size * MiB
        self._n = 0

    # -- helpers -------------------------------------------------------------------------------

    def record(self, workload: str, variant: str, values: list[float], unit: str, **extra) -> None:
        entry = {"unit": unit, "runs": values, "median": statistics.median(values), "min": min(values), "max": max(values), **extra}
        self.results.setdefault(workload, {})[variant] = entry
        print(f"  {workload:<28} {variant:<22} median {entry['median']:10.1f} {unit}  (min {entry['min']:.1f}, max {entry['max']:.1f})", flush=True)

    def worker(self, cache_dir: Path | None, **overrides) -> WorkerProcess:
        self._n += 1
        cfg = {
            "name": f"bench{self._n}",
            "storage_id": "bench",
            "url": f"s3://{BUCKET}",
            "options": {"endpoint_url": self.s3.endpoint},
            "credentials": {"access_key_id": self.s3.key, "secret_access_key": self.s3.secret},
            "mountpath": str(self.work / f"mnt-{self._n}"),
            "cache_dir": str(cache_dir) if cache_dir else None,
            "block_size": self.block,
            "ttl": 60.0,
            "log": str(self.work / "worker.log"),
            "log_level": "warning",
        }
        cfg.update(overrides)
        return WorkerProcess(cfg)

    def rclone(self, mode: str, cache_dir: Path, writable: bool = False) -> tuple[subprocess.Popen, str]:
        self._n += 1
        mnt = self.work / f"rclone-{self._n}"
        mnt.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env.update(
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENDPOINT=self.s3.endpoint,
            RCLONE_CONFIG_BENCH_REGION="us-east-1",
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=self.s3.key,
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=self.s3.secret,
        )
        cmd = ["rclone", "mount", f"bench:{BUCKET}", str(mnt), "--config", "/dev/null", "--vfs-cache-mode", mode,
               "--use-server-modtime", "--log-file", str(self.work / "rclone.log")]
        if not writable:
            cmd.append("--read-only")
        if mode in ("full", "writes"):
            cmd += ["--cache-dir", str(cache_dir)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while str(mnt) not in fuse_mounts():
            if proc.poll() is not None or time.monotonic() > end:
                stop_process(proc)
                raise RuntimeError("rclone did not mount; see rclone.log")
            time.sleep(0.05)
        return proc, str(mnt)

    def rclone_runs(self, mode: str, measure: Callable[[str], float], *, writable: bool = False) -> list[float]:
        """`measure(mountpoint)` on a fresh rclone mount (and an empty cache dir) per repeat."""
        vals = []
        for _ in range(self.args.repeat):
            cache = Path(tempfile.mkdtemp(dir=self.work))
            proc, mnt = self.rclone(mode, cache, writable=writable)
            try:
                vals.append(measure(mnt))
            finally:
                self.stop_rclone(proc, mnt)
                shutil.rmtree(cache, ignore_errors=True)
        return vals

    @staticmethod
    def stop_rclone(proc: subprocess.Popen, mnt: str) -> None:
        subprocess.run(["fusermount3", "-u", mnt], check=False, capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        if mnt in fuse_mounts():
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)

    def put(self, key: str, path: Path) -> None:
        self.s3.client().upload_file(str(path), BUCKET, key)

    @staticmethod
    def read_file(path: str, bs: int = MiB) -> float:
        """Seconds to read a whole file with plain read() calls of `bs` bytes."""
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(bs):
                pass
        return time.perf_counter() - t

    def rate(self, size: int, secs: float) -> float:
        return size / secs / 1e6

    # -- workloads -----------------------------------------------------------------------------

    def sequential(self) -> None:
        size = self.args.seq_mib * MiB
        src = dataset(size, 1)
        self.put("seq.bin", src)
        w = "sequential read"
        print(f"\n{w}: {size // MiB} MiB object, block {self.block // MiB} MiB", flush=True)
        runs = range(self.args.repeat)

        self.record(w, "local file", [self.rate(size, self.read_file_nocache(str(src))) for _ in runs], "MB/s")
        self.record(w, "direct fsspec", [self.rate(size, self.direct_read("seq.bin", size)) for _ in runs], "MB/s")

        cold, warm, hot, rss = [], [], [], []
        for _ in runs:
            cache = Path(tempfile.mkdtemp(dir=self.work))
            wk = self.worker(cache)
            try:
                cold.append(self.rate(size, self.read_file(f"{wk.mnt}/seq.bin")))
                hot.append(self.rate(size, self.read_file(f"{wk.mnt}/seq.bin")))
                self.wait_disk_blocks(wk, -(-size // self.block))
                rss.append(wk.peak_rss() / MiB)
            finally:
                wk.stop()
            wk = self.worker(cache)
            try:
                warm.append(self.rate(size, self.read_file(f"{wk.mnt}/seq.bin")))
                assert wk.stats()["store"]["get_requests"] == 0, "warm read went to the backend"
            finally:
                wk.stop()
                shutil.rmtree(cache)
        self.record(w, "sidecar cold", cold, "MB/s", peak_rss_mib=max(rss))
        self.record(w, "sidecar warm (disk)", warm, "MB/s")
        self.record(w, "sidecar hot (page)", hot, "MB/s")

        if self.args.rclone:
            for mode in ("off", "full"):
                vals = self.rclone_runs(mode, lambda mnt: self.rate(size, self.read_file(f"{mnt}/seq.bin")))
                self.record(w, f"rclone {mode} cold", vals, "MB/s")

        if shutil.which("fio"):
            vals = []
            for _ in runs:
                wk = self.worker(None)
                try:
                    vals.append(self.fio(f"{wk.mnt}/seq.bin", "read", "1M", size))
                finally:
                    wk.stop()
            self.record(w, "sidecar cold (fio 1M)", vals, "MB/s")

    @staticmethod
    def read_file_nocache(path: str) -> float:
        subprocess.run(["dd", f"if={path}", "iflag=nocache", "count=0", "status=none"], check=False)
        return Bench.read_file(path)

    def direct_read(self, key: str, size: int) -> float:
        """The practical limit: s3fs, parallel ranged GETs of the sidecar's block size and window."""
        import s3fs

        fs = s3fs.S3FileSystem(key=self.s3.key, secret=self.s3.secret, endpoint_url=self.s3.endpoint, skip_instance_cache=True)
        starts = list(range(0, size, self.block))
        ends = [min(s + self.block, size) for s in starts]
        t = time.perf_counter()
        parts = fs.cat_ranges([f"{BUCKET}/{key}"] * len(starts), starts, ends, batch_size=self.args.window)
        secs = time.perf_counter() - t
        assert sum(len(p) for p in parts) == size
        return secs

    def wait_disk_blocks(self, wk: WorkerProcess, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if (wk.stats()["disk"] or {}).get("blocks", 0) >= n:
                return
            time.sleep(0.05)

    def fio(self, path: str, rw: str, bs: str, size: int, number_ios: int | None = None) -> float:
        cmd = ["fio", "--name=job", f"--filename={path}", "--readonly", f"--rw={rw}", f"--bs={bs}", f"--size={size}",
               "--ioengine=psync", "--numjobs=1", "--invalidate=1", "--randrepeat=0", "--output-format=json"]
        if number_ios:
            cmd += [f"--number_ios={number_ios}"]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        job = out["jobs"][0]["read"]
        return job["iops"] if rw == "randread" else job["bw_bytes"] / 1e6

    def random_reads(self) -> None:
        size = self.args.random_mib * MiB
        src = dataset(size, 2)
        self.put("random.bin", src)
        w = "random 4 KiB reads"
        n = self.args.random_ios
        print(f"\n{w}: {size // MiB} MiB object, {n} reads per run on a fresh mount", flush=True)
        vals, amp = [], []
        for _ in range(self.args.repeat):
            wk = self.worker(None)
            try:
                iops = self.fio(f"{wk.mnt}/random.bin", "randread", "4k", size, number_ios=n)
                st = wk.stats()
                vals.append(iops)
                amp.append(st["store"]["bytes_fetched"] / (n * 4096))
            finally:
                wk.stop()
        self.record(w, "sidecar cold", vals, "IOPS", read_amplification=statistics.median(amp))
        print(f"    read amplification (backend bytes per byte read): {statistics.median(amp):.0f}")
        if self.args.rclone:
            vals = self.rclone_runs("off", lambda mnt: self.fio(f"{mnt}/random.bin", "randread", "4k", size, number_ios=n))
            self.record(w, "rclone off cold", vals, "IOPS")

    def parallel(self) -> None:
        n, size = 16, self.args.parallel_mib * MiB
        src = dataset(size, 3)
        for i in range(n):
            self.put(f"par/{i:02d}.bin", src)
        w = "16 parallel readers"
        print(f"\n{w}: {n} x {size // MiB} MiB", flush=True)
        total = n * size

        def run(root: str) -> float:
            t = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda i: self.read_file(f"{root}/par/{i:02d}.bin"), range(n)))
            return time.perf_counter() - t

        vals, rss = [], []
        for _ in range(self.args.repeat):
            wk = self.worker(None)
            try:
                vals.append(self.rate(total, run(wk.mnt)))
                rss.append(wk.peak_rss() / MiB)
            finally:
                wk.stop()
        limit = 256  # the worker's default memory budget (MiB): cached + in-flight blocks
        self.record(w, "sidecar cold", vals, "MB/s", peak_rss_mib=max(rss), memory_limit_mib=limit)
        print(f"    peak RSS of the mount process: {max(rss):.0f} MiB (memory budget {limit} MiB + interpreter and SDKs)")
        if self.args.rclone:
            self.record(w, "rclone off cold", self.rclone_runs("off", lambda mnt: self.rate(total, run(mnt))), "MB/s")

    def upload_many(self, prefix: str, count: int, size: int) -> None:
        client = self.s3.client()
        body = b"x" * size
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"{prefix}/{i:05d}.dat", Body=body), range(count)))

    def listing(self) -> None:
        count = self.args.list_count
        self.upload_many("many", count, 10)
        w = f"ls -l of {count} objects"
        print(f"\n{w}", flush=True)
        import s3fs

        def direct() -> float:
            fs = s3fs.S3FileSystem(key=self.s3.key, secret=self.s3.secret, endpoint_url=self.s3.endpoint, skip_instance_cache=True)
            t = time.perf_counter()
            assert len(fs.ls(f"{BUCKET}/many", detail=True)) == count
            return time.perf_counter() - t

        def scan(root: str) -> float:
            t = time.perf_counter()
            n = sum(1 for e in os.scandir(f"{root}/many") if e.stat().st_size >= 0)
            assert n == count
            return time.perf_counter() - t

        self.record(w, "direct LIST (s3fs)", [direct() for _ in range(self.args.repeat)], "s")
        cold, hot, lists, heads = [], [], [], []
        for _ in range(self.args.repeat):
            wk = self.worker(None)
            try:
                cold.append(scan(wk.mnt))
                hot.append(scan(wk.mnt))
                st = wk.stats()["store"]
                lists.append(st["list_requests"])
                heads.append(st["head_requests"])
            finally:
                wk.stop()
        self.record(w, "sidecar cold", cold, "s", list_requests=max(lists), head_requests=max(heads))
        self.record(w, "sidecar cached", hot, "s")
        if self.args.rclone:
            self.record(w, "rclone off cold", self.rclone_runs("off", scan), "s")

    def small_files(self) -> None:
        count = self.args.small_count
        self.upload_many("small", count, 4096)
        w = f"cat {count} x 4 KiB files"
        print(f"\n{w}", flush=True)

        def cat(root: str) -> float:
            t = time.perf_counter()
            with ThreadPoolExecutor(1) as pool:
                list(pool.map(lambda e: open(e.path, "rb").read(), os.scandir(f"{root}/small")))
            return time.perf_counter() - t

        vals = []
        for _ in range(self.args.repeat):
            wk = self.worker(None)
            try:
                vals.append(cat(wk.mnt))
            finally:
                wk.stop()
        self.record(w, "sidecar cold", vals, "s")
        if self.args.rclone:
            self.record(w, "rclone off cold", self.rclone_runs("off", cat), "s")

    def writes(self) -> None:
        """Sequential write of one file through a writable mount (close returns once stored)
        against a direct fsspec upload of the same bytes."""
        size = self.args.write_mib * MiB
        src = dataset(size, 4)
        w = "sequential write + close"
        print(f"\n{w}: {size // MiB} MiB", flush=True)
        import s3fs

        def direct() -> float:
            fs = s3fs.S3FileSystem(key=self.s3.key, secret=self.s3.secret, endpoint_url=self.s3.endpoint, skip_instance_cache=True)
            t = time.perf_counter()
            fs.put_file(str(src), f"{BUCKET}/direct-write.bin")
            return time.perf_counter() - t

        def through_mount(root: str) -> float:
            t = time.perf_counter()
            subprocess.run(["dd", f"if={src}", f"of={root}/mount-write.bin", "bs=1M", "status=none"], check=True)
            return time.perf_counter() - t

        self.record(w, "direct fsspec put_file", [self.rate(size, direct()) for _ in range(self.args.repeat)], "MB/s")
        vals = []
        for _ in range(self.args.repeat):
            cache = Path(tempfile.mkdtemp(dir=self.work))
            wk = self.worker(cache, readonly=False)
            try:
                vals.append(self.rate(size, through_mount(wk.mnt)))
            finally:
                wk.stop()
                shutil.rmtree(cache)
        head = self.s3.client().head_object(Bucket=BUCKET, Key="mount-write.bin")
        assert head["ContentLength"] == size
        self.record(w, "sidecar (dd bs=1M)", vals, "MB/s")
        if self.args.rclone:
            vals = self.rclone_runs("writes", lambda mnt: self.rate(size, through_mount(mnt)), writable=True)
            self.record(w, "rclone writes (close before upload)", vals, "MB/s")

    def providers(self) -> None:
        """Cold and warm sequential reads through Azure (Azurite) and GCS (the emulator), next to
        direct fsspec reads (adlfs / gcsfs, parallel ranged reads of the sidecar's block size)."""
        from tests.devservers import azurite_server, gcs_server
        from sidecar.store.azure import make_azure_filesystem
        from sidecar.store.gcs import make_gcs_filesystem
        from sidecar.urls import parse

        size = self.args.provider_mib * MiB
        src = dataset(size, 5)
        with azurite_server(self.work / "azurite") as az, gcs_server(self.work / "gcs.log") as gs:
            setups = {
                "azure": ("az://bench", {"account_name": az.account, "endpoint_url": az.endpoint}, {"account_key": az.key}, make_azure_filesystem),
                "gcs": ("gs://bench", {"endpoint_url": gs.endpoint, "anonymous": True}, {}, make_gcs_filesystem),
            }
            for provider, (url, options, creds, make) in setups.items():
                fs = make(parse(url), options, creds)
                fs.mkdir("bench")
                fs.put_file(str(src), "bench/seq.bin")
                w = f"sequential read ({provider})"
                print(f"\n{w}: {size // MiB} MiB object, block {self.block // MiB} MiB", flush=True)

                def direct() -> float:
                    f = make(parse(url), options, creds)
                    starts = list(range(0, size, self.block))
                    ends = [min(x + self.block, size) for x in starts]
                    t = time.perf_counter()
                    parts = f.cat_ranges(["bench/seq.bin"] * len(starts), starts, ends, batch_size=self.args.window)
                    secs = time.perf_counter() - t
                    assert sum(len(p) for p in parts) == size
                    return secs

                self.record(w, "direct fsspec", [self.rate(size, direct()) for _ in range(self.args.repeat)], "MB/s")
                cold, warm = [], []
                for _ in range(self.args.repeat):
                    cache = Path(tempfile.mkdtemp(dir=self.work))
                    where = {"url": url, "options": options, "credentials": creds, "storage_id": f"bench-{provider}"}
                    wk = self.worker(cache, **where)
                    try:
                        cold.append(self.rate(size, self.read_file(f"{wk.mnt}/seq.bin")))
                        self.wait_disk_blocks(wk, -(-size // self.block))
                    finally:
                        wk.stop()
                    wk = self.worker(cache, **where)
                    try:
                        warm.append(self.rate(size, self.read_file(f"{wk.mnt}/seq.bin")))
                    finally:
                        wk.stop()
                        shutil.rmtree(cache)
                self.record(w, "sidecar cold", cold, "MB/s")
                self.record(w, "sidecar warm (disk)", warm, "MB/s")

    def status_calls(self) -> None:
        """Wall time of `storage-sidecar status` (a Kubernetes exec probe) against a running daemon."""
        w = "storage-sidecar status"
        print(f"\n{w}: wall time per call, daemon with one mount", flush=True)
        manifest = {
            "root": str(self.work / "project"),
            "storages": [{"name": "bench", "provider": "s3", "url": f"s3://{BUCKET}", "options": {"endpoint_url": self.s3.endpoint}}],
            "mounts": [{"storage": "bench", "mountpath": f"m{i}", "source_path": f"dir{i}", "name": f"m{i}"} for i in range(3)],
        }
        (self.work / "status-manifest.json").write_text(json.dumps(manifest))
        sock = str(self.work / "status.sock")
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.s3.key, AWS_SECRET_ACCESS_KEY=self.s3.secret)
        exe = str(Path(sys.executable).parent / "storage-sidecar")
        with open(self.work / "status-daemon.log", "w") as log:
            daemon = subprocess.Popen([exe, "run", "--manifest", str(self.work / "status-manifest.json"), "--socket", sock],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
        started = time.perf_counter()
        try:
            from sidecar.status import Unreachable, request

            end = time.monotonic() + 60
            while True:  # polled in-process (cheap), so the figure is the daemon's, not the poller's
                try:
                    if request("/ready", sock=sock, timeout=2)[0] == 200:
                        break
                except Unreachable:
                    pass
                if time.monotonic() > end or daemon.poll() is not None:
                    raise RuntimeError("the daemon did not become ready")
                time.sleep(0.02)
            self.record("daemon start to /ready, 3 mounts", "sidecar", [(time.perf_counter() - started) * 1000], "ms")
            vals = []
            for _ in range(max(10, self.args.repeat)):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], capture_output=True)
                vals.append((time.perf_counter() - t) * 1000)
            self.record(w, "python -c pass (reference)", vals, "ms")
            for args, label in ((["--probe", "readiness"], "status --probe readiness"), ([], "status (table)"), (["--json"], "status --json")):
                vals = []
                for _ in range(max(10, self.args.repeat)):
                    t = time.perf_counter()
                    subprocess.run([exe, "status", "--socket", sock, *args], capture_output=True)
                    vals.append((time.perf_counter() - t) * 1000)
                self.record(w, label, vals, "ms")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(daemon)

    def ratios(self) -> dict[str, float]:
        r: dict[str, float] = {}
        seq = self.results.get("sequential read", {})

        def med(k: str) -> float | None:
            return seq.get(k, {}).get("median")

        pairs = {
            "cold / direct fsspec": ("sidecar cold", "direct fsspec"),
            "warm / cold": ("sidecar warm (disk)", "sidecar cold"),
            "hot / cold": ("sidecar hot (page)", "sidecar cold"),
            "warm / local file": ("sidecar warm (disk)", "local file"),
            "cold / rclone off": ("sidecar cold", "rclone off cold"),
            "cold / rclone full": ("sidecar cold", "rclone full cold"),
        }
        for label, (a, b) in pairs.items():
            if med(a) and med(b):
                r[f"sequential {label}"] = med(a) / med(b)
        for w in ("random 4 KiB reads", "16 parallel readers"):
            d = self.results.get(w, {})
            if "sidecar cold" in d and "rclone off cold" in d:
                r[f"{w} sidecar / rclone off"] = d["sidecar cold"]["median"] / d["rclone off cold"]["median"]
        for provider in ("azure", "gcs"):
            d = self.results.get(f"sequential read ({provider})", {})
            if "sidecar cold" in d and "direct fsspec" in d:
                r[f"{provider}: cold / direct fsspec"] = d["sidecar cold"]["median"] / d["direct fsspec"]["median"]
                r[f"{provider}: warm / cold"] = d["sidecar warm (disk)"]["median"] / d["sidecar cold"]["median"]
        st = self.results.get("storage-sidecar status", {})
        if "status --probe readiness" in st and "python -c pass (reference)" in st:
            r["status --probe / python -c pass"] = st["status --probe readiness"]["median"] / st["python -c pass (reference)"]["median"]
        rnd = self.results.get("random 4 KiB reads", {}).get("sidecar cold", {})
        if "read_amplification" in rnd:
            r["random 4 KiB read amplification"] = rnd["read_amplification"]
        par = self.results.get("16 parallel readers", {}).get("sidecar cold", {})
        if "peak_rss_mib" in par:
            r["16 readers: peak RSS - memory budget (MiB)"] = par["peak_rss_mib"] - par["memory_limit_mib"]
        wr = self.results.get("sequential write + close", {})
        if "sidecar (dd bs=1M)" in wr and "direct fsspec put_file" in wr:
            r["write sidecar / direct fsspec"] = wr["sidecar (dd bs=1M)"]["median"] / wr["direct fsspec put_file"]["median"]
        if "sidecar (dd bs=1M)" in wr and "rclone writes (close before upload)" in wr:
            r["write sidecar / rclone writes"] = wr["sidecar (dd bs=1M)"]["median"] / wr["rclone writes (close before upload)"]["median"]
        for w, d in self.results.items():
            if w.startswith(("ls -l", "cat ")) and "rclone off cold" in d:
                r[f"{w}: rclone time / sidecar time"] = d["rclone off cold"]["median"] / d["sidecar cold"]["median"]
            if w.startswith("ls -l") and "direct LIST (s3fs)" in d:
                r[f"{w}: sidecar time / direct LIST"] = d["sidecar cold"]["median"] / d["direct LIST (s3fs)"]["median"]
        return r


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--block-size", type=int, default=8, help="MiB")
    p.add_argument("--window", type=int, default=8, help="parallel ranged GETs of the direct reader (the sidecar's read-ahead window)")
    p.add_argument("--seq-mib", type=int, default=256)
    p.add_argument("--random-mib", type=int, default=256)
    p.add_argument("--random-ios", type=int, default=100, help="random reads per run (moto reads the whole object per ranged GET)")
    p.add_argument("--parallel-mib", type=int, default=16)
    p.add_argument("--write-mib", type=int, default=256)
    p.add_argument("--provider-mib", type=int, default=128, help="object size for the Azure and GCS reads")
    p.add_argument("--list-count", type=int, default=10000)
    p.add_argument("--small-count", type=int, default=1000)
    p.add_argument("--only", nargs="*", default=None, help="sequential random parallel listing small write providers status")
    p.add_argument("--no-rclone", dest="rclone", action="store_false")
    args = p.parse_args()
    if args.rclone and not shutil.which("rclone"):
        print("rclone not found: run `make bench` (installs it) or pass --no-rclone", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    started = datetime.now(timezone.utc)
    try:
        with moto_server(work / "moto.log", auth=False) as s3:
            s3.client().create_bucket(Bucket=BUCKET)
            b = Bench(args, s3, work)
            workloads = {"sequential": b.sequential, "random": b.random_reads, "parallel": b.parallel,
                         "listing": b.listing, "small": b.small_files, "write": b.writes, "providers": b.providers,
                         "status": b.status_calls}
            for name, workload in workloads.items():
                if args.only is None or name in args.only:
                    workload()
            ratios = b.ratios()
    finally:
        for m in fuse_mounts():
            if m.startswith(str(work)):
                subprocess.run(["fusermount3", "-u", "-z", m], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print("\nratios")
    for k, v in ratios.items():
        print(f"  {k:<55} {v:6.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{started:%Y-%m-%d}-{platform.node()}.json"
    # A partial run (--only) updates the workloads it ran and keeps the others of the day's file.
    previous = json.loads(out.read_text()) if out.exists() else {}
    results = {**previous.get("results", {}), **b.results}
    runs = {**previous.get("runs", {}), **{w: {"started": started.isoformat(), "args": vars(args)} for w in b.results}}
    out.write_text(json.dumps({"server": "moto", "results": results, "ratios": {**previous.get("ratios", {}), **ratios}, "runs": runs}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
