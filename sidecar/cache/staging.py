"""A disk thread's staging area for O_DIRECT reads, in huge pages where the kernel gives them.

A direct read into a block's own buffer (4 KiB pages) reaches a virtio disk as requests of at
most 254 pages, its segment limit, many of them at once; the same reads into memory of 2 MiB
pages went out as a few requests of several MiB, at about twice the speed
(benchmarks/results/HISTORY.md). So a run of blocks is read into a staging area of
huge pages, one per disk thread, made once, and copied into the blocks' buffers: a copy in
memory for fewer, larger disk requests. Where the kernel gives no huge pages
(transparent huge pages off, or memory too fragmented when the area is made) there is no
staging area, and blocks are read into their own buffers as before.

The areas are outside the memory budget: DIRECT_RUN blocks per disk thread that read directly
(4 MiB each for 1 MiB blocks, DISK_THREADS of them at most at once; sidecar.cache.blocks).
"""

from __future__ import annotations

import ctypes
import mmap
import threading

HUGE = 2 << 20  # a transparent huge page on x86-64 and arm64 (4 KiB base pages)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14
_local = threading.local()


def staging(n: int) -> memoryview | None:
    """This thread's staging area, at least `n` bytes of huge pages at a huge page's boundary;
    None where the kernel would not give them (asked again only for a larger area)."""
    area: memoryview | None = getattr(_local, "area", None)
    if area is not None and len(area) >= n:
        return area
    if getattr(_local, "refused", 0) >= n:
        return None
    made = _huge_area(n)
    if made is None:
        _local.refused = n
        return None
    _local.area = made
    return made


def _huge_area(n: int) -> memoryview | None:
    size = -(-n // HUGE) * HUGE
    try:
        m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return None
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor)
    del anchor  # (an export left would keep the mapping from ever being closed)
    start = -address % HUGE
    try:
        m.madvise(_MADV_HUGEPAGE, start, size)
        try:
            m.madvise(_MADV_POPULATE_WRITE, start, size)
        except OSError:  # (before 5.14: touched instead)
            m[start : start + size] = bytes(size)
    except OSError:
        m.close()
        return None
    if _huge_bytes(address + start) < size:
        m.close()
        return None
    return memoryview(m)[start : start + size]


def _huge_bytes(address: int) -> int:
    """Bytes of transparent huge pages in the mapping of this process that holds `address`."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, _, hi = head.partition("-")
                    try:
                        inside = int(lo, 16) <= address < int(hi, 16)
                    except ValueError:
                        inside = False
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
