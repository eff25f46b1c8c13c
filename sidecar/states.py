"""The states of a mount, one set for the daemon, its metrics, status and the CLI.

    pending -> checking -> mounted | needs_credentials | failed | skipped
    mounted <-> degraded       (backend errors or stalled calls since the last poll)
    mounted -> unmounted       (POST unmount, shutdown)
    mounted -> failed          (the worker died: noticed, reported, mounted again)
    needs_credentials -> checking   (POST credentials)
    failed -> checking         (retried with backoff, staying `failed` until it works)
    checking -> copying -> copied   (copy mode)

The same diagram, with what the mount path shows in each state, is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from enum import StrEnum


class MountState(StrEnum):
    PENDING = "pending"
    CHECKING = "checking"
    MOUNTED = "mounted"
    DEGRADED = "degraded"
    NEEDS_CREDENTIALS = "needs_credentials"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNMOUNTED = "unmounted"
    COPYING = "copying"  # copy mode: downloading into the mount path
    COPIED = "copied"  # copy mode: the folder is there, as ordinary local files


STATES = tuple(s.value for s in MountState)
UP = frozenset({MountState.MOUNTED, MountState.DEGRADED})  # the storage is served at its path
STARTING = frozenset({MountState.PENDING, MountState.CHECKING})  # not ready yet
COPY = frozenset({MountState.COPYING, MountState.COPIED})  # copy mode: plain files at the path
TROUBLED = frozenset({MountState.FAILED, MountState.NEEDS_CREDENTIALS, MountState.DEGRADED})  # logged as warnings
