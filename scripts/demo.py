"""`make demo`: a local S3 server with sample data, the sidecar mounting it, a look inside.

Runs until Ctrl-C when started from a terminal; otherwise (or with --once) it shows the mount and
then stops by itself. Everything it starts is stopped and unmounted on the way out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: its dev servers
from tests.devservers import fuse_mounts, moto_server, stop_process  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
DEMO = HERE / ".demo"
BIN = Path(sys.executable).parent / "storage-sidecar"


def sample_objects() -> dict[str, bytes]:
    rng = random.Random(42)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["sample", "chrom", "pos", "ref", "alt", "qual"])
    for i in range(2000):
        w.writerow([f"HG00{i % 7}", f"chr{rng.randint(1, 22)}", rng.randint(1, 10**8), "ACGT"[i % 4], "TGCA"[i % 4], rng.randint(10, 99)])
    return {
        "data/README.md": b"# GIAB sample\nA small stand-in for the Genome in a Bottle data set.\n",
        "data/raw/variants.csv": out.getvalue().encode(),
        "data/raw/reads/HG002.bam": rng.randbytes(48 * 1024 * 1024),
        "data/raw/reads/HG003.bam": rng.randbytes(3 * 1024 * 1024),
        "data/processed/summary.json": json.dumps({"samples": 7, "variants": 2000}).encode(),
    }


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def show(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)


def main() -> int:
    once = "--once" in sys.argv or not sys.stdin.isatty()
    DEMO.mkdir(exist_ok=True)
    root = DEMO / "project"
    with moto_server(DEMO / "moto.log") as s3:
        banner(f"local S3 server (moto) at {s3.endpoint}, bucket 'giab'")
        client = s3.client()
        client.create_bucket(Bucket="giab")
        for key, data in sample_objects().items():
            client.put_object(Bucket="giab", Key=key, Body=data)
            print(f"  s3://giab/{key}  ({len(data):,} bytes)")
        creds = DEMO / "credentials" / "giab"
        creds.mkdir(parents=True, exist_ok=True)
        (creds / "access_key_id").write_text(s3.key)
        (creds / "secret_access_key").write_text(s3.secret)
        for f in ("access_key_id", "secret_access_key"):  # others may not read credential files
            os.chmod(creds / f, 0o600)
        manifest = {
            "root": str(root),
            "storages": [
                {"name": "giab", "provider": "s3", "url": "s3://giab/data", "readonly": True, "options": {"endpoint_url": s3.endpoint}}
            ],
            "mounts": [{"storage": "giab", "mountpath": "data/giab", "source_path": "raw"}],
        }
        mpath = DEMO / "manifest.json"
        mpath.write_text(json.dumps(manifest, indent=2))
        banner("the mount manifest")
        show([str(BIN), "validate", str(mpath)])
        banner("starting the sidecar")
        log = open(DEMO / "sidecar.log", "w")
        proc = subprocess.Popen(
            [str(BIN), "run", "--manifest", str(mpath), "--credentials-dir", str(DEMO / "credentials"), "--cache-dir", str(DEMO / "cache"), "--socket", str(DEMO / "sidecar.sock")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        mnt = str(root / "data" / "giab")
        try:
            end = time.monotonic() + 60
            while mnt not in fuse_mounts():
                if proc.poll() is not None or time.monotonic() > end:
                    print((DEMO / "sidecar.log").read_text()[-4000:])
                    print("the sidecar did not mount; see .demo/sidecar.log")
                    return 1
                time.sleep(0.1)
            banner(f"mounted at {mnt}")
            show(["ls", "-lR", mnt])
            banner("reading files")
            show(["head", "-5", f"{mnt}/variants.csv"])
            t = time.monotonic()
            show(["sha256sum", f"{mnt}/reads/HG002.bam"])
            cold = time.monotonic() - t
            t = time.monotonic()
            subprocess.run(["sha256sum", f"{mnt}/reads/HG002.bam"], check=False, capture_output=True)
            hot = time.monotonic() - t
            print(f"48 MiB read: first {cold:.2f} s, again {hot:.3f} s (page and block cache)")
            banner("writing is refused: the storage is read-only")
            show(["touch", f"{mnt}/new-file"])
            banner("status (what `storage-sidecar status` shows inside a session)")
            show([str(BIN), "status", "--socket", str(DEMO / "sidecar.sock")])
            if once:
                banner("done (non-interactive); unmounting")
            else:
                banner("the mount stays up until you press Ctrl-C")
                try:
                    signal.pause()
                except KeyboardInterrupt:
                    print()
        except KeyboardInterrupt:
            pass
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(proc)
            still = mnt in fuse_mounts()
            print(f"sidecar exited with {proc.returncode}; {'STILL MOUNTED' if still else 'unmounted cleanly'}")
    return 0 if proc.returncode == 0 and not still else 1


if __name__ == "__main__":
    sys.exit(main())
