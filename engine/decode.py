"""Hostile file in, clean RGB pixels out: the one decode/resize path of training and serving.

    data = read_file_bytes(path, max_bytes=100_000_000, follow_symlinks=False)
    image = decode_image(data, input_size=(224, 224), max_pixels=40_000_000)
    image.model_input        # (224, 224, 3) uint8, what the model is fed
    image.preview            # oriented RGB, at most `preview_max_side` px, for overlays
    image.width, image.height, image.sha256

Every failure is an :class:`~engine.errors.ImageError` subclass with a message fit for a
results row: empty file, not an image (whatever its extension), corrupt or truncated data,
too many pixels (decompression bombs), a symlink or something that is not a regular file.
Only JPEG, PNG, BMP, WEBP, GIF (first frame) and TIFF (first page) parsers are ever run.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import (CorruptImageError, EmptyFileError, ImageError, ImageTooLargeError,
                           NotAnImageError, UnreadableFileError)

#: Pillow format names we accept; anything else is "not an image" for pawcam
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")
#: reduced JPEG decoding keeps at least this many pixels on the long side by default
DEFAULT_REDUCED_MIN_SIDE = 512
# pawcam runs one image per thread on its own pools (decode, pictures, training's decode):
# OpenCV's own per-call threads only add hand-offs on top (measured: resize and bicubic
# upsampling about twice as slow in wall time on a busy 2-core machine).
cv2.setNumThreads(1)
# Our own pixel limit is checked before decoding; Pillow's global one is switched off so that
# it cannot fire first with a less helpful message (or merely warn below 2x its limit).
Image.MAX_IMAGE_PIXELS = None
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class DecodedImage:
    model_input: np.ndarray   # (H, W, 3) uint8 at the model's input size
    preview: np.ndarray | None  # oriented RGB uint8, longest side <= preview_max_side
    width: int                # oriented size of the original picture, in pixels
    height: int
    sha256: str


def input_open_flags(follow_symlinks: bool) -> int:
    """``os.open`` flags for reading an input: never blocks on a FIFO, refuses a symlink
    (``ELOOP``) unless ``follow_symlinks``, not inherited by child processes."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    return flags if follow_symlinks else flags | os.O_NOFOLLOW


def read_file_bytes(path: str | Path, *, max_bytes: int, follow_symlinks: bool = False) -> bytes:
    """Read a whole regular file, refusing symlinks (unless asked), FIFOs, devices, huge files.

    ``O_NOFOLLOW`` and ``O_NONBLOCK`` make the checks race-free: a name swapped for a symlink
    after listing is refused, and a FIFO cannot block the reader.
    """
    try:
        fd = os.open(path, input_open_flags(follow_symlinks))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFileError("is a symbolic link; pawcam does not follow links in "
                                      "its input (copy the file itself)") from exc
        if exc.errno == errno.ENOENT:
            raise UnreadableFileError("no such file (wrong path, or it was moved or deleted "
                                      "before it could be read)") from exc
        raise UnreadableFileError(f"cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError("is not a regular file (directory, FIFO, socket or "
                                      "device); only image files can be classified")
        if st.st_size == 0:
            raise EmptyFileError("file is empty (0 bytes)")
        if st.st_size > max_bytes:
            raise ImageTooLargeError(f"file is {st.st_size:,} bytes, over the "
                                     f"max_file_bytes limit of {max_bytes:,}; raise "
                                     "[decode] max_file_bytes to accept it")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            # Read the size fstat saw (not a max_bytes buffer per photo), +1 to notice growth;
            # a file still growing is read on up to the limit.
            data = fh.read(min(st.st_size, max_bytes) + 1)
            if len(data) > st.st_size:
                data += fh.read(max_bytes + 1 - len(data))
    finally:
        if fd >= 0:
            os.close(fd)
    if not data:
        raise EmptyFileError("file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"file grew past the max_file_bytes limit of {max_bytes:,}")
    return data


def decode_image(data: bytes, *, input_size: tuple[int, int], max_pixels: int,
                 preview_max_side: int | None = None, reduced_jpeg: bool = True,
                 reduced_jpeg_min_side: int = DEFAULT_REDUCED_MIN_SIDE) -> DecodedImage:
    """Decode ``data`` into model input (and optionally a preview) with EXIF orientation applied.

    ``input_size`` is (height, width). With ``reduced_jpeg`` large JPEGs are decoded at 1/2,
    1/4 or 1/8 scale straight from the DCT, keeping the model's input size in both dimensions
    and ``reduced_jpeg_min_side`` pixels on the long side (room for the pictures). The scale
    depends on these decode settings only, never on output settings, so a run with or without
    pictures -- and training -- feed the model identical pixels.
    """
    if not data:
        raise EmptyFileError("file is empty (0 bytes)")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return _decode(data, sha256, input_size, max_pixels, preview_max_side, reduced_jpeg,
                       reduced_jpeg_min_side)
    except ImageError as exc:
        exc.sha256 = sha256  # error rows still identify the content
        raise


def _decode(data: bytes, sha256: str, input_size: tuple[int, int], max_pixels: int,
            preview_max_side: int | None, reduced_jpeg: bool,
            reduced_jpeg_min_side: int) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise NotAnImageError("not a supported image (JPEG, PNG, BMP, WEBP, GIF or TIFF "
                              "expected, whatever the file's extension)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImageError(f"corrupt image header ({exc})") from exc
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise CorruptImageError(f"image has an invalid size {width}x{height}")
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} = {width * height:,} pixels, "
                                     f"over the max_image_pixels limit of {max_pixels:,}; "
                                     "raise [decode] max_image_pixels to accept it")
        orientation = _orientation(img)
        if orientation in _SWAPS_AXES:
            width, height = height, width
        if reduced_jpeg and img.format == "JPEG":
            img.draft("RGB", _draft_request(img.size, input_size, orientation,
                                            reduced_jpeg_min_side))
        rgb = _to_rgb_array(img, orientation)
    except (ImageTooLargeError, CorruptImageError):
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        message = str(exc)
        if "truncated" in message:
            raise CorruptImageError("image data is truncated (incomplete download or copy?)") from exc
        raise CorruptImageError(f"cannot decode image data ({message})") from exc
    finally:
        img.close()
    return DecodedImage(
        model_input=resize_to(rgb, input_size),
        preview=_limit_side(rgb, preview_max_side) if preview_max_side else None,
        width=width, height=height, sha256=sha256,
    )


def decode_limits(decode: Any) -> dict[str, Any]:
    """The keyword arguments :func:`decode_image` takes from ``[decode]`` settings
    (:class:`engine.config.DecodeSettings`): one spelling for every caller.

        decode_image(data, input_size=(224, 224), **decode_limits(settings.decode))
    """
    return {"max_pixels": decode.max_image_pixels, "reduced_jpeg": decode.reduced_jpeg,
            "reduced_jpeg_min_side": decode.reduced_jpeg_min_side}


def load_model_input(path: str | Path, *, input_size: tuple[int, int], max_pixels: int,
                     max_bytes: int, reduced_jpeg: bool = True,
                     reduced_jpeg_min_side: int = DEFAULT_REDUCED_MIN_SIDE,
                     follow_symlinks: bool = False) -> np.ndarray:
    """File to ``(H, W, 3) uint8`` model input: what training reads, identical to serving."""
    data = read_file_bytes(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks)
    return decode_image(data, input_size=input_size, max_pixels=max_pixels,
                        reduced_jpeg=reduced_jpeg,
                        reduced_jpeg_min_side=reduced_jpeg_min_side).model_input


def _draft_request(stored: tuple[int, int], input_size: tuple[int, int], orientation: int,
                   min_side: int) -> tuple[int, int]:
    """The (width, height) in stored orientation that a reduced decode must at least keep."""
    w, h = stored
    in_h, in_w = input_size
    if orientation in _SWAPS_AXES:
        in_h, in_w = in_w, in_h
    long_side = max(w, h)
    return (max(in_w, -(-min_side * w // long_side)), max(in_h, -(-min_side * h // long_side)))


def resize_to(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``rgb`` to exactly ``size`` = (height, width): area averaging when shrinking."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return np.ascontiguousarray(rgb)
    shrinking = rgb.shape[0] * rgb.shape[1] >= h * w
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(rgb, (w, h), interpolation=interpolation)


def _limit_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return rgb
    return resize_to(rgb, (max(1, round(h * scale)), max(1, round(w * scale))))


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # malformed EXIF never makes a photo unusable
        return 1


def _to_rgb_array(img: Image.Image, orientation: int) -> np.ndarray:
    """First frame, any mode -> oriented (H, W, 3) uint8 RGB; alpha composited on white."""
    img.seek(0)
    img.load()
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(gray, "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if orientation != 1:
        img = img.transpose(_TRANSPOSE[orientation])
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError(f"decoded to an unexpected shape {arr.shape}")
    return arr
