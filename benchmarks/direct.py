"""The best direct client of issue 34, in a process of its own so that its CPU is its own (the
link proxy runs in the benchmark's process): boto3, ranged GETs of `--part` bytes, `--threads`
at a time (16 x 8 MiB read 256 MiB fastest of the clients tried on the emulated link).

python -m benchmarks.direct ENDPOINT BUCKET KEY SIZE [--part N] [--threads N]
prints {"MBps": ..., "cpu_s_per_GiB": ...}; the bytes are checked for length, not kept.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.direct")
    p.add_argument("endpoint")
    p.add_argument("bucket")
    p.add_argument("key")
    p.add_argument("size", type=int)
    p.add_argument("--part", type=int, default=8 << 20)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--access-key", required=True)
    p.add_argument("--secret-key", required=True)
    args = p.parse_args()

    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=args.endpoint, aws_access_key_id=args.access_key, aws_secret_access_key=args.secret_key,
                          region_name="us-east-1", config=Config(max_pool_connections=args.threads))

    def one(lo: int) -> int:
        hi = min(lo + args.part, args.size) - 1
        body = client.get_object(Bucket=args.bucket, Key=args.key, Range=f"bytes={lo}-{hi}")["Body"]
        n = 0
        while chunk := body.read(1 << 20):
            n += len(chunk)
        return n

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    with ThreadPoolExecutor(args.threads) as pool:
        got = sum(pool.map(one, range(0, args.size, args.part)))
    secs = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if got != args.size:
        raise SystemExit(f"read {got} bytes of {args.size}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"MBps": args.size / secs / 1e6, "cpu_s_per_GiB": cpu / (args.size / (1 << 30))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
