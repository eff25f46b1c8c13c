"""Domain errors and the ONE table that maps them to errno values.

Lower layers (store, cache, vfs) raise these; only the FUSE adapter converts them to errno
(`errno_for`). Anything not in the table is unexpected: the adapter logs it with its traceback
and answers EIO.
"""

from __future__ import annotations

import errno


class SidecarError(Exception):
    """Base of every domain error. `code` is a stable, machine-readable reason."""

    code = "error"


class NotFound(SidecarError):
    code = "not_found"

    def __init__(self, *args: object, cacheable_for: float = 0.0) -> None:
        super().__init__(*args)
        self.cacheable_for = cacheable_for  # s the kernel may keep the answer (a negative dentry)


class AccessDenied(SidecarError):
    code = "access_denied"


class NoCredentials(AccessDenied):
    """The SDK found no usable credentials to sign with (none given, or half of a pair)."""

    code = "credentials_missing"


class ObjectChanged(SidecarError):
    """The object changed under an open handle (its etag no longer matches)."""

    code = "object_changed"


class BackendUnavailable(SidecarError):
    """The backend could not be reached or did not answer within the mount's deadline."""

    code = "endpoint_unreachable"


class BackendTimeout(BackendUnavailable):
    code = "timeout"


class ReadOnly(SidecarError):
    code = "readonly"


class IsADirectory(SidecarError):
    code = "is_a_directory"


class NotADirectory(SidecarError):
    code = "not_a_directory"


class BadHandle(SidecarError):
    code = "bad_handle"


class NotSupported(SidecarError):
    code = "not_supported"


class NotEmpty(SidecarError):
    code = "not_empty"


class Exists(SidecarError):
    code = "exists"


class CrossDevice(SidecarError):
    """A rename the mount does not do in place (too large a directory); `mv` then copies."""

    code = "rename_too_large"


class NoSpace(SidecarError):
    code = "staging_full"


class NameTooLong(SidecarError):
    code = "name_too_long"


class NotPermitted(SidecarError):
    code = "not_permitted"


class WriteConflict(SidecarError):
    """The object changed remotely since this file was staged; the local copy is kept."""

    code = "write_conflict"


class UploadFailed(BackendUnavailable):
    code = "upload_failed"


class IncompleteWrite(SidecarError):
    """A write to the file failed (ENOSPC, EIO): what is staged is not what was written, so it
    is not published (the file is kept `incomplete`)."""

    code = "incomplete_write"


class InvalidName(SidecarError):
    """A name that cannot be stored as an object key (control characters, not UTF-8)."""

    code = "invalid_name"


ERRNO_TABLE: dict[type[SidecarError], int] = {
    NotFound: errno.ENOENT,
    AccessDenied: errno.EACCES,
    ObjectChanged: errno.ESTALE,
    BackendTimeout: errno.EIO,
    BackendUnavailable: errno.EIO,
    ReadOnly: errno.EROFS,
    IsADirectory: errno.EISDIR,
    NotADirectory: errno.ENOTDIR,
    BadHandle: errno.EBADF,
    NotSupported: errno.ENOTSUP,
    NotEmpty: errno.ENOTEMPTY,
    Exists: errno.EEXIST,
    CrossDevice: errno.EXDEV,
    NoSpace: errno.ENOSPC,
    IncompleteWrite: errno.EIO,
    NameTooLong: errno.ENAMETOOLONG,
    NotPermitted: errno.EPERM,
    WriteConflict: errno.EIO,
    InvalidName: errno.EINVAL,
}


def errno_for(exc: BaseException) -> int | None:
    """The errno for a domain error (most specific class first), None for anything unexpected."""
    for cls in type(exc).__mro__:
        if cls in ERRNO_TABLE:
            return ERRNO_TABLE[cls]  # type: ignore[index]
    return None
