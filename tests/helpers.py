"""Test fixtures made on the fly: tiny real Keras models and real image files."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_model(class_names: Sequence[str] = ("cat", "dog"), size: int = 32, seed: int = 0,
               nested: bool = False):
    """A real, deterministic conv net: Rescaling -> conv -> conv("last_conv") -> GAP -> Dense.

    ``nested=True`` wraps the convolutional part in a sub-model (the "Graph disconnected"
    layout of many transfer-learning notebooks).
    """
    import keras

    keras.utils.set_random_seed(seed)
    units = 1 if len(class_names) == 2 else len(class_names)
    activation = "sigmoid" if units == 1 else "softmax"

    def backbone(x):
        x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(x)
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(x)
        return keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)

    inputs = keras.Input((size, size, 3), name="image")
    if nested:
        bb_in = keras.Input((size, size, 3))
        inner = keras.Model(bb_in, backbone(bb_in), name="backbone")
        x = inner(inputs)
    else:
        x = backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(units, activation=activation, name="head")(x)
    return keras.Model(inputs, outputs, name="tiny")


def save_tiny_model(folder: Path, class_names: Sequence[str] = ("cat", "dog"), size: int = 32,
                    nested: bool = False, **meta_fields) -> Path:
    """Build, save (.keras + metadata JSON) and return the model path."""
    from engine.modelio import ModelMeta, save_model

    model = tiny_model(class_names, size=size, nested=nested)
    meta = ModelMeta(class_names=tuple(class_names), input_size=(size, size),
                     version="tiny-test-1", **meta_fields)
    return save_model(model, meta, Path(folder) / "tiny.keras")


def photo_like(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def image_bytes(fmt: str = "JPEG", width: int = 64, height: int = 48, seed: int = 0,
                mode: str = "RGB", **save_kwargs) -> bytes:
    img = Image.fromarray(photo_like(width, height, seed))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def write_image(path: Path, fmt: str = "JPEG", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(fmt, **kwargs))
    return path


def fill_fs(folder: Path, leave_bytes: int, name: str = "filler.bin") -> Path:
    """Fill the file system of ``folder`` with one file until about ``leave_bytes`` are free."""
    import os

    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    path = folder / name
    with open(path, "ab") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return path


def sigkill_once_rows(proc, csv_path: Path, rows: int, timeout: float = 120) -> None:
    """SIGKILL ``proc`` once ``csv_path`` holds more than ``rows`` lines (CRLF-terminated
    records), or at ``timeout``; waits for it to die."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.exists() and csv_path.read_bytes().count(b"\r\n") > rows:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
