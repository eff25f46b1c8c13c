import json
import subprocess
import sys

from click.testing import CliRunner

from sidecar.cli import main
from tests.unit.test_manifest import BASE


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sidecar.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "validate" in out and "run" in out


def test_validate_prints_table_and_json(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(BASE))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 0, r.output
    assert "giab" in r.output and "/home/jovyan/work/my-project/data/giab" in r.output and "ro" in r.output
    r = CliRunner().invoke(main, ["validate", "--json", str(f)])
    assert json.loads(r.output)["mounts"][0]["source_path"] == "raw"


def test_validate_bad_manifest_exits_nonzero_with_field_errors(tmp_path):
    bad = json.loads(json.dumps(BASE))
    bad["mounts"][0]["mountpath"] = "../../etc"
    bad["storages"][0]["options"]["secret_access_key"] = "s3cr3t-value"
    f = tmp_path / "m.json"
    f.write_text(json.dumps(bad))
    r = CliRunner().invoke(main, ["validate", str(f)])
    assert r.exit_code == 2
    assert "storages[0].options.secret_access_key" in r.output and "s3cr3t-value" not in r.output


def test_probe_fast_path_only_takes_probe_invocations():
    from sidecar.entry import _fast_probe

    assert _fast_probe(["status"]) is None
    assert _fast_probe(["status", "--json"]) is None
    assert _fast_probe(["status", "--probe", "bogus"]) is None  # click reports the bad choice
    assert _fast_probe(["ls", "--probe", "readiness"]) is None
    assert _fast_probe(["status", "--probe", "readiness", "--socket", "/nonexistent/s.sock"]) == 1
