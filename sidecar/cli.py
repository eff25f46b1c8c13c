"""The `storage-sidecar` command line. Imports stay lazy: `status` runs as a probe every few seconds."""

from __future__ import annotations

import json
import sys

import click

from sidecar import __version__


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
@click.option("--credentials-dir", type=click.Path(file_okay=False), default=None, help="<dir>/<storage-name>/<field> credential files.")
@click.option("--block-size", default="8M", show_default=True, help="Block size of the cache.")
@click.option("--memory-limit", default="256M", show_default=True, help="Memory for cached and prefetched blocks, per mount.")
@click.option("--readahead", default="128M", show_default=True, help="Most bytes read ahead for one sequential reader.")
@click.option("--disk-limit", default="10G", show_default=True, help="Hard limit of the disk cache, per storage.")
@click.option("--grace-period", default=20.0, show_default=True, help="Seconds to unmount everything after SIGTERM.")
@click.option("--check-deadline", default=10.0, show_default=True, help="Seconds the pre-flight check of one storage may take.")
@click.option("--credentials-wait", default=0.0, show_default=True, help="Seconds /ready waits for credentials or a skip before skipping a mount (0: do not wait).")
@click.option("--write-probe/--no-write-probe", default=True, show_default=True, help="Check write permission of writable storages with a probe object.")
@click.option("--uid", type=int, default=None, help="Owner of the files (default: the daemon's user).")
@click.option("--gid", type=int, default=None, help="Group of the files.")
@click.option("--allow-other", is_flag=True, help="Let other users access the mounts (needs user_allow_other).")
@click.option("--log-level", default="info", show_default=True)
def run(manifest_path, socket_path, socket_group, cache_dir, credentials_dir, block_size, memory_limit, readahead, disk_limit, grace_period,
        check_deadline, credentials_wait, write_probe, uid, gid, allow_other, log_level) -> None:
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
        cache_dir=cache_dir,
        credentials_dir=credentials_dir,
        block_size=_size(block_size),
        memory_limit=_size(memory_limit),
        readahead=_size(readahead),
        disk_limit=_size(disk_limit),
        grace_period=grace_period,
        uid=uid,
        gid=gid,
        allow_other=allow_other,
        log_level=log_level,
    )
    trio.run(Daemon(manifest, cfg).run)


EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2


@main.command()
@click.option("--socket", "socket_path", default=None, help="Control socket of the daemon.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--probe", type=click.Choice(["liveness", "readiness", "startup"]), default=None, help="Kubernetes exec probe: exit 0 healthy, 1 not; silent unless failing.")
def status(socket_path: str | None, as_json: bool, probe: str | None) -> None:
    """Show every mount's state (exit 0 all mounted or skipped, 1 some not healthy, 2 no daemon)."""
    from sidecar.status import Unreachable, request

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
            rows.append((
                m["name"], m["state"], m["mountpath"], "ro" if m["readonly"] else "rw",
                "-" if rate is None else f"{rate:.0%}", _human(store.get("bytes_fetched", 0)), str(sum((c.get("errors") or {}).values())),
                f"{err.get('code')}: {err.get('reason')}" if err else "",
            ))
        _table(("NAME", "STATE", "MOUNTPATH", "MODE", "HIT RATE", "READ FROM BACKEND", "ERRORS", "PROBLEM"), rows)
        if unhealthy:
            click.echo(f"\n{len(unhealthy)} mount(s) not healthy. Needs credentials: POST them to /mounts/<name>/credentials "
                       "or skip with /mounts/<name>/skip; failed: see PROBLEM, then `storage-sidecar mount NAME` to retry.", err=True)
    sys.exit(EXIT_UNHEALTHY if unhealthy else EXIT_HEALTHY)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
