"""The model on disk: a ``.keras`` file plus a metadata JSON beside it.

    models/cat_dog_model.keras   the Keras 3 model; takes raw RGB 0-255, returns probabilities
    models/cat_dog_model.json    ModelMeta: class names, input size, threshold, temperature, ...

    loaded = load_model("models/cat_dog_model.keras")
    loaded.meta.class_names          # ['cat', 'dog']
    loaded.model(batch_uint8_as_float32)

Two classes use one sigmoid unit (probability of ``class_names[1]``); more classes use a softmax.
The last layer must be a ``Dense`` layer (or an ``Activation`` after one): its pre-activation
outputs are the logits that calibration and Grad-CAM work on. Models are always loaded with
Keras safe mode on, so a ``.keras`` file cannot run arbitrary Python code (Lambda layers).
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.durable import atomic_path, write_atomic
from engine.errors import ModelLoadError

log = logging.getLogger(__name__)

META_FORMAT = "pawcam-model/1"
#: the only preprocessing contract: the model takes RGB pixels in [0, 255] as float32
PREPROCESSING = "rgb_0_255"

HOW_TO_GET_A_MODEL = (
    "train one with `pawcam train --data DIR` or restore the shipped one with "
    "`git checkout -- models/`, then point [model] path in config.toml at it"
)


@dataclass(frozen=True)
class ModelMeta:
    """Everything the engine needs to know about a model besides its weights."""

    class_names: tuple[str, ...]
    input_size: tuple[int, int] = (224, 224)  # (height, width)
    preprocessing: str = PREPROCESSING
    #: binary models: predict class_names[1] when its calibrated probability >= threshold
    threshold: float = 0.5
    #: calibrated probability = activation(logits / temperature)
    temperature: float = 1.0
    version: str = "unversioned"
    #: default Grad-CAM layer recorded at training time ("" = find automatically)
    target_layer: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = META_FORMAT
    #: sha256 of the .keras file this metadata belongs to ("" = not recorded): a model and
    #: metadata replaced in two steps and interrupted in between are caught at load time
    model_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        return len(self.class_names) == 2

    def predicted_indices(self, probs: Any) -> Any:
        """Predicted class index per row of calibrated probabilities (N, C).

        Binary models compare ``P(class_names[1])`` with ``threshold``; others take the argmax.
        Grad-CAM explains exactly this class.
        """
        import numpy as np

        probs = np.asarray(probs)
        if self.binary:
            return (probs[:, 1] >= self.threshold).astype(np.int64)
        return np.argmax(probs, axis=1)

    def validate(self, where: str) -> None:
        names = self.class_names
        if len(names) < 2 or len(set(names)) != len(names) or not all(
                isinstance(n, str) and n.strip() for n in names):
            raise ModelLoadError(f"{where}: class_names must be two or more distinct, non-empty "
                                 f"names, got {list(names)!r}")
        if "uncertain" in names:
            raise ModelLoadError(f"{where}: 'uncertain' is reserved for low-confidence results; "
                                 "rename that class")
        h, w = self.input_size
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise ModelLoadError(f"{where}: input_size {self.input_size} is out of range")
        if self.preprocessing != PREPROCESSING:
            raise ModelLoadError(f"{where}: preprocessing {self.preprocessing!r} is not supported; "
                                 f"pawcam models take raw RGB ({PREPROCESSING!r}) and scale inside")
        if not 0.0 < self.threshold < 1.0:
            raise ModelLoadError(f"{where}: threshold must be in (0, 1), got {self.threshold}")
        if not self.temperature > 0.0:
            raise ModelLoadError(f"{where}: temperature must be > 0, got {self.temperature}")

    def to_json(self) -> str:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["input_size"] = list(self.input_size)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelMeta:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(f"{where}: unknown metadata key(s) {unknown}")
        if "class_names" not in data:
            raise ModelLoadError(f"{where}: metadata lacks class_names")
        try:
            data = dict(data)
            data["class_names"] = tuple(data["class_names"])
            if "input_size" in data:
                h, w = data["input_size"]
                data["input_size"] = (int(h), int(w))
            for key in ("threshold", "temperature"):
                if key in data:
                    data[key] = float(data[key])
            meta = cls(**data)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: malformed metadata ({exc})") from exc
        if meta.format != META_FORMAT:
            raise ModelLoadError(f"{where}: metadata format {meta.format!r} is not {META_FORMAT!r}")
        meta.validate(where)
        return meta


@dataclass
class LoadedModel:
    model: Any  # keras.Model
    meta: ModelMeta
    path: Path


def meta_path_for(model_path: str | Path) -> Path:
    """``models/x.keras`` -> ``models/x.json``."""
    return Path(model_path).with_suffix(".json")


def read_meta(model_path: str | Path) -> ModelMeta:
    path = meta_path_for(model_path)
    if not path.is_file():
        raise ModelLoadError(f"model metadata {path} not found (it must sit beside the model); "
                             + HOW_TO_GET_A_MODEL)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model metadata {path} is not valid JSON ({exc}); "
                             + HOW_TO_GET_A_MODEL) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"model metadata {path} must be a JSON object")
    return ModelMeta.from_dict(data, str(path))


def load_model(model_path: str | Path) -> LoadedModel:
    """Load ``model_path`` (.keras, safe mode) and its metadata; check they agree."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelLoadError(f"model file {model_path} not found; " + HOW_TO_GET_A_MODEL)
    if model_path.suffix != ".keras" or not zipfile.is_zipfile(model_path):
        raise ModelLoadError(f"{model_path} is not a Keras 3 `.keras` archive; "
                             + HOW_TO_GET_A_MODEL)
    meta = read_meta(model_path)
    if meta.model_sha256 and file_sha256(model_path) != meta.model_sha256:
        raise ModelLoadError(f"{model_path} and its metadata {meta_path_for(model_path)} do not "
                             "belong together (an interrupted install or a hand-copied file?); "
                             "copy both files from the same training run, or "
                             + HOW_TO_GET_A_MODEL)
    import keras  # heavy import kept off the module import path

    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many types for a corrupt archive
        raise ModelLoadError(f"cannot load {model_path} ({type(exc).__name__}: {exc}); "
                             + HOW_TO_GET_A_MODEL) from exc
    _check_agreement(model, meta, model_path)
    log.info("loaded model %s (version %s, classes %s)", model_path, meta.version,
             ", ".join(meta.class_names))
    return LoadedModel(model=model, meta=meta, path=model_path)


def _check_agreement(model: Any, meta: ModelMeta, where: Path) -> None:
    in_shape = tuple(model.inputs[0].shape)
    if len(in_shape) != 4 or in_shape[-1] != 3:
        raise ModelLoadError(f"{where}: model input must be (batch, H, W, 3), got {in_shape}")
    if in_shape[1:3] != (None, None) and tuple(in_shape[1:3]) != meta.input_size:
        raise ModelLoadError(f"{where}: model input {in_shape[1:3]} disagrees with metadata "
                             f"input_size {meta.input_size}")
    units = model.outputs[0].shape[-1]
    expected = 1 if meta.binary else meta.num_classes
    if units != expected:
        raise ModelLoadError(f"{where}: model has {units} output unit(s) but metadata lists "
                             f"{meta.num_classes} classes (expected {expected} unit(s))")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: Any, meta: ModelMeta, model_path: str | Path) -> Path:
    """Write ``model_path`` (.keras) and its metadata JSON; return the model path.

    Each file is replaced atomically and durably (:mod:`engine.durable`); the metadata records
    the model file's sha256, so a crash between the two replaces is detected by
    :func:`load_model` instead of pairing a new model with an old temperature and threshold.
    """
    model_path = Path(model_path)
    if model_path.suffix != ".keras":
        raise ValueError(f"model path must end in .keras, got {model_path}")
    meta.validate(str(model_path))
    _check_agreement(model, meta, model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # both files complete before either is renamed (the model first, then its metadata)
    with atomic_path(meta_path_for(model_path)) as tmp_meta, \
            atomic_path(model_path, keep_suffix=True) as tmp_model:  # Keras wants ".keras"
        model.save(tmp_model)
        meta = replace(meta, model_sha256=file_sha256(tmp_model))
        tmp_meta.write_text(meta.to_json(), encoding="utf-8")
    return model_path


def write_meta(model_path: str | Path, meta: ModelMeta) -> Path:
    """Replace the metadata JSON beside ``model_path`` atomically and durably."""
    return write_atomic(meta_path_for(model_path), meta.to_json().encode("utf-8"))
