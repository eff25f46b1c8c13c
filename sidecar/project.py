"""A project's storage configuration: `.storage/storage.json` in the project's repository.

It holds the storages and mounts of the manifest model with mount paths relative to the project
root, and never a secret. `storage-sidecar add/ls/rm/mount/umount` edit and use it on a laptop
and in a session alike; `storage-sidecar manifest` turns it into the daemon's mount manifest.

Every mount path is listed in the project's `.gitignore` (in a block marked by
`# storage-sidecar mounts`), so mounted data is never committed, also by collaborators who clone
the project: the configuration is shared through git, and so is the ignore list.

Edits are validated as a whole manifest before anything is written, and the file is replaced
atomically: a refused change leaves nothing changed on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sidecar import urls
from sidecar.manifest import DEFAULT_INSTANCE, Manifest, ManifestError, parse_manifest, slugify, storage_id

CONFIG = Path(".storage") / "storage.json"
IGNORE_MARK = "# storage-sidecar mounts (do not commit mounted data)"


class ProjectError(Exception):
    """A refused project operation; the message says what and why."""


def _gitignore_escape(path: str) -> str:
    """A literal path as a .gitignore pattern: wildcards and backslashes escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in path)


def find_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The project root: the nearest directory (from `start` up) with `.storage/storage.json`,
    else the nearest with `.git`."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / CONFIG).exists():
            return d
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d
    raise ProjectError(f"no project here: no {CONFIG} or .git in {here} or above (run inside a project, or pass --project)")


class Project:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / CONFIG

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def load_doc(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"instance": DEFAULT_INSTANCE, "storages": [], "mounts": []}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ProjectError(f"cannot read {self.path}: {exc}") from None

    def manifest(self, doc: dict[str, Any] | None = None, root: str | None = None) -> Manifest:
        doc = self.load_doc() if doc is None else doc
        try:
            return parse_manifest({"root": root or str(self.root), **json.loads(json.dumps(doc))})
        except ManifestError as exc:
            raise ProjectError(f"{self.path}: {exc}") from None

    def save(self, doc: dict[str, Any]) -> None:
        self.manifest(doc)  # validate the whole before writing anything
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.path)
        self._sync_gitignore(doc)

    def _sync_gitignore(self, doc: dict[str, Any]) -> None:
        path = self.root / ".gitignore"
        lines = path.read_text().splitlines() if path.exists() else []
        if IGNORE_MARK in lines:
            start = lines.index(IGNORE_MARK)
            end = start + 1
            while end < len(lines) and lines[end].startswith("/"):
                end += 1
            del lines[start:end]
            while lines and not lines[-1].strip():
                lines.pop()
        entries = [f"/{_gitignore_escape(m['mountpath'].strip('/'))}/" for m in doc["mounts"]]
        if entries:
            lines += (["", IGNORE_MARK] if lines else [IGNORE_MARK]) + entries
        if lines or path.exists():
            path.write_text("\n".join(lines) + ("\n" if lines else ""))

    def relative(self, target: str) -> str:
        """A target given on the command line (relative to the working directory, or absolute)
        as a path relative to the project root; refuses one outside the project."""
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
            # a newline would write extra lines (patterns, negations) into .gitignore
            raise ProjectError(f"target {target!r} must not contain control characters (newline, tab, ...)")
        p = Path(target)
        absolute = (p if p.is_absolute() else Path.cwd() / p).resolve()
        if absolute == self.root or self.root not in absolute.parents:
            raise ProjectError(f"target {target!r} must be a folder inside the project {self.root}")
        return str(absolute.relative_to(self.root))

    def add(
        self,
        url: str,
        target: str,
        *,
        name: str | None = None,
        writable: bool = False,
        source_path: str = "",
        options: dict[str, Any] | None = None,
        copy: bool = False,
        rclone_type: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Adds a mount of `url` at `target` (and the storage, unless one with the same id exists)."""
        try:
            parsed = urls.parse(url)
        except urls.StorageURLError as exc:
            raise ProjectError(str(exc)) from None
        doc = self.load_doc()
        rel = self.relative(target)
        absolute = self.root / rel
        if absolute.is_dir() and any(absolute.iterdir()) and not os.path.ismount(absolute):
            raise ProjectError(f"target {target!r} already holds files; mount into an empty or new folder")
        if absolute.exists() and not absolute.is_dir():
            raise ProjectError(f"target {target!r} is a file")
        sid = storage_id(doc.get("instance", DEFAULT_INSTANCE), parsed)
        storage = next((s for s in doc["storages"] if s.get("id") == sid), None)
        if storage is None:
            storage = {"id": sid, "name": name or slugify(parsed.label), "provider": parsed.provider, "url": parsed.canonical(),
                       "readonly": not writable, "options": options or {}}
            if rclone_type:
                storage["rclone_type"] = rclone_type
            doc["storages"].append(storage)
            mount_name = storage["name"]
        else:
            if writable and storage.get("readonly", True):
                raise ProjectError(f"storage {storage['name']!r} exists read-only; remove it first to add it writable")
            # Another mount of a known storage: its own name, so the existing ones keep theirs.
            mount_name = name or slugify(f"{storage['name']}-{Path(rel).name}")
        mount = {"name": mount_name, "storage": sid, "mountpath": rel, "source_path": source_path.strip("/")}
        if copy:
            mount["mode"] = "copy"  # downloaded into the folder, not mounted
        doc["mounts"].append(mount)
        self.save(doc)
        return storage, mount

    def remove(self, name: str, *, force: bool = False) -> list[str]:
        """Removes a mount, or a storage (with its mounts when `force`). Returns what went."""
        doc = self.load_doc()
        manifest = self.manifest(doc)
        mount_names = [m.name for m in manifest.mounts]
        if name in mount_names:
            i = mount_names.index(name)
            del doc["mounts"][i]
            self.save(doc)
            return [f"mount {name}"]
        storage = next((s for s in manifest.storages if s.name == name or s.id == name), None)
        if storage is None:
            raise ProjectError(f"no mount or storage named {name!r}; see `storage-sidecar ls`")
        users = [m.name for m in manifest.mounts if m.storage == storage.id]
        if users and not force:
            raise ProjectError(f"storage {name!r} is used by mount(s) {', '.join(map(str, users))}; remove them first or pass --force")
        doc["mounts"] = [m for m, parsed in zip(doc["mounts"], manifest.mounts) if parsed.storage != storage.id]
        doc["storages"] = [s for s in doc["storages"] if s.get("id") != storage.id and s.get("name") != storage.name]
        self.save(doc)
        return [f"storage {name}", *(f"mount {u}" for u in users)]
