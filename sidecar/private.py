"""Folders that hold the user's data or control files (caches, staging, sockets): this user's
alone. Cached blocks and staged files are bucket data; another uid in the pod must read none."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeFolder(Exception):
    """A folder that is not this user's alone and cannot be made so."""


def private_folder(path: str | os.PathLike[str], *, fix_mode: bool = True) -> Path:
    """`path` as a folder owned by this user with mode 0700: missing components are created 0700;
    an existing folder of ours with a looser mode is tightened (`fix_mode`) or refused; a symlink,
    a file, or a folder of another user is refused."""
    p = Path(path)
    if not p.exists():
        if p.parent != p:
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UnsafeFolder(f"{p} must be a folder owned by uid {os.getuid()} (it is not, or is a symlink)")
    if st.st_mode & 0o077:
        if not fix_mode:
            raise UnsafeFolder(f"{p} is open to other users (mode {oct(st.st_mode & 0o777)}); it must be 0700")
        os.chmod(p, 0o700)
    return p
