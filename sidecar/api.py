"""The control socket's API: what each route of `sidecar.control`'s HTTP server answers.

GET `/health`, `/ready`, `/status`, `/events` (a stream), `/metrics`; POST
`/mounts/{name}/{action}`. Actions that change a mount's state (`mount`, `unmount`, `skip`,
`credentials`, `retry`) go to the mount's supervisor as a command and are answered once it has
acted, or with 202 once a request has waited ACTION_WAIT; the others (`refresh`, `prefetch`,
`publish`, `push`, `rescue`) are asked of the mount's worker. Every bad body is a 400 naming
what is wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any

import trio

from sidecar import credentials as credential_sources
from sidecar import rescue
from sidecar.control import REQUEST_DEADLINE, EventStream, HTTPError, route
from sidecar.log import get_logger, register_secret
from sidecar.protocol import (
    Command, Prefetch, PrefetchStarted, Publish, Published, Push, Pushed, Refresh, Refreshed, RescueUpload, RescueUploaded,
)
from sidecar.states import COPY, UP

log = get_logger("sidecar.api")

ACTION_WAIT = REQUEST_DEADLINE - 2  # a POST action answers 202 once this has passed


class ControlAPI:
    def __init__(self, daemon: Any) -> None:  # sidecar.daemon.Daemon (which imports this module)
        self.daemon = daemon

    async def handle(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        """One request: (status, JSON-able body or an EventStream); raises HTTPError."""
        path, params = route(target)
        expected = "POST" if path.startswith("/mounts/") else "GET"
        if method != expected:
            raise HTTPError(405, "method_not_allowed", f"{path} takes {expected}")
        if path == "/health":
            return 200, {"status": "ok"}
        if path == "/ready":
            ready = self.daemon.ready()
            return (200 if ready else 503), {"ready": ready, "states": {m.name: m.state for m in self.daemon.mounts.values()}}
        if path == "/status":
            return 200, await self.daemon.status()
        if path == "/events":
            snapshot = [m.state_event(self.daemon.ready()) for m in self.daemon.mounts.values()]
            snapshot += [self.daemon.rescued_event(m) for m in self.daemon.mounts.values() if m.rescued_total]
            return 200, EventStream(self.daemon.events.subscribe(snapshot))
        if path == "/metrics":
            from sidecar.metrics import render

            return 200, render(self.daemon)
        m = self.daemon.mounts.get(params["name"])
        if m is None:
            raise HTTPError(404, "no_such_mount", f"no mount named {params['name']!r}; mounts: {', '.join(self.daemon.mounts)}")
        action = path.rsplit("/", 1)[1]
        if action == "publish":
            return await self._publish(m, body)
        if action == "refresh":
            return await self._refresh(m, body)
        if action == "prefetch":
            return await self._prefetch(m, body)
        if action == "rescue":
            return await self._rescue(m, body)
        if action == "push":
            if m.mount.mode != "copy" or m.worker is None or m.state not in COPY:
                raise HTTPError(409, "not_a_copy", f"{m.name} is not a copied folder ({m.mount.mode}, {m.state})")
            pushed: Pushed | None = await m.worker.call(Push(), ACTION_WAIT)
            if pushed is None:
                return 202, {"pushed": None, "reason": "still uploading"}
            if not pushed.ok:
                raise HTTPError(409, "not_pushed", pushed.reason or "not pushed")
            return 200, {"pushed": pushed.pushed, "failed": pushed.failed}
        arg = None
        if action == "credentials":
            arg = parse_credentials(body, m.storage.provider)
        if action == "unmount" and m.state in UP and "force=1" not in target.partition("?")[2]:
            pids = await trio.to_thread.run_sync(busy_pids, m.mount.mountpath)
            if pids:
                raise HTTPError(409, "busy", f"{m.mount.mountpath} is in use by process(es) {', '.join(map(str, pids))}; close them or unmount with --force")
        done = trio.Event()
        await m.commands[0].send((action, arg, done))
        # Answer within the socket's request deadline: a pre-flight or mount that takes longer
        # goes on, and the client follows it on /status (or /events) after a 202.
        with trio.move_on_after(ACTION_WAIT):
            await done.wait()
        return (200 if done.is_set() else 202), m.public()

    @staticmethod
    def _body_field(body: bytes, name: str, kind: type, default: Any, example: str) -> Any:
        """One field of a JSON object body (`default` when the body is empty), or a 400."""
        try:
            doc = json.loads(body.decode("utf-8")) if body else {name: default}
            value = doc.get(name, default) if isinstance(doc, dict) else None
            if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
                raise ValueError
        except (ValueError, RecursionError, UnicodeDecodeError):
            raise HTTPError(400, "bad_request", f"the body must be {example}") from None
        return value

    async def _ask_worker(self, m: Any, action: str, command: Command) -> Any:
        """Sends a command to a mounted mount's worker; its answer, or None if it takes longer
        than a request may wait (the work goes on)."""
        if m.worker is None or m.state not in UP:
            raise HTTPError(409, "not_mounted", f"{m.name} is {m.state}; {action} needs it mounted")
        return await m.worker.call(command, ACTION_WAIT)

    async def _refresh(self, m: Any, body: bytes) -> tuple[int, Any]:
        """Forgets the mount's cached metadata of a folder (or all of it) in the worker and the
        kernel: the next access sees the bucket as it is now, whatever the metadata TTL."""
        path = self._body_field(body, "path", str, "", 'empty or {"path": "<folder in the mount>"}')
        refreshed: Refreshed | None = await self._ask_worker(m, "refresh", Refresh(path))
        if refreshed is None:
            raise HTTPError(503, "no_answer", f"the mount process of {m.name} did not answer")
        return 200, {"path": path, "entries": refreshed.entries}

    async def _prefetch(self, m: Any, body: bytes) -> tuple[int, Any]:
        """Warms the mount's disk cache with folders or files, in the background (progress in
        /status); refused when it cannot fit the disk cache."""
        paths = self._body_field(body, "paths", list, [], '{"paths": ["<folder or file in the mount>", ...]}')
        started: PrefetchStarted | None = await self._ask_worker(m, "prefetch", Prefetch(tuple(paths)))
        if started is None:
            return 202, {"paths": paths, "started": None, "reason": "still planning; see status"}
        if not started.ok:
            raise HTTPError(409, "prefetch_refused", started.reason or "refused")
        return 200, {"paths": paths, "started": True, "files": started.files, "bytes": started.bytes}

    async def _rescue(self, m: Any, body: bytes) -> tuple[int, Any]:
        """What was moved aside from beneath the mount path: listed, uploaded into the storage
        under the paths it had (a changed object is not overwritten: the file goes under a
        conflict name), or discarded."""
        what = self._body_field(body, "action", str, "list", '{"action": "list" | "upload" | "discard"}')
        if what == "discard":
            removed = await trio.to_thread.run_sync(rescue.discard, self.daemon.rescue_base, m.name)
            log.info("rescued_discarded", mount=m.name, entries=removed)
            await self.daemon.refresh_rescued(m)
            return 200, {"discarded": removed}
        if what == "upload":
            if m.storage.readonly:
                raise HTTPError(409, "read_only", f"{m.name} is read-only: its rescued files are kept until `storage-sidecar rescue {m.name} --discard`")
            folder = str(rescue.mount_folder(self.daemon.rescue_base, m.name))
            uploaded: RescueUploaded | None = await self._ask_worker(m, "rescue --upload", RescueUpload(folder))
            await self.daemon.refresh_rescued(m)
            if uploaded is None:
                return 202, {"uploaded": None, "reason": "still uploading; see status"}
            return 200, uploaded.fields()
        if what != "list":
            raise HTTPError(400, "bad_request", 'the body must be {"action": "list" | "upload" | "discard"}')
        await self.daemon.refresh_rescued(m)
        return 200, {"rescued": m.rescued, "rescued_total": m.rescued_total, "where": str(rescue.mount_folder(self.daemon.rescue_base, m.name))}

    async def _publish(self, m: Any, body: bytes) -> tuple[int, Any]:
        """Uploads an `incomplete` staged file of a mount on a person's explicit request."""
        key = self._body_field(body, "key", str, "", '{"key": "<object key of an incomplete file>"}')
        if not key:
            raise HTTPError(400, "bad_request", 'the body must be {"key": "<object key of an incomplete file>"}')
        published: Published | None = await self._ask_worker(m, "publish", Publish(key))
        if published is None:
            return 202, {"key": key, "published": None, "reason": "still uploading; see status"}
        if not published.ok:
            raise HTTPError(409, "not_published", published.reason or "not published")
        return 200, {"key": key, "published": True}


def busy_pids(path: str) -> list[int]:
    """Processes with a file open, or their working directory, inside `path`."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        links = [f"/proc/{entry}/cwd"]
        try:
            links += [f"/proc/{entry}/fd/{fd}" for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == real or target.startswith(prefix):
                found.append(int(entry))
                break
    return found


def parse_credentials(body: bytes, provider: str) -> dict[str, str]:
    try:
        doc = json.loads((body or b"null").decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "bad_json", "the body must be UTF-8 JSON: a JSON object of credential fields") from None
    except (ValueError, RecursionError):  # bad JSON, a number too long to convert, deep nesting
        raise HTTPError(400, "bad_json", "the body must be a JSON object of credential fields") from None
    from sidecar.rclone import credential_from_option, options_for

    rclone_names = options_for(provider)  # the same credentials as rclone names them (a data connector's sensitive fields)
    allowed = (*credential_sources.FIELDS[provider], *rclone_names)
    if not isinstance(doc, dict) or not doc:
        raise HTTPError(400, "bad_credentials", f"the body must be a JSON object with fields from: {', '.join(allowed)}")
    unknown = [k for k in doc if k not in allowed]
    if unknown:
        raise HTTPError(400, "bad_credentials", f"unknown credential field(s) {', '.join(map(repr, unknown))} for {provider}; allowed: {', '.join(allowed)}")
    if not all(isinstance(v, str) and v for v in doc.values()):
        raise HTTPError(400, "bad_credentials", "every credential field must be a non-empty string")
    for name, value in doc.items():
        problem = credential_sources.text_problem(value)
        if problem:
            raise HTTPError(400, "bad_credentials", f"credential field {name!r} {problem}")
    for v in doc.values():
        register_secret(v)  # as given (an obscured `pass`, a SAS URL are secrets too)
    ours: dict[str, str] = {}
    for name, given in doc.items():
        try:
            field, value = credential_from_option(provider, name, given) if name in rclone_names else (name, given)
        except ValueError as exc:
            raise HTTPError(400, "bad_credentials", f"credential field {name!r}: {exc}") from None
        if value != given:
            register_secret(value)  # what was derived from it (revealed, the SAS URL's query)
        ours[field] = value
    return ours
