"""The evaluation report beside a model: JSON, a Markdown model card, PNG plots, mistakes.

    write_report(Path("models/cat_dog_model.keras"), meta, evaluation)
    # models/cat_dog_model.md                         the model card (links into the folder below)
    # models/cat_dog_model_report/evaluation.json     every number, machine-readable
    # models/cat_dog_model_report/training_curves.png confusion_matrix.png roc_curve.png
    # models/cat_dog_model_report/reliability_diagram.png
    # models/cat_dog_model_report/wrong/NN_*.jpg      most confidently wrong, Grad-CAM overlays

Everything the card says comes from the model's metadata (training data, counts, skipped
files, settings, seeds, versions, timing, training history) and the evaluation, so
``pawcam evaluate`` can rebuild the full card for any pawcam model. The plots are drawn by
:mod:`training.plots` (matplotlib's Agg backend, no display needed), the faithfulness section's
table and plot here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.classifier import format_confidence
from engine.durable import write_atomic
from engine.modelio import ModelMeta
from engine.render import write_picture
from engine.text import safe_stem
from training.plots import (plot_confusion, plot_faithfulness, plot_reliability, plot_roc,
                            plot_training_curves)

log = logging.getLogger(__name__)


def report_dir_for(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + "_report")


def card_path_for(model_path: Path) -> Path:
    return model_path.with_suffix(".md")


def _keep_top(s: dict[str, Any]) -> str:
    """``97.0 % ± 1.2 (8 draws: 96.9 %)``; older reports hold only the one-draw figure."""
    text = f"{100 * s['keep_top_win_rate']:.1f} %"
    if "keep_top_win_rate_se" in s:
        text += f" ± {100 * s['keep_top_win_rate_se']:.1f}"
    if "keep_top_win_rate_draws" in s:
        text += f" ({s['keep_top_draws']} draws: {100 * s['keep_top_win_rate_draws']:.1f} %)"
    return text


def faithfulness_lines(scores: dict[str, Any]) -> list[str]:
    """The Markdown table of the methods' faithfulness numbers (model card, README)."""
    n = next(iter(scores.values()))["images"]
    lines = [
        f"Scored on a seeded sample of {n} photos, probability of the explained (predicted) "
        "class; each perturbed photo answered by the served model.",
        "",
        "| method | keep top 20 % beats random 20 % of 7x7 cells | drop, top 20 % / random | "
        "deletion AUC ↓ | insertion AUC ↑ | ROAD MoRF ↓ / LeRF ↑ | ROAD gap ↑ | maps by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, s in scores.items():
        lines.append(
            f"| `{method}` | {_keep_top(s)} | {s['keep_top_drop']:.3f} / "
            f"{s['keep_random_drop']:.3f} | {s['deletion_auc']:.3f} | {s['insertion_auc']:.3f} | "
            f"{s['road_morf']:.3f} / {s['road_lerf']:.3f} | {s['road_gap']:.3f} | "
            f"{s.get('maps_by', '')} |")
    lines += [
        "",
        "- *keep top vs random* (issue 12's protocol): keep only the 20 % of pixels the map ranks "
        "highest (the rest: the photo's mean colour) vs 10 random cells of the 7x7 grid, one draw "
        "per photo; the share of photos where the map's region keeps the class strictly better "
        "(± its standard error), and the mean drop of its probability. In brackets: the share of "
        "several random draws beaten (same expectation, less noise from the draw).",
        "- *deletion / insertion*: pixels removed from the photo (added to a blurred copy) in map "
        "order, 10 steps; removed pixels take a heavily blurred copy's values, which keeps colours "
        "and layout so the curve measures lost detail rather than the shock of flat patches.",
        "- *ROAD*: the most (MoRF) or least (LeRF) relevant 20/40/60/80 % of pixels replaced by "
        "noisy linear imputation from their neighbours (no tell-tale edges); gap = mean LeRF - "
        "MoRF.",
    ]
    return lines


def write_report(model_path: Path, meta: ModelMeta, evaluation: Any) -> Path:
    """Write the report folder and the card beside ``model_path``; returns the card path."""
    model_path = Path(model_path)
    folder = report_dir_for(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    data = evaluation.to_dict()
    m = data["metrics"]
    plots: dict[str, str] = {}
    if plot_training_curves(meta.extra.get("history", []), folder / "training_curves.png"):
        plots["training curves"] = "training_curves.png"
    plot_confusion(m["confusion_matrix"], meta.class_names, folder / "confusion_matrix.png")
    plots["confusion matrix"] = "confusion_matrix.png"
    if data["roc"]:
        plot_roc(data["roc"], folder / "roc_curve.png")
        plots["ROC curve"] = "roc_curve.png"
    plot_reliability(data["reliability_before"], data["reliability_after"],
                     m["ece_uncalibrated"], m["ece"], folder / "reliability_diagram.png")
    plots["reliability diagram"] = "reliability_diagram.png"
    if data.get("faithfulness"):
        plot_faithfulness(data["faithfulness"], folder / "faithfulness.png")
    wrong_dir = folder / "wrong"
    for old in wrong_dir.glob("*") if wrong_dir.is_dir() else []:
        old.unlink()
    gallery_files = []
    for k, item in enumerate(evaluation.gallery, 1):
        name = f"{k:02d}_{safe_stem(item.path.replace('/', '_'))}.jpg"
        wrong_dir.mkdir(exist_ok=True)
        write_picture(wrong_dir / name, item.picture, "jpg", 85)
        gallery_files.append(f"wrong/{name}")
    for entry, f in zip(data["most_confidently_wrong"], gallery_files):
        entry["overlay"] = f
    data["model"] = {"file": model_path.name, "version": meta.version,
                     "class_names": list(meta.class_names), "temperature": meta.temperature}
    data["plots"] = plots   # the card can be redrawn from evaluation.json alone
    squashed = _previous(folder).get("squashed")
    if squashed and squashed.get("version") == meta.version:
        data["squashed"] = squashed   # benchmarks/squashed_check.py --card, same model
    write_atomic(folder / "evaluation.json", (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    card = card_path_for(model_path)
    write_atomic(card, render_card(model_path, meta, data, plots).encode("utf-8"))
    log.info("report written: %s and %s/", card, folder)
    return card


PLOTS = {"training curves": "training_curves.png", "confusion matrix": "confusion_matrix.png",
         "ROC curve": "roc_curve.png", "reliability diagram": "reliability_diagram.png"}


def _previous(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "evaluation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def add_squashed_check(model_path: Path, meta: ModelMeta, squashed: dict[str, Any]) -> Path:
    """Record the squashed-photos check (``benchmarks/squashed_check.py --card``) in the report's
    evaluation.json and redraw the card from it; returns the card path."""
    folder = report_dir_for(model_path)
    data = _previous(folder)
    if data.get("model", {}).get("version") != meta.version:
        raise ValueError(f"{folder / 'evaluation.json'} is not this model's evaluation: run "
                         "`pawcam evaluate` first")
    data["squashed"] = {**squashed, "version": meta.version}
    write_atomic(folder / "evaluation.json", (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    plots = data.get("plots") or {  # reports written before the list was recorded
        t: f for t, f in PLOTS.items() if (folder / f).exists()}
    card = card_path_for(model_path)
    write_atomic(card, render_card(model_path, meta, data, plots).encode("utf-8"))
    return card


def squashed_lines(sq: dict[str, Any]) -> list[str]:
    """The card's section on squashed photos: the same test set resized without keeping its
    aspect ratio, scored the same way."""
    rows = [f"| {name} | {_pct(m['accuracy'])} | {m['roc_auc']:.5f} | {m['ece']:.4f} | {m['n']} |"
            for name, m in (("as published", sq["natural"]), (sq["label"], sq["squashed"]))]
    return ["## Squashed photos", "",
            f"How it was checked: {sq['how']} Scored through the engine as served "
            f"({sq['runtime']}).", "",
            "| test photos | accuracy | ROC-AUC | ECE | images |", "|---|---|---|---|---|",
            *rows, ""]


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


def _counts(c: dict[str, int] | None) -> str:
    if not c:
        return "-"
    return f"{sum(c.values()):,} (" + ", ".join(f"{k} {v:,}" for k, v in c.items()) + ")"


def render_card(model_path: Path, meta: ModelMeta, data: dict[str, Any],
                plots: dict[str, str]) -> str:
    m = data["metrics"]
    ex = meta.extra
    rel = report_dir_for(model_path).name
    names = meta.class_names
    lines = [
        f"# Model card: `{model_path.name}`",
        "",
        f"*Version* `{meta.version}` · classes {', '.join(f'`{n}`' for n in names)} · input "
        f"{meta.input_size[0]}x{meta.input_size[1]} RGB 0-255 (scaling inside the model) · "
        f"temperature {meta.temperature:.4f} · threshold {meta.threshold}",
        "",
        "## What it is",
        "",
        "MobileNetV2 (ImageNet-pretrained backbone unless stated below) → global average "
        "pooling → dropout → Dense "
        + ("(one sigmoid unit = P(" + names[1] + "))" if meta.binary else "(softmax)")
        + ", one flat Keras graph; Grad-CAM explains layer "
        f"`{meta.target_layer or 'auto'}`. Trained with `pawcam train` in two phases: the head "
        "on the frozen backbone, then the top blocks fine-tuned at a low learning rate with "
        "BatchNorm in inference mode (a phase is kept only if it lowers the validation loss). "
        "Confidences are temperature-scaled (see Training below).",
        "",
        f"## Evaluation on `{_short(data['split_dir'])}` (through the engine, as served)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| images | {m['n']} ({', '.join(f'{k}: {v}' for k, v in m['counts'].items())}); "
        f"skipped {m['skipped']} |",
        f"| accuracy | {_pct(m['accuracy'])} |",
        f"| ROC-AUC | {m['roc_auc']:.5f} |",
        f"| ECE (15 bins), calibrated | {m['ece']:.4f} |",
        f"| ECE before calibration (T = 1) | {m['ece_uncalibrated']:.4f} |",
        f"| log loss calibrated / uncalibrated | {m['log_loss']:.4f} / "
        f"{m['log_loss_uncalibrated']:.4f} |",
        f"| macro F1 | {m['macro_f1']:.4f} |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, r in m["per_class"].items():
        lines.append(f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | "
                     f"{r['support']} |")
    lines += ["", "Confusion matrix (rows = true, columns = predicted):", "",
              "| true \\ predicted | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, m["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    if data.get("squashed"):
        lines += [""] + squashed_lines(data["squashed"])[:-1]
    lines += ["", "## Plots", ""]
    for title, f in plots.items():
        lines.append(f"![{title}]({rel}/{f})")
        lines.append("")
    if data.get("skipped"):
        lines += ["Files of this set that could not be read (not counted above):", ""]
        lines += [f"- `{s['path']}`: {s['message']} ({s['code']})" for s in data["skipped"][:50]]
        lines.append("")
    if data.get("faithfulness"):
        lines += ["## Explanations: how faithful is each method", ""]
        lines += faithfulness_lines(data["faithfulness"])
        lines += ["", f"![faithfulness curves]({rel}/faithfulness.png)", ""]
    wrong = data["most_confidently_wrong"]
    lines += ["## Most confidently wrong", ""]
    if wrong:
        lines += ["Grad-CAM overlays of the predicted class (what the model looked at when it "
                  "was wrong):", "", "| image | true | predicted | confidence | overlay |",
                  "|---|---|---|---|---|"]
        for w in wrong:
            pic = f"![]({rel}/{w['overlay']})" if w.get("overlay") else ""
            lines.append(f"| `{w['path']}` | {w['true']} | {w['predicted']} | "
                         f"{format_confidence(w['confidence'])} | {pic} |")
    else:
        lines.append("No mistakes on this set.")
    lines += ["", "## Training", ""]
    if not ex:
        lines.append("No training information in the metadata (not trained by `pawcam train`).")
    else:
        data_info = ex.get("data", {})
        t = ex.get("timing", {})
        sources = data_info.get("sources") or []
        if sources:
            lines += ["Data sources (`--data`, in order; photos found / used after the pre-scan):",
                      "", "| folder | train/ files | used for training + validation | "
                      "skipped | test/ files |", "|---|---|---|---|---|"]
            for s in sources:
                lines.append(f"| `{_short(s['root'])}` | {_counts(s.get('train_files'))} | "
                             f"{_counts(s.get('used'))} | {s.get('skipped', 0)} | "
                             f"{_counts(s.get('test_files')) if s.get('test_files') else '-'} |")
            lines.append("")
        t_parts = ", ".join(f"{label} {t[key]:.0f} s" for key, label in (
            ("decode_seconds", "decode"), ("activation_seconds", "activations"),
            ("feature_seconds", "features"), ("head_seconds", "head"),
            ("fine_tune_seconds", "fine-tune"), ("calibration_seconds", "calibration"))
            if key in t)
        lines += [
            f"- data: " + (", ".join(f"`{_short(x['root'])}`" for x in sources) if sources
                           else f"`{_short(data_info.get('root', '?'))}`")
            + f"; train {data_info.get('train_counts')}, "
            f"validation {data_info.get('val_counts')} (stratified {data_info.get('validation_fraction')} "
            f"of train, seed {ex.get('seed')}), test {data_info.get('test_counts')}",
            f"- skipped by the pre-scan: {len(ex.get('skipped', []))} file(s)"
            + ("" if not ex.get("skipped") else ": " + ", ".join(
                f"`{s['path']}` ({s['code']})" for s in ex["skipped"][:20])),
            f"- backbone weights: `{_short(str(ex.get('backbone_weights')))}`",
            f"- training wall-clock time: **{t.get('train_seconds', 0) / 60:.1f} min** "
            f"({t_parts}) on {ex.get('machine', '?')}; "
            "evaluation not included",
            f"- calibration: T = {meta.temperature:.4f} fitted on "
            f"{ex.get('calibration', {}).get('images', '?')} images "
            f"({ex.get('calibration', {}).get('method', 'validation split')}; "
            f"{ex.get('calibration', {}).get('errors', '?')} of them misclassified); ECE there "
            f"before/after: {ex.get('val_ece_before', float('nan')):.4f} / "
            f"{ex.get('val_ece_after', float('nan')):.4f}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in ex.get('versions', {}).items())}",
            f"- seeds: {ex.get('seed')} (Python, NumPy, TensorFlow via keras.utils.set_random_seed; "
            "the split, the shuffling and the augmentation use it too). "
            + ("TensorFlow op determinism was on: rerunning `pawcam train` with the same "
               "settings and data on the same kind of machine gives the same weights (the "
               "version suffix is a hash of them); another CPU type or TensorFlow version may "
               "differ in the last digits."
               if ex.get("settings", {}).get("deterministic") else
               "Op determinism was off, so a rerun gives slightly different weights (early "
               "stopping can then pick another epoch) and metrics that differ by a few images."),
            "",
            "Settings (`[training]`):",
            "",
            "```toml",
        ]
        for k, v in ex.get("settings", {}).items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines += ["```"]
        notes = ex.get("notes")
        if notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Limits", "",
              "- Trained on photos of " + " and ".join(names) + " only: any other picture still "
              "gets one of these labels; the engine's `uncertain_below` band flags low "
              "confidence but not out-of-distribution inputs.",
              "- The temperature was fitted on photos from the same source as the training set; "
              "on other photo sources (phone cameras, drawings, night shots) confidences may be "
              "less well calibrated.",
              "- Timings were measured on a 2-core machine shared with other work, so they are "
              "noisy.", ""]
    return "\n".join(lines)


def _short(path: str) -> str:
    """Paths in the card relative to the repo's parent when possible (no home folders)."""
    p = str(path)
    for marker in ("/shared/", "/models/", "/runs/"):
        if marker in p:
            return "…" + p[p.index(marker):]
    return p
