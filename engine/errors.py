"""Typed exceptions. Every message says what went wrong *and* what to do about it.

    try:
        settings = load_settings("config.toml")
    except PawcamError as exc:
        print(exc)          # one readable line, safe to show a user
"""
from __future__ import annotations

import errno


class PawcamError(Exception):
    """Base class of every error pawcam raises on purpose."""


class ConfigError(PawcamError):
    """config.toml is missing, malformed, or holds an unknown key or a wrong type."""


class ModelLoadError(PawcamError):
    """The model file or its metadata is missing, corrupt or inconsistent."""


class ImageError(PawcamError):
    """An input file cannot become a model input. Recorded as an `error` row, never fatal."""

    #: short machine-readable reason, written to logs and failure sidecars
    code = "image_error"
    #: sha256 of the file's bytes when they could be read (filled in by the classifier)
    sha256 = ""


class EmptyFileError(ImageError):
    code = "empty_file"


class NotAnImageError(ImageError):
    code = "not_an_image"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    code = "too_large"


class UnreadableFileError(ImageError):
    code = "unreadable"


class StorageError(PawcamError):
    """Output storage failed (disk full, quota, read-only, I/O error, no permission): a state
    of the machine, not of an input. ``folder`` is where pawcam was writing, ``rows`` how many
    rows were safely written before it happened."""

    def __init__(self, message: str, folder: str = "", rows: int = 0) -> None:
        super().__init__(message)
        self.folder = folder
        self.rows = rows


#: errno values that mean "the storage is in trouble", not "this input is bad": disk full,
#: quota exceeded, read-only file system, I/O error, no permission, file size limit
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                            errno.EPERM, errno.EFBIG})


def is_storage_fault(exc: BaseException) -> bool:
    """``OSError(ENOSPC, ...)`` -> True; ``FileNotFoundError`` -> False."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC): out/results.csv`` -- one line for logs and status."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    where = exc.filename if exc.filename is not None else ""
    return f"{text}{f' ({name})' if name else ''}{f': {where}' if where else ''}"
