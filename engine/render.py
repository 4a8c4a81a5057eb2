"""Grad-CAM pictures: pure functions from arrays to arrays, plus one safe writer.

    gray = attention_gray(cam, size=(h, w))            # (h, w) uint8
    heat = heatmap(cam, size=(h, w), colormap="jet")   # (h, w, 3) RGB uint8
    over = overlay(rgb, cam, alpha=0.45, caption="dog 97.3%")
    write_picture(path, over, fmt="jpg", quality=90)  # atomic: temp file + rename
    PictureOptions.from_settings(settings.gradcam)     # which pictures, and their look

:class:`PictureOptions` is where the pictures' look is decided (from ``[gradcam]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from engine.config import GRADCAM_OUTPUTS, GradcamSettings
from engine.durable import write_atomic

_COLORMAPS = {
    "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA, "viridis": cv2.COLORMAP_VIRIDIS, "plasma": cv2.COLORMAP_PLASMA,
    "hot": cv2.COLORMAP_HOT, "bone": cv2.COLORMAP_BONE, "parula": cv2.COLORMAP_PARULA,
}


@dataclass(frozen=True)
class PictureOptions:
    """Which Grad-CAM pictures a classifier writes, and how they look.

        PictureOptions.from_settings(settings.gradcam)         # what config.toml says
        PictureOptions(outputs=("overlay",), max_side=256)     # small overlays only
        PictureOptions(outputs=())                             # no pictures, no maps
    """

    #: the pictures to write, of ``gray``, ``heatmap``, ``overlay``; () for none
    outputs: tuple[str, ...] = GRADCAM_OUTPUTS
    #: longest side of the photo the pictures are drawn on
    max_side: int = 512
    format: str = "jpg"
    jpeg_quality: int = 90
    overlay_alpha: float = 0.45
    colormap: str = "jet"
    #: caption the overlay with the label and confidence
    annotate: bool = True

    @classmethod
    def from_settings(cls, gradcam: GradcamSettings) -> "PictureOptions":
        """The ``[gradcam]`` section's picture keys (none when ``enabled = false``)."""
        return cls(outputs=gradcam.active_outputs, max_side=gradcam.max_side,
                   format=gradcam.format, jpeg_quality=gradcam.jpeg_quality,
                   overlay_alpha=gradcam.overlay_alpha, colormap=gradcam.colormap,
                   annotate=gradcam.annotate)


def _upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    return cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def attention_gray(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CAM in [0, 1] upsampled to ``size`` (h, w) as 8-bit grayscale (white = attention).

    Scaled to 0-255 (+0.5 for rounding) before the bicubic upsampling, whose weights sum to one,
    so the big array needs one clip and one conversion only.
    """
    up = _upsample(np.asarray(cam, np.float32) * 255.0 + 0.5, size)
    return np.clip(up, 0, 255, out=up).astype(np.uint8)


@lru_cache(maxsize=None)
def colormap_table(colormap: str) -> np.ndarray:
    """OpenCV's ``colormap`` as a (256, 1, 3) RGB lookup table (read-only).

    ``cv2.applyColorMap(gray, COLORMAP_JET)`` rebuilds this table on every call and returns
    BGR; a lookup in the table built once gives the same pixels in RGB at half the cost.
    """
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    table = np.ascontiguousarray(cv2.applyColorMap(ramp, _COLORMAPS[colormap])[:, :, ::-1])
    table.setflags(write=False)
    return table


def colorize(gray: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """An 8-bit attention map colored with ``colormap``: RGB uint8."""
    return cv2.applyColorMap(gray, colormap_table(colormap))


def heatmap(cam: np.ndarray, size: tuple[int, int], colormap: str = "jet") -> np.ndarray:
    """CAM upsampled to ``size`` and colored: RGB uint8."""
    return colorize(attention_gray(cam, size), colormap)


def blend(rgb: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45, caption: str = ""
          ) -> np.ndarray:
    """A colored map ``heat`` over ``rgb`` (same size), ``caption`` at the top left."""
    blended = cv2.addWeighted(rgb, 1.0 - alpha, heat, alpha, 0.0)
    if caption:
        blended = draw_caption(blended, caption)
    return blended


def overlay(rgb: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45, colormap: str = "jet",
            caption: str = "") -> np.ndarray:
    """Blend the colored CAM over ``rgb`` (same size) and write ``caption`` at the top left."""
    return blend(rgb, heatmap(cam, rgb.shape[:2], colormap), alpha=alpha, caption=caption)


def pictures(rgb: np.ndarray, cam: np.ndarray, kinds: tuple[str, ...], *, alpha: float = 0.45,
             colormap: str = "jet", caption: str = "") -> dict[str, np.ndarray]:
    """The requested pictures of one photo, sharing one upsampled map and one colored map.

    ``pictures(rgb, cam, ("gray", "heatmap", "overlay"))`` equals calling
    :func:`attention_gray`, :func:`heatmap` and :func:`overlay` one by one, at a third of the
    resize and colormap work.
    """
    gray = attention_gray(cam, rgb.shape[:2])
    out: dict[str, np.ndarray] = {}
    heat = colorize(gray, colormap) if {"heatmap", "overlay"} & set(kinds) else None
    for kind in kinds:
        if kind == "gray":
            out[kind] = gray
        elif kind == "heatmap":
            out[kind] = heat
        elif kind == "overlay":
            out[kind] = blend(rgb, heat, alpha=alpha, caption=caption)
        else:
            raise ValueError(f"unknown picture kind {kind!r}")
    return out


def draw_caption(rgb: np.ndarray, caption: str) -> np.ndarray:
    """White text on a dark band, scaled to the picture's width."""
    out = rgb.copy()
    h, w = out.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (unit_w, _), _ = cv2.getTextSize(caption, font, 1.0, 2)
    # As large as 1/640 of the width allows, shrunk further until the caption fits.
    scale = max(0.25, min(1.2, w / 640.0, 0.9 * w / max(unit_w, 1)))
    thickness = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(caption, font, scale, thickness)
    pad = max(2, round(6 * scale))
    band_h = min(h, th + base + 2 * pad)
    band_w = min(w, tw + 2 * pad)
    out[:band_h, :band_w] = (out[:band_h, :band_w] * 0.35).astype(np.uint8)
    cv2.putText(out, caption, (pad, pad + th), font, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    return out


def encode_picture(image: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """RGB or grayscale uint8 array to JPEG/PNG/WEBP bytes."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params: list[int] = []
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ok, buf = cv2.imencode("." + fmt, image, params)
    if not ok:  # pragma: no cover - OpenCV failing on a valid uint8 array
        raise RuntimeError(f"OpenCV could not encode a {fmt} picture")
    return buf.tobytes()


def write_picture(path: Path, image: np.ndarray, fmt: str, quality: int = 90,
                  durable: bool = False) -> Path:
    """Encode and write atomically (temp file + rename): a reader never sees half a picture.

    ``durable`` fsyncs the data before the rename (the daemon's pictures must survive a power
    cut once their row is committed); bulk runs leave it off (one fsync per picture would cost
    more than the picture). The temp file never stays behind on failure
    (:func:`engine.durable.write_atomic`). The folder is not fsync'ed here: the daemon does
    that once per batch, before its commit.
    """
    return write_atomic(path, encode_picture(image, fmt, quality), durable=durable,
                        sync_folder=False)
