"""Issue 35's benchmark: N = 1, 2, 4 sessions of one node reading the same object, with the
node's shared cache (`--shared-cache`) and without it, on the link emulator (`rclone serve s3`
behind LinkProxy: bandwidth per connection and a delay before each response).

Each session is a mount worker with its own disk cache, as a session pod's sidecar has. Two
orders: one session after another (a team starting its sessions over a day) and all at once (a
class starting together). Reported per case: GETs and bytes on the link, each session's time
and throughput, its shared hits; every session's bytes are checked against the served file.
The page cache is dropped before each case.

    python -m benchmarks.shared [--size-mib 1024] [--sessions 1,2,4] [--rounds 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.link import BUCKET, LinkBench, clean_up, drop_page_cache, save_results

MiB = 1 << 20
NAME = "shared.bin"


def read_digest(path: str) -> tuple[int, float, str]:
    """(bytes, seconds, sha256) of reading `path` through, 1 MiB at a time."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    n, started = 0, time.monotonic()
    try:
        while chunk := os.read(fd, MiB):
            n += len(chunk)
            h.update(chunk)
    finally:
        os.close(fd)
    return n, time.monotonic() - started, h.hexdigest()


class SharedBench(LinkBench):
    def case(self, n: int, shared: bool, at_once: bool, digest: str) -> dict[str, Any]:
        """N sessions (new workers, new disk caches; a new shared folder if `shared`) read the file."""
        base = Path(tempfile.mkdtemp(dir=self.work))
        folder = str(base / "node-shared") if shared else None
        workers = [self.worker(base / f"cache{i}", shared_cache_dir=folder) for i in range(n)]
        try:
            drop_page_cache()
            self.proxy.reset_counts()
            reads: list[tuple[int, float, str] | None] = [None] * n

            def read(i: int) -> None:
                reads[i] = read_digest(f"{workers[i].mnt}/{NAME}")

            started = time.monotonic()
            if at_once:
                threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for i in range(n):
                    read(i)
            wall = time.monotonic() - started
            stats = [w.stats() for w in workers]
        finally:
            for w in workers:
                w.stop()
            shutil.rmtree(base, ignore_errors=True)
        if any(r is None or r[2] != digest for r in reads):
            raise AssertionError(f"a session read other bytes than the served file: {[r and r[2][:12] for r in reads]}")
        size = self.args.size_mib * MiB
        return {
            "sessions": n, "shared": shared, "order": "at once" if at_once else "one after another", "wall_s": round(wall, 2),
            "session_s": [round(r[1], 2) for r in reads if r], "session_MBps": [round(size / r[1] / 1e6, 1) for r in reads if r],
            "gets": self.proxy.counts.get("GET", 0), "requests": {k: v for k, v in self.proxy.counts.items() if v},
            "link_bytes_down": self.proxy.bytes_down, "link_bytes_over_object": round(self.proxy.bytes_down / size, 3),
            "shared_hits": [s["cache"].get("shared_hits", 0) for s in stats],
            "session_gets": [s["store"]["get_requests"] for s in stats],
        }

    def sessions(self) -> None:
        a = self.args
        path = self.put(NAME, a.size_mib * MiB)
        if self._dirty:
            self.restart()
            self._dirty = False
        digest = read_digest(str(path))[2]
        rows: list[dict[str, Any]] = []
        for r in range(a.rounds):
            for n in (int(x) for x in a.sessions.split(",")):
                for at_once in ((False,) if n == 1 else (False, True)):
                    for shared in (False, True):
                        row = self.case(n, shared, at_once, digest)
                        row["round"] = r + 1
                        rows.append(row)
                        print(f"  {n} session(s), {row['order']}, shared {'on' if shared else 'off'}: {row['gets']} GETs, "
                              f"{row['link_bytes_over_object']:.2f}x the object on the link, sessions {row['session_s']} s, "
                              f"shared hits {row['shared_hits']}", flush=True)
        summary = {}
        for n in (int(x) for x in a.sessions.split(",")):
            for order in ("one after another", "at once"):
                for shared in (False, True):
                    sel = [x for x in rows if x["sessions"] == n and x["order"] == order and x["shared"] == shared]
                    if sel:
                        summary[f"{n} {order} shared={'on' if shared else 'off'}"] = {
                            "link_bytes_over_object": statistics.median(x["link_bytes_over_object"] for x in sel),
                            "median_session_s": statistics.median(s for x in sel for s in x["session_s"]),
                            "wall_s": statistics.median(x["wall_s"] for x in sel)}
        self.results["sessions"] = {"size_mib": a.size_mib, "rows": rows, "summary": summary}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared")
    p.add_argument("--bandwidth", type=float, default=25e6, help="bytes/s per connection")
    p.add_argument("--first-byte", type=float, default=0.03, help="seconds before each response")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--sessions", default="1,2,4")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-shared-"))
    bench = SharedBench(args, work)
    bench.results["conditions"]["note"] = ("each session a mount worker with its own disk cache; page cache dropped before each case; "  # type: ignore[index]
                                           f"bucket {BUCKET}")
    bench.start()
    try:
        bench.sessions()
    finally:
        bench.stop()
        clean_up(work, "shared")
    bench.results["conditions"]["load_after"] = os.getloadavg()  # type: ignore[index]
    save_results(bench.results, "shared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
