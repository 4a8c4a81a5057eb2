"""Training data: folders -> file lists with labels, the pre-scan skip list, the split.

    data = scan_sources([Path("../shared/dataset"), Path("../shared/dataset-extra")])
    data.class_names, len(data.files), data.test_dir      # every root's train/, one test/
    train_idx, val_idx = stratified_split(labels, fraction=0.1, seed=1337)

The files listed here are decoded once into an on-disk cache by :mod:`training.photos`.

**Symbolic links.** A training set is the user's own choice, often assembled with links to
photos kept elsewhere, so inside the data folders named with ``--data`` links are followed:
links to files are read (wherever they point), links to folders are walked (each real folder
once). A file reached twice is used once; a training file that is also a test photo is left
out of training. The daemon's inbox and the served path never follow links.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import ConfigError

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
        files = walk_files(root / name)
        if not files:
            raise ConfigError(f"{root / name}: no files; every class folder needs images")
        layout.files.extend(files)
        layout.labels.extend([label] * len(files))
    return layout


def walk_files(folder: Path) -> list[Path]:
    """Every candidate file under ``folder``, sorted; symbolic links are followed.

    Links to folders are walked like folders (each real folder once, so a link loop ends),
    links to files are listed like files (a broken link is listed too and then reported by
    the decoder). Hidden files and folders are left out.
    """
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [Path(folder)]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            entries = list(os.scandir(d))
        except OSError as exc:
            log.warning("cannot list %s: %s", d, exc.strerror or exc)
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(Path(entry.path))
            elif _is_candidate(Path(entry.name)):
                out.append(Path(entry.path))
    return sorted(out)


@dataclass
class SourceInfo:
    """One data folder the user named, with what it contributed (for the model card)."""
    root: Path
    train_counts: dict[str, int]
    test_counts: dict[str, int] | None = None
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "train_files": self.train_counts,
                "test_files": self.test_counts, "skipped": self.skipped}


@dataclass
class TrainingData:
    """The training files of every source (in source order) and the one test folder."""
    class_names: tuple[str, ...]
    files: list[Path]
    labels: np.ndarray            # int64, per file
    origin: np.ndarray            # int32, index into ``sources`` per file
    stamps: list[tuple[int, int]]  # (size, mtime_ns) per file, for the cache key
    test_dir: Path
    test_layout: SplitLayout
    sources: list[SourceInfo]
    skipped: list[Skipped]        # duplicates found while listing


def scan_sources(roots: Sequence[Path]) -> TrainingData:
    """List ``ROOT/train/<class>/`` of every root and the ``test/`` split of the one that has it.

    Raises ConfigError when a root lacks ``train/``, when the class folders differ between
    roots, or when not exactly one root holds ``test/``. A photo reached twice (two links to
    the same file, or a training photo that is also a test photo) is used once: a duplicate in
    training is skipped and listed, and a training photo that is a test photo is dropped from
    training (no leak of test photos into training).
    """
    roots = [Path(r).resolve() for r in roots]
    if not roots:
        raise ConfigError("no data folder given; pass --data DIR (repeatable)")
    for r in roots:
        if not (r / "train").is_dir():
            raise ConfigError(f"{r}: no train/ folder; every --data DIR needs DIR/train/<class>/ "
                              "(and one of them DIR/test/<class>/)")
    with_test = [r for r in roots if (r / "test").is_dir()]
    if not with_test:
        raise ConfigError(f"no test/ folder in {', '.join(str(r) for r in roots)}; put held-out "
                          "photos in DIR/test/<class>/ (same class folders as train/) so the "
                          "model can be evaluated")
    if len(with_test) > 1:
        raise ConfigError(f"several data folders hold a test/ split ({', '.join(map(str, with_test))}); "
                          "pawcam evaluates on one test folder: merge them, or keep test/ in one "
                          "folder only")
    names: tuple[str, ...] | None = None
    layouts = []
    for r in roots:
        layout = scan_split(r / "train", names)
        if names is None:
            names = layout.class_names
        layouts.append(layout)
    assert names is not None
    test_dir = with_test[0] / "test"
    test_layout = scan_split(test_dir, names)
    seen: dict[tuple[int, int], str] = {}
    for f in test_layout.files:
        try:
            st = f.stat()
            seen[(st.st_dev, st.st_ino)] = f"the test photo {_display(f, test_dir.parent.parent)}"
        except OSError:
            pass
    files: list[Path] = []
    labels: list[int] = []
    origin: list[int] = []
    stamps: list[tuple[int, int]] = []
    skipped: list[Skipped] = []
    sources: list[SourceInfo] = []
    for k, (r, layout) in enumerate(zip(roots, layouts)):
        info = SourceInfo(r, layout.counts(),
                          test_layout.counts() if r == with_test[0] else None)
        for f, label in zip(layout.files, layout.labels):
            display = _display(f, r.parent)
            try:
                st = f.stat()
            except OSError:
                st = None  # broken link or vanished: the decoder reports it
            if st is not None:
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    skipped.append(Skipped(display, "duplicate",
                                           f"same file as {seen[ident]} (reached twice, e.g. "
                                           "through symbolic links); used once"))
                    info.skipped += 1
                    continue
                seen[ident] = display
            files.append(f)
            labels.append(label)
            origin.append(k)
            stamps.append((st.st_size, st.st_mtime_ns) if st is not None else (-1, -1))
        sources.append(info)
    return TrainingData(names, files, np.asarray(labels, np.int64), np.asarray(origin, np.int32),
                        stamps, test_dir, test_layout, sources, skipped)


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
