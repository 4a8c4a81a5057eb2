"""Grad-CAM pictures and safe output names."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.render import (_COLORMAPS, attention_gray, colorize, draw_caption, encode_picture,
                           heatmap, overlay, write_picture)
from engine.text import MAX_STEM, safe_stem, safe_token
from tests.helpers import photo_like

SAFE = re.compile(r"^[A-Za-z0-9._-]+$")

HOSTILE_NAMES = [
    "../../etc/passwd", "..\\..\\windows\\system32\\cmd.exe", "", ".", "..", "...", ".hidden",
    "/", "////", "a/b/../../c.jpg", "Ünïcødé café.jpg", "猫と犬.png", "🐱🐶.jpeg",
    "x" * 1000 + ".jpg", "名" * 300, "name with spaces & $ymbols!.jpg", "-rf .jpg",
    "new\nline\r.jpg", "nul\x00byte.jpg", os.fsdecode(b"\xff\xfe.jpg"), "CON", "a:b*c?d.jpg",
    ".jpg", "file.tar.gz", "..\x00../x",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_safe_stem_is_bounded_ascii_without_separators(name):
    stem = safe_stem(name)
    assert stem, name
    assert stem.isascii() and SAFE.match(stem), (name, stem)
    assert "/" not in stem and "\\" not in stem and stem not in (".", "..")
    assert not stem.startswith(".") and not stem.startswith("-")
    assert len(stem) <= MAX_STEM


@pytest.mark.parametrize("name,expected", [
    ("../../etc/passwd", "passwd"),
    ("photos/IMG_0001.jpg", "IMG_0001"),
    ("C:\\Users\\me\\IMG_0002.JPG", "IMG_0002"),
    ("Ünïcode café.jpg", "Unicode_cafe"),
    ("Ünïcødé.jpg", "Unicde"),  # letters without an ASCII decomposition are dropped
    ("file.tar.gz", "file.tar"),
    ("", "image"),
    ("...", "image"),
    ("猫.jpg", "image"),
    (".hidden", "hidden"),
])
def test_safe_stem_examples(name, expected):
    assert safe_stem(name) == expected


def test_safe_stem_length_is_bounded():
    assert len(safe_stem("a" * 500 + ".jpg")) == MAX_STEM
    assert len(safe_stem("a" * 500, max_len=10)) == 10


@pytest.mark.parametrize("token", ["job.1", "20261124T140307Z-9f3a-000001", "../x", "", "..",
                                   "run 7/8", "ü.1"])
def test_safe_token_keeps_dotted_parts(token):
    out = safe_token(token)
    assert out and SAFE.match(out) and "/" not in out and out not in (".", "..")
    assert len(out) <= MAX_STEM
    assert safe_token("job.1") != safe_token("job.2")
    assert safe_token("20261124T140307Z-9f3a-000001") == "20261124T140307Z-9f3a-000001"


@pytest.fixture(scope="module")
def cam() -> np.ndarray:
    y, x = np.mgrid[0:7, 0:9]
    c = np.exp(-((x - 6) ** 2 + (y - 2) ** 2) / 4.0).astype(np.float32)
    return c / c.max()


def test_attention_gray_maps_0_to_0_and_1_to_255():
    assert (attention_gray(np.zeros((5, 5), np.float32), (20, 30)) == 0).all()
    assert (attention_gray(np.ones((5, 5), np.float32), (20, 30)) == 255).all()
    half = attention_gray(np.full((5, 5), 0.5, np.float32), (8, 8))
    assert (np.abs(half.astype(int) - 128) <= 1).all()


def test_attention_gray_size_dtype_and_peak_location(cam):
    gray = attention_gray(cam, (70, 90))
    assert gray.shape == (70, 90) and gray.dtype == np.uint8
    peak = np.unravel_index(np.argmax(gray), gray.shape)
    assert abs(peak[0] - 25) <= 8 and abs(peak[1] - 65) <= 8  # cam peak (2, 6) scaled by 10
    assert gray.min() <= 5


def test_heatmap_and_colormaps(cam):
    jet = heatmap(cam, (35, 45), "jet")
    assert jet.shape == (35, 45, 3) and jet.dtype == np.uint8
    # jet: cold is blue, hot is red (RGB order)
    cold = heatmap(np.zeros((3, 3), np.float32), (4, 4), "jet")[0, 0]
    hot = heatmap(np.ones((3, 3), np.float32), (4, 4), "jet")[0, 0]
    assert cold[2] > 100 and cold[0] < 50, cold
    assert hot[0] > 100 and hot[2] < 50, hot
    assert not np.array_equal(heatmap(cam, (35, 45), "viridis"), jet)


@pytest.mark.parametrize("name", sorted(_COLORMAPS))
def test_colorize_is_opencvs_colormap_in_rgb_order(name):
    """The cached lookup table gives exactly what cv2.applyColorMap gives, for every level."""
    import cv2

    gray = np.concatenate([np.arange(256, dtype=np.uint8),
                           np.random.default_rng(0).integers(0, 256, 44, dtype=np.uint8)])
    gray = gray.reshape(20, 15)
    expected = cv2.cvtColor(cv2.applyColorMap(gray, _COLORMAPS[name]), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(colorize(gray, name), expected)
    np.testing.assert_array_equal(colorize(gray[:1, :7], name), expected[:1, :7])


def test_overlay_blends_and_keeps_size(cam):
    rgb = photo_like(90, 70, seed=3)
    for alpha in (0.0, 0.45, 1.0):
        out = overlay(rgb, cam, alpha=alpha)
        assert out.shape == rgb.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(rgb, cam, alpha=0.0), rgb)
    np.testing.assert_array_equal(overlay(rgb, cam, alpha=1.0), heatmap(cam, (70, 90)))


def test_caption_is_written_in_the_top_left(cam):
    rgb = np.full((120, 200, 3), 128, np.uint8)
    plain = overlay(rgb, cam, alpha=0.0)
    captioned = overlay(rgb, cam, alpha=0.0, caption="dog 97.3%")
    diff = np.abs(captioned.astype(int) - plain.astype(int)).sum(axis=2)
    ys, xs = np.nonzero(diff)
    assert len(ys) > 0
    assert ys.max() < 60 and xs.min() < 20
    assert (captioned[-20:, -20:] == plain[-20:, -20:]).all()
    tiny = draw_caption(np.zeros((6, 8, 3), np.uint8), "a very long caption text")
    assert tiny.shape == (6, 8, 3)


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_pictures_have_the_right_size_and_format(tmp_path, cam, fmt, pil):
    rgb = photo_like(90, 70, seed=4)
    for kind, image in (("gray", attention_gray(cam, (70, 90))), ("heatmap", heatmap(cam, (70, 90))),
                        ("overlay", overlay(rgb, cam, caption="cat 60%"))):
        path = write_picture(tmp_path / f"x.{kind}.{fmt}", image, fmt, quality=90)
        with Image.open(path) as im:
            assert im.format == pil and im.size == (90, 70)
            if kind == "gray" and fmt != "webp":  # WebP has no grayscale mode
                assert im.mode == "L"
            else:
                assert im.mode == "RGB"
            if kind == "gray":
                arr = np.asarray(im.convert("RGB")).astype(int)
                assert np.abs(arr[..., 0] - arr[..., 2]).max() <= 8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"x.{k}.{fmt}" for k in ("gray", "heatmap", "overlay"))  # no temp files left


def test_png_pictures_are_lossless_and_rgb_order_kept(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red
    data = encode_picture(rgb, "png")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), rgb)


def test_jpeg_quality_changes_size():
    rgb = photo_like(200, 150, seed=5)
    assert len(encode_picture(rgb, "jpg", 20)) < len(encode_picture(rgb, "jpg", 95))


def test_write_picture_replaces_atomically(tmp_path):
    path = tmp_path / "p.png"
    write_picture(path, np.zeros((4, 4), np.uint8), "png")
    write_picture(path, np.full((4, 4), 255, np.uint8), "png")
    assert (np.asarray(Image.open(path)) == 255).all()
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_write_picture_leaves_no_temp_file_when_it_fails(tmp_path):
    from engine.render import write_picture

    img = np.zeros((8, 8, 3), np.uint8)
    blocked = tmp_path / "x.jpg"
    blocked.mkdir()
    (blocked / "keep").write_text("a folder where the picture should go")
    with pytest.raises(OSError):
        write_picture(blocked, img, "jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jpg"]
    done = write_picture(tmp_path / "y.png", img, "png", durable=True)
    assert done.read_bytes().startswith(b"\x89PNG")
