"""The `storage-sidecar` command line. Imports stay lazy: `status` runs as a probe every few seconds."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from sidecar import __version__
from sidecar import protocol as defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="storage-sidecar")
def main() -> None:
    """Mount cloud object storage (S3, Azure Blob, GCS) into a session or onto a laptop."""


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the parsed manifest as JSON.")
def validate(manifest: str, as_json: bool) -> None:
    """Validate MANIFEST and print its mounts (exit 2 with field-level errors on a bad one)."""
    from sidecar.manifest import ManifestError, load

    try:
        m = load(manifest)
    except ManifestError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(m.model_dump(), indent=2))
        return
    rows = []
    for mt in m.mounts:
        st = m.storage_for(mt)
        rows.append((mt.name, st.provider, st.parsed.canonical(), mt.source_path or "/", mt.mountpath, "ro" if st.readonly else "rw"))
    _table(("NAME", "PROVIDER", "URL", "SOURCE", "MOUNTPATH", "MODE"), rows)


def _human(n: int) -> str:
    """A size as the largest unit that divides it (the flags' defaults: 1M, 10G)."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


@main.command()
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), help="Manifest file (else $STORAGE_SIDECAR_MANIFEST).")
@click.option("--socket", "socket_path", default=None, help="Control socket (default $STORAGE_SIDECAR_SOCKET or /run/storage-sidecar/sidecar.sock).")
@click.option("--socket-group", default=None, help="Group that may use the control socket (the session user's group).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Disk cache directory (none: memory only).")
@click.option("--shared-cache", "shared_cache", type=click.Path(file_okay=False), default=None,
              help="A node folder shared by the sidecars of the node (a hostPath): blocks of object versions, encrypted per version, kept once for all (docs/SECURITY.md).")
@click.option("--shared-cache-limit", default=_human(defaults.SHARED_CACHE_LIMIT), show_default=True, help="Bytes of the shared cache, all sidecars of the node together.")
@click.option("--credentials-dir", type=click.Path(file_okay=False), default=None, help="<dir>/<storage-name>/<field> credential files.")
@click.option("--block-size", default=_human(defaults.BLOCK_SIZE), show_default=True, help="Block size of the cache.")
@click.option("--fetch-size", default=_human(defaults.FETCH_SIZE), show_default=True, help="Bytes per ranged GET of a sequential reader.")
@click.option("--max-fetches", default=defaults.MAX_FETCHES, show_default=True, help="Ranged GETs in flight per mount.")
@click.option("--memory-limit", default=_human(defaults.MEMORY_LIMIT), show_default=True, help="Memory for cached and prefetched blocks, per mount.")
@click.option("--readahead", default=_human(defaults.READAHEAD), show_default=True, help="Most bytes read ahead for one sequential reader.")
@click.option("--disk-limit", default=_human(defaults.DISK_LIMIT), show_default=True, help="Hard limit of the disk cache, per storage (less if its file system has less free space).")
@click.option("--staging-limit", default=_human(defaults.STAGING_LIMIT), show_default=True, help="Bytes of files being written that may be staged on local disk, per mount (beyond: ENOSPC).")
@click.option("--grace-period", default=defaults.GRACE_PERIOD, show_default=True, help="Seconds to unmount everything after SIGTERM.")
@click.option("--check-deadline", default=defaults.CHECK_DEADLINE, show_default=True, help="Seconds the pre-flight check of one storage may take.")
@click.option("--credentials-wait", default=defaults.CREDENTIALS_WAIT, show_default=True, help="Seconds /ready waits for credentials or a skip before skipping a mount (0: do not wait).")
@click.option("--write-probe/--no-write-probe", default=True, show_default=True, help="Check write permission of writable storages with a probe object.")
@click.option("--uid", type=int, default=None, help="Owner of the files (default: the daemon's user).")
@click.option("--gid", type=int, default=None, help="Group of the files.")
@click.option("--allow-other", is_flag=True, help="Let other users access the mounts (needs user_allow_other).")
@click.option("--only", default=None, help="Comma-separated mount names to mount at start; the others wait, unmounted.")
@click.option("--fork-template/--no-fork-template", default=True, show_default=True, help="Fork mount workers from a warm template process (fast start, shared memory).")
@click.option("--wait-copies", is_flag=True, help="/ready waits for copy-mode mounts to finish downloading.")
@click.option("--mount-helper", default=None, help="Socket of a privileged `storage-sidecar mount-helper`: mount through it (no SYS_ADMIN needed here).")
@click.option("--copy-limit", default=_human(defaults.COPY_LIMIT), show_default=True, help="Largest folder a copy-mode mount downloads (larger: refused).")
@click.option("--log-level", default="info", show_default=True)
def run(manifest_path, socket_path, socket_group, cache_dir, shared_cache, shared_cache_limit, credentials_dir, block_size, fetch_size, max_fetches, memory_limit, readahead, disk_limit, staging_limit, grace_period,
        check_deadline, credentials_wait, write_probe, uid, gid, allow_other, only, fork_template, wait_copies, mount_helper, copy_limit, log_level) -> None:
    """Mount every mount of the manifest and serve them until SIGTERM/SIGINT."""
    import os

    import trio

    from sidecar.status import default_socket

    # Never reach for a cloud instance-metadata endpoint: credentials come from our sources.
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    from sidecar import log
    from sidecar.daemon import Daemon, DaemonConfig
    from sidecar.manifest import ManifestError, load, load_from_env

    log.configure(log_level)
    try:
        manifest = load(manifest_path) if manifest_path else load_from_env()
    except ManifestError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    if manifest is None:
        click.echo("no manifest: pass --manifest FILE or set STORAGE_SIDECAR_MANIFEST", err=True)
        sys.exit(2)
    cfg = DaemonConfig(
        socket=socket_path or default_socket(),
        socket_group=int(socket_group) if socket_group and socket_group.isdigit() else socket_group,
        check_deadline=check_deadline,
        credentials_wait=credentials_wait,
        write_probe=write_probe,
        credentials_dir=credentials_dir,
        cache=defaults.CacheConfig(cache_dir=cache_dir, block_size=_size(block_size), fetch_size=_size(fetch_size), max_fetches=max_fetches,
                                   memory_limit=_size(memory_limit), readahead=_size(readahead), disk_limit=_size(disk_limit),
                                   staging_limit=_size(staging_limit), shared_cache_dir=shared_cache, shared_cache_limit=_size(shared_cache_limit)),
        grace_period=grace_period,
        uid=uid,
        gid=gid,
        allow_other=allow_other,
        log_level=log_level,
        only=set(filter(None, only.split(","))) if only is not None else None,
        wait_copies=wait_copies,
        fork_workers=fork_template,
        mount_helper=mount_helper,
        copy_limit=_size(copy_limit),
    )
    trio.run(Daemon(manifest, cfg).run)


@main.command(name="mount-helper")
@click.option("--socket", "socket_path", required=True, help="Unix socket to listen on.")
@click.option("--allowed-root", "roots", multiple=True, required=True, type=click.Path(file_okay=False), help="Mounts may only be made below these folders.")
@click.option("--allow-uid", "uids", multiple=True, type=int, help="Only these callers' uids may mount (default: any).")
@click.option("--log-level", default="info", show_default=True)
def mount_helper(socket_path: str, roots: tuple[str, ...], uids: tuple[int, ...], log_level: str) -> None:
    """The privileged side of unprivileged mounting: opens /dev/fuse, mounts it at a requested
    folder inside an allowed root, and hands the fd to the caller (a node DaemonSet in
    Kubernetes; see container/k8s/mount-helper.yaml). Unmounts when the caller goes away."""
    from sidecar import log
    from sidecar.mounthelper import MountHelper

    log.configure(log_level)
    MountHelper(socket_path, list(roots), set(uids) or None).serve()


EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_DAEMON = 0, 1, 2, 3


def _project(path: str | None):  # type: ignore[no-untyped-def]
    from sidecar.project import Project, ProjectError, find_root

    try:
        return Project(find_root(path))
    except ProjectError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _daemon_socket(socket_path: str | None) -> str | None:
    """The daemon to ask: `--socket`; else the session's ($STORAGE_SIDECAR_SOCKET or the default)
    if it answers; else the background sidecar of the project around the working directory, as
    `mount` and `ls` find it (the project is looked for only then: a probe in a session stays light)."""
    if socket_path:
        return socket_path
    from sidecar.status import Unreachable, default_socket, request

    session = default_socket()
    try:
        if request("/health", sock=session, timeout=2.0)[0] == 200:
            return session
    except Unreachable:
        pass
    from sidecar import local
    from sidecar.private import UnsafeFolder
    from sidecar.project import Project, ProjectError, find_root

    try:
        own = str(local.project_paths(Project(find_root(None)))["sock"])
    except (ProjectError, UnsafeFolder, OSError):
        return session
    return own if local.answers(own) else session


project_option = click.option("--project", "project_dir", default=None, help="Project folder (default: found from the working directory).")


@main.command()
@click.argument("url")
@click.argument("target", required=False)
@click.option("--name", default=None, help="Name of the storage (default: the bucket/container, or the rclone remote's name).")
@click.option("--writable", is_flag=True, help="Allow writing (storages are read-only unless asked).")
@click.option("--source-path", default="", help="Folder inside the storage to mount (with --rclone-config: bucket/folder, as rclone names it).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Provider option (endpoint_url, region, anonymous, ...).")
@click.option("--rclone-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Add a remote of this rclone config (then give TARGET only): its secrets go to the local credential store.")
@click.option("--remote", default=None, help="With --rclone-config: the remote's name (its [section]).")
@click.option("--check", is_flag=True, help="Run the pre-flight check of the new storage.")
@click.option("--copy", is_flag=True, help="Download the data into TARGET as ordinary files instead of mounting it.")
@project_option
def add(url, target, name, writable, source_path, options, rclone_config, remote, check, copy, project_dir) -> None:
    """Add the storage at URL to the project, mounted at TARGET (or, with --rclone-config and
    --remote, the remote of an rclone config, mounted at TARGET)."""
    from sidecar.project import ProjectError

    project = _project(project_dir)
    opts = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--option {item!r}: write KEY=VALUE", EXIT_BAD_INPUT)
        opts[key] = {"true": True, "false": False}.get(value.lower(), value)
    rclone_type = None
    if rclone_config:
        if target is not None or not remote:
            _fail("with --rclone-config: storage-sidecar add --rclone-config FILE --remote NAME TARGET [--source-path bucket/folder]",
                  EXIT_BAD_INPUT)
        target, name = url, name or remote
        url, opts, rclone_type = _from_rclone_config(rclone_config, remote, source_path, name)
        source_path = ""
    elif target is None:
        _fail("storage-sidecar add URL TARGET (or --rclone-config FILE --remote NAME TARGET)", EXIT_BAD_INPUT)
    try:
        storage, mount = project.add(url, target, name=name, writable=writable, source_path=source_path, options=opts, copy=copy,
                                     rclone_type=rclone_type)
    except ProjectError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"added {storage['name']} ({storage['url']}, {'read-only' if storage['readonly'] else 'writable'}) at {mount['mountpath']}")
    click.echo(f"{mount['mountpath']} is listed in .gitignore; configuration in {project.path.relative_to(project.root)}")
    if check:
        _run_checks(project, [mount.get("name") or storage["name"]])


def _from_rclone_config(path: str, remote: str, source_path: str, name: str) -> tuple[str, dict[str, Any], str]:
    """(url, options, rclone type) of a remote of an rclone config; its secrets (revealed if
    rclone obscured them) are saved in the local credential store under the storage's name."""
    from sidecar import credentials, rclone

    try:
        remotes = rclone.parse_config(open(path, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _fail(f"--rclone-config {path}: {exc}", EXIT_BAD_INPUT)
    if remote not in remotes:
        _fail(f"--remote {remote!r}: no such remote in {path}; remotes: {', '.join(remotes) or 'none'}", EXIT_BAD_INPUT)
    section = dict(remotes[remote])
    secrets = {k: section.pop(k) for k in list(section) if k in rclone.SECRETS.get(section.get("type", ""), {})}
    try:
        ours = rclone.storage_from_rclone(section, source_path, loc=f"[{remote}]", source_loc="--source-path")
        unusable = [k for k in secrets if not rclone.credential_field(ours["rclone_type"], k)]
        if unusable:  # a secret of a way of signing in the sidecar does not offer (Azure AD, OAuth)
            raise rclone.RcloneError(f"[{remote}].{unusable[0]}", f"rclone option of type {ours['rclone_type']} not supported: {unusable[0]!r}")
        values = dict(rclone.credential_from_option(ours["provider"], k, v) for k, v in secrets.items())
    except (rclone.RcloneError, ValueError) as exc:
        field = getattr(exc, "field", "")
        _fail(f"{path}: {field + ': ' if field else ''}{exc}", EXIT_BAD_INPUT)
    if values:
        try:
            click.echo(f"credentials of {name} saved in {credentials.save_local(name, values)}", err=True)
        except credentials.InsecureCredentials as exc:
            _fail(f"credentials not saved: {exc}", EXIT_BAD_INPUT)
    return ours["url"], ours["options"], ours["rclone_type"]


def _run_checks(project, names: list[str] | None) -> bool:  # type: ignore[no-untyped-def]
    import trio

    from sidecar import credentials, preflight

    manifest = project.manifest()
    rows, ok = [], True
    for m in manifest.mounts:
        if names and m.name not in names:
            continue
        st = manifest.storage_for(m)
        creds = {} if st.options.get("anonymous") else credentials.lookup(st.name or "", st.provider)
        result = trio.run(lambda: preflight.check(m.name or "", st.parsed, st.options, creds, source_path=m.source_path, writable=not st.readonly))
        ok &= result.ok
        rows.append((m.name, st.parsed.canonical(), result.code, result.reason))
    _table(("MOUNT", "URL", "RESULT", "DETAIL"), rows)
    return ok


@main.command()
@click.argument("names", nargs=-1)
@project_option
def check(names, project_dir) -> None:
    """Run the pre-flight check of the project's storages (all, or NAMES)."""
    project = _project(project_dir)
    sys.exit(EXIT_OK if _run_checks(project, list(names) or None) else EXIT_FAILED)


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("--socket", "socket_path", default=None)
@project_option
def ls_(as_json, socket_path, project_dir) -> None:
    """List the project's storages and mounts, with their state when a sidecar serves them."""
    from sidecar import local
    from sidecar.project import ProjectError

    project = _project(project_dir)
    try:
        manifest = project.manifest()
    except ProjectError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    states = {}
    sidecar = local.find(project, socket_path)
    if sidecar is not None:
        code, body = sidecar.request("/status")
        states = {m["name"]: m["state"] for m in body.get("mounts", [])} if code == 200 else {}
    mounted = set(devmounts())
    out = []
    for m in manifest.mounts:
        st = manifest.storage_for(m)
        state = states.get(m.name) or ("mounted" if m.mountpath in mounted else "not mounted")
        out.append({"name": m.name, "storage": st.name, "provider": st.provider, "rclone_type": st.rclone_type, "url": st.parsed.canonical(),
                    "source_path": m.source_path, "target": os.path.relpath(m.mountpath, project.root),
                    "readonly": st.readonly, "state": state})
    unused = [s.name for s in manifest.storages if not any(m.storage == s.id for m in manifest.mounts)]
    if as_json:
        click.echo(json.dumps({"project": str(project.root), "mounts": out, "unmounted_storages": unused}, indent=2))
        return
    _table(("NAME", "STORAGE", "PROVIDER", "URL", "SOURCE", "TARGET", "MODE", "STATE"),
           [(o["name"], o["storage"], o["provider"] + (f" (rclone {o['rclone_type']})" if o["rclone_type"] else ""), o["url"],
             o["source_path"] or "/", o["target"], "ro" if o["readonly"] else "rw", o["state"]) for o in out])
    for name in unused:
        click.echo(f"storage {name} has no mount")


def devmounts() -> list[str]:
    from sidecar.mounttable import fuse_mounts

    return fuse_mounts()


@main.command(name="rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove a storage together with its mounts.")
@project_option
def rm_(name, force, project_dir) -> None:
    """Remove a mount, or a storage (one still mounted somewhere needs --force)."""
    from sidecar.project import ProjectError

    project = _project(project_dir)
    try:
        gone = project.remove(name, force=force)
    except ProjectError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo("removed " + ", ".join(gone))


PROMPTS = {  # field, prompt, hidden
    "s3": [("access_key_id", "Access key id", False), ("secret_access_key", "Secret access key", True)],
    "azure": [("account_key", "Account key", True)],
    "gcs": [("service_account.json", "Path of the service-account JSON file", False)],
    "webdav": [("password", "Password", True)],
}


def _ask_credentials(provider: str) -> dict[str, str]:
    values = {}
    for field, label, hidden in PROMPTS[provider]:
        value = click.prompt(f"    {label}", hide_input=hidden)
        if field == "service_account.json":
            with open(os.path.expanduser(value)) as f:
                value = f.read()
        values[field] = value
    return values


def _until_credentials_work(sidecar: Any, name: str, st: Any, code: int, body: Any) -> tuple[int, Any]:
    """On a terminal, while the sidecar says the storage needs credentials: asks for them (or
    to go on without the storage), three times at most; offers to save those that worked."""
    from sidecar import credentials

    attempts = 0
    while code == 200 and body["state"] == "needs_credentials" and attempts < 3:
        attempts += 1
        click.echo(f"  {name}: {body['error']['reason']}")
        choice = click.prompt("  Enter credentials, or go on without this storage?", type=click.Choice(["enter", "skip"]), default="enter")
        if choice == "skip":
            return sidecar.request(f"/mounts/{name}/skip", "POST")  # type: ignore[no-any-return]
        values = _ask_credentials(st.provider)
        code, body = sidecar.request(f"/mounts/{name}/credentials", "POST", values)
        if code == 200 and body["state"] == "mounted" and click.confirm("  Save them in the local credential store?", default=False):
            try:
                click.echo(f"  saved in {credentials.save_local(st.name or name, values)}")
            except credentials.InsecureCredentials as exc:
                click.echo(f"  not saved: {exc}", err=True)
    return code, body


@main.command()
@click.argument("names", nargs=-1)
@click.option("--socket", "socket_path", default=None, help="Ask the sidecar at this socket.")
@click.option("--foreground", is_flag=True, help="On a laptop: run the sidecar in this terminal until Ctrl-C.")
@click.option("--yes", "-y", is_flag=True, help="Mount without asking first.")
@click.option("--no-mount", is_flag=True, help="Mount nothing (every storage is skipped).")
@click.option("--skip", "skips", multiple=True, metavar="NAME", help="Do not mount NAME (repeatable).")
@project_option
def mount(names, socket_path, foreground, yes, no_mount, skips, project_dir) -> None:
    """Mount the project's storages (all, or NAMES): through the session's sidecar, or on a
    laptop through a background sidecar started for the project. On a terminal it asks before
    mounting each storage and, when credentials are missing or refused, asks for them (hidden),
    offers to save them, or to go on without that storage; without a terminal it never waits."""
    from sidecar import credentials, local
    from sidecar.project import ProjectError
    from sidecar.status import Unreachable

    project = _project(project_dir)
    try:
        manifest = project.manifest()
    except ProjectError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    known = [m.name for m in manifest.mounts]
    wanted = list(names) or known
    unknown = [n for n in (*wanted, *skips) if n not in known]
    if unknown:
        _fail(f"no mount named {', '.join(unknown)}; mounts: {', '.join(map(str, known)) or 'none (add one with `storage-sidecar add`)'}", EXIT_BAD_INPUT)
    skipped = set(wanted) if no_mount else set(skips)
    if foreground:
        paths = local.project_paths(project)
        paths["manifest.json"].write_text(json.dumps(manifest.model_dump()))
        os.execv(sys.executable, [sys.executable, "-m", "sidecar.cli", "run", "--manifest", str(paths["manifest.json"]),
                                  "--socket", str(paths["sock"]), "--cache-dir", str(local.cache_dir()),
                                  "--only", ",".join(n for n in wanted if n not in skipped)])
    interactive = sys.stdin.isatty()
    try:
        sidecar = local.find(project, socket_path)
        if sidecar is None:
            if socket_path:
                _fail(f"no sidecar answers at {socket_path}", EXIT_NO_DAEMON)
            if not [n for n in wanted if n not in skipped]:
                click.echo("nothing to mount")
                sys.exit(EXIT_OK)
            click.echo("starting a background sidecar for this project ...", err=True)
            sidecar = local.start_background(project, [])
        failed = 0
        for name in wanted:
            mt = manifest.mount_named(name)
            st = manifest.storage_for(mt)
            if name not in skipped and interactive and not yes:
                target = os.path.relpath(mt.mountpath, project.root)
                if not click.confirm(f"Mount {name} ({st.parsed.canonical()}) at {target}?", default=True):
                    skipped.add(name)
            if name in skipped:
                code, body = sidecar.request(f"/mounts/{name}/skip", "POST")
                click.echo(f"  {name}: skipped")
                continue
            click.echo(f"mounting {name} ...", err=True)
            code, body = sidecar.request(f"/mounts/{name}/mount", "POST")
            if interactive:
                code, body = _until_credentials_work(sidecar, name, st, code, body)
            if code != 200:
                failed += 1
                click.echo(f"  {name}: {body.get('error') if isinstance(body, dict) else body}", err=True)
                continue
            err = body.get("error") or {}
            click.echo(f"  {name}: {body['state']} at {body['mountpath']}" + (f" ({err.get('code')}: {err.get('reason')})" if err else ""))
            if body["state"] == "needs_credentials" and not interactive:
                click.echo(f"  {name}: give credentials through the environment, {credentials.local_store_path()}, "
                           "or run `storage-sidecar mount` in a terminal to be asked", err=True)
            failed += body["state"] not in ("mounted", "degraded", "skipped")
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    except RuntimeError as exc:
        _fail(str(exc), EXIT_FAILED)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--socket", "socket_path", default=None)
@click.option("--force", is_flag=True, help="Unmount even while files are open in the mount.")
@project_option
def umount(names, socket_path, force, project_dir) -> None:
    """Unmount the project's storages (all, or NAMES). On a laptop, unmounting the last one stops
    the background sidecar."""
    from sidecar import local
    from sidecar.status import Unreachable

    project = _project(project_dir)
    sidecar = local.find(project, socket_path)
    if sidecar is None:
        _fail("no sidecar serves this project's mounts (nothing is mounted)", EXIT_NO_DAEMON)
    try:
        code, body = sidecar.request("/status")
        mounts = {m["name"]: m for m in body["mounts"]}
        unknown = [n for n in names if n not in mounts]
        if unknown:
            _fail(f"no mount named {', '.join(unknown)}; mounts: {', '.join(mounts)}", EXIT_BAD_INPUT)
        failed = 0
        for name in names or [n for n, m in mounts.items() if m["state"] in ("mounted", "degraded")]:
            code, body = sidecar.request(f"/mounts/{name}/unmount" + ("?force=1" if force else ""), "POST")
            if code == 200:
                click.echo(f"  {name}: {body['state']}")
            else:
                failed += 1
                click.echo(f"  {name}: not unmounted: {body.get('error')}", err=True)
        if sidecar.local:
            code, body = sidecar.request("/status")
            if not any(m["state"] in ("mounted", "degraded", "checking") for m in body["mounts"]):
                local.stop_background(project)
                click.echo("stopped the background sidecar", err=True)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@main.command(name="manifest")
@click.option("--root", default=None, help="Where the project is in the session (default: the project folder here).")
@click.option("--output", "-o", default="-", help="File to write (default: standard output).")
@project_option
def manifest_cmd(root, output, project_dir) -> None:
    """Write the daemon's mount manifest from the project's storage configuration."""
    from sidecar.project import ProjectError

    project = _project(project_dir)
    try:
        m = project.manifest(root=root)
    except ProjectError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    text = json.dumps(m.model_dump(), indent=2) + "\n"
    if output == "-":
        click.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)


@main.group()
def metadata() -> None:
    """The project's storage as JSON-LD (Renku ontology)."""


@metadata.command(name="export")
@click.option("--output", "-o", default="-")
@project_option
def metadata_export(output, project_dir) -> None:
    """Write the project's storages and mounts as JSON-LD."""
    from sidecar.metadata import export

    project = _project(project_dir)
    text = json.dumps(export(project.load_doc(), project.root.name), indent=2) + "\n"
    if output == "-":
        click.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)


@metadata.command(name="import")
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True))
@project_option
def metadata_import(source, project_dir) -> None:
    """Read a JSON-LD document (e.g. the knowledge graph's answer) into the project's configuration."""
    from sidecar.metadata import import_
    from sidecar.project import ProjectError

    project = _project(project_dir)
    try:
        doc = import_(json.load(sys.stdin if source == "-" else open(source)))
        project.save(doc)
    except (ValueError, ProjectError) as exc:
        _fail(f"cannot import {source}: {exc}", EXIT_BAD_INPUT)
    click.echo(f"imported {len(doc['storages'])} storage(s) and {len(doc['mounts'])} mount(s) into {project.path}")


@main.command()
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--probe", type=click.Choice(["liveness", "readiness", "startup"]), default=None, help="Kubernetes exec probe: exit 0 healthy, 1 not; silent unless failing.")
@click.option("--watch", is_flag=True, help="Follow the mounts live (each state change as it happens) until every one has settled.")
def status(socket_path: str | None, as_json: bool, probe: str | None, watch: bool) -> None:
    """Show every mount's state (exit 0 all mounted or skipped, 1 some not healthy, 2 no daemon)."""
    from sidecar.status import Unreachable, events, request

    if not probe:
        socket_path = _daemon_socket(socket_path)
    if watch:
        try:
            names = {m["name"] for m in request("/status", sock=socket_path)[1]["mounts"]}
            seen: set[str] = set()
            for event in events(sock=socket_path):
                if event.get("type") == "mount_state":
                    seen.add(event["mount"])
                    problem = f" ({event['code']}: {event['reason']})" if event.get("code") else ""
                    click.echo(f"{time.strftime('%H:%M:%S', time.localtime(event['time']))} {event['mount']}: {event['state']}{problem}", err=True)
                    if event.get("ready") and seen >= names:
                        break
                elif event.get("type") == "dropped":
                    break
        except Unreachable as exc:
            click.echo(f"{exc}. Is the sidecar running?", err=True)
            sys.exit(EXIT_UNREACHABLE)
    try:
        if probe:
            code, body = request("/health" if probe == "liveness" else "/ready", sock=socket_path, timeout=3.0)
            if code != 200:
                click.echo(f"storage-sidecar not {probe.replace('ness', 'y').replace('startup', 'started')}: {json.dumps(body)}", err=True)
                sys.exit(EXIT_UNHEALTHY)
            return
        code, body = request("/status", sock=socket_path)
    except Unreachable as exc:
        click.echo(f"{exc}. Is the sidecar running? Start it with `storage-sidecar run` or pass --socket.", err=True)
        sys.exit(EXIT_UNREACHABLE if not probe else EXIT_UNHEALTHY)
    mounts = body["mounts"]
    unhealthy = [m for m in mounts if m["state"] not in ("mounted", "skipped")]
    if as_json:
        click.echo(json.dumps(body, indent=2))
    else:
        rows = []
        for m in mounts:
            c = m.get("counters") or {}
            store = c.get("store") or {}
            rate = m.get("cache_hit_rate")
            err = m.get("error") or {}
            unsynced = m.get("unsynced") or {}
            problem = f"{err.get('code')}: {err.get('reason')}" if err else ""
            if m.get("next_try"):
                problem += f" (next try in {max(0, m['next_try'] - time.time()):.0f} s)"
            rows.append((
                m["name"], m["state"], m["mountpath"], "ro" if m["readonly"] else "rw",
                "-" if rate is None else f"{rate:.0%}", _human(store.get("bytes_fetched", 0)), str(sum((c.get("errors") or {}).values())),
                f"{unsynced.get('files', 0)} ({_human(unsynced.get('bytes', 0))})" if unsynced.get("files") else "-",
                problem,
            ))
        _table(("NAME", "STATE", "MOUNTPATH", "MODE", "HIT RATE", "READ FROM BACKEND", "ERRORS", "UNSYNCED", "PROBLEM"), rows)
        _shared_line(mounts)
        for m in mounts:
            if m.get("path") in ("bare", "locked") and m["state"] not in ("copying", "copied"):
                why = ("read-only: the storage is not mounted there and no placeholder could be" if m["path"] == "locked"
                       else "nothing holds it: files written there stay local, and are moved aside when it is mounted again")
                click.echo(f"{m['name']}: {m['mountpath']} is {m['path']} ({why})")
            if m.get("rescued_total"):
                total = m["rescued_total"]
                size = sum(e.get("size", 0) for e in m.get("rescued") or [])
                click.echo(f"{m['name']}: {total} rescued entr{'y' if total == 1 else 'ies'} ({_human(size)}) found beneath "
                           f"{m['mountpath']} and moved aside; `storage-sidecar rescue {m['name']}` lists them")
            for f in m.get("staged") or []:
                if f["state"] in ("incomplete", "conflict"):
                    click.echo(f"{m['name']}: {f['key']} is {f['state']} ({_human(f['size'])}), local copy {f['local_path']}"
                               + (f"; publish it with `storage-sidecar publish {m['name']} {f['key']}`" if f["state"] == "incomplete" else ""))
        if unhealthy:
            click.echo(f"\n{len(unhealthy)} mount(s) not healthy. Needs credentials: POST them to /mounts/<name>/credentials "
                       "or skip with /mounts/<name>/skip; failed: see PROBLEM, then `storage-sidecar mount NAME` to retry.", err=True)
    sys.exit(EXIT_UNHEALTHY if unhealthy else EXIT_HEALTHY)


@main.command()
@click.argument("mount_name")
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
def push(mount_name: str, socket_path: str | None) -> None:
    """Copy mode: upload the files of a copied folder that are new or changed since the copy
    (conditionally: a file changed in the bucket meanwhile is not overwritten)."""
    from sidecar.status import Unreachable, request

    socket_path = _daemon_socket(socket_path)

    try:
        code, body = request(f"/mounts/{mount_name}/push", "POST", sock=socket_path, timeout=600)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    if code != 200:
        _fail(f"not pushed: {body.get('error') if isinstance(body, dict) else body}", EXIT_FAILED)
    for path in body.get("pushed") or []:
        click.echo(f"  pushed {path}")
    for f in body.get("failed") or []:
        click.echo(f"  not pushed {f['path']}: {f['code']}: {f['reason']}", err=True)
    sys.exit(EXIT_FAILED if body.get("failed") else EXIT_OK)


@main.command()
@click.argument("mount_name")
@click.argument("paths", nargs=-1)
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
@click.option("--no-wait", is_flag=True, help="Start it and return; `storage-sidecar status` shows the progress.")
def prefetch(mount_name: str, paths: tuple[str, ...], socket_path: str | None, no_wait: bool) -> None:
    """Warm the disk cache of a mounted storage with folders or files (PATHS in the mount; none:
    all of it), so that reading them later never touches the backend. Refused, with the sizes,
    when they do not fit the disk cache. Shows progress until done."""
    from sidecar.status import Unreachable, request

    socket_path = _daemon_socket(socket_path)

    try:
        code, body = request(f"/mounts/{mount_name}/prefetch", "POST", {"paths": list(paths)}, sock=socket_path, timeout=30)
        if code not in (200, 202):
            _fail(f"prefetch refused: {body.get('error') if isinstance(body, dict) else body}", EXIT_FAILED)
        if no_wait:
            click.echo(f"{mount_name}: prefetching {body.get('files')} files ({_human(body.get('bytes') or 0)}) in the background")
            return
        _follow_progress(mount_name, "prefetch", socket_path)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)


def _follow_progress(mount_name: str, what: str, socket_path: str | None) -> None:
    """A live progress bar (bytes, files, rate, time left) on a terminal, plain lines otherwise,
    from the mount's `what` progress in /status, until it is done or failed."""
    from sidecar.status import request

    bar = None
    last_line = 0.0
    while True:
        _, status = request("/status", sock=socket_path)
        mount = next((m for m in status["mounts"] if m["name"] == mount_name), None)
        p = (mount or {}).get(what) or {}
        if p and sys.stderr.isatty() and bar is None:
            from tqdm import tqdm

            bar = tqdm(total=p["bytes_total"], unit="B", unit_scale=True, unit_divisor=1024, desc=f"{what} {mount_name}")
        if bar is not None:
            bar.update(p.get("bytes_done", 0) - bar.n)
            bar.set_postfix(files=f"{p.get('files_done', 0)}/{p.get('files_total', 0)}")
        elif p and time.monotonic() - last_line >= 2:
            last_line = time.monotonic()
            click.echo(f"{what} {mount_name}: {p.get('files_done', 0)}/{p.get('files_total', 0)} files, "
                       f"{_human(p.get('bytes_done', 0))} of {_human(p.get('bytes_total', 0))}", err=True)
        if p.get("state") in ("done", "failed") or not p:
            break
        time.sleep(0.5)
    if bar is not None:
        bar.close()
    errors = p.get("errors") or []
    summary = f"{what} {mount_name}: {p.get('state', 'unknown')}, {p.get('files_done', 0)} files, {_human(p.get('bytes_done', 0))}"
    click.echo(summary + (f", {len(errors)} errors (see `storage-sidecar status --json`)" if errors else ""))
    if p.get("state") != "done" or errors:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("mount_name")
@click.argument("path", default="")
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
def refresh(mount_name: str, path: str, socket_path: str | None) -> None:
    """See the bucket as it is now: forget the cached listings and attributes of PATH (a folder
    in the mount; default: all of it), whatever the mount's metadata TTL."""
    from sidecar.status import Unreachable, request

    socket_path = _daemon_socket(socket_path)

    try:
        code, body = request(f"/mounts/{mount_name}/refresh", "POST", {"path": path}, sock=socket_path, timeout=15)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    if code != 200:
        _fail(f"not refreshed: {body.get('error') if isinstance(body, dict) else body}", EXIT_FAILED)
    click.echo(f"{mount_name}: refreshed {path or '/'}")


@main.command()
@click.argument("mount_name")
@click.argument("key")
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
def publish(mount_name: str, key: str, socket_path: str | None) -> None:
    """Upload an `incomplete` staged file (one whose writer never closed it, e.g. the sidecar died
    while it was being written) under its key, as it is. Nothing is ever published without this."""
    from sidecar.status import Unreachable, request

    socket_path = _daemon_socket(socket_path)

    try:
        code, body = request(f"/mounts/{mount_name}/publish", "POST", {"key": key}, sock=socket_path, timeout=30)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    if code == 200:
        click.echo(f"published {key}")
    elif code == 202:
        click.echo(f"{key}: still uploading; `storage-sidecar status` shows when it is done")
    else:
        _fail(f"{key}: not published: {body.get('error') if isinstance(body, dict) else body}", EXIT_FAILED)


@main.command()
@click.argument("mount_name")
@click.option("--upload", is_flag=True, help="Upload them into the (writable) storage under the paths they had; a changed object is not overwritten.")
@click.option("--discard", is_flag=True, help="Remove them.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
def rescue(mount_name: str, upload: bool, discard: bool, as_json: bool, socket_path: str | None) -> None:
    """List the files found beneath MOUNT's path before the sidecar held it (written while no
    sidecar ran there) and moved aside, never hidden; upload or discard them."""
    from sidecar.status import Unreachable, request

    socket_path = _daemon_socket(socket_path)

    if upload and discard:
        _fail("--upload and --discard exclude each other", EXIT_BAD_INPUT)
    action = "upload" if upload else "discard" if discard else "list"
    try:
        code, body = request(f"/mounts/{mount_name}/rescue", "POST", {"action": action}, sock=socket_path, timeout=600 if upload else 30)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_DAEMON)
    if code not in (200, 202):
        _fail(f"{mount_name}: {body.get('error') if isinstance(body, dict) else body}", EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(body, indent=2))
    elif action == "list":
        for e in body["rescued"]:
            click.echo(f"{e['path']}\t{e['kind']}\t{_human(e['size'])}\t{e['where']}")
        click.echo(f"{body['rescued_total']} rescued entr{'y' if body['rescued_total'] == 1 else 'ies'} in {body['where']}", err=True)
    elif action == "discard":
        click.echo(f"{mount_name}: {body['discarded']} rescued entries removed")
    elif code == 202:
        click.echo(f"{mount_name}: still uploading; `storage-sidecar rescue {mount_name}` shows what is left")
    else:
        for path in body.get("uploaded") or []:
            click.echo(f"  uploaded {path}")
        for c in body.get("conflicts") or []:
            click.echo(f"  uploaded {c['path']} as {c['key']} (another object has its name)")
        for k in body.get("kept") or []:
            click.echo(f"  kept {k['path']}: {k['reason']}", err=True)
        for f in body.get("failed") or []:
            click.echo(f"  not uploaded {f['path']}: {f['reason']}", err=True)
    sys.exit(EXIT_FAILED if action == "upload" and (body.get("failed") or code == 202) else EXIT_OK)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _shared_line(mounts: list[dict[str, Any]]) -> None:
    """One line for the node's shared cache, if the mounts use one: its size (as last seen) and
    what this session's mounts read from it."""
    reported = [s for m in mounts if (s := ((m.get("counters") or {}).get("shared")))]
    for problem in sorted({s["unusable"] for s in reported if s.get("unusable")}):
        click.echo(f"shared node cache unusable (reads are fetched): {problem}")
    seen = [s for s in reported if not s.get("unusable")]
    if not seen:
        return
    hits, served = sum(s.get("hits", 0) for s in seen), sum(s.get("bytes_served", 0) for s in seen)
    evictions, size, limit = sum(s.get("evictions", 0) for s in seen), max(s.get("size", 0) for s in seen), seen[0].get("limit", 0)
    click.echo(f"shared node cache: {_human(size)} of {_human(limit)}; {hits} block(s) read from it ({_human(served)}), "
               f"{evictions} evicted by this session")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
