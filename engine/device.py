"""Pick where TensorFlow runs: the GPU when it sees one (memory growth on), else the CPU.

    device = configure_device(settings.device)   # -> "/GPU:0" or "/CPU:0"
    with tf.device(device): ...

Called once per process, before the model is built or loaded.
"""
from __future__ import annotations

import logging

from engine.config import DeviceSettings
from engine.errors import ConfigError
from engine.quiet import native_stderr_captured

log = logging.getLogger(__name__)
_configured: str | None = None


def configure_device(settings: DeviceSettings) -> str:
    """Apply ``[device]`` settings; return the TensorFlow device string to run under."""
    global _configured
    if _configured is not None:
        return _configured
    with native_stderr_captured() as captured:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    if captured.text:
        log.debug("TensorFlow start-up output:\n%s", captured.text)
    choice = settings.device
    if choice == "cpu":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # already initialised: placement below still pins the CPU
            pass
        _configured = "/CPU:0"
    elif not gpus:
        if choice.startswith("gpu"):
            raise ConfigError(f'[device] device = "{choice}" but TensorFlow sees no GPU; install '
                              'the GPU extra (pip install ".[gpu]") and drivers, or use "auto"')
        _configured = "/CPU:0"
    else:
        index = int(choice[4:]) if choice.startswith("gpu:") else 0
        if index >= len(gpus):
            raise ConfigError(f'[device] device = "{choice}" but only {len(gpus)} GPU(s) are '
                              "visible")
        if settings.memory_growth:
            for gpu in gpus:
                try:
                    tf.config.experimental.set_memory_growth(gpu, True)
                except RuntimeError:  # already initialised
                    pass
        _configured = f"/GPU:{index}"
    log.info("running on %s (%d GPU(s) visible)", _configured, len(gpus))
    return _configured
