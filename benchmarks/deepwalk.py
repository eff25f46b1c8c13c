"""`python -m benchmarks.deepwalk`: `find` down a folder tree N levels deep through a mount, with
the metadata TTL at 0 and 5 s: backend calls and seconds (the walk must cost one call per
folder, not one per ancestor per step)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.devservers import WorkerProcess, moto_server


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="deepwalk-"))
    with moto_server(work / "moto.log", auth=False) as s3:
        client = s3.client()
        rows = []
        for depth in (50, 100, 200):
            bucket = f"deep-{depth}"
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="/".join(f"d{i}" for i in range(depth)) + "/leaf.txt", Body=b"x")
            for ttl in (0.0, 5.0):
                w = WorkerProcess({"name": f"w{depth}{int(ttl)}", "storage_id": bucket, "url": f"s3://{bucket}",
                                   "options": {"endpoint_url": s3.endpoint}, "credentials": {"access_key_id": "k", "secret_access_key": "s"},
                                   "mountpath": str(work / f"m{depth}-{int(ttl)}"), "ttl": ttl, "log": str(work / "w.log")})
                try:
                    started = time.monotonic()
                    out = subprocess.run(["find", w.mnt], capture_output=True, text=True, check=True, timeout=600).stdout
                    secs = time.monotonic() - started
                    st = w.stats()["store"]
                    calls = st["head_requests"] + st["list_requests"] + st["get_requests"]
                    assert out.count("\n") == depth + 2
                    rows.append((depth, ttl, calls, secs))
                    print(f"depth {depth:3d}  metadata_ttl {ttl:g}: {calls:5d} backend calls, {secs:6.2f} s", flush=True)
                finally:
                    w.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
