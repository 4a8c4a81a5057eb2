"""The daemon's model: built and checked at start-up, rebuilt on SIGHUP while the old one serves.

    clf = build_classifier(settings)                 # load, check, warm up (or PawcamError)
    reload = Reload.start(settings, wcfg)           # config.toml re-read, model built on a thread
    ... reload.done() ...
    clf = reload.result()                            # the new classifier, or its error

What may change in a reload and what needs a restart is decided here (:func:`reread_settings`);
swapping the model in between batches is the daemon's job (watcher.daemon).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from engine.config import Settings, load_settings, replace
from watcher.config import WatcherSettings, watcher_settings

log = logging.getLogger("pawcam.watch")


def build_classifier(settings: Settings):
    """THE way the daemon gets a classifier (start-up and SIGHUP reload): load the model
    named in ``settings``, check it and warm it up. Raises PawcamError (ModelLoadError, ...)
    when the model is unusable."""
    from engine.classifier import Classifier

    t0 = time.monotonic()
    clf = Classifier.from_settings(settings)
    check_and_warm_up(clf)
    log.info("model %s loaded in %.1f s", clf.meta.version, time.monotonic() - t0)
    return clf


def check_and_warm_up(clf) -> None:
    """A test batch: trace the model for batch shapes 1 and 2 (then any size) before READY,
    so the first dropped file does not pay for it, and check that it answers with one
    finite probability per class."""
    import numpy as np

    from engine.decode import DecodedImage
    from engine.errors import ModelLoadError

    h, w = clf.meta.input_size
    img = DecodedImage(np.zeros((h, w, 3), np.uint8), None, w, h, "")
    for n in (1, 2):
        probs, _ = clf.infer([img] * n)
        probs = np.asarray(probs)
        if probs.shape != (n, len(clf.meta.class_names)) or not np.isfinite(probs).all():
            raise ModelLoadError(
                f"the model's test batch of {n} gave {probs.shape} "
                f"{'non-finite ' if not np.isfinite(probs).all() else ''}probabilities, "
                f"expected ({n}, {len(clf.meta.class_names)}) finite ones")


def reread_settings(old: Settings, wold: WatcherSettings) -> tuple[Settings, WatcherSettings]:
    """config.toml again, keeping what cannot change while running: the folders, the
    device, decode threads, runtime and precision (the latter two and the folders may come
    from command-line flags) and the RESTART_ONLY watcher keys (a change to those is logged
    as needing a restart). Raises PawcamError (ConfigError) for a bad configuration."""
    raw = load_settings(old.source) if old.source is not None else old
    wraw = watcher_settings(raw)
    kept = {k: getattr(wold, k) for k in WatcherSettings.RESTART_ONLY}
    changed = [f"[watcher] {k}" for k, v in kept.items() if getattr(wraw, k) != v]
    if raw.device != old.device:
        changed.append("[device]")
    for key in ("decode_threads", "runtime", "precision"):  # (these may come from flags)
        if getattr(raw.inference, key) != getattr(old.inference, key):
            changed.append(f"[inference] {key}")
    if changed:
        log.warning("reload: %s changed in the configuration but need(s) a restart; "
                    "keeping the running values", ", ".join(changed))
    new = replace(raw, paths=old.paths, device=old.device,
                  inference=replace(raw.inference,
                                    decode_threads=old.inference.decode_threads,
                                    runtime=old.inference.runtime,
                                    precision=old.inference.precision))
    return new, replace(wraw, **kept)


class Reload:
    """A reload in progress: the settings it will bring and the classifier being built on
    its own thread (the daemon keeps serving with the old one meanwhile)."""

    def __init__(self, settings: Settings, wcfg: WatcherSettings, future: Future) -> None:
        self.settings, self.wcfg, self.future = settings, wcfg, future

    @classmethod
    def start(cls, settings: Settings, wcfg: WatcherSettings) -> "Reload":
        """Re-read the settings (PawcamError: a bad config.toml) and start building."""
        new, wnew = reread_settings(settings, wcfg)
        builder = ThreadPoolExecutor(1, thread_name_prefix="pawcam-reload")
        future = builder.submit(build_classifier, new)
        builder.shutdown(wait=False)
        return cls(new, wnew, future)

    def done(self) -> bool:
        return self.future.done()

    def result(self):
        """The new classifier (raises what building it raised)."""
        return self.future.result()
