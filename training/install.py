"""The install policy: when a newly trained model replaces the installed one.

    installed = install_model(settings, run / "model.keras", meta, evaluation,
                              target=Path("models/cat_dog_model.keras"), policy="if_better")

``[training] install`` (or ``pawcam train --install``):

* ``if_better`` (default): the installed model is evaluated on the same test folder and
  replaced only when the new one is better (:func:`is_better`: accuracy, then ROC-AUC, then
  log loss, each beyond a noise margin), so a casual run never overwrites a better shipped
  model and the repository only gets a new model file when it improves. An installed model
  that cannot be loaded is replaced; one with other classes is kept (``always`` replaces it).
* ``always``: replace it.
* ``never``: the model stays in its run folder.

Installing copies the model and its metadata next to the target (temp names, then renamed),
the report folder, and rewrites the card so its links use the installed name.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.durable import atomic_path
from engine.errors import ModelLoadError
from engine.modelio import ModelMeta, load_model, meta_path_for
from training.evaluate import Evaluation, evaluate_folder
from training.report import card_path_for, report_dir_for, write_report

log = logging.getLogger(__name__)


def is_better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Strictly better on the same test set: higher accuracy; at equal accuracy a ROC-AUC
    higher by at least 1e-4; at equal both, a log loss lower by at least 1e-3. Differences
    below those margins are numerical noise (float32 kernels differ between runs and
    machines), so the installed model stays and the repository does not grow for nothing."""
    if abs(new["accuracy"] - old["accuracy"]) > 1e-9:
        return new["accuracy"] > old["accuracy"]
    if abs(new["roc_auc"] - old["roc_auc"]) >= 1e-4:
        return new["roc_auc"] > old["roc_auc"]
    return new["log_loss"] < old["log_loss"] - 1e-3


def should_install(settings: Settings, model_path: Path, meta: ModelMeta,
                   evaluation: Evaluation, target: Path, policy: str) -> bool:
    """Whether ``policy`` lets the new model replace ``target`` (logs why not)."""
    if policy == "never":
        log.info("not installed ([training] install = \"never\"); the model is %s", model_path)
        return False
    if policy != "if_better" or not target.exists():
        return True
    try:
        current = load_model(target)
    except ModelLoadError as exc:
        log.warning("installed model %s cannot be loaded (%s); replacing it", target, exc)
        return True
    if current.meta.class_names != meta.class_names:
        log.warning("not installed: %s has classes %s, the new model %s; use "
                    "--install always to replace it", target,
                    list(current.meta.class_names), list(meta.class_names))
        return False
    log.info("evaluating the installed model %s on the same test set to compare", target)
    old = evaluate_folder(settings, current, Path(evaluation.split_dir), 0)
    n, o = evaluation.metrics, old.metrics
    if not is_better(n, o):
        log.info("not installed: the installed model is as good or better (accuracy "
                 "%.4f vs new %.4f, ROC-AUC %.5f vs new %.5f); the new model stays in %s "
                 "(--install always replaces it anyway)", o["accuracy"], n["accuracy"],
                 o["roc_auc"], n["roc_auc"], model_path.parent)
        return False
    log.info("new model is better: accuracy %.4f (installed %.4f), ROC-AUC %.5f "
             "(installed %.5f)", n["accuracy"], o["accuracy"], n["roc_auc"], o["roc_auc"])
    return True


def install_model(settings: Settings, model_path: Path, meta: ModelMeta, evaluation: Evaluation,
                  target: Path, policy: str) -> bool:
    """Copy the model, its metadata, report and card to ``target`` when ``policy`` says so."""
    if not should_install(settings, model_path, meta, evaluation, target, policy):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    _copy_model_files(model_path, target)
    report = report_dir_for(target)
    if report.exists():
        shutil.rmtree(report)
    shutil.copytree(report_dir_for(model_path), report)
    write_report(target, meta, evaluation)  # the card's links use the installed name
    log.info("installed %s (+ %s, %s, %s/)", target, meta_path_for(target).name,
             card_path_for(target).name, report.name)
    return True


def _copy_model_files(model_path: Path, target: Path) -> None:
    """The model and its metadata copied to ``target``: both copies complete (and fsync'ed)
    under hidden temp names before either is renamed (the model first, then its metadata)."""
    with atomic_path(meta_path_for(target)) as meta_tmp, \
            atomic_path(target, keep_suffix=True) as tmp:
        shutil.copyfile(model_path, tmp)
        shutil.copyfile(meta_path_for(model_path), meta_tmp)
