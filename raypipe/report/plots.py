"""Pictures of a model's quality and of a run: ROC, precision-recall, confusion matrix, training
curves. Each function writes one PNG of a fixed pixel size (``FIGSIZE`` x ``DPI``) and returns
its path. Matplotlib's non-interactive backend is used, so they run on headless workers."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

FIGSIZE = (6.0, 5.0)  # inches
DPI = 100  # -> 600 x 500 pixel PNGs
PIXELS = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height)


def _save(fig, path: str | Path) -> str:
    # no bbox_inches="tight": it would change the pixel size from figure to figure
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def youden_point(labels: np.ndarray, scores: np.ndarray) -> dict:
    """The ROC point maximising Youden's J = TPR - FPR: {threshold, fpr, tpr, j}."""
    fpr, tpr, thr = skm.roc_curve(labels, scores)
    i = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (nothing predicted positive); clip it to a real score
    t = float(min(thr[i], 1.0)) if np.isfinite(thr[i]) else 1.0
    return {"threshold": t, "fpr": float(fpr[i]), "tpr": float(tpr[i]), "j": float(tpr[i] - fpr[i])}


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """(FPR, TPR) of the rule ``score >= threshold``."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    pos, neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return {"threshold": float(threshold), "fpr": float((pred & ~labels).sum() / neg),
            "tpr": float((pred & labels).sum() / pos)}


def roc_findings_png(targets: np.ndarray, scores: np.ndarray, finding_names: list[str],
                     path: str | Path) -> str:
    """Multi-label: the ROC curve of every finding (with both classes present) in one figure, the
    legend sorted by AUC."""
    targets = np.asarray(targets).astype(bool)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="chance")
    curves = []
    for i, name in enumerate(finding_names):
        yi = targets[:, i]
        if yi.any() and not yi.all():
            fpr, tpr, _ = skm.roc_curve(yi, scores[:, i])
            curves.append((skm.roc_auc_score(yi, scores[:, i]), name, fpr, tpr))
    for auc, name, fpr, tpr in sorted(curves, key=lambda c: -c[0]):
        ax.plot(fpr, tpr, lw=1.2, label=f"{name}: AUC = {auc:.3f}")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC curves, {len(curves)} findings", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def roc_png(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path,
            threshold: float = 0.5) -> str:
    """ROC curve(s) with AUC. Binary: the positive (second) class, with the chosen operating point
    (``threshold``) and Youden's point marked. More classes: one-vs-rest curve per class."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="chance")
    if probs.shape[1] == 2:
        scores = probs[:, 1]
        fpr, tpr, _ = skm.roc_curve(labels, scores)
        auc = skm.roc_auc_score(labels, scores)
        ax.plot(fpr, tpr, lw=2, label=f"{class_names[1]} vs {class_names[0]}: AUC = {auc:.3f}")
        chosen = operating_point(labels, scores, threshold)
        ax.scatter([chosen["fpr"]], [chosen["tpr"]], s=60, marker="o", zorder=3,
                   label=f"chosen t={threshold:.2f} (TPR {chosen['tpr']:.2f}, FPR {chosen['fpr']:.2f})")
        y = youden_point(labels, scores)
        ax.scatter([y["fpr"]], [y["tpr"]], s=80, marker="*", zorder=3,
                   label=f"Youden t={y['threshold']:.2f} (J = {y['j']:.2f})")
    else:
        for i, name in enumerate(class_names):
            yi = (labels == i).astype(int)
            if 0 < yi.sum() < len(yi):
                fpr, tpr, _ = skm.roc_curve(yi, probs[:, i])
                ax.plot(fpr, tpr, lw=1.5, label=f"{name}: AUC = {skm.roc_auc_score(yi, probs[:, i]):.3f}")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def pr_png(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path) -> str:
    """Precision-recall curve(s) with average precision; the dashed line is the prevalence."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for i in classes:
        yi = (labels == i).astype(int)
        if yi.sum() == 0:
            continue
        prec, rec, _ = skm.precision_recall_curve(yi, probs[:, i])
        ap = skm.average_precision_score(yi, probs[:, i])
        line, = ax.plot(rec, prec, lw=2, label=f"{class_names[i]}: AP = {ap:.3f}")
        ax.axhline(yi.mean(), color=line.get_color(), lw=1, ls="--",
                   label=f"{class_names[i]} prevalence {yi.mean():.2f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.05))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def confusion_png(confusion: list[list[int]] | np.ndarray, class_names: list[str], path: str | Path,
                  threshold: float | None = None) -> str:
    """Confusion matrix (rows: true class, columns: predicted), counts and row percentages."""
    cm = np.asarray(confusion, dtype=np.int64)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.imshow(cm, cmap="Blues")
    rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for (i, j), v in np.ndenumerate(cm):
        color = "white" if v > cm.max() / 2 else "black"
        ax.text(j, i, f"{v}\n{100 * v / rows[i, 0]:.0f}%", ha="center", va="center", color=color)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=30, ha="right")
    ax.set_yticks(ticks, class_names)
    title = "Confusion matrix" + (f" at threshold {threshold:.2f}" if threshold is not None else "")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return _save(fig, path)


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for h in history:
        v = h.get(key)
        if isinstance(v, int | float) and not math.isnan(float(v)):
            xs.append(int(h.get("epoch", len(xs))))
            ys.append(float(v))
    return xs, ys


def training_curves_png(history: list[dict], path: str | Path) -> str:
    """Train and val loss and val AUC per epoch; learning rate on a second axis."""
    fig, (ax_loss, ax_auc) = plt.subplots(2, 1, figsize=FIGSIZE, sharex=True)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        xs, ys = _series(history, key)
        ax_loss.plot(xs, ys, marker="o", ms=3, label=label)
    ax_loss.set(ylabel="loss", title="Training curves")
    ax_loss.legend(loc="upper left", fontsize=8)
    xs, ys = _series(history, "val_auc")
    ax_auc.plot(xs, ys, marker="o", ms=3, color="tab:green", label="val AUC")
    ax_auc.set(xlabel="epoch", ylabel="val AUC")
    ax_lr = ax_auc.twinx()
    xs, ys = _series(history, "lr")
    ax_lr.plot(xs, ys, color="tab:gray", ls="--", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    handles = ax_auc.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
    ax_auc.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
