"""Holds many connections to a unix socket open, as a hostile member of its group would: half of
them with a request that never ends, half with nothing sent; a connection the server closes is
opened again. Prints "flooding" once every connection has been opened, then runs until its stdin
is closed or the given seconds have passed, and prints what happened as JSON. Standard library
only: it runs as another user under the system's python3 (tests/mount/test_control_socket.py)."""

import json
import selectors
import socket
import sys
import time

path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
stats = {"opened": 0, "closed_by_server": 0, "refused": 0}


def open_one(kind):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except BlockingIOError:
        pass
    except OSError:
        stats["refused"] += 1
        s.close()
        return
    if kind == "half":
        try:
            s.send(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        except OSError:
            pass
    stats["opened"] += 1
    sel.register(s, selectors.EVENT_READ, kind)


for i in range(count):
    open_one("half" if i % 2 else "idle")
print("flooding", flush=True)
sel.register(sys.stdin, selectors.EVENT_READ, "stop")
end = time.monotonic() + seconds
while time.monotonic() < end:
    events = sel.select(timeout=0.1)
    if any(key.data == "stop" for key, _ in events):
        break
    for key, _ in events:
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            stats["closed_by_server"] += 1
            open_one(key.data)
print(json.dumps(stats), flush=True)
