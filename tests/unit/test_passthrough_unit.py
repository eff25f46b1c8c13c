"""sidecar.passthrough.OpenFiles without a kernel: the protocol hook stubbed."""

from sidecar import passthrough


class _Hook:
    """The C hook's functions: registrations kept until an answer 'consumes' them."""

    def __init__(self):
        self.registered = {}

    def sidecar_pt_state(self):
        return 7

    def sidecar_pt_register(self, fh, backing_id):
        self.registered[fh] = backing_id
        return 0

    def sidecar_pt_unregister(self, fh):
        self.registered.pop(fh, None)

    def sidecar_pt_pending(self, fh):
        return int(fh in self.registered)

    def answer(self, fh):  # the OPEN's answer went out patched
        self.registered.pop(fh)


def test_an_open_whose_answer_went_out_unpatched_counts_as_served_here(monkeypatch):
    """The hook patches only the OPEN requests it noted (a fixed table); an answer it could not
    match goes out without the backing id. The next open of that inode must then not be passed
    through (the kernel would refuse it: the inode is open the other way), nor counted so."""
    hook = _Hook()
    monkeypatch.setattr(passthrough, "_lib", hook)
    monkeypatch.setattr(passthrough, "_refused", False)
    opened_backing = []
    monkeypatch.setattr(passthrough, "open_backing", lambda path, size: opened_backing.append(path) or 9)
    monkeypatch.setattr(passthrough, "close_backing", lambda backing_id: None)
    files = passthrough.OpenFiles(lambda fh: ("/cache/seg", 100))

    assert files.opened(5, 1) is True  # registered; its answer goes out patched
    hook.answer(1)
    assert files.opened(5, 2) is True  # the same backing file for the inode's next open
    hook.answer(2)
    files.released(1)
    files.released(2)
    assert files.as_dict()["opens"] == 2 and files.as_dict()["open"] == 0

    assert files.opened(6, 3) is True  # ... but this answer was sent unpatched (not consumed)
    assert files.opened(6, 4) is False  # the inode is open the other way: served here
    d = files.as_dict()
    assert d["opens"] == 2 and d["open"] == 0 and d["served"] == 2 and 3 not in hook.registered
    files.released(3)
    files.released(4)
    assert files.as_dict()["served"] == 0

    assert files.opened(7, 5) is True  # unpatched too, and released before any other open
    files.released(5)
    d = files.as_dict()
    assert d["opens"] == 2 and d["open"] == 0 and d["served"] == 0 and 5 not in hook.registered


_REPLY_WITH_A_DRAINING_THREAD = r"""
import ctypes, importlib.util, os, sys, threading
lib = ctypes.PyDLL(importlib.util.find_spec("sidecar._fusept").origin)  # (PyDLL: called with the GIL held, as pyfuse3 does)
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
lib.sidecar_pt_send_reply.argtypes = [ctypes.c_int, ctypes.POINTER(IOVec), ctypes.c_int]
lib.sidecar_pt_send_reply.restype = ctypes.c_ssize_t
size = int(sys.argv[1])
r, w = os.pipe()
got = []
drain = threading.Thread(target=lambda: got.append(sum(len(c) for c in iter(lambda: os.read(r, 1 << 16), b""))))
drain.start()
body = ctypes.create_string_buffer(b"x" * size, size)
iov = (IOVec * 1)(IOVec(ctypes.addressof(body), size))
n = lib.sidecar_pt_send_reply(w, iov, 1)
os.close(w)
drain.join()
print(n, got[0])
"""


def test_a_large_reply_is_written_with_the_gil_released():
    """pyfuse3 answers a READ holding the GIL; the hook writes a large reply without it, so the
    worker's other threads (receiving the next blocks, writing the disk cache) run meanwhile.
    Shown with a pipe whose only reader is a Python thread of the same process: a 1 MiB reply
    fills the pipe, and only that thread draining it lets the write end (held, the GIL would
    leave the writer and that thread waiting on each other forever)."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("sidecar._fusept") is None:
        pytest.skip("the protocol hook is not built here")
    for size in (1 << 20, 4096):  # (a small reply fits the pipe: it returns either way)
        out = subprocess.run([sys.executable, "-c", _REPLY_WITH_A_DRAINING_THREAD, str(size)], capture_output=True, text=True, timeout=15)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(size), str(size)]
