"""Batched class activation maps for Keras classifiers: probabilities and one map per image.

    cam = GradCam(model, meta)                      # Grad-CAM, target layer found automatically
    probs, maps = cam(images)                       # (N, C) probabilities, (N, h, w) in [0, 1]
    probs = cam.probabilities(images)               # forward only, no map
    cam = GradCam(model, meta, ["out_relu", "block_13_expand_relu"], method="layercam")

One compiled function per batch computes, for each image, the **predicted** class's
pre-activation score, its gradients at the target layer(s), the weights, and
``ReLU(sum_k w_k A_k)`` normalised to [0, 1] (an all-zero map stays zero, never NaN).
For a single sigmoid unit the score is ``+logit`` when the positive class is predicted and
``-logit`` otherwise, so a "cat" result shows cat evidence.

A method is only its weighting ``(grads, activations) -> weights`` (pytorch-grad-cam's
shape): see :mod:`engine.cam_methods` (``gradcam``, ``gradcampp``, ``layercam``).

With several target layers each layer's map is normalised, upsampled (bilinear) to the finest
layer's grid, and the maps are averaged and normalised again (pytorch-grad-cam's fusion).

The model may hold its backbone as a nested sub-model (the "Graph disconnected" pitfall): the
outer chain is replayed around a copy of the backbone with extra outputs. Any topology is
checked at construction: the rebuilt graph must reproduce the model's own outputs.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np

from engine.cam_methods import CLOSED_FORM_METHODS, METHODS, ChannelWeights  # noqa: F401 (re-export)
from engine.errors import ModelLoadError
from engine.modelio import ModelMeta

log = logging.getLogger(__name__)
# Keras warns when a one-input model loaded from disk is called with a bare tensor; harmless.
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

#: how many scales ``layercam`` fuses when no target layer is set (7x7, 14x14, 28x28 on
#: MobileNetV2 at 224 px)
AUTO_LAYER_SCALES = 3


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


def find_multiscale_layers(model: Any, scales: int = AUTO_LAYER_SCALES,
                           first: tuple[str, ...] | None = None) -> list[tuple[str, ...]]:
    """The last feature map (or ``first``), then the last layer before it at twice, four times
    ... its resolution.

    MobileNetV2 at 224 px: ``out_relu`` (7x7), ``block_13_expand_relu`` (14x14),
    ``block_6_expand_relu`` (28x28). Layers with 3 or fewer channels (the image) are skipped.
    """
    first = first or find_target_layer(model)
    container = model
    for name in first[:-1]:
        container = container.get_layer(name)
    layers = _sublayers(container)
    names = [layer.name for layer in layers]
    start = names.index(first[-1])
    height = int(layers[start].output.shape[1])
    found = [first]
    for layer in reversed(layers[:start]):
        if len(found) >= scales:
            break
        shape = getattr(layer, "output", None)
        if shape is None or isinstance(layer.output, (list, tuple)) or len(layer.output.shape) != 4:
            continue
        h, k = layer.output.shape[1], layer.output.shape[3]
        if h == height * 2 ** len(found) and (k or 0) > 3:
            found.append((*first[:-1], layer.name))
    return found


def _build_feature_model(model: Any, paths: list[tuple[str, ...]]) -> Any:
    """A model with outputs ``[activations of each target layer..., input of the head layer]``."""
    import keras

    head, _ = _head(model)
    if all(len(p) == 1 for p in paths):
        targets = [model.get_layer(p[0]).output for p in paths]
        return keras.Model(model.inputs, [*targets, head.input], name="gradcam_features")
    if any(len(p) != 2 for p in paths) or len({p[0] for p in paths}) != 1:
        raise ModelLoadError(f"target layers {['/'.join(p) for p in paths]!r} must all be in the "
                             "outer model or all in one nested sub-model, one level deep; flatten "
                             "the model or choose layers of the outer model")
    container = model.get_layer(paths[0][0])
    inner = keras.Model(container.inputs, [*[container.get_layer(p[1]).output for p in paths],
                                           container.outputs[0]])
    inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype)
    x, features = inputs, None
    for layer in _sublayers(model)[:-1]:
        if layer is container:
            *features, x = inner(x)
        else:
            x = layer(x)
    return keras.Model(inputs, [*features, x], name="gradcam_features")


def fuse_maps(cams: list[Any]) -> Any:
    """Per-layer maps (N, h_i, w_i) -> one map on the finest grid: each normalised, upsampled
    (bilinear), averaged, normalised again. One layer: just normalised."""
    import tensorflow as tf

    if len(cams) == 1:
        return normalize_maps(cams[0])
    size = max((tuple(c.shape[1:3]) for c in cams), key=lambda hw: hw[0] * hw[1])
    resized = [tf.image.resize(normalize_maps(c)[..., None], size, method="bilinear")[..., 0]
               for c in cams]
    return normalize_maps(tf.add_n(resized) / float(len(resized)))


def target_layer_names(target_layer: str | Sequence[str]) -> tuple[str, ...]:
    """``""`` -> (), ``"a"`` -> ("a",), ``["a", "b"]`` -> ("a", "b")."""
    if isinstance(target_layer, str):
        return (target_layer,) if target_layer else ()
    return tuple(name for name in target_layer if name)


class GradCam:
    """Batched probabilities + class activation maps for ``model`` described by ``meta``.

    ``target_layer``: a layer name, a list of them (maps fused), or "" for the metadata's
    layer / the last feature map (for ``layercam``: that one and the last layers at the next
    finer resolutions, :data:`AUTO_LAYER_SCALES` in all). ``method``: a key of :data:`METHODS`, or pass
    ``channel_weights`` directly.
    """

    def __init__(self, model: Any, meta: ModelMeta, target_layer: str | Sequence[str] = "",
                 method: str = "gradcam", channel_weights: ChannelWeights | None = None) -> None:
        import tensorflow as tf

        if channel_weights is None and method not in METHODS:
            raise ModelLoadError(f"unknown explanation method {method!r}; set [gradcam] method to "
                                 f"one of {list(METHODS)}")
        self.model = model
        self.meta = meta
        self.method = method
        names = target_layer_names(target_layer)
        recorded = target_layer_names(meta.target_layer)
        if names:
            self.target_paths = [resolve_target_layer(model, name) for name in names]
        elif method == "layercam" and channel_weights is None:  # from the recorded layer up
            first = resolve_target_layer(model, recorded[0]) if len(recorded) == 1 else None
            self.target_paths = find_multiscale_layers(model, first=first)
        elif recorded:
            self.target_paths = [resolve_target_layer(model, name) for name in recorded]
        else:
            self.target_paths = [find_target_layer(model)]
        self.channel_weights = channel_weights or METHODS[method]
        self.head, self.activation = _head(model)
        wanted = "sigmoid" if meta.binary else "softmax"
        if self.activation != wanted:
            raise ModelLoadError(f"a {meta.num_classes}-class model must end in {wanted}, this "
                                 f"one ends in {self.activation}")
        try:
            self.features = _build_feature_model(model, self.target_paths)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"cannot connect Grad-CAM layer(s) {self.target_layer!r} to the model's "
                f"output ({type(exc).__name__}: {exc}); choose another [gradcam] target_layer or "
                "disable Grad-CAM") from exc
        self._cam_fn = tf.function(self._cam_step, reduce_retracing=True)
        self._logit_fn = tf.function(self._logit_step, reduce_retracing=True)
        self._self_check()
        log.debug("%s target layer(s): %s", method, self.target_layer)

    @property
    def target_path(self) -> tuple[str, ...]:
        """The first (coarsest by default) target layer's path."""
        return self.target_paths[0]

    @property
    def target_layer(self) -> str:
        """The target layer(s) as written in config: ``out_relu`` or ``out_relu, block_13_...``."""
        return ", ".join("/".join(p) for p in self.target_paths)

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

    def _layer_map(self, grads: Any, acts: Any) -> Any:
        """``sum_k w_k A_k`` for one layer; weights per channel (N, K) or per position (N, h, w, K)."""
        import tensorflow as tf

        weights = tf.cast(self.channel_weights(grads, acts), acts.dtype)
        if len(weights.shape) == 2:
            return tf.einsum("nhwk,nk->nhw", acts, weights)
        return tf.reduce_sum(acts * weights, axis=-1)

    def _cam_step(self, images: Any) -> tuple[Any, Any]:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            *acts, head_input = self.features(images, training=False)
            for a in acts:
                tape.watch(a)
            logits = self._logits(head_input)
            # Images are independent in inference mode, so d(sum)/dA_i = d(score_i)/dA_i.
            total = tf.reduce_sum(self._predicted_scores(logits))
        grads = tape.gradient(total, acts)
        cams = [self._layer_map(g, a) for g, a in zip(grads, acts)]
        return logits, fuse_maps(cams)

    def _logit_step(self, images: Any) -> Any:
        *_, head_input = self.features(images, training=False)
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
        *_, head_input = self.features(x, training=False)
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
