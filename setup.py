"""The one compiled part: a FUSE protocol hook for pyfuse3 on libfuse 3.14 (sidecar/_fusept.c:
passthrough, zero-message opens). Optional: where it does not build (no libfuse3 headers), the
mount serves every read itself and every open is a request."""

import subprocess

from setuptools import Extension, setup


def _fuse3_include() -> list[str]:
    try:
        flags = subprocess.run(["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [f[2:] for f in flags if f.startswith("-I")]


setup(
    ext_modules=[
        Extension("sidecar._fusept", sources=["sidecar/_fusept.c"], include_dirs=_fuse3_include(), libraries=["fuse3", "dl"], optional=True),
    ]
)
