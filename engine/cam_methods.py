"""Explanation methods: each one only its weighting ``(grads, activations) -> weights``.

    from engine.cam_methods import METHODS
    weights = METHODS["gradcampp"](grads, activations)   # NHWK, NHWK -> NK or NHWK

As in pytorch-grad-cam, :class:`engine.gradcam.GradCam` is the shared base (target layers,
predicted-class score, gradients, ``ReLU(sum_k w_k A_k)``, normalisation, multi-layer fusion)
and a method only says how the feature maps are weighted: per channel ``(N, K)`` or per
position and channel ``(N, h, w, K)``.

- ``gradcam``   (Selvaraju et al. 2017): the spatial mean of the gradient.
- ``gradcampp`` (Chattopadhyay et al. 2018, eq. 19 with the authors' alpha normalisation, as
  tf-keras-vis): ``sum_ij alpha_ij ReLU(g_ij)``, ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)``.
- ``layercam``  (Jiang et al. 2021): elementwise ``ReLU(g_ij) * A_ij``, usually over several
  layers.

TensorFlow is imported inside each function, so this module imports without it.
"""
from __future__ import annotations

from typing import Any, Callable

#: (grads, activations) NHWK -> weights NK (per channel) or NHWK (per position and channel)
ChannelWeights = Callable[[Any, Any], Any]


def gradcam_weights(grads: Any, activations: Any) -> Any:
    """Grad-CAM: each channel weighs the spatial mean of its gradient (Selvaraju et al. 2017)."""
    import tensorflow as tf

    del activations
    return tf.reduce_mean(grads, axis=(1, 2))


def gradcampp_weights(grads: Any, activations: Any) -> Any:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): ``sum_ij alpha_ij ReLU(g_ij)``.

    ``alpha_ij = g^2 / (2 g^2 + sum_ab A_ab g^3)`` (the exponential score's factors cancel),
    0 where ``g^2 = 0``, then normalised to sum 1 over the positions of each channel, as the
    authors' code and tf-keras-vis do. For a GAP -> Dense head ``g = w / (h w)`` everywhere, so
    the weights reduce to ``ReLU(w) / (h w)``: see :func:`engine.runtime_ort.cams_from_class_maps`.
    """
    import tensorflow as tf

    g2 = tf.square(grads)
    g3 = g2 * grads
    total = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + total * g3
    denom = tf.where(g2 == 0.0, tf.ones_like(denom), denom)
    alpha = g2 / denom
    norm = tf.reduce_sum(alpha, axis=(1, 2), keepdims=True)
    alpha = alpha / tf.where(norm != 0.0, norm, tf.ones_like(norm))
    return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))


def layercam_weights(grads: Any, activations: Any) -> Any:
    """LayerCAM (Jiang et al. 2021): each position weighs its own positive gradient."""
    import tensorflow as tf

    del activations
    return tf.nn.relu(grads)


#: ``[gradcam] method`` -> its weighting
METHODS: dict[str, ChannelWeights] = {
    "gradcam": gradcam_weights,
    "gradcampp": gradcampp_weights,
    "layercam": layercam_weights,
}
#: methods whose maps need no gradient below the last feature map for a GAP -> Dense head (the
#: ONNX export serves them in closed form); the others need TensorFlow's gradients
CLOSED_FORM_METHODS = ("gradcam", "gradcampp")
