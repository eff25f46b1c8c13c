"""The project's storage as JSON-LD in the Renku ontology.

    schema:Project  --renku:hasStorage-->  renku:RemoteStorage (@id, renku:provider, renku:url)
                    --renku:mountpoints--> renku:StorageMount  (@id, renku:storage -> @id of the
                                                                 RemoteStorage, renku:mountpath)

Besides those, each entity carries what a round trip needs (schema:name, renku:readonly,
renku:options as a JSON literal, renku:sourcePath). Import reads the document with rdflib's
JSON-LD parser, so any equivalent form (expanded, compacted with another context, a knowledge
graph's answer) is understood, not only the form export writes.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA = "http://schema.org/"
RENKU = "https://swissdatasciencecenter.github.io/renku-ontology#"
CONTEXT = {"schema": SCHEMA, "renku": RENKU}


def project_id(instance: str, name: str) -> str:
    return f"https://{instance}/projects/{name}"


def export(doc: dict[str, Any], project_name: str) -> dict[str, Any]:
    """JSON-LD of a project configuration document (`.storage/storage.json`)."""
    from sidecar.manifest import parse_manifest

    instance = doc.get("instance", "renkulab.io")
    manifest = parse_manifest({"root": "/project", **json.loads(json.dumps(doc))})
    storages = [
        {
            "@id": s.id,
            "@type": "renku:RemoteStorage",
            "schema:name": s.name,
            "renku:provider": s.provider,
            "renku:url": s.url,
            "renku:readonly": s.readonly,
            "renku:options": json.dumps(s.options, sort_keys=True),
            **({"renku:rcloneType": s.rclone_type} if s.rclone_type else {}),
        }
        for s in manifest.storages
    ]
    mounts = [
        {
            "@id": m.id,
            "@type": "renku:StorageMount",
            "schema:name": m.name,
            "renku:storage": {"@id": m.storage},
            "renku:mountpath": m.mountpath.removeprefix("/project/"),
            "renku:sourcePath": m.source_path,
        }
        for m in manifest.mounts
    ]
    return {
        "@context": CONTEXT,
        "@id": project_id(instance, project_name),
        "@type": "schema:Project",
        "schema:name": project_name,
        "renku:hasStorage": storages,
        "renku:mountpoints": mounts,
    }


def import_(jsonld: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """A project configuration document from JSON-LD (the inverse of `export`)."""
    from rdflib import RDF, Graph, Namespace, URIRef

    S, R = Namespace(SCHEMA), Namespace(RENKU)
    g = Graph()
    g.parse(data=json.dumps(jsonld), format="json-ld")
    projects = list(g.subjects(RDF.type, S.Project))
    if len(projects) != 1:
        raise ValueError(f"expected one schema:Project, found {len(projects)}")
    project = projects[0]

    def one(subject: URIRef, pred: URIRef, default: Any = None) -> Any:
        value = g.value(subject, pred)
        return default if value is None else value.toPython()

    storages, ids = [], {}
    for st in sorted(g.objects(project, R.hasStorage)):
        entry = {
            "id": str(st),
            "name": one(st, S.name),
            "provider": one(st, R.provider),
            "url": one(st, R.url),
            "readonly": bool(one(st, R.readonly, True)),
            "options": json.loads(one(st, R.options, "{}")),
            "rclone_type": one(st, R.rcloneType),
        }
        storages.append({k: v for k, v in entry.items() if v is not None})
        ids[str(st)] = entry
    mounts = []
    for mt in sorted(g.objects(project, R.mountpoints)):
        storage = g.value(mt, R.storage)
        if str(storage) not in ids:
            raise ValueError(f"mount {mt} refers to storage {storage}, which the project does not have")
        entry = {"id": str(mt), "name": one(mt, S.name), "storage": str(storage), "mountpath": one(mt, R.mountpath),
                 "source_path": one(mt, R.sourcePath, "")}
        mounts.append({k: v for k, v in entry.items() if v is not None})
    instance = str(project).split("/")[2]
    return {"instance": instance, "storages": storages, "mounts": mounts}
