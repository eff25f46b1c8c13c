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


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
