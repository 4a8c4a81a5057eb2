"""Folder dataset -> decoded uint8 arrays, with a pre-scan that skips unusable files.

    layout = scan_split(Path("data/train"))          # class names = sorted sub-folders
    images, labels, skipped = decode_all(layout.files, layout.labels, input_size=(224, 224),
                                         decode=settings.decode, threads=2)
    train_idx, val_idx = stratified_split(labels, fraction=0.1, seed=1337)

Decoding and resizing go through :func:`engine.decode.load_model_input`, the exact code the
engine serves with, so training sees the pixels serving sees (no train/serve skew). Files that
fail (empty, truncated, not an image, too large) raise :class:`engine.errors.ImageError`; they
are skipped and listed with the engine's error code and message.

The decoded images are kept in one uint8 array (2,000 photos at 224x224 are ~300 MB), so every
epoch after the pre-scan reads memory instead of decoding JPEGs again.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.config import DecodeSettings
from engine.decode import load_model_input
from engine.errors import ConfigError, ImageError

log = logging.getLogger(__name__)


@dataclass
class SplitLayout:
    root: Path
    class_names: tuple[str, ...]
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, c)}


@dataclass(frozen=True)
class Skipped:
    path: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "code": self.code, "message": self.message}


def _is_candidate(path: Path) -> bool:
    """Files worth pre-scanning: anything not hidden. The content decides, not the suffix,
    so ``notes.txt`` in a class folder is reported as skipped rather than silently ignored;
    only well-known non-image sidecars (Thumbs.db, .DS_Store) are left out."""
    name = path.name
    return not name.startswith(".") and name.lower() not in ("thumbs.db", "desktop.ini")


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(root: Path, class_names: Sequence[str] | None = None) -> SplitLayout:
    """List ``root/<class>/*`` (recursively inside each class folder), sorted, with labels.

    ``class_names`` forces the class list (the test split must use the training classes).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} not found; expected DIR/train/<class>/... "
                          "and DIR/test/<class>/... (one folder per class)")
    found = class_folders(root)
    names = tuple(class_names) if class_names is not None else tuple(found)
    if class_names is not None:
        missing = sorted(set(names) - set(found))
        extra = sorted(set(found) - set(names))
        if missing or extra:
            raise ConfigError(f"{root}: class folders {found} do not match the training classes "
                              f"{list(names)} (missing {missing}, unexpected {extra})")
    if len(names) < 2:
        raise ConfigError(f"{root}: found class folder(s) {list(names)}; need two or more "
                          "(one sub-folder of images per class)")
    if "uncertain" in names:
        raise ConfigError(f"{root}: a class folder is named 'uncertain', a name pawcam reserves "
                          "for low-confidence results; rename it")
    layout = SplitLayout(root=root, class_names=names)
    for label, name in enumerate(names):
        files = sorted(p for p in (root / name).rglob("*")
                       if (p.is_file() or p.is_symlink()) and _is_candidate(p))
        if not files:
            raise ConfigError(f"{root / name}: no files; every class folder needs images")
        layout.files.extend(files)
        layout.labels.extend([label] * len(files))
    return layout


def decode_all(files: Sequence[Path], labels: Sequence[int], *, input_size: tuple[int, int],
               decode: DecodeSettings, threads: int = 2, root: Path | None = None,
               ) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """Decode every file once into ``(N, H, W, 3) uint8``; unusable files are skipped.

    Returns the kept images, their labels (int64) and the skipped files in input order.
    """
    h, w = input_size
    out = np.empty((len(files), h, w, 3), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    skipped: list[Skipped] = []

    def one(i: int) -> Skipped | None:
        try:
            out[i] = load_model_input(files[i], input_size=input_size,
                                      max_pixels=decode.max_image_pixels,
                                      max_bytes=decode.max_file_bytes,
                                      reduced_jpeg=decode.reduced_jpeg,
                                      reduced_jpeg_min_side=decode.reduced_jpeg_min_side)
            ok[i] = True
            return None
        except ImageError as exc:
            return Skipped(_display(files[i], root), exc.code, str(exc))
        except Exception as exc:  # a decoder bug on a hostile file must not end training
            return Skipped(_display(files[i], root), "image_error",
                           f"unexpected decoder failure ({type(exc).__name__}: {exc})")

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, result in enumerate(pool.map(one, range(len(files)))):
            if result is not None:
                skipped.append(result)
                log.warning("skipping %s: %s (%s)", result.path, result.message, result.code)
            if (i + 1) % 500 == 0:
                log.info("decoded %d/%d images", i + 1, len(files))
    keep = np.flatnonzero(ok)
    if len(keep) == len(files):
        images = out
    else:
        images = out[keep]
        del out
    return images, np.asarray(labels, dtype=np.int64)[keep], skipped


def _display(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return os.path.relpath(path, root)
        except ValueError:
            pass
    return str(path)


def stratified_split(labels: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: (train indices, validation indices), both sorted.

    Each class gives ``round(n_c * fraction)`` images (at least one, and at least one stays in
    training) to validation.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise ConfigError(f"class {int(c)} has {len(idx)} usable image(s); need at least 2 "
                              "per class to carve a validation split")
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * fraction))))
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx
