"""Live progress for the launcher: GET /events and `storage-sidecar status --watch`."""

import socket
import subprocess
import sys
import threading

import pytest
import trio

from sidecar.daemon import EVENT_BUFFER, EventBus
from sidecar.status import events
from tests.conftest import needs_fuse, wait_for
from tests.daemons import creds_dir, new_bucket

pytestmark = [pytest.mark.mount, needs_fuse]

ORDER = {"good": ["pending", "checking", "mounted"], "nobucket": ["pending", "checking", "failed"],
         "nocreds": ["pending", "checking", "needs_credentials", "checking", "mounted"]}


def _manifest(tmp_path, s3):
    good = new_bucket(s3, {"a.txt": b"a"})
    other = new_bucket(s3, {"b.txt": b"b"})
    return {
        "root": str(tmp_path / "project"),
        "storages": [
            {"name": "good", "provider": "s3", "url": f"s3://{good}", "options": {"endpoint_url": s3.endpoint}},
            {"name": "nobucket", "provider": "s3", "url": "s3://no-such-bucket-here", "options": {"endpoint_url": s3.endpoint}},
            {"name": "nocreds", "provider": "s3", "url": f"s3://{other}", "options": {"endpoint_url": s3.endpoint}},
        ],
        "mounts": [{"storage": n, "mountpath": n} for n in ("good", "nobucket", "nocreds")],
    }


def test_events_follow_a_launch_in_order_and_a_late_client_gets_the_state_first(s3, tmp_path, daemons):
    creds = creds_dir(tmp_path, s3, ["good", "nobucket"])
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "STORAGE_SIDECAR_NO_KEYRING": "1"}
    d = daemons(tmp_path, _manifest(tmp_path, s3), creds=creds, env=env)
    seen: dict[str, list[str]] = {"good": [], "nobucket": [], "nocreds": []}
    done = threading.Event()

    def follow():
        for event in events(sock=d.sock, timeout=60):
            if event["type"] == "mount_state":
                states = seen[event["mount"]]
                if not states or states[-1] != event["state"]:
                    states.append(event["state"])
                # until every mount reached its last state (they settle in any order)
                if (seen["nocreds"][-2:] == ["checking", "mounted"] and seen["good"][-1:] == ["mounted"]
                        and seen["nobucket"][-1:] == ["failed"]):
                    break
        done.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    wait_for(lambda: "needs_credentials" in seen["nocreds"], timeout=60, what="needs_credentials on the event stream")
    code, body = d.post("/mounts/nocreds/credentials", {"access_key_id": s3.key, "secret_access_key": s3.secret})
    assert body["state"] == "mounted"
    assert done.wait(30)
    for name, states in seen.items():
        expected = ORDER[name]
        # the stream may begin after the first changes (then the snapshot is its first state),
        # but from there on every change is there, in order
        start = expected.index(states[0])
        assert states == expected[start : start + len(states)] and states[-1] == expected[-1], (name, states)
    # a client that connects now gets the current state of every mount first, marked ready
    late = events(sock=d.sock, timeout=10)
    first = [next(late) for _ in range(3)]
    assert {e["mount"]: e["state"] for e in first} == {"good": "mounted", "nobucket": "failed", "nocreds": "mounted"}
    assert all(e["ready"] for e in first)
    assert first[1]["code"] == "bucket_not_found"
    late.close()
    # `status --watch` follows until settled (here: at once) and exits with the usual code
    r = subprocess.run([sys.executable, "-m", "sidecar.cli", "status", "--watch", "--socket", d.sock], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1  # nobucket is failed
    assert "nobucket: failed (bucket_not_found" in r.stderr


def test_a_stuck_events_client_never_slows_the_daemon(s3, tmp_path, daemons):
    b = new_bucket(s3, {"f.txt": b"x"})
    m = {"root": str(tmp_path / "project"),
         "storages": [{"name": "one", "provider": "s3", "url": f"s3://{b}", "options": {"endpoint_url": s3.endpoint}}],
         "mounts": [{"storage": "one", "mountpath": "one"}]}
    d = daemons(tmp_path, m, creds=creds_dir(tmp_path, s3, ["one"]))
    d.wait_ready()
    stuck = []
    for _ in range(5):  # clients that ask for events and never read them
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.sock)
        s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        stuck.append(s)
    try:
        for _ in range(3):  # state changes while they are stuck
            assert d.post("/mounts/one/unmount?force=1")[1]["state"] == "unmounted"
            assert d.post("/mounts/one/mount")[1]["state"] == "mounted"
        assert d.get("/health")[0] == 200
    finally:
        for s in stuck:
            s.close()


def test_the_event_bus_drops_a_subscriber_that_falls_behind_and_never_blocks():
    async def main():
        bus = EventBus()
        stream = bus.subscribe([{"type": "mount_state", "mount": "m", "state": "pending"}])
        first = await stream.__anext__()  # subscribed, snapshot delivered
        assert first["state"] == "pending"
        with trio.fail_after(1):  # publishing never waits, however many events
            for i in range(EVENT_BUFFER * 4):
                bus.publish({"type": "mount_state", "mount": "m", "state": str(i)})
        got = [e async for e in stream]
        assert len(got) == EVENT_BUFFER + 1 and got[-1]["type"] == "dropped"
        assert got[0]["state"] == "0"  # the events it had room for, in order

    trio.run(main)
