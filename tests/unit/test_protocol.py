"""The daemon↔child protocol (sidecar.protocol): every message survives its own encoding, and a
line that is no message is refused with the reason, never half-read."""

import dataclasses
import json
import re

import pytest

from sidecar import protocol
from sidecar.protocol import (
    COMMANDS, EVENTS, CacheConfig, Failed, MountOptions, Prefetch, ProtocolError, Publish, PlaceholderConfig, StatsReport, WorkerConfig, decode_command,
    decode_event,
)


@pytest.mark.parametrize("kind", sorted(COMMANDS.values(), key=lambda k: k.name), ids=lambda k: k.name)
def test_every_command_decodes_to_itself(kind):
    sample = {"key": "a/b", "path": "data", "paths": ("x", "y/z"), "folder": "/tmp/f", "text": "why"}
    fields = {f: v for f, v in sample.items() if f in kind.__dataclass_fields__}
    cmd = kind(**fields)
    assert decode_command(cmd.encode()) == cmd


@pytest.mark.parametrize("kind", sorted(EVENTS.values(), key=lambda k: k.name), ids=lambda k: k.name)
def test_every_event_decodes_to_itself(kind):
    event = StatsReport({"store": {"get_requests": 3}, "inodes": 2}) if kind is StatsReport else kind()
    assert decode_event(event.encode()) == event


def test_a_command_answer_names_an_event():
    for kind in COMMANDS.values():
        assert kind.answer is None or kind.answer in EVENTS


@pytest.mark.parametrize("line, reason", [
    (b"stats\n", "not a JSON line"),
    (b'["stats"]\n', "no known 'cmd'"),
    (b'{"cmd": "format_disk"}\n', "no known 'cmd'"),
    (b'{"cmd": "publish", "key": 7}\n', "publish: key must be text"),
    (b'{"cmd": "publish", "key": "a", "force": true}\n', "publish: unknown field(s) force"),
    (b'{"cmd": "prefetch", "paths": "data"}\n', "prefetch: paths must be a list of text"),
])
def test_a_line_that_is_no_command_is_refused_with_its_reason(line, reason):
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        decode_command(line)


def test_an_event_is_not_taken_for_a_command():
    with pytest.raises(ProtocolError, match="no known 'cmd'"):
        decode_command(Failed("x", "y").encode())
    assert isinstance(decode_event(Failed("x", "y").encode()), Failed)


def test_prefetch_paths_travel_as_a_list():
    assert json.loads(Prefetch(("a", "b")).encode()) == {"cmd": "prefetch", "paths": ["a", "b"]}
    assert json.loads(Publish("k").encode()) == {"cmd": "publish", "key": "k"}


def test_configurations_refuse_unknown_options_by_name():
    with pytest.raises(ValueError, match="unknown placeholder option.*colour"):
        PlaceholderConfig.from_dict({"name": "a", "mountpath": "/m", "colour": "red"})
    with pytest.raises(ValueError, match="unknown worker option.*colour"):
        WorkerConfig.from_dict({"name": "a", "storage_id": "s", "url": "s3://b", "mountpath": "/m", "colour": "red"})
    cfg = PlaceholderConfig("a", "/m", message="hello")
    assert PlaceholderConfig.from_dict(json.loads(cfg.to_line())) == cfg


def test_the_protocol_module_imports_nothing_of_the_sidecar():
    assert not [n for n in vars(protocol) if n.startswith("sidecar")]


def test_the_cache_settings_travel_whole_and_unknown_ones_are_refused():
    cfg = WorkerConfig("a", "s", "s3://b", "/m", cache=CacheConfig(block_size=1 << 16, cache_dir="/c"))
    again = WorkerConfig.from_dict(json.loads(cfg.to_line()))
    assert again == cfg and isinstance(again.cache, CacheConfig)
    assert WorkerConfig.from_dict({"name": "a", "storage_id": "s", "url": "s3://b", "mountpath": "/m"}).cache == CacheConfig()
    with pytest.raises(ValueError, match="unknown cache option.*colour"):
        WorkerConfig.from_dict({"name": "a", "storage_id": "s", "url": "s3://b", "mountpath": "/m", "cache": {"colour": 1}})


def test_a_mounts_own_settings_travel_whole_and_unknown_ones_are_refused():
    cfg = WorkerConfig("a", "s", "s3://b", "/m", mount=MountOptions(source_path="raw", write_mode="writeback", prefetch=["x"]))
    again = WorkerConfig.from_dict(json.loads(cfg.to_line()))
    assert again == cfg and isinstance(again.mount, MountOptions)
    with pytest.raises(ValueError, match="unknown mount option.*colour"):
        WorkerConfig.from_dict({"name": "a", "storage_id": "s", "url": "s3://b", "mountpath": "/m", "mount": {"colour": 1}})


def test_the_manifests_mount_names_the_mount_settings_alike():
    """The supervisor hands a manifest mount's fields over by name (supervisor.worker_config)."""
    import dataclasses

    from sidecar.manifest import StorageMount
    from sidecar.supervisor import MOUNT_FIELDS

    assert MOUNT_FIELDS - {"ttl"} <= set(StorageMount.model_fields)
    assert {f.name for f in dataclasses.fields(MountOptions)} == MOUNT_FIELDS


def test_a_mounts_kernel_readahead_is_its_manifests():
    """`kernel_readahead_kb` of a manifest mount reaches its worker (a mount of model files read
    by mmap wants a small window, the others keep the daemon's); out of range, the manifest
    names the field."""
    from sidecar.config import DaemonConfig
    from sidecar.manifest import ManifestError, parse_manifest
    from sidecar.supervisor import Mount, worker_config
    from sidecar.worker import kernel_readahead_kb

    doc = {"root": "/work", "storages": [{"name": "models", "provider": "s3", "url": "s3://models"}],
           "mounts": [{"storage": "models", "mountpath": "a", "kernel_readahead_kb": 1024}, {"storage": "models", "mountpath": "b"}]}
    m = parse_manifest(doc)
    cfg = DaemonConfig()
    a, b = (worker_config(cfg, m.root, Mount(mt, m.storage_for(mt)), {}) for mt in m.mounts)
    assert (a.mount.kernel_readahead_kb, kernel_readahead_kb(a)) == (1024, 1024)
    assert (b.mount.kernel_readahead_kb, kernel_readahead_kb(b)) == (None, cfg.cache.kernel_readahead_kb)
    assert kernel_readahead_kb(WorkerConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(a))))) == 1024  # over the pipe
    doc["mounts"][0]["kernel_readahead_kb"] = 64
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert "mounts[0].kernel_readahead_kb" in dict(err.value.errors)
