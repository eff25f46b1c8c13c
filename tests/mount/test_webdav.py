"""What is particular to WebDAV (sidecar.store.webdav), on the two servers, counted at the link:
renames are one MOVE each (a file, or a whole folder), never copies; a mount's folder (its
`source_path`) that is not on the server yet is made by the first file written into it."""

import os

import pytest

from tests.backends import WebDAVBackend
from tests.conftest import needs_fuse

pytestmark = [pytest.mark.mount, needs_fuse]


@pytest.fixture(params=["dav_rclone", "dav_wsgidav"])
def proxied_dav(request):
    """(LinkProxy, WebDAVBackend, folder): a new folder of a WebDAV server, reached through the
    suite's proxy, which counts requests by method."""
    from tests.netproxy import LinkProxy

    server = request.getfixturevalue(request.param)
    with LinkProxy(int(server.endpoint.rsplit(":", 1)[1])) as proxy:
        backend = WebDAVBackend(server)
        yield proxy, backend, backend.create_bucket()


def _through(proxy, backend, folder, prefix=""):
    where = folder.storage(prefix)
    host = proxy.endpoint.split("://", 1)[1]
    where["url"] = where["url"].replace(backend.server.endpoint.split("://", 1)[1], host)
    return where


def test_a_rename_is_one_move_for_a_file_and_for_a_whole_folder(proxied_dav, mount_worker):
    proxy, backend, folder = proxied_dav
    for i in range(30):
        folder.put(f"tree/sub{i % 3}/f{i:02d}.txt", f"file {i}".encode())
    folder.put("one.txt", b"one")
    w = mount_worker(folder, readonly=False, **_through(proxy, backend, folder))
    os.listdir(w.mnt)
    proxy.reset_counts()
    os.rename(f"{w.mnt}/one.txt", f"{w.mnt}/two.txt")
    os.rename(f"{w.mnt}/tree", f"{w.mnt}/moved")
    assert proxy.counts["MOVE"] == 2 and proxy.counts["COPY"] == 0 and proxy.counts["DELETE"] == 0, proxy.counts
    assert proxy.counts["PUT"] == 0 and proxy.counts["GET"] == 0, proxy.counts
    keys = folder.keys()
    assert "two.txt" in keys and "one.txt" not in keys
    assert sorted(k for k in keys if k.startswith("moved/") and not k.endswith("/")) == sorted(
        f"moved/sub{i % 3}/f{i:02d}.txt" for i in range(30))
    assert not any(k.startswith("tree") for k in keys)
    assert open(f"{w.mnt}/moved/sub1/f04.txt", "rb").read() == b"file 4"
    assert folder.get("moved/sub1/f04.txt") == b"file 4"


def test_a_mounts_folder_missing_on_the_server_is_made_by_the_first_write(proxied_dav, mount_worker):
    proxy, backend, folder = proxied_dav
    w = mount_worker(folder, readonly=False, source_path="new/deeper", **_through(proxy, backend, folder))
    assert os.listdir(w.mnt) == []
    with open(f"{w.mnt}/result.csv", "w") as f:
        f.write("a,b\n1,2\n")
    assert folder.get("new/deeper/result.csv") == b"a,b\n1,2\n"
    assert {"new/", "new/deeper/"} <= set(folder.keys())
