import json

from rdflib import RDF, Graph, Literal, Namespace, URIRef

from sidecar.metadata import RENKU, SCHEMA, export, import_

S, R = Namespace(SCHEMA), Namespace(RENKU)

DOC = {
    "instance": "renkulab.io",
    "storages": [
        {"id": "https://renkulab.io/storage/s3/amazonaws.com/giab", "name": "giab", "provider": "s3", "url": "s3://giab/data",
         "readonly": True, "options": {"region": "us-east-1"}},
        {"id": "https://renkulab.io/storage/gcs/storage.googleapis.com/results-1", "name": "results-1", "provider": "gcs",
         "url": "gs://results-1", "readonly": False, "options": {}},
    ],
    "mounts": [
        {"id": "https://renkulab.io/storage/mounts/giab-raw", "name": "giab-raw", "storage": "https://renkulab.io/storage/s3/amazonaws.com/giab",
         "mountpath": "data/raw", "source_path": "raw"},
        {"id": "https://renkulab.io/storage/mounts/giab-processed", "name": "giab-processed",
         "storage": "https://renkulab.io/storage/s3/amazonaws.com/giab", "mountpath": "data/processed", "source_path": "processed"},
        {"id": "https://renkulab.io/storage/mounts/results-1", "name": "results-1",
         "storage": "https://renkulab.io/storage/gcs/storage.googleapis.com/results-1", "mountpath": "results", "source_path": ""},
    ],
}


def test_export_expands_to_exactly_the_expected_triples():
    g = Graph().parse(data=json.dumps(export(DOC, "my-project")), format="json-ld")
    p = URIRef("https://renkulab.io/projects/my-project")
    giab = URIRef(DOC["storages"][0]["id"])
    res = URIRef(DOC["storages"][1]["id"])
    expected = {
        (p, RDF.type, S.Project), (p, S.name, Literal("my-project")),
        (p, R.hasStorage, giab), (p, R.hasStorage, res),
    }
    for st, doc in ((giab, DOC["storages"][0]), (res, DOC["storages"][1])):
        expected |= {
            (st, RDF.type, R.RemoteStorage), (st, S.name, Literal(doc["name"])), (st, R.provider, Literal(doc["provider"])),
            (st, R.url, Literal(doc["url"])), (st, R.readonly, Literal(doc["readonly"])),
            (st, R.options, Literal(json.dumps(doc["options"], sort_keys=True))),
        }
    for m in DOC["mounts"]:
        mt = URIRef(m["id"])
        expected |= {
            (p, R.mountpoints, mt), (mt, RDF.type, R.StorageMount), (mt, S.name, Literal(m["name"])),
            (mt, R.storage, URIRef(m["storage"])), (mt, R.mountpath, Literal(m["mountpath"])), (mt, R.sourcePath, Literal(m["source_path"])),
        }
    assert set(g) == expected


def test_import_of_export_is_identity():
    back = import_(export(DOC, "my-project"))
    key = lambda d: d["id"]  # noqa: E731
    assert back["instance"] == DOC["instance"]
    assert sorted(back["storages"], key=key) == sorted(DOC["storages"], key=key)
    assert sorted(back["mounts"], key=key) == sorted(DOC["mounts"], key=key)


def test_import_understands_expanded_form():
    from rdflib import Graph

    g = Graph().parse(data=json.dumps(export(DOC, "p")), format="json-ld")
    expanded = json.loads(g.serialize(format="json-ld"))  # no context, full IRIs
    assert len(import_(expanded)["mounts"]) == 3


def test_import_refuses_a_mount_of_an_unknown_storage():
    bad = export(DOC, "p")
    bad["renku:mountpoints"][0]["renku:storage"] = {"@id": "https://elsewhere/storage/x"}
    try:
        import_(bad)
    except ValueError as exc:
        assert "does not have" in str(exc)
    else:
        raise AssertionError("accepted a dangling storage reference")


def test_a_storage_given_in_rclones_terms_keeps_its_type_and_its_options():
    doc = {"storages": [{"name": "lab", "rclone": {"type": "s3", "provider": "Ceph", "endpoint": "s3.example.org"}, "source_path": "bkt/x"}],
           "mounts": [{"storage": "lab", "mountpath": "data"}]}
    exported = export(doc, "p")
    (storage,) = exported["renku:hasStorage"]
    assert storage["renku:rcloneType"] == "s3" and json.loads(storage["renku:options"]) == {"endpoint_url": "https://s3.example.org"}
    (back,) = import_(exported)["storages"]
    assert (back["rclone_type"], back["url"], back["provider"]) == ("s3", "s3://bkt/x", "s3")
