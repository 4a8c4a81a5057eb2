"""Batched Grad-CAM for Keras classifiers: calibrated probabilities and one CAM per image.

    cam = GradCam(model, meta)                      # target layer found automatically
    probs, maps = cam(images)                       # (N, C) probabilities, (N, h, w) in [0, 1]
    probs = cam.probabilities(images)               # forward only, no CAM

One compiled function per batch computes, for each image, the **predicted** class's
pre-activation score, its gradient at the target layer, the channel weights, and
``ReLU(sum_k w_k A_k)`` normalised to [0, 1] (an all-zero map stays zero, never NaN).
For a single sigmoid unit the score is ``+logit`` when the positive class is predicted and
``-logit`` otherwise, so a "cat" result shows cat evidence. As in pytorch-grad-cam, the
method-specific part is only the channel weighting (:func:`gradcam_weights`); pass another
``channel_weights`` function to get a variant.

The model may hold its backbone as a nested sub-model (the "Graph disconnected" pitfall): the
outer chain is replayed around a two-output copy of the backbone. Any topology is checked at
construction: the rebuilt graph must reproduce the model's own outputs.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import numpy as np

from engine.errors import ModelLoadError
from engine.modelio import ModelMeta

log = logging.getLogger(__name__)
# Keras warns when a one-input model loaded from disk is called with a bare tensor; harmless.
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

ChannelWeights = Callable[[Any, Any], Any]  # (grads, activations) NHWK -> weights NK


def gradcam_weights(grads: Any, activations: Any) -> Any:
    """Grad-CAM: each channel weighs the spatial mean of its gradient (Selvaraju et al. 2017)."""
    import tensorflow as tf

    del activations
    return tf.reduce_mean(grads, axis=(1, 2))


def calibrated_probabilities(logits: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Logits (N, 1) or (N, C) -> calibrated probabilities (N, C), in float64.

    Binary: ``[sigmoid(-z/T), sigmoid(z/T)]``, each computed directly so that neither saturates
    to exactly 0 or 1 early (keeps the ranking of very confident images for ROC curves).
    """
    z = np.asarray(logits, dtype=np.float64) / meta.temperature
    if meta.binary:
        x = z[:, 0]
        return np.stack([_sigmoid(-x), _sigmoid(x)], axis=1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def normalize_maps(cams: Any) -> Any:
    """ReLU, then divide each map by its maximum; a map with no positive value becomes zeros."""
    import tensorflow as tf

    cams = tf.nn.relu(cams)
    peak = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
    return tf.math.divide_no_nan(cams, peak)


def _sublayers(model: Any) -> list[Any]:
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def find_target_layer(model: Any) -> tuple[str, ...]:
    """Path to the last layer with a 4-D output (the feature map before pooling).

    Returns ``("out_relu",)`` for a flat model or ``("mobilenetv2", "out_relu")`` when the
    layer sits in a nested backbone.
    """
    import keras

    for layer in reversed(_sublayers(model)):
        if isinstance(layer, keras.Model):
            try:
                return (layer.name, *find_target_layer(layer))
            except ModelLoadError:
                continue
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4:
            return (layer.name,)
    raise ModelLoadError(f"model {model.name!r} has no layer with a 4-D (H, W, channels) output; "
                         "Grad-CAM needs a convolutional feature map: set [gradcam] enabled = false")


def resolve_target_layer(model: Any, name: str) -> tuple[str, ...]:
    """Find ``name`` (a layer name, or ``outer/inner`` for a nested one) in ``model``."""
    import keras

    if "/" in name:
        return tuple(name.split("/"))
    names = [layer.name for layer in _sublayers(model)]
    if name in names:
        return (name,)
    for layer in _sublayers(model):
        if isinstance(layer, keras.Model) and name in [l.name for l in _sublayers(layer)]:
            return (layer.name, name)
    raise ModelLoadError(f"target layer {name!r} not found in model {model.name!r}; set "
                         "[gradcam] target_layer to one of its 4-D layers, or to \"\" to pick the "
                         "last one automatically")


def _head(model: Any) -> tuple[Any, str]:
    """The last layer and its activation name: ('sigmoid' | 'softmax' | 'linear')."""
    import keras

    head = _sublayers(model)[-1]
    activation = getattr(head, "activation", None)
    if not isinstance(head, (keras.layers.Dense, keras.layers.Activation)) or activation is None:
        raise ModelLoadError(f"the model's last layer {head.name!r} must be a Dense layer (or an "
                             "Activation after one) so that its logits can be read")
    act_name = getattr(activation, "__name__", str(activation))
    if act_name not in ("sigmoid", "softmax", "linear"):
        raise ModelLoadError(f"last-layer activation {act_name!r} is not supported; use sigmoid "
                             "(one unit, two classes) or softmax")
    return head, act_name


def _build_feature_model(model: Any, path: tuple[str, ...]) -> Any:
    """A model with outputs ``[target activations, input of the head layer]``."""
    import keras

    head, _ = _head(model)
    if len(path) == 1:
        target = model.get_layer(path[0])
        return keras.Model(model.inputs, [target.output, head.input], name="gradcam_features")
    if len(path) != 2:
        raise ModelLoadError(f"target layer {'/'.join(path)!r} is nested more than one level deep; "
                             "flatten the model or choose a layer of the outer model")
    container = model.get_layer(path[0])
    inner = keras.Model(container.inputs, [container.get_layer(path[1]).output,
                                           container.outputs[0]])
    inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype)
    x, features = inputs, None
    for layer in _sublayers(model)[:-1]:
        if layer is container:
            features, x = inner(x)
        else:
            x = layer(x)
    return keras.Model(inputs, [features, x], name="gradcam_features")


class GradCam:
    """Batched probabilities + Grad-CAM maps for ``model`` described by ``meta``."""

    def __init__(self, model: Any, meta: ModelMeta, target_layer: str = "",
                 channel_weights: ChannelWeights = gradcam_weights) -> None:
        import tensorflow as tf

        self.model = model
        self.meta = meta
        name = target_layer or meta.target_layer
        self.target_path = resolve_target_layer(model, name) if name else find_target_layer(model)
        self.channel_weights = channel_weights
        self.head, self.activation = _head(model)
        wanted = "sigmoid" if meta.binary else "softmax"
        if self.activation != wanted:
            raise ModelLoadError(f"a {meta.num_classes}-class model must end in {wanted}, this "
                                 f"one ends in {self.activation}")
        try:
            self.features = _build_feature_model(model, self.target_path)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"cannot connect Grad-CAM layer {'/'.join(self.target_path)!r} to the model's "
                f"output ({type(exc).__name__}: {exc}); choose another [gradcam] target_layer or "
                "disable Grad-CAM") from exc
        self._cam_fn = tf.function(self._cam_step, reduce_retracing=True)
        self._logit_fn = tf.function(self._logit_step, reduce_retracing=True)
        self._self_check()
        log.debug("Grad-CAM target layer: %s", "/".join(self.target_path))

    @property
    def target_layer(self) -> str:
        return "/".join(self.target_path)

    # -- math ----------------------------------------------------------------------------
    def _logits(self, head_input: Any) -> Any:
        """Pre-activation scores of the last layer: (N, units)."""
        import tensorflow as tf

        if hasattr(self.head, "kernel"):  # Dense: recompute x @ W + b without its activation
            z = tf.matmul(head_input, tf.cast(self.head.kernel, head_input.dtype))
            if self.head.use_bias:
                z = z + tf.cast(self.head.bias, z.dtype)
            return z
        return head_input  # Activation layer: its input already is the logits

    def _predicted_scores(self, logits: Any) -> Any:
        """The predicted class's pre-activation score per image (N,)."""
        import tensorflow as tf

        if self.meta.binary:
            z = logits[:, 0]
            # P(positive) >= threshold  <=>  z / T >= logit(threshold)
            cut = self.meta.temperature * float(np.log(self.meta.threshold / (1 - self.meta.threshold)))
            return tf.where(z >= tf.constant(cut, z.dtype), z, -z)
        cls = tf.argmax(logits, axis=-1, output_type=tf.int32)  # T > 0 keeps the argmax
        return tf.gather(logits, cls, axis=1, batch_dims=1)

    def _cam_step(self, images: Any) -> tuple[Any, Any]:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            acts, head_input = self.features(images, training=False)
            tape.watch(acts)
            logits = self._logits(head_input)
            # Images are independent in inference mode, so d(sum)/dA_i = d(score_i)/dA_i.
            total = tf.reduce_sum(self._predicted_scores(logits))
        grads = tape.gradient(total, acts)
        weights = self.channel_weights(grads, acts)
        cams = tf.einsum("nhwk,nk->nhw", acts, tf.cast(weights, acts.dtype))
        return logits, normalize_maps(cams)

    def _logit_step(self, images: Any) -> Any:
        _, head_input = self.features(images, training=False)
        return self._logits(head_input)

    # -- public --------------------------------------------------------------------------
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images``: (N, H, W, 3) RGB 0-255. Returns probabilities (N, C) and CAMs (N, h, w)."""
        logits, cams = self._cam_fn(_as_batch(images))
        return calibrated_probabilities(logits.numpy(), self.meta), cams.numpy().astype(np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (N, C), without the gradient pass."""
        return calibrated_probabilities(self._logit_fn(_as_batch(images)).numpy(), self.meta)

    def _self_check(self) -> None:
        """The rebuilt graph must give the model's own output (catches unsupported topologies)."""
        h, w = self.meta.input_size
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, size=(2, h, w, 3)).astype(np.float32)
        expected = np.asarray(self.model(x, training=False), dtype=np.float64)
        _, head_input = self.features(x, training=False)
        z = np.asarray(self._logits(head_input), dtype=np.float64)
        if self.activation == "sigmoid":
            got = 1.0 / (1.0 + np.exp(-z))
        elif self.activation == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            got = e / e.sum(axis=1, keepdims=True)
        else:
            got = z
        if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-4):
            raise ModelLoadError("this model's topology is not supported for Grad-CAM (the "
                                 "rebuilt graph does not reproduce its output); flatten the model "
                                 "or disable Grad-CAM")


def _as_batch(images: np.ndarray) -> Any:
    import tensorflow as tf

    return tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
