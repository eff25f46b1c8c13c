"""Real clients on the emulated link, side by side with `rclone mount` (issue 33).

Readers: sqlite queries, a DuckDB group-by over Parquet, h5py slices, pandas CSV and Parquet, a
zarr array of 2,500 chunks in one folder; and `ls -l` of a folder of 5,000 objects. Each runs in its own process (h5py and DuckDB keep the
GIL or threads of their own; the link proxy is threads of this one) on a new mount (cold), then
again on the same mount (warm), for the sidecar and for `rclone mount` with `--vfs-cache-mode
full` and `off`; the answer must equal the local file's. Reported: seconds, GETs, HEADs, LISTs,
every request, link bytes and their ratio to the bytes the reader needs.

Writers: `rsync -a` of 500 files, `git clone` of a 200-file repository, `mv` of the rsynced
folder, 10 Jupyter-style saves of a notebook: the sidecar durable and write-back, and `rclone
mount --vfs-cache-mode writes` (its close returns before the upload, as write-back), against moto
behind the same link emulation: the tool's seconds, and every request (the proxy's and the
checks' own excluded) until the bucket holds the result (uploads and deletes settled).

python -m benchmarks.clients [--only sqlite,duckdb,...] ; figures in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.link import BUCKET, SQLITE_QUERIES, LinkBench, _h5_slices, _sqlite_table, clean_up, save_results

ROOT = Path(__file__).resolve().parent.parent
READERS = ("sqlite", "duckdb", "hdf5", "pandas_csv", "pandas_parquet", "zarr")
WRITERS = ("rsync", "git_clone", "mv", "jupyter")
ZARR_SHAPE, ZARR_CHUNK = (5000, 5000), (100, 100)  # 2,500 chunks of 10 kB in one folder
CSV_ROWS = 600_000  # ~60 MB


# -- the readers' work, run in a process of its own: prints {"answer", "seconds"} --------------

def run_reader(name: str, root: str) -> dict[str, Any]:
    # The reader's libraries are imported before the clock starts: pandas and pyarrow alone
    # took 0.47 s (0.57 CPU-s), as long as a whole cold Parquet read through the sidecar, the
    # same for every mount, and on this 2-core machine their CPU made the passes' times vary
    # (the reader's CPU 0.67-1.50 s per pass).
    if name == "duckdb":
        import duckdb
    elif name in ("pandas_csv", "pandas_parquet"):
        import pandas as pd
        import pyarrow.parquet  # noqa: F401 (what read_parquet imports on its first call)
    elif name == "zarr":
        import zarr
    elif name == "hdf5":
        import h5py  # noqa: F401
    started = time.monotonic()
    if name == "sqlite":
        out = subprocess.run([sys.executable, "-c", SQLITE_QUERIES, f"{root}/data.db"], capture_output=True, text=True, check=True).stdout.split()
        answer: Any = out[:2]
    elif name == "duckdb":
        answer = duckdb.sql(f"SELECT c0 > 0.5 AS k, count(*), round(sum(c3), 3) FROM read_parquet('{root}/table.parquet') GROUP BY k ORDER BY k").fetchall()
    elif name == "hdf5":
        answer = _h5_slices(f"{root}/data.h5")
    elif name == "pandas_csv":
        answer = round(float(pd.read_csv(f"{root}/table.csv")["b"].sum()), 3)
    elif name == "pandas_parquet":
        df = pd.read_parquet(f"{root}/table.parquet", columns=["c2", "c7"])
        answer = [round(float(df["c2"].sum()), 3), round(float(df["c7"].sum()), 3)]
    elif name == "zarr":
        answer = int(zarr.open(f"{root}/arr.zarr", mode="r")[:].sum(dtype="int64"))
    else:
        raise ValueError(name)
    return {"answer": json.loads(json.dumps(answer)), "seconds": time.monotonic() - started}


class ClientsBench(LinkBench):
    # -- data -------------------------------------------------------------------------------

    def make(self, name: str) -> int:
        """Makes the reader's file(s) once; returns the bytes it needs."""
        import pyarrow.parquet as pq

        base = self.served / BUCKET
        if name == "sqlite":
            if not (base / "data.db").exists():
                self._dirty = True
                _sqlite_table(base / "data.db")
            return (base / "data.db").stat().st_size
        if name in ("duckdb", "pandas_parquet"):
            path = self.make_parquet()
            meta = pq.ParquetFile(path).metadata
            idx = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
            cols = ["c0", "c3"] if name == "duckdb" else ["c2", "c7"]
            return sum(meta.row_group(g).column(idx[c]).total_compressed_size for g in range(meta.num_row_groups) for c in cols)
        if name == "hdf5":
            self.make_hdf5()
            from benchmarks.link import H5_ROW_SLICES

            return sum(b - a for a, b in H5_ROW_SLICES) * self.H5_COLS * 8 + 2 * 2 * self.H5_CHUNK[0] * self.H5_CHUNK[1] * 8
        if name == "pandas_csv":
            path = base / "table.csv"
            if not path.exists():
                self._dirty = True
                rng = random.Random(11)
                with open(path, "w") as f:
                    f.write("a,b,c,d,e,f\n")
                    for _ in range(CSV_ROWS):
                        f.write(",".join(f"{rng.random():.9f}" for _ in range(6)) + "\n")
            return path.stat().st_size
        if name == "zarr":
            path = base / "arr.zarr"
            if not path.exists():
                import numpy as np
                import zarr

                self._dirty = True
                z = zarr.open(str(path), mode="w", shape=ZARR_SHAPE, chunks=ZARR_CHUNK, dtype="u1", compressor=None)
                z[:] = np.random.default_rng(2).integers(0, 256, ZARR_SHAPE, dtype="u1")
            return sum(p.stat().st_size for p in path.iterdir())
        raise ValueError(name)

    # -- readers ----------------------------------------------------------------------------

    def _pass(self, name: str, mounted: str, expected: Any) -> dict[str, Any]:
        self.proxy.reset_counts()
        got = subprocess.run([sys.executable, "-m", "benchmarks.clients", "--run", name, mounted], cwd=ROOT, capture_output=True, text=True,
                             timeout=1800)
        if got.returncode != 0:
            raise RuntimeError(f"{name} on {mounted}: {got.stderr[-2000:]}")
        out = json.loads(got.stdout.strip().splitlines()[-1])
        assert out["answer"] == expected, (name, out["answer"], expected)
        c = self.proxy.counts
        return {"seconds": out["seconds"], "gets": c["GET"], "heads": c["HEAD"], "lists": c["LIST"], "requests": sum(c.values()),
                "link_bytes": self.proxy.bytes_down}

    def reader(self, name: str) -> None:
        need = self.make(name)
        if self._dirty:
            self.restart()
            self._dirty = False
        expected = run_reader(name, str(self.served / BUCKET))["answer"]
        out: dict[str, Any] = {"needed_bytes": need}
        rounds: list[dict[str, Any]] = []
        # Rounds alternate the sidecar and the rclone mounts, so a noisy minute of this shared
        # machine falls on both; the ratios are the rounds' medians.
        for _ in range(self.args.rounds):
            one: dict[str, Any] = {}
            w = self.worker(Path(tempfile.mkdtemp(dir=self.work)))
            one["sidecar_cold"] = self._pass(name, w.mnt, expected)
            one["sidecar_warm"] = self._pass(name, w.mnt, expected)
            w.stop()
            for mode in ("full", "off"):
                if f"rclone_{mode}" not in self.args.peers.split(","):
                    continue
                proc, mnt = self.rclone_mount(mode)
                one[f"rclone_{mode}_cold"] = self._pass(name, mnt, expected)
                one[f"rclone_{mode}_warm"] = self._pass(name, mnt, expected)
                self.rclone_unmount(proc, mnt)
            for v in one.values():
                v["link_bytes_ratio"] = v["link_bytes"] / need
            one["ratios"] = {f"{when} seconds / rclone {mode}": one[f"sidecar_{when}"]["seconds"] / max(one[f"rclone_{mode}_{when}"]["seconds"], 1e-3)
                             for mode in ("full", "off") for when in ("cold", "warm") if f"rclone_{mode}_{when}" in one}
            rounds.append(one)
        out.update({k: v for k, v in rounds[-1].items() if k != "ratios"})  # (the last round's counts, as before)
        out["ratios"] = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]}
        if len(rounds) > 1:
            out["rounds"] = rounds
        self.results[name] = out

    def folder(self) -> None:
        """`ls -l` of a folder of 5,000 objects (listdir, then a stat of every name), cold and
        again once the metadata expired (TTL 2 s, rclone's --dir-cache-time 2s)."""
        base = self.served / BUCKET / "many"
        if not base.exists():
            self._dirty = True
            base.mkdir()
            for i in range(5000):
                (base / f"item{i:05d}.json").write_bytes(b"{}" * 256)
        if self._dirty:
            self.restart()
            self._dirty = False
        out: dict[str, Any] = {"entries": 5000}
        for who in ("sidecar", "rclone_off"):
            if who == "sidecar":
                w: Any = self.worker(None, ttl=2.0)
                mnt, proc = w.mnt, None
            else:
                w = None
                proc, mnt = self.rclone_mount("off", "--dir-cache-time", "2s", "--attr-timeout", "2s")
            for when in ("cold", "expired"):
                if when == "expired":
                    time.sleep(2.5)  # the condition measured: the TTL has passed
                self.proxy.reset_counts()
                started = time.monotonic()
                names = os.listdir(f"{mnt}/many")
                for n in names:
                    os.stat(f"{mnt}/many/{n}")
                secs = time.monotonic() - started
                assert len(names) == 5000, len(names)
                c = self.proxy.counts
                out[f"{who}_{when}"] = {"seconds": secs, "lists": c["LIST"], "heads": c["HEAD"], "requests": sum(c.values())}
            if w is not None:
                w.stop()
            else:
                self.rclone_unmount(proc, mnt)
        self.results["folder"] = out

    # -- writers ----------------------------------------------------------------------------

    def _sources(self) -> tuple[Path, Path, dict[str, str]]:
        src = self.work / "rsync-src"
        if not src.exists():
            src.mkdir()
            rng = random.Random(4)
            for i in range(500):
                (src / f"f{i:03d}.dat").write_bytes(rng.randbytes(rng.randrange(4 << 10, 64 << 10)))
        repo = self.work / "repo"
        env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@example.org", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@example.org")
        if not repo.exists():
            subprocess.run(["git", "init", "-q", str(repo)], check=True)
            for i in range(200):
                p = repo / f"d{i % 10}" / f"f{i:03d}.py"
                p.parent.mkdir(exist_ok=True)
                p.write_text(f"# file {i}\n" + "x = 1\n" * (i % 50))
            subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, env=env)
            subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "first"], check=True, env=env)
        return src, repo, env

    def _settled(self, who: str, w: Any, want: Callable[[], bool]) -> float:
        """Waits (bounded) until the bucket holds the result; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + 300
        while time.monotonic() < deadline:
            if w is not None:
                u = w.stats()["unsynced"]
                done = u["files"] == 0 and u.get("old_names", 0) == 0
            else:
                done = True
            if done and want():
                return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"{who}: the bucket never held the result")

    def writers(self) -> None:
        """Against moto behind a LinkProxy of the same link (rclone's S3 server keeps objects as
        files: it cannot hold a folder marker "a/" beside "a/b", which every mkdir makes)."""
        from tests.devservers import moto_server
        from tests.netproxy import LinkProxy

        src, repo, env = self._sources()
        files = {p.name for p in src.iterdir()}
        link_proxy = self.proxy
        with moto_server(self.work / "moto.log") as s3:
            s3.client().create_bucket(Bucket="writes")
            with LinkProxy(int(s3.endpoint.rsplit(":", 1)[1]), bandwidth=self.args.bandwidth, first_byte_delay=self.args.first_byte) as proxy:
                self.proxy = proxy
                try:
                    self._writers(s3, src, repo, env, files)
                finally:
                    self.proxy = link_proxy

    def _writers(self, s3: Any, src: Path, repo: Path, env: dict[str, str], files: set[str]) -> None:
        client = s3.client()

        def keys(prefix: str) -> set[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket="writes", Prefix=prefix)
            return {o["Key"][len(prefix):] for p in pages for o in p.get("Contents", [])}

        out: dict[str, dict[str, Any]] = {}
        for who in ("sidecar_durable", "sidecar_writeback", "rclone_writes"):
            top = f"w-{who}"
            if who.startswith("sidecar"):
                w: Any = self.worker(Path(tempfile.mkdtemp(dir=self.work)), readonly=False, write_mode=who.split("_")[1], writeback_delay=1.0,
                                     url="s3://writes", credentials={"access_key_id": s3.key, "secret_access_key": s3.secret})
                mnt, proc = w.mnt, None
            else:
                w = None
                proc, mnt = self.rclone_mount("writes", creds=(s3.key, s3.secret), bucket="writes")
            os.mkdir(f"{mnt}/{top}")
            nb = f"{mnt}/{top}/nb.ipynb"
            with open(nb, "w") as f:
                f.write(json.dumps({"cells": [{"source": "x" * 200_000}]}))
            steps: list[tuple[str, Callable[[], None], Callable[[], bool]]] = [
                ("rsync", lambda: subprocess.run(["rsync", "-a", f"{src}/", f"{mnt}/{top}/rs/"], check=True),
                 lambda: keys(f"{top}/rs/") >= files),
                ("git_clone", lambda: subprocess.run(["git", "clone", "-q", "--no-hardlinks", f"file://{repo}", f"{mnt}/{top}/clone"], check=True, env=env),
                 lambda: "d9/f199.py" in keys(f"{top}/clone/")),
                ("mv", lambda: subprocess.run(["mv", f"{mnt}/{top}/rs", f"{mnt}/{top}/rs2"], check=True),
                 lambda: not keys(f"{top}/rs/") and keys(f"{top}/rs2/") >= files),
                ("jupyter", lambda: _jupyter_saves(nb, 10),
                 lambda: ".~nb.ipynb" not in keys(f"{top}/") and b'"saved": 9' in client.get_object(Bucket="writes", Key=f"{top}/nb.ipynb")["Body"].read()),
            ]
            for name, act, want in steps:
                self._settled(who, w, lambda: True)
                self.proxy.reset_counts()
                started = time.monotonic()
                act()
                secs = time.monotonic() - started
                settle = self._settled(who, w, want)
                c = dict(self.proxy.counts)
                out.setdefault(name, {})[who] = {"seconds": secs, "settled_after_s": settle, "requests": sum(c.values()), "by_kind": c}
            if w is not None:
                w.stop()
            else:
                self.rclone_unmount(proc, mnt)
        for name, per in out.items():
            n = 500 if name in ("rsync", "mv") else 200 if name == "git_clone" else 10
            for v in per.values():
                v["requests_per_item"] = v["requests"] / n
        self.results["writers"] = out


def _jupyter_saves(nb: str, n: int) -> None:
    """jupyter_server's atomic_writing: the notebook copied to `.~name`, written in place,
    fsynced, closed, the copy removed."""
    backup = os.path.join(os.path.dirname(nb), ".~" + os.path.basename(nb))
    for i in range(n):
        shutil.copy2(nb, backup)
        with open(nb, "w") as f:
            f.write(json.dumps({"cells": [{"source": "x" * 200_000}], "saved": i}))
            f.flush()
            os.fsync(f.fileno())
        os.remove(backup)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clients")
    p.add_argument("--bandwidth", type=float, default=25e6, help="bytes/s per connection")
    p.add_argument("--first-byte", type=float, default=0.03, help="seconds before each response")
    p.add_argument("--only", default=",".join(READERS + ("folder", "writers")))
    p.add_argument("--peers", default="rclone_full,rclone_off", help="the rclone mounts the readers are compared with")
    p.add_argument("--rounds", type=int, default=1, help="rounds per reader (sidecar and peers alternating); ratios are their medians")
    p.add_argument("--run", nargs=2, metavar=("READER", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_reader(*args.run)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="sidecar-clients-"))
    bench = ClientsBench(args, work)
    bench.start()
    try:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            bench.writers() if name == "writers" else bench.folder() if name == "folder" else bench.reader(name)
            print(json.dumps(bench.results[name], indent=1), flush=True)
    finally:
        bench.stop()
        clean_up(work, "clients")
        bench.results["conditions"]["load_after"] = os.getloadavg()  # type: ignore[index]
        save_results(bench.results, "clients")  # what was measured, even when a later workload failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
