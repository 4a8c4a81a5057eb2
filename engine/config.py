"""Settings as plain, typed, validated data, read from ``config.toml``.

    settings = load_settings("config.toml")        # or load_settings(None) for defaults
    settings.inference.batch_size                   # -> 32
    settings.model.path                             # absolute Path

Each TOML table maps to one frozen dataclass below. An unknown key, a wrong type or a value out
of range is a :class:`ConfigError` that names the key and the file. Relative paths are resolved
against the folder holding the config file (the current folder when running on defaults), so a
service started from anywhere finds the same files.

``[training]``, ``[watcher]`` and ``[serve]`` belong to those packages: they build their own
dataclasses from ``settings.extra_sections`` with :func:`build_section`, so the engine never
imports them.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import ConfigError

T = TypeVar("T")

#: sections owned by packages built on the engine; validated there
EXTRA_SECTIONS = ("training", "watcher", "serve")

GRADCAM_OUTPUTS = ("gray", "heatmap", "overlay")
#: explanation methods (engine.cam_methods.METHODS; kept here so config needs no TensorFlow)
CAM_METHODS = ("gradcam", "gradcampp", "layercam")
COLORMAPS = ("jet", "turbo", "inferno", "magma", "viridis", "plasma", "hot", "bone", "parula")
IMAGE_FORMATS = ("jpg", "png", "webp")
RUNTIMES = ("auto", "onnxruntime", "tensorflow")
PRECISIONS = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class ModelSettings:
    path: Path = Path("models/cat_dog_model.keras")


@dataclass(frozen=True)
class PathSettings:
    inbox: Path = Path("inbox")
    outbox: Path = Path("outbox")


@dataclass(frozen=True)
class InferenceSettings:
    batch_size: int = 32
    #: threads that decode files and write pictures; 0 = one per CPU core
    decode_threads: int = 0
    uncertain_below: float = 0.6
    #: "auto" (TensorFlow when a GPU is visible, else ONNX Runtime), "onnxruntime", "tensorflow"
    runtime: str = "auto"
    #: ONNX Runtime precision: "auto" (int8 when its recorded check passed, else fp32),
    #: "fp32" (exact) or "int8"
    precision: str = "auto"
    #: threads ONNX Runtime runs one batch on; 0 = its default (one per physical core)
    model_threads: int = 0
    #: let ONNX Runtime's threads busy-wait for the next operator instead of sleeping
    model_spin: bool = False

    def validate(self, where: str) -> None:
        _check(1 <= self.batch_size <= 4096, where, "batch_size", "must be between 1 and 4096")
        _check(0 <= self.decode_threads <= 64, where, "decode_threads",
               "must be between 0 (one per core) and 64")
        _check(0.0 <= self.uncertain_below <= 1.0, where, "uncertain_below", "must be in [0, 1]")
        _check(self.runtime in RUNTIMES, where, "runtime", f"must be one of {list(RUNTIMES)}")
        _check(self.precision in PRECISIONS, where, "precision",
               f"must be one of {list(PRECISIONS)}")
        _check(0 <= self.model_threads <= 256, where, "model_threads",
               "must be between 0 (one per physical core) and 256")

    @property
    def threads(self) -> int:
        """``decode_threads`` with 0 resolved to the number of usable CPU cores."""
        if self.decode_threads:
            return self.decode_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class DecodeSettings:
    max_image_pixels: int = 40_000_000
    max_file_bytes: int = 100_000_000
    reduced_jpeg: bool = True
    reduced_jpeg_min_side: int = 512

    def validate(self, where: str) -> None:
        _check(self.max_image_pixels >= 1, where, "max_image_pixels", "must be positive")
        _check(1 <= self.reduced_jpeg_min_side <= 16384, where, "reduced_jpeg_min_side",
               "must be between 1 and 16384")
        _check(self.max_file_bytes >= 1, where, "max_file_bytes", "must be positive")


@dataclass(frozen=True)
class GradcamSettings:
    enabled: bool = True
    outputs: tuple[str, ...] = GRADCAM_OUTPUTS
    #: "gradcam", "gradcampp" or "layercam" (see engine.cam_methods)
    method: str = "gradcam"
    #: "" (automatic), a layer name, or a list of layer names whose maps are fused
    target_layer: str | tuple[str, ...] = ""
    colormap: str = "jet"
    overlay_alpha: float = 0.45
    max_side: int = 512
    format: str = "jpg"
    jpeg_quality: int = 90
    annotate: bool = True

    def validate(self, where: str) -> None:
        for name in self.outputs:
            _check(name in GRADCAM_OUTPUTS, where, "outputs", f"{name!r} is not one of {list(GRADCAM_OUTPUTS)}")
        _check(len(set(self.outputs)) == len(self.outputs), where, "outputs", "lists a picture twice")
        _check(self.method in CAM_METHODS, where, "method", f"must be one of {list(CAM_METHODS)}")
        _check(all(isinstance(n, str) and n for n in self.target_layers) and
               len(set(self.target_layers)) == len(self.target_layers), where, "target_layer",
               "must be \"\", a layer name or a list of distinct layer names")
        _check(self.colormap in COLORMAPS, where, "colormap", f"must be one of {list(COLORMAPS)}")
        _check(0.0 <= self.overlay_alpha <= 1.0, where, "overlay_alpha", "must be in [0, 1]")
        _check(16 <= self.max_side <= 16384, where, "max_side", "must be between 16 and 16384")
        _check(self.format in IMAGE_FORMATS, where, "format", f"must be one of {list(IMAGE_FORMATS)}")
        _check(1 <= self.jpeg_quality <= 100, where, "jpeg_quality", "must be between 1 and 100")

    @property
    def target_layers(self) -> tuple[str, ...]:
        """``target_layer`` as a tuple of names: () for automatic."""
        if isinstance(self.target_layer, str):
            return (self.target_layer,) if self.target_layer else ()
        return tuple(self.target_layer)

    @property
    def active_outputs(self) -> tuple[str, ...]:
        """The pictures to write: none when Grad-CAM is disabled."""
        return self.outputs if self.enabled else ()


@dataclass(frozen=True)
class DeviceSettings:
    device: str = "auto"
    memory_growth: bool = True

    def validate(self, where: str) -> None:
        ok = self.device in ("auto", "cpu", "gpu") or (
            self.device.startswith("gpu:") and self.device[4:].isdigit()
        )
        _check(ok, where, "device", 'must be "auto", "cpu", "gpu" or "gpu:N"')


@dataclass(frozen=True)
class ClusterSettings:
    """``pawcam predict --ray``: where the run goes and how the actor pool is sized."""

    #: "" starts a local Ray for the run; "auto" joins the cluster of this machine;
    #: "ray://HOST:10001" connects through Ray Client; "HOST:6379" joins by GCS address
    address: str = ""
    #: classifier actors (one loaded model each); 0 = as many as the cluster's CPUs (or GPUs,
    #: with gpus_per_actor) allow
    actors: int = 0
    cpus_per_actor: float = 2.0
    gpus_per_actor: float = 0.0
    #: inputs per actor call; 0 = 4 x [inference] batch_size (decoding overlaps the model)
    batch_size: int = 0
    #: calls one actor runs at once (on threads, one model): 2 lets the next call decode
    #: while this one is on the model
    calls_per_actor: int = 2
    #: a file that killed a worker this many times gets an error row instead of another try
    max_crashes: int = 2

    def validate(self, where: str) -> None:
        _check(0 <= self.actors <= 100_000, where, "actors", "must be between 0 (auto) and 100000")
        _check(0 < self.cpus_per_actor <= 1024, where, "cpus_per_actor",
               "must be above 0 and at most 1024")
        _check(0 <= self.gpus_per_actor <= 64, where, "gpus_per_actor", "must be between 0 and 64")
        _check(0 <= self.batch_size <= 65536, where, "batch_size",
               "must be between 0 (4 x [inference] batch_size) and 65536")
        _check(1 <= self.max_crashes <= 100, where, "max_crashes", "must be between 1 and 100")
        _check(1 <= self.calls_per_actor <= 16, where, "calls_per_actor",
               "must be between 1 and 16")

    def inputs_per_call(self, model_batch: int) -> int:
        return self.batch_size or 4 * model_batch


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    gradcam: GradcamSettings = field(default_factory=GradcamSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: raw tables of sections owned by other packages (see EXTRA_SECTIONS)
    extra_sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the file these settings came from (None: built-in defaults)
    source: Path | None = None
    #: folder that relative paths were resolved against
    base_dir: Path = Path(".")


_ENGINE_SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "paths": PathSettings,
    "inference": InferenceSettings,
    "decode": DecodeSettings,
    "gradcam": GradcamSettings,
    "device": DeviceSettings,
    "cluster": ClusterSettings,
}


def _check(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: `{key}` {message}")


def _coerce(value: Any, annotation: Any, where: str, key: str) -> Any:
    """Return ``value`` as ``annotation`` or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif origin is tuple:
        inner = typing.get_args(annotation)[0]
        if isinstance(value, list):
            return tuple(_coerce(v, inner, where, key) for v in value)
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where, key)
            except ConfigError:
                continue
    else:  # pragma: no cover - a programming error in a settings class
        raise TypeError(f"unsupported settings type {annotation!r}")
    expected = getattr(annotation, "__name__", str(annotation)).replace("Path", "path string")
    raise ConfigError(f"{where}: `{key}` must be {expected}, got {type(value).__name__} {value!r}")


def build_section(cls: type[T], data: dict[str, Any] | None, section: str, source: Path | None,
                  base_dir: Path = Path(".")) -> T:
    """Build the frozen dataclass ``cls`` from one TOML table, strictly.

    Unknown keys and wrong types raise :class:`ConfigError` naming ``[section] key`` and the
    file; relative ``Path`` fields are resolved against ``base_dir``; a ``validate(where)``
    method on ``cls``, if any, checks ranges.

        cfg = build_section(WatcherSettings, settings.extra_sections.get("watcher"), "watcher",
                            settings.source, settings.base_dir)
    """
    where = f"{source or 'built-in defaults'} [{section}]"
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"known keys are {', '.join(names)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            value = _coerce(data[f.name], hints[f.name], where, f.name)
        else:
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise ConfigError(f"{where}: `{f.name}` is required")
        if isinstance(value, Path) and not value.is_absolute():
            value = (base_dir / value).resolve()
        values[f.name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(where)
    return obj


def load_settings(path: str | Path | None, *, required: bool = True) -> Settings:
    """Read and validate a config file; ``path=None`` gives the built-in defaults.

    With ``required=False`` a missing file also gives the defaults (used for the implicit
    ``./config.toml``); an explicitly named missing file is an error.
    """
    if path is None:
        return _settings_from_dict({}, None, Path.cwd())
    path = Path(path)
    if not path.is_file():
        if not required:
            return _settings_from_dict({}, None, Path.cwd())
        raise ConfigError(f"config file {path} not found; pass --config PATH or copy the "
                          "project's config.toml next to where you run pawcam")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax and try again") from exc
    return _settings_from_dict(data, path, path.resolve().parent)


def _settings_from_dict(data: dict[str, Any], source: Path | None, base_dir: Path) -> Settings:
    known = [*_ENGINE_SECTIONS, *EXTRA_SECTIONS]
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown section or key {key!r}; known sections are "
                              f"{', '.join(known)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} must be a [table]")
    sections = {
        name: build_section(cls, data.get(name), name, source, base_dir)
        for name, cls in _ENGINE_SECTIONS.items()
    }
    extra = {name: data.get(name, {}) for name in EXTRA_SECTIONS}
    return Settings(**sections, extra_sections=extra, source=source, base_dir=base_dir)


def replace(settings: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported: settings are frozen, so overrides make copies."""
    return dataclasses.replace(settings, **changes)
