"""``[training]`` settings as one frozen, validated dataclass.

    settings = load_settings("config.toml")
    cfg = training_settings(settings)          # strict: unknown keys / wrong types -> ConfigError
    cfg.fine_tune_from                         # "block_13_expand"
    cfg.weights_spec(settings.base_dir)        # "imagenet" | None | absolute .h5 path

Every field has a default, so an absent ``[training]`` table trains with the defaults. Path
fields are resolved against the folder of the config file (engine.config.build_section).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config import CAM_METHODS, Settings, build_section
from engine.errors import ConfigError

INSTALL_POLICIES = ("if_better", "always", "never")
SCHEDULES = ("constant", "cosine")


def _check(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: `{key}` {message}")


@dataclass(frozen=True)
class TrainingSettings:
    # -- model ----------------------------------------------------------------------------
    image_size: int = 224
    alpha: float = 1.0
    #: "imagenet" (Keras download / cache), "none" (random init) or a path to a no-top .h5
    backbone_weights: str = "imagenet"
    dropout: float = 0.2
    # -- data -----------------------------------------------------------------------------
    validation_fraction: float = 0.1
    seed: int = 1337
    #: TensorFlow deterministic ops (tf.config.experimental.enable_op_determinism): the same
    #: seed, data and machine give the same model; process-wide once switched on
    deterministic: bool = True
    batch_size: int = 32
    # -- phase 1: head on the frozen backbone ---------------------------------------------
    head_epochs: int = 30
    head_learning_rate: float = 1e-3
    head_patience: int = 4
    # -- phase 2: fine-tune the top of the backbone ----------------------------------------
    fine_tune_epochs: int = 6
    fine_tune_learning_rate: float = 1e-5
    fine_tune_from: str = "block_13_expand"
    fine_tune_patience: int = 2
    #: "constant" or "cosine" (decays to 0 over fine_tune_epochs)
    fine_tune_schedule: str = "constant"
    #: train phase 2 on cached activations of the frozen layers (flip-only augmentation)
    fine_tune_cache: bool = False
    # -- augmentation (phase 2; phase 1 uses horizontal flips only) ----------------------
    flip: bool = True
    rotation: float = 0.03
    zoom: float = 0.1
    contrast: float = 0.1
    # -- calibration / report -------------------------------------------------------------
    calibrate: bool = True
    gallery_size: int = 12
    #: `pawcam evaluate`: photos of a seeded test sample that score the explanation methods
    #: (deletion/insertion, ROAD, keep-top-20%-vs-random); 0 = skip
    faithfulness_images: int = 200
    #: the methods scored (each one's maps by the runtime that serves it)
    faithfulness_methods: tuple[str, ...] = ("gradcam", "gradcampp", "layercam")
    # -- outputs --------------------------------------------------------------------------
    output_dir: Path = Path("runs")
    install_to: Path = Path("models/cat_dog_model.keras")
    install: str = "if_better"
    #: keep the run folder's cache/ (decoded images, activations) after a successful run
    keep_cache: bool = False

    def validate(self, where: str) -> None:
        _check(32 <= self.image_size <= 1024, where, "image_size", "must be between 32 and 1024")
        _check(0.1 <= self.alpha <= 2.0, where, "alpha", "must be between 0.1 and 2.0")
        _check(bool(self.backbone_weights.strip()), where, "backbone_weights",
               'must be "imagenet", "none" or a path to a .h5 weights file')
        _check(0.0 <= self.dropout < 1.0, where, "dropout", "must be in [0, 1)")
        _check(0.0 < self.validation_fraction < 0.5, where, "validation_fraction",
               "must be in (0, 0.5)")
        _check(self.seed >= 0, where, "seed", "must be >= 0")
        _check(1 <= self.batch_size <= 1024, where, "batch_size", "must be between 1 and 1024")
        _check(0 <= self.head_epochs <= 1000, where, "head_epochs", "must be between 0 and 1000")
        _check(0 <= self.fine_tune_epochs <= 1000, where, "fine_tune_epochs",
               "must be between 0 and 1000")
        _check(self.head_epochs + self.fine_tune_epochs > 0, where, "head_epochs",
               "and fine_tune_epochs cannot both be 0")
        for key in ("head_learning_rate", "fine_tune_learning_rate"):
            _check(0.0 < getattr(self, key) < 1.0, where, key, "must be in (0, 1)")
        for key in ("head_patience", "fine_tune_patience"):
            _check(getattr(self, key) >= 1, where, key, "must be >= 1")
        _check(0.0 <= self.rotation <= 0.5, where, "rotation", "must be in [0, 0.5] (fraction of a turn)")
        _check(0.0 <= self.zoom < 1.0, where, "zoom", "must be in [0, 1)")
        _check(0.0 <= self.contrast < 1.0, where, "contrast", "must be in [0, 1)")
        _check(0 <= self.gallery_size <= 200, where, "gallery_size", "must be between 0 and 200")
        _check(self.fine_tune_schedule in SCHEDULES, where, "fine_tune_schedule",
               f"must be one of {list(SCHEDULES)}")
        _check(0 <= self.faithfulness_images <= 100_000, where, "faithfulness_images",
               "must be between 0 and 100000")
        _check(all(m in CAM_METHODS for m in self.faithfulness_methods), where,
               "faithfulness_methods", f"must list methods of {list(CAM_METHODS)}")
        _check(self.install in INSTALL_POLICIES, where, "install",
               f"must be one of {list(INSTALL_POLICIES)}")
        _check(self.install_to.suffix == ".keras", where, "install_to", "must end in .keras")

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def weights_spec(self, base_dir: Path) -> str | None:
        """What ``keras.applications.MobileNetV2(weights=...)`` gets: "imagenet", None or a path."""
        value = self.backbone_weights.strip()
        if value.lower() == "imagenet":
            return "imagenet"
        if value.lower() == "none":
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (base_dir / path).resolve()
        return str(path)


def training_settings(settings: Settings) -> TrainingSettings:
    return build_section(TrainingSettings, settings.extra_sections.get("training"), "training",
                         settings.source, settings.base_dir)
