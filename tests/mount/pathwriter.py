"""Writes at a mount path as a session would, until SIGTERM: creates a file, renames a file
into it from beside it, makes a folder; again and again. Prints one JSON object: what succeeded
and how the rest failed. Standard library only: it also runs as another user, under the
system's python3 (tests/mount/test_path_hold.py)."""

import errno
import json
import os
import signal
import sys
import time

mnt, scratch, tag = sys.argv[1], sys.argv[2], sys.argv[3]
stop = False


def _stop(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, _stop)
landed, failed = [], {}


def attempt(what, name, action):
    try:
        action()
        landed.append([what, name])
    except OSError as exc:
        key = errno.errorcode.get(exc.errno, str(exc.errno))
        failed[key] = failed.get(key, 0) + 1


def create(name):
    with open(os.path.join(mnt, name), "w") as f:
        f.write(name)


def rename_in(name):
    src = os.path.join(scratch, name)
    with open(src, "w") as f:
        f.write(name)
    try:
        os.rename(src, os.path.join(mnt, name))
    finally:
        if os.path.exists(src):
            os.unlink(src)


n = 0
print("started", flush=True)
end = time.monotonic() + 600  # bounded: stops by itself
while not stop and time.monotonic() < end:
    n += 1
    attempt("create", f"c-{tag}-{n}.txt", lambda: create(f"c-{tag}-{n}.txt"))
    attempt("rename", f"r-{tag}-{n}.txt", lambda: rename_in(f"r-{tag}-{n}.txt"))
    attempt("mkdir", f"d-{tag}-{n}", lambda: os.mkdir(os.path.join(mnt, f"d-{tag}-{n}")))
    time.sleep(0.002)
print(json.dumps({"tries": n, "landed": landed, "failed": failed}), flush=True)
