"""`python -m benchmarks.smallfiles`: many small files and session start, side by side in one run.

Against moto behind tests/netproxy.LinkProxy (no shaping: it only counts requests by kind), the
sidecar and `rclone mount --vfs-cache-mode full` (rclone returns from close before uploading;
the sidecar in durable mode after) do:
- a zarr-like store of 2,500 chunk files in 50 folders: cold pass, then warm pass (within the TTL)
- `cp -r` of 500 small files into the mount: durable, write-back, rclone, and a local `cp -r`
  on the same disk; again against `rclone serve s3` (`copy_fast`), whose PUTs cost a fifth of moto's
- `rsync -a` of 300 files into the mount, twice (the second must send nothing)
- `git init && git add && git commit` of 300 files inside the mount
each with the seconds and the requests by method. Then the daemon's start to /ready with 1, 3
and 20 mounts, quiet and beside two CPU-bound processes, and the proportional set size (PSS)
of the whole sidecar per mount.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.devservers import WorkerProcess, moto_server, stop_process
from sidecar.status import Unreachable, request
from benchmarks.link import rclone_binary, save_results, wait_mounted
from benchmarks import ramfs
from tests.netproxy import LinkProxy

RESULTS = Path(__file__).resolve().parent / "results"


class RcloneS3:
    """`rclone serve s3` over a folder, with the few things the workloads ask of a server."""

    key, secret = "benchkey", "benchsecret0123456789"

    def __init__(self, root: Path, work: Path) -> None:
        from tests.devservers import free_port, wait_http

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{self.key},{self.secret}",
                                      str(root)], stdout=open(work / "rclone-serve.log", "w"), stderr=subprocess.STDOUT)
        wait_http(self.endpoint + "/", self.proc)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key, aws_secret_access_key=self.secret, region_name="us-east-1")

    def stop(self) -> None:
        stop_process(self.proc)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    fn()
    return time.monotonic() - started


class SmallFiles:
    def __init__(self, s3, proxy: LinkProxy, work: Path) -> None:
        self.s3, self.proxy, self.work = s3, proxy, work
        self.n = 0
        self.results: dict[str, dict] = {}

    def bucket(self) -> str:
        self.n += 1
        name = f"small-{self.n}"
        self.s3.client().create_bucket(Bucket=name)
        return name

    def worker(self, bucket: str, **cfg) -> WorkerProcess:
        self.n += 1
        base = {"name": f"s{self.n}", "storage_id": f"bench-{bucket}", "url": f"s3://{bucket}", "options": {"endpoint_url": self.proxy.endpoint},
                "credentials": {"access_key_id": self.s3.key, "secret_access_key": self.s3.secret}, "mountpath": str(self.work / f"m{self.n}"),
                "cache_dir": str(self.work / f"cache{self.n}"), "log": str(self.work / "worker.log"), "log_level": "warning"}
        base.update(cfg)
        return WorkerProcess(base)

    def rclone(self, bucket: str) -> tuple[subprocess.Popen, str]:
        self.n += 1
        mnt = str(self.work / f"rc{self.n}")
        os.makedirs(mnt)
        env = dict(os.environ, RCLONE_CONFIG_M_TYPE="s3", RCLONE_CONFIG_M_PROVIDER="Other", RCLONE_CONFIG_M_ENDPOINT=self.proxy.endpoint,
                   RCLONE_CONFIG_M_ACCESS_KEY_ID=self.s3.key, RCLONE_CONFIG_M_SECRET_ACCESS_KEY=self.s3.secret, RCLONE_CONFIG_M_REGION="us-east-1")
        env.pop("AWS_CA_BUNDLE", None)
        proc = subprocess.Popen([rclone_binary(), "mount", f"m:{bucket}", mnt, "--config", "/dev/null", "--vfs-cache-mode", "full",
                                 "--cache-dir", str(self.work / f"rcc{self.n}"), "--log-file", str(self.work / "rclone.log")], env=env)
        wait_mounted(mnt, proc)
        return proc, mnt

    @staticmethod
    def unmount(proc: subprocess.Popen, mnt: str) -> None:
        subprocess.run(["fusermount3", "-u", mnt], check=False, capture_output=True)
        stop_process(proc, timeout=60)

    def measure(self, name: str, who: str, fn) -> None:  # type: ignore[no-untyped-def]
        self.proxy.reset_counts()
        secs = timed(fn)
        self.results.setdefault(name, {})[who] = {"seconds": round(secs, 2), "requests": dict(self.proxy.counts)}
        print(f"  {name:<24} {who:<12} {secs:7.2f} s  {dict(self.proxy.counts)}", flush=True)

    # -- workloads ------------------------------------------------------------------------

    def zarr(self) -> None:
        bucket = self.bucket()
        client = self.s3.client()
        keys = [f"store.zarr/c{a}/{b}" for a in range(50) for b in range(50)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=os.urandom(1024)), keys))

        def read_all(root: str) -> None:
            for k in keys:
                with open(f"{root}/{k}", "rb") as f:
                    f.read()

        w = self.worker(bucket, ttl=300.0)
        self.measure("zarr_2500_cold", "sidecar", lambda: read_all(w.mnt))
        self.measure("zarr_2500_warm", "sidecar", lambda: read_all(w.mnt))
        w.stop()
        proc, mnt = self.rclone(bucket)
        self.measure("zarr_2500_cold", "rclone_full", lambda: read_all(mnt))
        self.measure("zarr_2500_warm", "rclone_full", lambda: read_all(mnt))
        self.unmount(proc, mnt)

    def _src500(self) -> Path:
        src = self.work / "src500"
        if not src.exists():
            src.mkdir()
            for i in range(500):
                (src / f"f{i:03d}.txt").write_bytes(os.urandom(2048))
        return src

    def copy_fast(self) -> None:
        """`cp -r` of 500 files against a fast S3 server (rclone serve s3: a PUT of 2 KiB takes
        ~1.7 ms here, against moto's ~7.5 ms): what a durable close costs the sidecar itself."""
        served = self.work / "served"
        served.mkdir(exist_ok=True)
        fast = RcloneS3(served, self.work)
        saved = self.s3, self.proxy
        try:
            self.s3 = fast
            self.proxy = LinkProxy(fast.port)
            self._cp_r_500("cp_r_500_fast_server", into_root=True)
        finally:
            self.proxy.close()
            fast.stop()
            self.s3, self.proxy = saved

    def _cp_r_500(self, name: str, *, into_root: bool = False) -> None:
        """`cp -r` of 500 small files: onto the local disk that holds the staging area (file
        creation is what both pay for; on this machine's ext4 it costs up to ~0.5 ms a file),
        into the mount durable and write-back, into rclone full, and into a trivial in-memory
        pyfuse3 + trio file system (the floor of the FUSE layer itself). `into_root`: the files go
        into the mount's root, not a new folder (rclone serve s3 refuses keys under a "folder/"
        marker object, "file already exists", which a mkdir in the mount creates)."""
        src = self._src500()
        self.measure(name, "local", lambda: subprocess.run(["cp", "-r", str(src), str(self.work / f"local-{name}")], check=True))

        def cp_into(mnt: str) -> None:
            subprocess.run(["cp", "-r", f"{src}/.", mnt] if into_root else ["cp", "-r", str(src), f"{mnt}/dst"], check=True)

        for who, cfg in (("durable", {}), ("writeback", {"write_mode": "writeback"})):
            w = self.worker(self.bucket(), readonly=False, ttl=5.0, **cfg)
            self.measure(name, who, lambda: cp_into(w.mnt))
            w.stop()  # write-back: the queue is flushed here (not counted in cp's time)
        proc, mnt = self.rclone(self.bucket())
        self.measure(name, "rclone_full", lambda: cp_into(mnt))
        self.unmount(proc, mnt)
        # The floor of any pyfuse3 + trio file system here: files created in memory, nothing else.
        floor = self.work / f"floor-{name}"
        floor.mkdir()
        with ramfs.mounted(str(floor), "0", "--writable"):
            self.measure(name, "pyfuse3_floor", lambda: cp_into(str(floor)))

    def copy_in(self) -> None:
        self._cp_r_500("cp_r_500")
        rsrc = self.work / "src300"
        rsrc.mkdir()
        for i in range(300):
            p = rsrc / f"r{i:03d}.dat"
            p.write_bytes(os.urandom(4096))
            os.utime(p, (1_600_000_000 + i, 1_600_000_000 + i))
        env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@x")

        def git(gitdir: str) -> None:
            os.makedirs(gitdir)
            for i in range(300):
                Path(f"{gitdir}/g{i:03d}.txt").write_text(f"line {i}\n")
            for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "x"]):
                subprocess.run(cmd, cwd=gitdir, check=True, env=env)

        for who in ("sidecar", "sidecar_writeback", "rclone_full"):
            bucket = self.bucket()
            if who == "rclone_full":
                proc, mnt = self.rclone(bucket)
            else:
                w = self.worker(bucket, readonly=False, ttl=5.0, **({"write_mode": "writeback"} if who.endswith("writeback") else {}))
                mnt = w.mnt
            for run in ("rsync_in_first", "rsync_in_second"):
                self.measure(run, who, lambda: subprocess.run(["rsync", "-a", f"{rsrc}/", f"{mnt}/r/"], check=True))
            back = self.work / f"back-{who}"
            self.measure("rsync_out", who, lambda: subprocess.run(["rsync", "-a", f"{mnt}/r/", str(back)], check=True))
            self.measure("git_300", who, lambda: git(f"{mnt}/repo"))
            if who == "rclone_full":
                self.unmount(proc, mnt)
            else:
                w.stop()

    def start_to_ready(self) -> None:
        out: dict[str, dict] = {}
        for template in ("forked", "spawned"):
            for n in (1, 3, 20):
                bucket = self.bucket()
                for load in ("quiet", "2_cpu_burners"):
                    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if load != "quiet" else 0)]
                    try:
                        secs, pss = self._start(bucket, n, fork=template == "forked")
                    finally:
                        for b in burners:
                            b.kill()
                            b.wait()
                    out.setdefault(template, {}).setdefault(f"{n}_mounts", {})[load] = {"seconds_to_ready": round(secs, 2), "pss_MiB": round(pss, 1),
                                                                                       "first_read_s": self._first_read[0], "later_cold_read_s": self._first_read[1],
                                                                                       "first_read_requests": self._first_requests[0],
                                                                                       "later_cold_read_requests": self._first_requests[1],
                                                                                       "later_cold_read_unlisted_folder_s": self._first_read[2],
                                                                                       "later_cold_read_unlisted_folder_requests": self._first_requests[2]}
                    print(f"  start {template:<8} {n:2d} mounts {load:<14} {secs:6.2f} s to /ready, PSS {pss:7.1f} MiB, "
                          f"first read {self._first_read[0]:.3f} s {self._first_requests[0]}, later cold reads {self._first_read[1]:.3f} s "
                          f"{self._first_requests[1]} and {self._first_read[2]:.3f} s {self._first_requests[2]}", flush=True)
            one, twenty = out[template]["1_mounts"]["quiet"]["pss_MiB"], out[template]["20_mounts"]["quiet"]["pss_MiB"]
            out[template]["pss_per_additional_mount_MiB"] = round((twenty - one) / 19, 1)  # type: ignore[index]
        self.results["start_to_ready"] = out

    def _start(self, bucket: str, n: int, *, fork: bool = True) -> tuple[float, float]:
        root = self.work / f"proj{self.n}"
        self.n += 1
        names = [f"m{i}" for i in range(n)]
        manifest = {"root": str(root), "storages": [{"name": k, "id": f"https://bench/storage/{bucket}/{k}", "provider": "s3", "url": f"s3://{bucket}/{k}",
                                                     "options": {"endpoint_url": self.proxy.endpoint}} for k in names],
                    "mounts": [{"storage": k, "mountpath": k} for k in names]}
        creds = self.work / f"creds{self.n}"
        for k in names:
            (creds / k).mkdir(parents=True)
            (creds / k / "access_key_id").write_text(self.s3.key)
            (creds / k / "secret_access_key").write_text(self.s3.secret)
            for f in (creds / k).iterdir():
                f.chmod(0o600)
        (self.work / "m.json").write_text(json.dumps(manifest))
        # The first read after /ready (it lists the mount's root, then GETs) against later cold
        # reads: one in the listed root (a GET only), one in a folder not listed yet (a LIST and
        # a GET, the first read's shape).
        for k in ("first.bin", "second.bin", "sub/third.bin"):
            self.s3.client().put_object(Bucket=bucket, Key=f"m0/{k}", Body=os.urandom(4 << 20))
        sock = str(self.work / f"d{self.n}.sock")
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "run", "--manifest", str(self.work / "m.json"), "--socket", sock,
                                 "--credentials-dir", str(creds), "--no-write-probe", "--log-level", "warning",
                                 "--fork-template" if fork else "--no-fork-template"],
                                stdout=subprocess.DEVNULL, stderr=open(self.work / "daemon.log", "a"))
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not get ready: {(self.work / 'daemon.log').read_text()[-2000:]}")
                try:
                    if request("/ready", sock=sock, timeout=2)[0] == 200:
                        break
                except Unreachable:
                    pass
                time.sleep(0.02)
            secs = time.monotonic() - started
            times, asked = [], []
            for k in ("first.bin", "second.bin", "sub/third.bin"):
                self.proxy.reset_counts()
                t = time.monotonic()
                Path(root / "m0" / k).read_bytes()
                times.append(round(time.monotonic() - t, 3))
                asked.append(dict(self.proxy.counts))  # the first also lists the folder; the second finds it listed
            self._first_read = times
            self._first_requests = asked
            pss = 0
            pids = [str(proc.pid)] + [str(m["worker_pid"]) for m in request("/status", sock=sock)[1]["mounts"] if m.get("worker_pid")]
            todo = [str(proc.pid)]  # every descendant: the template, and the workers and placeholders it forked
            while todo:
                found = subprocess.run(["pgrep", "-P", todo.pop()], capture_output=True, text=True).stdout.split()
                pids += found
                todo += found
            for pid in set(pids):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
            return secs, pss / 1024
        finally:
            stop_process(proc, timeout=60)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sidecar-small-"))
    with moto_server(work / "moto.log") as s3:
        port = int(s3.endpoint.rsplit(":", 1)[1])
        with LinkProxy(port) as proxy:
            bench = SmallFiles(s3, proxy, work)
            failed = False
            steps = {"zarr": bench.zarr, "copy_in": bench.copy_in, "copy_fast": bench.copy_fast, "start": bench.start_to_ready}
            try:
                for name in (sys.argv[1].split(",") if len(sys.argv) > 1 else steps):
                    try:
                        steps[name]()
                    except Exception as exc:  # one failing workload is reported; the others still run
                        traceback.print_exc()
                        bench.results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
                        failed = True
            finally:
                from sidecar.mounttable import fuse_mounts

                for m in fuse_mounts():
                    if m.startswith(str(work)):
                        subprocess.run(["fusermount3", "-u", "-z", m], check=False)
    shutil.rmtree(work, ignore_errors=True)
    bench.results["conditions"] = {"server": "moto behind LinkProxy (counting only)", "load": os.getloadavg()}
    save_results(bench.results, "smallfiles")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
