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
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Disk cache directory (none: memory only).")
@click.option("--credentials-dir", type=click.Path(file_okay=False), default=None, help="<dir>/<storage-name>/<field> credential files.")
@click.option("--block-size", default="8M", show_default=True, help="Block size of the cache.")
@click.option("--memory-limit", default="256M", show_default=True, help="Memory for cached and prefetched blocks, per mount.")
@click.option("--disk-limit", default="10G", show_default=True, help="Hard limit of the disk cache, per storage.")
@click.option("--grace-period", default=20.0, show_default=True, help="Seconds to unmount everything after SIGTERM.")
@click.option("--uid", type=int, default=None, help="Owner of the files (default: the daemon's user).")
@click.option("--gid", type=int, default=None, help="Group of the files.")
@click.option("--allow-other", is_flag=True, help="Let other users access the mounts (needs user_allow_other).")
@click.option("--log-level", default="info", show_default=True)
def run(manifest_path, cache_dir, credentials_dir, block_size, memory_limit, disk_limit, grace_period, uid, gid, allow_other, log_level) -> None:
    """Mount every mount of the manifest and serve them until SIGTERM/SIGINT."""
    import trio

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
        cache_dir=cache_dir,
        credentials_dir=credentials_dir,
        block_size=_size(block_size),
        memory_limit=_size(memory_limit),
        disk_limit=_size(disk_limit),
        grace_period=grace_period,
        uid=uid,
        gid=gid,
        allow_other=allow_other,
        log_level=log_level,
    )
    trio.run(Daemon(manifest, cfg).run)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
