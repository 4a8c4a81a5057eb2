"""Decoding hostile files: every format and mode, every failure as a clear ImageError.

The last tests run the same cases end to end through ``Classifier.process`` with a tiny real
model: one result per input, in order, an ``error`` row for each bad file, pictures for the good.
"""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.decode import decode_image, load_model_input, read_file_bytes, resize_to
from engine.errors import (CorruptImageError, EmptyFileError, ImageError, ImageTooLargeError,
                           NotAnImageError, UnreadableFileError)
from tests.helpers import image_bytes, photo_like, write_image

BIG = 10**9


def dec(data: bytes, size=(48, 64), **kwargs):
    kwargs.setdefault("max_pixels", BIG)
    return decode_image(data, input_size=size, **kwargs)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def assert_readable_message(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} has an empty message"
    assert len(message) >= 12 and message.isprintable(), message
    assert "Traceback" not in message and "b'" not in message and "\\x" not in message
    return message


# --- formats -----------------------------------------------------------------------------------
LOSSLESS = [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]


@pytest.mark.parametrize("fmt,kwargs", LOSSLESS, ids=[f for f, _ in LOSSLESS])
def test_lossless_formats_decode_exactly(fmt, kwargs):
    pixels = photo_like(64, 48, seed=1)
    d = dec(encode(Image.fromarray(pixels), fmt, **kwargs), size=(48, 64), preview_max_side=1000)
    assert (d.width, d.height) == (64, 48)
    assert d.model_input.shape == (48, 64, 3) and d.model_input.dtype == np.uint8
    np.testing.assert_array_equal(d.model_input, pixels)
    np.testing.assert_array_equal(d.preview, pixels)


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"quality": 95}), ("WEBP", {"quality": 95}),
                                        ("GIF", {})], ids=["JPEG", "WEBP-lossy", "GIF"])
def test_lossy_formats_decode_to_the_right_size_and_colors(fmt, kwargs):
    pixels = photo_like(80, 60, seed=2)
    d = dec(encode(Image.fromarray(pixels), fmt, **kwargs), size=(60, 80), reduced_jpeg=False)
    assert (d.width, d.height) == (80, 60)
    assert d.model_input.shape == (60, 80, 3)
    assert np.abs(d.model_input.astype(int) - pixels.astype(int)).mean() < 12


def test_sizes_are_reported_and_model_input_resized():
    d = dec(image_bytes("PNG", 120, 30, seed=3), size=(32, 32))
    assert (d.width, d.height) == (120, 30)
    assert d.model_input.shape == (32, 32, 3)
    assert len(d.sha256) == 64


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in
              [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    d = dec(buf.getvalue(), size=(10, 20))
    assert (d.width, d.height) == (20, 10)
    assert (np.abs(d.model_input.astype(int) - [255, 0, 0]) <= 2).all()


def test_multipage_tiff_gives_its_first_page():
    pages = [Image.new("RGB", (16, 8), (10, 200, 30)), Image.new("RGB", (16, 8), (0, 0, 0))]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    d = dec(buf.getvalue(), size=(8, 16))
    assert (d.model_input == [10, 200, 30]).all()


# --- EXIF orientation --------------------------------------------------------------------------
def _corner_picture(width=40, height=20) -> np.ndarray:
    """Gray picture with a red top-left corner and a blue bottom-left corner."""
    arr = np.full((height, width, 3), 128, np.uint8)
    arr[:6, :6] = (255, 0, 0)
    arr[-6:, :6] = (0, 0, 255)
    return arr


def _jpeg_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=98, exif=exif.tobytes())


def _is(color, pixel, tol=40):
    return (np.abs(np.asarray(pixel, int) - np.asarray(color, int)) <= tol).all()


@pytest.mark.parametrize("reduced", [True, False])
def test_exif_orientation_6_rotates_clockwise_and_swaps_size(reduced):
    arr = _corner_picture(40, 20)
    data = _jpeg_with_orientation(arr, 6)
    d = dec(data, size=(40, 20), preview_max_side=1000, reduced_jpeg=reduced)
    assert (d.width, d.height) == (20, 40)
    assert d.preview.shape == (40, 20, 3)
    # rotated 90 degrees clockwise: top-left goes to top-right, bottom-left to top-left
    assert _is((255, 0, 0), d.preview[2, -3]), d.preview[2, -3]
    assert _is((0, 0, 255), d.preview[2, 2]), d.preview[2, 2]
    assert _is((128, 128, 128), d.preview[-3, -3])
    # the independent reference: Pillow's own exif_transpose
    from PIL import ImageOps

    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(d.preview, ref)
    np.testing.assert_array_equal(d.model_input, ref)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation):
    from PIL import ImageOps

    data = _jpeg_with_orientation(_corner_picture(30, 18), orientation)
    d = dec(data, size=(8, 8), preview_max_side=1000, reduced_jpeg=False)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert (d.height, d.width) == ref.shape[:2]
    np.testing.assert_array_equal(d.preview, ref)


def test_malformed_exif_orientation_is_ignored():
    data = _jpeg_with_orientation(_corner_picture(30, 18), 99)
    d = dec(data, size=(18, 30))
    assert (d.width, d.height) == (30, 18)


# --- modes -------------------------------------------------------------------------------------
def test_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    d = dec(encode(Image.fromarray(gray, "L"), "PNG"), size=gray.shape)
    for c in range(3):
        np.testing.assert_array_equal(d.model_input[..., c], gray)


def _palette_image(transparent: bool) -> bytes:
    img = Image.new("P", (8, 4))
    img.putpalette([200, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    px = np.zeros((4, 8), np.uint8)
    px[:, 4:] = 1
    img.putdata(px.ravel().tolist())
    return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def test_palette_image_without_transparency():
    d = dec(_palette_image(False), size=(4, 8))
    assert (d.model_input[:, :4] == [200, 0, 0]).all()
    assert (d.model_input[:, 4:] == [0, 0, 255]).all()


def test_palette_image_with_transparency_is_composited_on_white():
    assert "transparency" in Image.open(io.BytesIO(_palette_image(True))).info
    d = dec(_palette_image(True), size=(4, 8))
    assert (d.model_input[:, :4] == 255).all()
    assert (d.model_input[:, 4:] == [0, 0, 255]).all()


def test_transparent_gif_is_composited_on_white():
    img = Image.new("P", (8, 4))
    img.putpalette([0, 0, 0, 0, 200, 0] + [0, 0, 0] * 254)
    px = np.zeros((4, 8), np.uint8)
    px[:, 4:] = 1
    img.putdata(px.ravel().tolist())
    d = dec(encode(img, "GIF", transparency=0), size=(4, 8))
    assert (d.model_input[:, :4] == 255).all()
    assert (d.model_input[:, 4:] == [0, 200, 0]).all()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_rgba_alpha_is_composited_on_white(fmt):
    rgba = np.zeros((4, 9, 4), np.uint8)
    rgba[:, :3] = (0, 0, 0, 0)            # fully transparent black -> white
    rgba[:, 3:6] = (0, 180, 0, 255)       # opaque green stays green
    rgba[:, 6:] = (0, 0, 0, 128)          # half-transparent black -> mid gray
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    d = dec(encode(Image.fromarray(rgba, "RGBA"), fmt, **kwargs), size=(4, 9))
    out = d.model_input.astype(int)
    assert (out[:, :3] == 255).all(), out[0, :3]
    assert (np.abs(out[:, 3:6] - [0, 180, 0]) <= 1).all()
    assert (np.abs(out[:, 6:] - 127) <= 2).all(), out[0, 6:]


def test_la_alpha_is_composited_on_white():
    la = np.zeros((4, 6, 2), np.uint8)
    la[:, :3] = (0, 0)      # transparent black -> white
    la[:, 3:] = (60, 255)   # opaque dark gray
    d = dec(encode(Image.fromarray(la, "LA"), "PNG"), size=(4, 6))
    assert (d.model_input[:, :3] == 255).all()
    assert (d.model_input[:, 3:] == 60).all()


def test_cmyk_jpeg_converts_to_rgb():
    pixels = photo_like(64, 48, seed=4)
    data = image_bytes("JPEG", 64, 48, seed=4, mode="CMYK", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    for reduced in (True, False):
        d = dec(data, size=(48, 64), reduced_jpeg=reduced)
        assert d.model_input.shape == (48, 64, 3)
        assert np.abs(d.model_input.astype(int) - pixels.astype(int)).mean() < 6


@pytest.mark.parametrize("value,expected", [(65535, 255), (32768, 128), (0, 0), (257, 1)])
def test_16bit_png_is_scaled_not_clipped(value, expected):
    img = Image.fromarray(np.full((6, 10), value, np.uint16))
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    d = dec(data, size=(6, 10))
    assert (np.abs(d.model_input.astype(int) - expected) <= 1).all(), d.model_input[0, 0]


def test_16bit_png_gradient_keeps_its_order():
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    d = dec(encode(Image.fromarray(ramp), "PNG"), size=(4, 16))
    row = d.model_input[0, :, 0].astype(int)
    np.testing.assert_allclose(row, np.round(ramp[0] / 257.0), atol=1)
    assert row[0] == 0 and row[-1] == 255


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_one_bit_images(fmt):
    bits = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    data = encode(Image.fromarray(bits).convert("1"), fmt)
    d = dec(data, size=(8, 8))
    np.testing.assert_array_equal(d.model_input[..., 0], np.where(bits, 255, 0))
    np.testing.assert_array_equal(d.model_input[..., 1], d.model_input[..., 2])


# --- failures ----------------------------------------------------------------------------------
def test_empty_data_and_empty_file(tmp_path):
    with pytest.raises(EmptyFileError) as info:
        dec(b"")
    assert "empty" in assert_readable_message(info.value)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(EmptyFileError):
        read_file_bytes(empty, max_bytes=BIG)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_files_are_corrupt(fmt):
    data = image_bytes(fmt, 200, 150, seed=5)
    with pytest.raises(CorruptImageError) as info:
        dec(data[:len(data) // 2])
    message = assert_readable_message(info.value)
    if fmt in ("JPEG", "PNG"):
        assert "truncated" in message.lower()


def test_truncated_jpeg_message_mentions_truncation():
    data = image_bytes("JPEG", 300, 200, seed=6)
    with pytest.raises(CorruptImageError, match="truncated"):
        dec(data[:len(data) // 2], reduced_jpeg=False)
    with pytest.raises(CorruptImageError, match="truncated"):
        dec(data[:len(data) // 2], reduced_jpeg=True)


def test_corrupt_header_is_corrupt_or_not_an_image():
    data = bytearray(image_bytes("PNG", 40, 30))
    data[16:24] = b"\xff" * 8  # IHDR width/height garbage, CRC now wrong
    with pytest.raises((CorruptImageError, NotAnImageError)) as info:
        dec(bytes(data))
    assert_readable_message(info.value)


@pytest.mark.parametrize("data", [
    np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    b"hello, I am a text file pretending to be a photo\n" * 20,
    b"<svg xmlns='http://www.w3.org/2000/svg'></svg>",
    b"%PDF-1.4\n%...\n",
], ids=["random", "text", "svg", "pdf"])
def test_not_an_image(data):
    with pytest.raises(NotAnImageError) as info:
        dec(data)
    message = assert_readable_message(info.value)
    assert "JPEG" in message


def test_other_image_formats_are_refused():
    """Only the six parsers run: an ICO or a PCX is not an image for pawcam."""
    img = Image.fromarray(photo_like(32, 32))
    for fmt in ("ICO", "PCX", "PPM"):
        with pytest.raises(NotAnImageError):
            dec(encode(img, fmt))


def test_content_decides_not_the_extension(tmp_path):
    png_named_jpg = tmp_path / "really_a_png.jpg"
    pixels = photo_like(40, 30, seed=8)
    png_named_jpg.write_bytes(encode(Image.fromarray(pixels), "PNG"))
    got = load_model_input(png_named_jpg, input_size=(30, 40), max_pixels=BIG, max_bytes=BIG)
    np.testing.assert_array_equal(got, pixels)
    text_named_jpg = tmp_path / "notes.jpg"
    text_named_jpg.write_text("not a picture at all\n")
    with pytest.raises(NotAnImageError):
        load_model_input(text_named_jpg, input_size=(30, 40), max_pixels=BIG, max_bytes=BIG)


def test_pixel_limit_boundary():
    data = image_bytes("PNG", 100, 50)
    assert dec(data, max_pixels=5000).width == 100
    with pytest.raises(ImageTooLargeError) as info:
        dec(data, max_pixels=4999)
    message = assert_readable_message(info.value)
    assert "100x50" in message and "max_image_pixels" in message


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-correct) header claims width x height but holds no real data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_pixel_limit_is_checked_before_decoding():
    """A decompression bomb's header is enough: the too-large error comes before any decode."""
    with pytest.raises(ImageTooLargeError, match="100000x100000"):
        dec(_png_claiming(100_000, 100_000), max_pixels=40_000_000)
    # the same header under the limit fails only when decoding (proof that nothing was decoded)
    with pytest.raises(CorruptImageError):
        dec(_png_claiming(4000, 4000), max_pixels=40_000_000)


def test_reported_pixel_limit_uses_the_real_jpeg_size():
    data = image_bytes("JPEG", 400, 300)
    with pytest.raises(ImageTooLargeError):
        dec(data, size=(8, 8), max_pixels=400 * 300 - 1, reduced_jpeg=True)


def test_max_bytes_limit(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(image_bytes("PNG", 30, 20))
    n = path.stat().st_size
    assert read_file_bytes(path, max_bytes=n) == path.read_bytes()
    with pytest.raises(ImageTooLargeError) as info:
        read_file_bytes(path, max_bytes=n - 1)
    assert "max_file_bytes" in assert_readable_message(info.value)


def test_symlink_is_refused_unless_followed(tmp_path):
    target = write_image(tmp_path / "real.jpg")
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    with pytest.raises(UnreadableFileError) as info:
        read_file_bytes(link, max_bytes=BIG)
    assert "link" in assert_readable_message(info.value)
    assert read_file_bytes(link, max_bytes=BIG, follow_symlinks=True) == target.read_bytes()
    dangling = tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(UnreadableFileError):
        read_file_bytes(dangling, max_bytes=BIG, follow_symlinks=True)


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def attempt():
        try:
            outcome.append(read_file_bytes(fifo, max_bytes=BIG))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # unblock the reader so the suite does not hang, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=5)
        pytest.fail("read_file_bytes blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], UnreadableFileError), outcome
    assert "regular file" in assert_readable_message(outcome[0])


def test_directory_and_missing_file(tmp_path):
    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    with pytest.raises(UnreadableFileError) as info:
        read_file_bytes(folder, max_bytes=BIG)
    assert_readable_message(info.value)
    with pytest.raises(UnreadableFileError) as info:
        read_file_bytes(tmp_path / "nope.jpg", max_bytes=BIG)
    assert_readable_message(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_permissions(tmp_path):
    path = write_image(tmp_path / "secret.jpg")
    path.chmod(0)
    try:
        with pytest.raises(UnreadableFileError) as info:
            read_file_bytes(path, max_bytes=BIG)
        assert_readable_message(info.value)
    finally:
        path.chmod(0o644)


def test_every_error_class_is_an_image_error_with_a_code():
    codes = set()
    for cls in (EmptyFileError, NotAnImageError, CorruptImageError, ImageTooLargeError,
                UnreadableFileError):
        assert issubclass(cls, ImageError)
        codes.add(cls.code)
    assert len(codes) == 5


# --- reduced JPEG decoding and previews --------------------------------------------------------
@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return image_bytes("JPEG", 2000, 1500, seed=9, quality=92)


@pytest.mark.parametrize("input_size", [(32, 32), (224, 224)])
def test_reduced_jpeg_gives_nearly_the_same_model_input(big_jpeg, input_size):
    full = dec(big_jpeg, size=input_size, reduced_jpeg=False, preview_max_side=4000)
    fast = dec(big_jpeg, size=input_size, reduced_jpeg=True, preview_max_side=4000)
    assert (fast.width, fast.height) == (full.width, full.height) == (2000, 1500)
    assert fast.sha256 == full.sha256
    assert fast.model_input.shape == full.model_input.shape == (*input_size, 3)
    diff = np.abs(fast.model_input.astype(float) - full.model_input.astype(float))
    assert diff.mean() < 4.0, diff.mean()  # DCT scaling vs area averaging: ~1% of the range
    other = dec(image_bytes("JPEG", 2000, 1500, seed=99), size=input_size, reduced_jpeg=False)
    assert np.abs(other.model_input.astype(float) - full.model_input).mean() > 10 * diff.mean()
    # the reduced path really decoded fewer pixels, never fewer than the model needs
    assert full.preview.shape[:2] == (1500, 2000)
    assert fast.preview.shape[0] < 1500
    assert min(fast.preview.shape[:2]) >= min(input_size)


def test_reduced_jpeg_with_orientation_reports_original_size():
    arr = np.asarray(Image.fromarray(photo_like(1600, 1200, seed=10)))
    data = _jpeg_with_orientation(arr, 6)
    full = dec(data, size=(32, 32), reduced_jpeg=False)
    fast = dec(data, size=(32, 32), reduced_jpeg=True)
    assert (fast.width, fast.height) == (full.width, full.height) == (1200, 1600)
    assert np.abs(fast.model_input.astype(float) - full.model_input.astype(float)).mean() < 2.0


def test_preview_respects_max_side():
    data = image_bytes("PNG", 300, 200, seed=11)
    assert dec(data, preview_max_side=None).preview is None
    assert dec(data, preview_max_side=100).preview.shape == (67, 100, 3)
    assert dec(data, preview_max_side=300).preview.shape == (200, 300, 3)
    assert dec(data, preview_max_side=1000).preview.shape == (200, 300, 3)  # never upscaled
    tall = image_bytes("PNG", 50, 400, seed=12)
    assert dec(tall, preview_max_side=64).preview.shape == (64, 8, 3)


@pytest.mark.parametrize("max_side", [64, 200, 512])
def test_reduced_jpeg_preview_respects_max_side(big_jpeg, max_side):
    """Pictures get exactly max_side: the reduced decode keeps reduced_jpeg_min_side (512) on
    the long side (2000x1500 decodes at 1/2 = 1000x750, since 1/4 = 500 < 512)."""
    d = dec(big_jpeg, size=(224, 224), reduced_jpeg=True, preview_max_side=max_side)
    assert max(d.preview.shape[:2]) == max_side
    assert d.preview.shape[1] / d.preview.shape[0] == pytest.approx(4 / 3, rel=0.02)


def test_reduced_jpeg_scale_depends_on_decode_settings_only(big_jpeg):
    """The model input is identical whatever the pictures' size (no output-dependent skew)."""
    a = dec(big_jpeg, size=(224, 224), reduced_jpeg=True, preview_max_side=None)
    b = dec(big_jpeg, size=(224, 224), reduced_jpeg=True, preview_max_side=2000)
    np.testing.assert_array_equal(a.model_input, b.model_input)
    small = dec(big_jpeg, size=(224, 224), reduced_jpeg=True, reduced_jpeg_min_side=224,
                preview_max_side=4000)
    assert max(small.preview.shape[:2]) == 500  # 1/4 scale is allowed now
    assert min(small.preview.shape[:2]) >= 224


def test_resize_to_exact_size():
    rgb = photo_like(50, 40)
    np.testing.assert_array_equal(resize_to(rgb, (40, 50)), rgb)
    assert resize_to(rgb, (10, 20)).shape == (10, 20, 3)
    assert resize_to(rgb, (80, 100)).shape == (80, 100, 3)


# --- end to end: Classifier.process ------------------------------------------------------------
def _settings(model_path: Path, **decode_changes):
    from engine.config import load_settings, replace

    s = load_settings(None)
    return replace(
        s,
        model=replace(s.model, path=model_path),
        gradcam=replace(s.gradcam, max_side=48, format="png"),
        inference=replace(s.inference, batch_size=3),
        decode=replace(s.decode, **decode_changes),
    )


@pytest.fixture(scope="module")
def classifier(tiny_model_path):
    from engine.classifier import Classifier

    return Classifier.from_settings(_classifier_settings(tiny_model_path))


def _classifier_settings(tiny_model_path):
    return _settings(tiny_model_path, max_image_pixels=1_000_000, max_file_bytes=2_000_000)


def _bad_and_good_inputs(root: Path):
    """(path, expected_status, expected error fragment or '') in input order."""
    cases = []

    def add(path, status, fragment=""):
        cases.append((Path(path), status, fragment))

    add(write_image(root / "a" / "IMG_0001.jpg", seed=1), "ok")
    (root / "empty.jpg").write_bytes(b"")
    add(root / "empty.jpg", "error", "empty")
    add(write_image(root / "b" / "IMG_0001.jpg", seed=2), "ok")
    jpeg = image_bytes("JPEG", 300, 200, seed=3)
    (root / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    add(root / "truncated.jpg", "error", "truncated")
    (root / "random.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    add(root / "random.jpg", "error", "not a supported image")
    (root / "notes.jpg").write_text("a text file with a .jpg name\n")
    add(root / "notes.jpg", "error", "not a supported image")
    add(write_image(root / "png_named.jpg", fmt="PNG", seed=4), "ok")
    add(write_image(root / "huge.png", fmt="PNG", width=1200, height=1000), "error",
        "max_image_pixels")
    (root / "too_many_bytes.bmp").write_bytes(image_bytes("BMP", 900, 800))  # ~2.2 MB
    add(root / "too_many_bytes.bmp", "error", "max_file_bytes")
    add(write_image(root / "anim.gif", fmt="GIF", seed=5), "ok")
    (root / "link.jpg").symlink_to(root / "a" / "IMG_0001.jpg")
    add(root / "link.jpg", "error", "link")
    os.mkfifo(root / "fifo.jpg")
    add(root / "fifo.jpg", "error", "regular file")
    (root / "folder.jpg").mkdir()
    add(root / "folder.jpg", "error", "regular file")
    add(root / "vanished.jpg", "error", "")
    add(write_image(root / "gray.png", fmt="PNG", mode="L", seed=6), "ok")
    add(write_image(root / "cmyk.jpg", mode="CMYK", seed=7), "ok")
    add(write_image(root / "alpha.webp", fmt="WEBP", mode="RGBA", seed=8), "ok")
    add(write_image(root / "page.tiff", fmt="TIFF", seed=9), "ok")
    return cases


def test_process_gives_one_result_per_input_in_order(classifier, tmp_path):
    from engine.classifier import Job
    from engine.results import ResultsCsv

    cases = _bad_and_good_inputs(tmp_path / "in")
    jobs = [Job(path, str(path), f"t1-{i:06d}") for i, (path, _, _) in enumerate(cases)]
    out = tmp_path / "out"
    results = classifier.process(jobs, out_dir=out, threads=2)

    assert len(results) == len(jobs)
    assert [r.input_path for r in results] == [j.input_path for j in jobs]
    assert [r.job_id for r in results] == [j.job_id for j in jobs]
    for (path, status, fragment), r in zip(cases, results):
        assert r.status == status, (path.name, r.error)
        if status == "error":
            assert_readable_message(r.error)
            assert fragment in r.error, (path.name, r.error)
            assert r.pictures == {} and r.label == "" and r.confidence is None
        else:
            assert r.error == ""
            assert r.label in ("cat", "dog", "uncertain")
            assert set(r.probabilities) == {"cat", "dog"}
            assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
            assert set(r.pictures) == {"gray", "heatmap", "overlay"}
            for kind, rel in r.pictures.items():
                picture = out / rel
                assert picture.is_file() and picture.stat().st_size > 0
                with Image.open(picture) as im:
                    assert max(im.size) <= 48
            assert r.width and r.height and len(r.sha256) == 64
    # one CSV row per input; the file opens with pandas
    import pandas as pd

    csv = ResultsCsv(out / "results.csv", classifier.meta.class_names)
    csv.append(results)
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == len(jobs)
    assert list(frame["status"]) == [s for _, s, _ in cases]


def test_same_name_from_different_folders_never_overwrites(classifier, tmp_path):
    from engine.classifier import Job

    a = write_image(tmp_path / "one" / "IMG_0001.jpg", seed=21)
    b = write_image(tmp_path / "two" / "IMG_0001.jpg", width=48, height=64, seed=22)
    out = tmp_path / "out"
    first = classifier.process([Job(a, str(a), "runA-000001")], out_dir=out)
    second = classifier.process([Job(b, str(b), "runB-000001")], out_dir=out)
    r1, r2 = first[0], second[0]
    assert r1.ok and r2.ok
    for kind in ("gray", "heatmap", "overlay"):
        assert r1.pictures[kind] != r2.pictures[kind]
        p1, p2 = out / r1.pictures[kind], out / r2.pictures[kind]
        assert p1.is_file() and p2.is_file()
        # the first picture was not overwritten: it still has the first image's shape
        with Image.open(p1) as i1, Image.open(p2) as i2:
            assert i1.size == (48, 36) and i2.size == (36, 48)
    # same run, same folder name, job ids differing only after a dot
    c = write_image(tmp_path / "three" / "IMG_0001.jpg", seed=23)
    both = classifier.process([Job(a, str(a), "job.1"), Job(c, str(c), "job.2")], out_dir=out)
    assert both[0].pictures["overlay"] != both[1].pictures["overlay"]


def test_process_without_pictures_gives_the_same_probabilities(tiny_model_path, classifier,
                                                               tmp_path):
    from engine.classifier import Classifier, Job
    from engine.config import replace

    s = _classifier_settings(tiny_model_path)
    no_pictures = Classifier.from_settings(replace(s, gradcam=replace(s.gradcam, enabled=False)),
                                           loaded=classifier.loaded)
    paths = [write_image(tmp_path / f"p{i}.jpg", seed=30 + i) for i in range(4)]
    jobs = [Job(p, str(p), f"np-{i}") for i, p in enumerate(paths)]
    with_pics = classifier.process(jobs, out_dir=tmp_path / "o1")
    without = no_pictures.process(jobs, out_dir=tmp_path / "o2")
    for r1, r2 in zip(with_pics, without):
        assert r2.ok and r2.pictures == {}
        assert r1.label == r2.label
        for name in ("cat", "dog"):
            assert r1.probabilities[name] == pytest.approx(r2.probabilities[name], abs=1e-6)
    assert not (tmp_path / "o2" / "gradcam").exists()


def test_uncertainty_band_gives_uncertain_and_keeps_probabilities(tiny_model_path, classifier,
                                                                  tmp_path):
    from engine.classifier import Classifier, Job
    from engine.config import replace

    s = _classifier_settings(tiny_model_path)
    paths = [write_image(tmp_path / f"u{i}.jpg", seed=40 + i) for i in range(3)]
    jobs = [Job(p, str(p), f"u-{i}") for i, p in enumerate(paths)]
    sure = classifier.process(jobs, out_dir=tmp_path / "o1")
    always = Classifier.from_settings(
        replace(s, inference=replace(s.inference, uncertain_below=1.0)), loaded=classifier.loaded)
    never = Classifier.from_settings(
        replace(s, inference=replace(s.inference, uncertain_below=0.0)), loaded=classifier.loaded)
    for r_sure, r_unc, r_none in zip(sure, always.process(jobs, out_dir=tmp_path / "o2"),
                                     never.process(jobs, out_dir=tmp_path / "o3")):
        assert r_unc.label == "uncertain" and r_unc.ok
        assert r_unc.probabilities == pytest.approx(r_sure.probabilities, abs=1e-6)
        assert r_unc.confidence == pytest.approx(max(r_sure.probabilities.values()), abs=1e-6)
        assert r_none.label in ("cat", "dog")
        expected = max(r_none.probabilities, key=r_none.probabilities.get)
        assert r_none.label == expected
    assert classifier.process([], out_dir=tmp_path / "o4") == []
