"""Typed exceptions. Every message says what went wrong *and* what to do about it.

    try:
        settings = load_settings("config.toml")
    except PawcamError as exc:
        print(exc)          # one readable line, safe to show a user
"""
from __future__ import annotations


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
