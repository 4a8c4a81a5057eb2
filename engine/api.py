"""pawcam from Python: the shipped model in three lines, results as plain values.

    from engine.api import load
    model = load()                                  # shipped model; ONNX Runtime on a CPU
    p = model.classify("photos/cat.jpg")            # a path, bytes, an RGB array or a PIL image
    p.label, p.confidence, p.probabilities          # 'cat', 0.991, {'cat': 0.991, 'dog': 0.009}
    p.cam                                           # (7, 7) float32 Grad-CAM map in [0, 1]
    p.pictures()["overlay"]                         # (h, w, 3) uint8 RGB, as pawcam writes it
    p.image("overlay")                              # the same as a PIL image (shows in notebooks)

    for p in model.classify_many(paths):            # streamed in batches, in order
        print(p.source, p.label if p.ok else p.error)

Everything goes through the engine's own pieces: the same decode path as training and serving
(:mod:`engine.decode`), the same runtimes (:mod:`engine.runtime`), the same pipeline for files
(:mod:`engine.pipeline`), the same pictures (:mod:`engine.render`). A file pawcam cannot read is a
:class:`~engine.errors.ImageError` from :meth:`Pawcam.classify` and a ``Prediction`` with
``ok == False`` and an ``error`` message from :meth:`Pawcam.classify_many`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np

from engine.classifier import Classifier, Job, decide, format_confidence
from engine.config import Settings, load_settings, replace
from engine.decode import DecodedImage, decode_image, decode_limits, resize_to
from engine.errors import ImageError
from engine.pipeline import Pipeline
from engine.render import pictures as render_pictures

ImageLike = Union[str, Path, bytes, np.ndarray, Any]  # Any: a PIL.Image.Image
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "cat_dog_model.keras"


@dataclass
class Prediction:
    """One image's answer. ``cam`` and ``preview`` are present when Grad-CAM is on."""

    source: str
    label: str = ""
    confidence: float = 0.0
    probabilities: dict[str, float] = field(default_factory=dict)
    cam: np.ndarray | None = None
    preview: np.ndarray | None = field(default=None, repr=False)
    error: str = ""
    _style: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.error

    def pictures(self) -> dict[str, np.ndarray]:
        """The gray map, heatmap and overlay (with its caption) as uint8 arrays."""
        if self.cam is None or self.preview is None:
            raise ValueError("no Grad-CAM map for this prediction (Grad-CAM off, or an error)")
        caption = f"{self.label} {format_confidence(self.confidence)}"
        return render_pictures(self.preview, self.cam, ("gray", "heatmap", "overlay"),
                               caption=caption, **self._style)

    def image(self, kind: str = "overlay"):
        """One picture as a PIL image: ``"gray"``, ``"heatmap"`` or ``"overlay"``."""
        from PIL import Image

        return Image.fromarray(self.pictures()[kind])


class Pawcam:
    """A loaded model with pawcam's decode, runtime, Grad-CAM and pictures."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.classifier = Classifier.from_settings(settings)
        self.meta = self.classifier.meta
        g = settings.gradcam
        self._style = {"alpha": g.overlay_alpha, "colormap": g.colormap}
        self._maps = bool(g.active_outputs)

    @property
    def runtime(self) -> str:
        """What runs the model, e.g. ``"onnxruntime int8 (CPU, cat_dog_model.int8.onnx)"``."""
        return self.classifier.runtime.describe()

    def classify(self, image: ImageLike) -> Prediction:
        """One image: a path, encoded bytes, an (H, W, 3) uint8 RGB array or a PIL image."""
        return self._predict([self._decode(image)], [_name(image)])[0]

    def classify_many(self, images: Iterable[ImageLike]) -> Iterator[Prediction]:
        """Many images, lazily, in batches of ``[inference] batch_size``; files are decoded on
        the engine's pipeline; unreadable files give ``ok == False`` predictions."""
        batch = self.settings.inference.batch_size
        it = iter(images)
        while chunk := list(islice(it, batch)):
            if all(isinstance(x, (str, Path)) for x in chunk):
                yield from self._files(chunk)
                continue
            decoded: list[DecodedImage | ImageError] = []
            for x in chunk:
                try:
                    decoded.append(self._decode(x))
                except ImageError as exc:
                    decoded.append(exc)
            yield from self._predict(decoded, [_name(x) for x in chunk])

    # -- inside -------------------------------------------------------------------------
    def _files(self, paths: list[str | Path]) -> list[Prediction]:
        jobs = [Job(Path(p), str(p), f"api-{i}", follow_symlinks=True) for i, p in enumerate(paths)]

        def finish(job: Job, image: DecodedImage, probs: np.ndarray, cam: np.ndarray | None):
            return self._prediction(job.input_path, image, probs, cam)

        def failed(job: Job, exc: Exception) -> Prediction:
            return Prediction(job.input_path, error=str(exc))

        with Pipeline(self.classifier, finish=finish, on_error=failed) as pipe:
            return [p for _, records in pipe.run([jobs]) for p in records]

    def _predict(self, decoded: list[DecodedImage | ImageError], names: list[str]
                 ) -> list[Prediction]:
        good = [d for d in decoded if isinstance(d, DecodedImage)]
        probs, cams = self.classifier.infer(good) if good else (None, None)
        out, k = [], 0
        for name, d in zip(names, decoded):
            if isinstance(d, DecodedImage):
                out.append(self._prediction(name, d, probs[k], None if cams is None else cams[k]))
                k += 1
            else:
                out.append(Prediction(name, error=str(d)))
        return out

    def _prediction(self, name: str, image: DecodedImage, probs: np.ndarray,
                    cam: np.ndarray | None) -> Prediction:
        index = int(self.meta.predicted_indices(probs[None, :])[0])
        label, confidence = decide(probs, index, self.meta.class_names,
                                   self.settings.inference.uncertain_below)
        preview = image.preview if image.preview is not None else image.model_input
        return Prediction(name, label, confidence,
                          {n: float(p) for n, p in zip(self.meta.class_names, probs)},
                          cam, preview if cam is not None else None, _style=self._style)

    def _decode(self, image: ImageLike) -> DecodedImage:
        d = self.settings.decode
        preview_side = self.settings.gradcam.max_side if self._maps else None
        if isinstance(image, (str, Path)):
            return self.classifier.decode(Job(Path(image), str(image), "api",
                                              follow_symlinks=True))
        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        elif isinstance(image, np.ndarray):
            return _from_array(image, self.meta.input_size, preview_side)
        elif hasattr(image, "save"):  # a PIL image: through the same decode path as files
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        else:
            raise TypeError(f"cannot classify a {type(image).__name__}: pass a path, bytes, an "
                            "(H, W, 3) uint8 RGB array or a PIL image")
        return decode_image(data, input_size=self.meta.input_size,
                            preview_max_side=preview_side, **decode_limits(d))


def _from_array(rgb: np.ndarray, input_size: tuple[int, int], preview_side: int | None
                ) -> DecodedImage:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"an array must be (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    preview = None
    if preview_side:
        scale = min(1.0, preview_side / max(h, w))
        preview = resize_to(rgb, (max(1, round(h * scale)), max(1, round(w * scale))))
    return DecodedImage(resize_to(rgb, input_size), preview, w, h, sha256="")


def _name(image: ImageLike) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"


def load(model: str | Path | None = None, *, runtime: str = "auto", precision: str = "auto",
         pictures: bool = True, config: str | Path | None = None) -> Pawcam:
    """Load a model for classifying from Python.

    ``model``: a ``.keras`` path (default: ``[model] path`` of ``config``, else the shipped
    model); ``runtime``/``precision`` as in config.toml's ``[inference]``; ``pictures=False``
    skips Grad-CAM (faster).
    """
    settings = load_settings(config) if config else load_settings(None)
    path = Path(model) if model else (settings.model.path if config else SHIPPED_MODEL)
    inference = replace(settings.inference, runtime=runtime, precision=precision)
    inference.validate("engine.api.load")
    settings = replace(settings, model=replace(settings.model, path=path), inference=inference,
                       gradcam=replace(settings.gradcam, enabled=pictures))
    return Pawcam(settings)
