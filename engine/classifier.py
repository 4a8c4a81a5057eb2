"""Files in, results out: decode, batched inference with Grad-CAM, pictures, result rows.

    clf = Classifier.from_settings(settings)        # opens the runtime [inference] asks for
    clf = Classifier(runtime, PictureOptions(outputs=("overlay",)), uncertain_below=0.6)
    jobs = [Job(Path("a.jpg"), "a.jpg", "run1-000001")]
    results = clf.process(jobs, out_dir=Path("outbox"))
    ResultsCsv(out_dir / "results.csv", clf.meta.class_names).append(results)

The three stages are public so that the one pipeline (:mod:`engine.pipeline`) can overlap them:
:meth:`Classifier.decode` (thread-safe), :meth:`Classifier.infer` (one batch on the runtime:
ONNX Runtime or TensorFlow, see :mod:`engine.runtime`) and :meth:`Classifier.finish` (pictures +
row, thread-safe). A bad file never raises out of :meth:`process`: it becomes an ``error``
result with a clear message.

``Job.input_path`` is the input as the user names it (see :mod:`engine.results` for why every
layer uses that one name); ``Job.source`` is the file actually read (in the daemon, the claimed
file in the processing area).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.config import DecodeSettings, InferenceSettings, Settings
from engine.decode import DecodedImage, decode_image, decode_limits, read_file_bytes
from engine.errors import ImageError, is_storage_fault
from engine.modelio import LoadedModel
from engine.render import PictureOptions, pictures, write_picture
from engine.results import STATUS_ERROR, UNCERTAIN, Result
from engine.runtime import Runtime, open_runtime
from engine.text import safe_stem, safe_token

log = logging.getLogger(__name__)

PICTURES_DIR = "gradcam"


@dataclass(frozen=True)
class Job:
    """One input file to classify."""

    source: Path            # the file to read
    input_path: str         # how the input is shown: the CSV's input_path (engine.results)
    job_id: str             # unique id: part of picture names, recorded in the CSV
    follow_symlinks: bool = False


def picture_name(job: Job, kind: str, fmt: str) -> str:
    """``IMG_0001.jpg`` + job ``r1-000007`` -> ``IMG_0001.r1-000007.overlay.jpg`` (never collides)."""
    return f"{safe_stem(job.input_path)}.{safe_token(job.job_id)}.{kind}.{fmt}"


def decide(probs: np.ndarray, index: int, class_names: Sequence[str],
           uncertain_below: float) -> tuple[str, float]:
    """Label and confidence for one row; a confidence under the band gives ``uncertain``."""
    confidence = float(probs[index])
    label = class_names[index] if confidence >= uncertain_below else UNCERTAIN
    return label, confidence


def format_confidence(confidence: float) -> str:
    """``0.9731`` -> ``97.3%``; never claims certainty: ``0.99997`` -> ``>99.9%``."""
    return ">99.9%" if confidence > 0.999 else f"{confidence:.1%}"


class Classifier:
    """A runtime (the model) plus what it takes to turn files into rows: decode limits, the
    pictures to write (:class:`~engine.render.PictureOptions`), the uncertainty band, and the
    batch size and threads of :meth:`process`.

    :meth:`from_settings` builds one from ``config.toml``'s settings and opens the runtime
    ``[inference]`` asks for (see :func:`engine.runtime.open_runtime`).
    """

    def __init__(self, runtime: Runtime, pictures: PictureOptions = PictureOptions(),
                 decode: DecodeSettings = DecodeSettings(),
                 uncertain_below: float = InferenceSettings.uncertain_below,
                 batch_size: int = InferenceSettings.batch_size, threads: int | None = None) -> None:
        self.runtime = runtime
        self.meta = runtime.meta
        #: the Keras model when serving with TensorFlow (None under ONNX Runtime)
        self.loaded: LoadedModel | None = getattr(runtime, "loaded", None)
        self.pictures = pictures
        self.decode_limits = decode
        self.uncertain_below = uncertain_below
        self.batch_size = batch_size
        #: threads that decode files and write pictures (default: one per usable CPU core)
        self.threads = threads or InferenceSettings().threads

    @classmethod
    def from_settings(cls, settings: Settings, *, loaded: LoadedModel | None = None,
                      runtime: Runtime | None = None,
                      pictures: PictureOptions | None = None) -> "Classifier":
        """The classifier ``settings`` describe. Opens the runtime ``[inference]`` asks for,
        unless ``runtime=`` shares one or ``loaded=`` (a Keras model in memory) is to be served
        with TensorFlow; ``pictures`` replaces ``[gradcam]``'s picture options."""
        pictures = pictures or PictureOptions.from_settings(settings.gradcam)
        if runtime is None and loaded is not None:
            from engine.runtime_tf import TfRuntime

            runtime = TfRuntime(loaded, settings)
        runtime = runtime or open_runtime(settings, need_maps=bool(pictures.outputs))
        inference = settings.inference
        return cls(runtime, pictures, settings.decode, uncertain_below=inference.uncertain_below,
                   batch_size=inference.batch_size, threads=inference.threads)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The pictures written for each input (() for none: no maps are computed)."""
        return self.pictures.outputs

    # -- stage 1: decode (threads) --------------------------------------------------------
    def decode(self, job: Job) -> DecodedImage:
        """Read and decode ``job.source``; raises :class:`ImageError` with a clear message."""
        d = self.decode_limits
        data = read_file_bytes(job.source, max_bytes=d.max_file_bytes,
                               follow_symlinks=job.follow_symlinks)
        return decode_image(data, input_size=self.meta.input_size,
                            preview_max_side=self.pictures.max_side if self.outputs else None,
                            **decode_limits(d))

    def try_decode(self, job: Job) -> DecodedImage | ImageError:
        try:
            return self.decode(job)
        except ImageError as exc:
            return exc
        except MemoryError:
            return ImageError("not enough memory to decode this image")
        except Exception as exc:  # a decoder bug on hostile input must not end the run
            log.exception("unexpected error decoding %s", job.input_path)
            return ImageError(f"unexpected decoder failure ({type(exc).__name__}: {exc})")

    # -- stage 2: inference (device) ------------------------------------------------------
    def infer(self, images: Sequence[DecodedImage]) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) and, when pictures are wanted, CAMs (N, h, w)."""
        batch = np.stack([im.model_input for im in images])
        return self.runtime.run(batch, maps=bool(self.outputs))

    # -- stage 3: pictures and the row (threads) ------------------------------------------
    def finish(self, job: Job, image: DecodedImage, probs: np.ndarray, cam: np.ndarray | None,
               out_dir: Path, durable: bool = False) -> Result:
        """The row for one decoded image, writing its pictures (fsync'ed if ``durable``).
        A storage fault (disk full, read-only, ...: :func:`engine.errors.is_storage_fault`)
        raises instead of becoming an ``error`` row."""
        index = int(self.meta.predicted_indices(probs[None, :])[0])
        label, confidence = decide(probs, index, self.meta.class_names, self.uncertain_below)
        result = Result(
            input_path=job.input_path, job_id=job.job_id, label=label, confidence=confidence,
            probabilities={n: float(p) for n, p in zip(self.meta.class_names, probs)},
            width=image.width, height=image.height, model_version=self.meta.version,
            sha256=image.sha256,
        )
        if cam is not None and self.outputs:
            try:
                result.pictures = self._write_pictures(job, image, cam, label, confidence, out_dir,
                                                       durable)
            except OSError as exc:
                if is_storage_fault(exc):   # the output's fault, not this input's: the caller
                    raise                   # stops (bulk) or waits it out (daemon)
                return self.error_result(job, f"prediction made but pictures could not be "
                                              f"written to {out_dir}: {exc.strerror or exc}",
                                         sha256=image.sha256)
        return result

    def _write_pictures(self, job: Job, image: DecodedImage, cam: np.ndarray, label: str,
                        confidence: float, out_dir: Path, durable: bool) -> dict[str, str]:
        g = self.pictures
        folder = out_dir / PICTURES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        base = image.preview if image.preview is not None else image.model_input
        caption = f"{label} {format_confidence(confidence)}" if g.annotate else ""
        made = pictures(base, cam, self.outputs, alpha=g.overlay_alpha, colormap=g.colormap,
                        caption=caption)
        written: dict[str, str] = {}
        for kind in self.outputs:
            name = picture_name(job, kind, g.format)
            write_picture(folder / name, made[kind], g.format, g.jpeg_quality, durable)
            written[kind] = f"{PICTURES_DIR}/{name}"
        return written

    def error_result(self, job: Job, error: ImageError | str, sha256: str = "") -> Result:
        message = str(error) or type(error).__name__
        sha256 = sha256 or getattr(error, "sha256", "")
        return Result(input_path=job.input_path, job_id=job.job_id, status=STATUS_ERROR,
                      error=message, model_version=self.meta.version, sha256=sha256)

    # -- all three, synchronously ---------------------------------------------------------
    def process(self, jobs: Sequence[Job], out_dir: Path, threads: int | None = None,
                durable: bool = False) -> list[Result]:
        """Classify ``jobs`` through the pipeline; results come back in the order of ``jobs``."""
        from engine.pipeline import Pipeline

        batch = self.batch_size
        chunks = [list(jobs[i:i + batch]) for i in range(0, len(jobs), batch)]
        with Pipeline(self, Path(out_dir), durable=durable, threads=threads) as pipe:
            return [r for _, results in pipe.run(chunks) for r in results]
