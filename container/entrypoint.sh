#!/bin/sh
# Entrypoint of the *session* container: wait until the storage-sidecar next to it is ready,
# then exec the session command. "Ready" means every mount has been checked and has settled
# (mounted, skipped, failed or waiting for credentials): a storage with bad credentials never
# blocks the session, but a sidecar that never answers does, clearly, after the wait.
#
#   STORAGE_SIDECAR_SOCKET  control socket (default /run/storage-sidecar/sidecar.sock)
#   STORAGE_SIDECAR_WAIT    seconds to wait for readiness (default 120)
#
# Usage: entrypoint.sh COMMAND [ARGS...]
set -eu
if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 64
fi
SOCKET="${STORAGE_SIDECAR_SOCKET:-/run/storage-sidecar/sidecar.sock}"
WAIT="${STORAGE_SIDECAR_WAIT:-120}"
PYTHON="$(command -v python3 || command -v python || true)"
if [ -z "$PYTHON" ]; then
    echo "entrypoint: python3 is needed to ask the storage-sidecar for readiness" >&2
    exit 69
fi
"$PYTHON" - "$SOCKET" "$WAIT" <<'PY'
import json, socket, sys, time
path, wait = sys.argv[1], float(sys.argv[2])
deadline, last, shown = time.monotonic() + wait, "no answer yet", {}


def show(states):
    # each mount's state as it changes, so the session log says why the launch waits
    for name, state in states.items():
        if shown.get(name) != state:
            print(f"storage-sidecar: {name}: {state}", file=sys.stderr, flush=True)
            shown[name] = state


while True:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        states = json.loads(body).get("states", {})
        show(states)
        if status == 200:
            print("storage-sidecar ready: " + (", ".join(f"{k}={v}" for k, v in states.items()) or "no mounts"), file=sys.stderr)
            sys.exit(0)
        last = f"not ready yet: {body.decode(errors='replace')}"
    except (OSError, ValueError, IndexError) as exc:
        last = f"cannot reach {path}: {exc}"
    if time.monotonic() >= deadline:
        print(f"entrypoint: the storage-sidecar did not become ready within {wait:g} s ({last}). "
              "Check the storage-sidecar container's log.", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PY
exec "$@"
