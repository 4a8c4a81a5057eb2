"""MobileNetV2 transfer-learning classifier, built as ONE flat functional graph.

    model = build_model(num_classes=2, input_size=(224, 224), alpha=1.0, weights=".../no_top.h5")
    set_backbone_trainable(model, False)                 # phase 1: head only
    set_backbone_trainable(model, True, "block_13_expand")  # phase 2: top blocks, BN frozen

Graph: ``image`` (raw RGB 0-255) -> ``scale`` (Rescaling to [-1, 1], what MobileNetV2 expects)
-> every MobileNetV2 layer up to ``out_relu`` -> ``pool`` (GAP) -> ``dropout`` -> ``classifier``
(Dense: one sigmoid unit for two classes, softmax otherwise). The backbone is built with
``input_tensor=`` so its layers become direct layers of the model: no nested sub-model, so
Grad-CAM reaches ``out_relu`` directly and the engine's self-check holds. No augmentation
layers live in the saved model; augmentation runs in the tf.data pipeline during training
only, so the serving graph is exactly: scale, backbone, pool, (inactive) dropout, Dense.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger(__name__)

TARGET_LAYER = "out_relu"
HEAD_LAYERS = ("pool", "dropout", "classifier")
FEATURE_LAYER = "pool"


def _keras_cache_dir() -> Path:
    import os

    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_model(num_classes: int, input_size: tuple[int, int], alpha: float = 1.0,
                weights: str | None = "imagenet", dropout: float = 0.2) -> Any:
    import keras

    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ConfigError(f"[training] backbone_weights: file {weights} not found; give the path "
                          "to a MobileNetV2 no-top .h5 file, \"imagenet\" (download) or \"none\"")
    h, w = input_size
    inputs = keras.Input((h, w, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    try:
        base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, alpha=alpha,
                                              weights=weights)
    except ValueError as exc:
        raise ConfigError(f"[training] cannot build MobileNetV2 (alpha={alpha}, input {h}x{w}, "
                          f"weights={weights!r}): {exc}") from exc
    except Exception as exc:  # download failures: URLError, HTTPError, OSError, ...
        if weights == "imagenet":
            raise ConfigError(
                f"[training] backbone_weights = \"imagenet\": downloading the ImageNet weights "
                f"failed ({type(exc).__name__}: {exc}). Put the no-top .h5 file in Keras' cache "
                f"folder {_keras_cache_dir()} or set backbone_weights to its path "
                "(or \"none\" to train from scratch)") from exc
        raise ConfigError(f"[training] backbone_weights: cannot load {weights} "
                          f"({type(exc).__name__}: {exc}); is it a MobileNetV2 alpha={alpha} "
                          "no-top .h5 file?") from exc
    base.trainable = False
    y = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    y = keras.layers.Dropout(dropout, name="dropout")(y)
    units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    outputs = keras.layers.Dense(units, activation=activation, name="classifier")(y)
    model = keras.Model(inputs, outputs, name="pawcam_mobilenetv2")
    check_flat(model)
    return model


def check_flat(model: Any) -> None:
    """The model must hold ``out_relu`` as a direct layer and contain no nested model."""
    import keras

    names = {layer.name for layer in model.layers}
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if TARGET_LAYER not in names or nested:
        raise AssertionError(f"model is not flat (nested: {nested}); Grad-CAM needs "
                             f"{TARGET_LAYER!r} as a direct layer")


def backbone_layers(model: Any) -> list[Any]:
    """The MobileNetV2 layers (everything between ``scale`` and the head)."""
    layers = list(model.layers)
    names = [layer.name for layer in layers]
    return layers[names.index("scale") + 1:names.index(FEATURE_LAYER)]


def set_backbone_trainable(model: Any, trainable: bool, from_layer: str = "") -> int:
    """Freeze the backbone, or unfreeze it from ``from_layer`` on (BatchNorm stays frozen).

    Keras 3 runs a BatchNormalization layer with ``trainable=False`` in inference mode (its
    moving statistics are used and not updated), which is what fine-tuning a small dataset
    needs. Returns the number of trainable backbone layers.
    """
    import keras

    layers = backbone_layers(model)
    names = [layer.name for layer in layers]
    start = len(layers)
    if trainable:
        if from_layer not in names:
            blocks = sorted({n.split("_expand")[0] for n in names if n.endswith("_expand")})
            raise ConfigError(f"[training] fine_tune_from = {from_layer!r} is not a backbone "
                              f"layer; use e.g. one of {[b + '_expand' for b in blocks][-6:]} "
                              "or 'Conv_1'")
        start = names.index(from_layer)
    count = 0
    for i, layer in enumerate(layers):
        on = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = on
        count += int(on and bool(layer.weights))
    return count


def cut_tensor(model: Any, layer_name: str) -> Any:
    """The tensor entering ``layer_name``: everything below it is frozen in phase 2, so its
    value per image can be cached and the top trained alone (``keras.Model(cut, output)``).
    Valid for ``block_N_expand`` and ``Conv_1``: the only tensor that crosses that boundary."""
    names = [layer.name for layer in backbone_layers(model)]
    if layer_name not in names or not (layer_name.endswith("_expand") or layer_name == "Conv_1"):
        raise ConfigError(f"[training] fine_tune_from = {layer_name!r}: with fine_tune_cache "
                          "the first fine-tuned layer must be a block_N_expand layer or "
                          "'Conv_1' (where one tensor enters the top of the network)")
    return model.get_layer(layer_name).input


def feature_model(model: Any) -> Any:
    """Image -> pooled backbone features (inference mode), sharing the model's layers."""
    import keras

    return keras.Model(model.inputs, model.get_layer(FEATURE_LAYER).output, name="features")


def head_model(model: Any, feature_dim: int) -> Any:
    """Pooled features -> dropout -> classifier, sharing the model's head weights."""
    import keras

    inputs = keras.Input((feature_dim,), name="features")
    y = model.get_layer("dropout")(inputs)
    outputs = model.get_layer("classifier")(y)
    return keras.Model(inputs, outputs, name="head")


def classifier_weights(model: Any):
    """(kernel, bias) of the Dense classifier as numpy arrays."""
    import numpy as np

    kernel, bias = model.get_layer("classifier").get_weights()
    return np.asarray(kernel, np.float64), np.asarray(bias, np.float64)


def init_batchnorm_statistics(model: Any, images: Any) -> None:
    """Set every BatchNorm layer's moving mean/variance from one batch of ``images``.

    Only for a randomly initialised backbone (``backbone_weights = "none"``): its BatchNorm
    layers start with mean 0 / variance 1, and through MobileNetV2's ~50 layers the
    activations then shrink to ~1e-11, so the frozen backbone of phase 1 outputs nothing the
    head could learn from. One forward pass in training mode with momentum 0 gives each layer
    the statistics of real data (a data-dependent initialisation); the weights are unchanged.
    """
    import keras
    import numpy as np

    bns = [layer for layer in backbone_layers(model)
           if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.trainable, layer.momentum) for layer in bns]
    for layer in bns:
        layer.trainable, layer.momentum = True, 0.0
    try:
        feature_model(model)(np.asarray(images, np.float32), training=True)
    finally:
        for layer, (trainable, momentum) in zip(bns, saved):
            layer.trainable, layer.momentum = trainable, momentum


def loss_and_metric(binary: bool):
    """The loss and accuracy metric of a sigmoid (binary) or softmax classifier."""
    import keras

    if binary:
        return keras.losses.BinaryCrossentropy(), keras.metrics.BinaryAccuracy(name="accuracy")
    return (keras.losses.SparseCategoricalCrossentropy(),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"))


def is_binary(model: Any) -> bool:
    """True for the two-class model (one sigmoid unit), False for a softmax over classes."""
    return int(model.outputs[0].shape[-1]) == 1


def num_classes(model: Any) -> int:
    """How many classes the model tells apart (2 for the one-unit sigmoid)."""
    units = int(model.outputs[0].shape[-1])
    return 2 if units == 1 else units
