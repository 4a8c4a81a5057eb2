"""Keras callbacks of a training phase: epoch log, checkpoints, early stopping with best weights.

    start_epoch_log(run / "log.csv")
    callbacks = phase_callbacks("head", model, run / "log.csv", run / "checkpoints", patience=3)
    history = trainee.fit(..., callbacks=callbacks)
    best = best_of(callbacks).best     # the best val_loss (and weights) for the next phase
    rows = history_rows("head", history)   # one dict per epoch, as in log.csv

Keras' own :class:`keras.callbacks.History` (what ``fit`` returns) holds the per-epoch numbers;
:class:`EpochStats` adds each epoch's ``seconds`` and ``learning_rate`` to the logs so they land
in it. Three jobs stay home-made, each for a reason:

* ``log.csv`` (:class:`EpochCsv`): one file for both phases, ``phase`` first and epochs counted
  from 1 in each phase (readers and tests rely on that layout). ``keras.callbacks.CSVLogger``
  writes ``epoch`` (from 0) first, then the metrics in alphabetical order.
* checkpoints and early stopping (:class:`BestWeights`): the model being fitted is only a part
  of the network (the head on cached features, or the top on cached activations) while the
  checkpoint must be the *full* model, and phase 2 starts from phase 1's best and must beat
  it: ``keras.callbacks.EarlyStopping`` can only restore weights seen in its own ``fit``, and
  ``ModelCheckpoint`` saves the fitted model.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from engine.durable import atomic_path

log = logging.getLogger(__name__)

LOG_COLUMNS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
               "learning_rate", "seconds")

#: a progress line during an epoch at most this often (seconds)
PROGRESS_EVERY = 30.0


def start_epoch_log(path: Path) -> None:
    """A fresh ``log.csv`` with its header row."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerow(LOG_COLUMNS)


class EpochStats(keras.callbacks.Callback):
    """Adds ``seconds`` and ``learning_rate`` to each epoch's logs; logs a progress line
    every :data:`PROGRESS_EVERY` seconds inside long epochs."""

    def __init__(self, phase: str, batches: int) -> None:
        super().__init__()
        self.phase, self.batches = phase, batches
        self.t0 = self.last_note = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = self.last_note = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if now - self.last_note > PROGRESS_EVERY:
            self.last_note = now
            log.info("%s: batch %d/%d, loss %.4f", self.phase, batch + 1, self.batches,
                     float((logs or {}).get("loss", np.nan)))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = getattr(self.model, "optimizer", None)
        logs["learning_rate"] = float(np.asarray(opt.learning_rate)) if opt is not None else None
        logs["seconds"] = time.perf_counter() - self.t0


class EpochCsv(keras.callbacks.Callback):
    """Appends one row per epoch to ``log.csv`` (see :data:`LOG_COLUMNS`) and logs it."""

    def __init__(self, path: Path, phase: str) -> None:
        super().__init__()
        self.path, self.phase = path, phase

    def on_epoch_end(self, epoch, logs=None):
        row = epoch_row(self.phase, epoch, logs or {})
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c)) for c in LOG_COLUMNS])
        log.info("%s epoch %d: loss %.4f acc %.4f | val_loss %.4f val_acc %.4f (%.1f s)",
                 row["phase"], row["epoch"], row["loss"], row["accuracy"], row["val_loss"],
                 row["val_accuracy"], row["seconds"])


class BestWeights(keras.callbacks.Callback):
    """Checkpoints of the full model each epoch, early stopping on validation loss, and the
    best weights restored at the end (``start_best``: the previous phase's best, to beat)."""

    def __init__(self, phase: str, full_model: Any, ckpt_dir: Path, patience: int,
                 start_best: tuple[float, list] | None = None) -> None:
        super().__init__()
        self.phase, self.full_model, self.ckpt_dir, self.patience = (phase, full_model,
                                                                    ckpt_dir, patience)
        self.best = start_best[0] if start_best else np.inf
        self.best_weights = start_best[1] if start_best else None
        self.best_epoch = 0 if start_best else -1   # 0: the previous phase's weights
        self.wait = 0

    def on_epoch_end(self, epoch, logs=None):
        val_loss = float((logs or {})["val_loss"])
        _save_checkpoint(self.full_model, self.ckpt_dir / "last.keras")
        if val_loss < self.best - 1e-6:
            self.best, self.best_epoch, self.wait = val_loss, epoch + 1, 0
            self.best_weights = self.full_model.get_weights()
            _save_checkpoint(self.full_model, self.ckpt_dir / "best.keras")
        else:
            self.wait += 1
            if self.wait >= self.patience:
                log.info("%s: early stop, no val_loss improvement in %d epoch(s)", self.phase,
                         self.patience)
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.full_model.set_weights(self.best_weights)
            where = f"epoch {self.best_epoch}" if self.best_epoch > 0 else "the previous phase"
            log.info("%s: restored best weights (%s, val_loss %.4f)", self.phase, where,
                     self.best)


def phase_callbacks(phase: str, full_model: Any, log_path: Path, ckpt_dir: Path,
                    patience: int, start_best: tuple[float, list] | None = None,
                    batches: int = 0) -> list[keras.callbacks.Callback]:
    """Epoch stats, ``log.csv`` row, checkpoints + early stopping, in that order (the last
    one is the :class:`BestWeights`: see :func:`best_of`)."""
    return [EpochStats(phase, batches), EpochCsv(log_path, phase),
            BestWeights(phase, full_model, ckpt_dir, patience, start_best)]


def best_of(callbacks: list[keras.callbacks.Callback]) -> BestWeights:
    """The :class:`BestWeights` of a :func:`phase_callbacks` list."""
    return next(cb for cb in callbacks if isinstance(cb, BestWeights))


def epoch_row(phase: str, epoch: int, logs: dict[str, Any]) -> dict[str, Any]:
    """One epoch's numbers in ``log.csv``'s columns (epochs counted from 1)."""
    return {"phase": phase, "epoch": epoch + 1, "loss": float(logs["loss"]),
            "accuracy": float(logs.get("accuracy", np.nan)),
            "val_loss": float(logs["val_loss"]),
            "val_accuracy": float(logs.get("val_accuracy", np.nan)),
            "learning_rate": logs.get("learning_rate"), "seconds": logs.get("seconds")}


def history_rows(phase: str, history: keras.callbacks.History) -> list[dict[str, Any]]:
    """Keras' History of one ``fit`` as :func:`epoch_row` dicts (the model card's curves)."""
    return [epoch_row(phase, epoch, {k: v[i] for k, v in history.history.items()})
            for i, epoch in enumerate(history.epoch)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def _save_checkpoint(model: Any, path: Path) -> None:
    """A checkpoint is replaced whole: a crash mid-save leaves the previous one, not half a file."""
    with atomic_path(path, durable=False, keep_suffix=True) as tmp:
        model.save(tmp)
