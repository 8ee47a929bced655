"""Validation metrics on the full set of predictions (never averaged per shard)."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], threshold: float = 0.5
) -> dict:
    """Metrics from integer ``labels`` (N,) and class probabilities ``probs`` (N, K).

    Binary: ``auc`` is ROC AUC of the positive (second) class; precision/recall/F1 at
    ``threshold``. More classes: ``auc`` is the one-vs-rest macro AUC, plus ``auc_<class>`` each;
    precision/recall/F1 are macro averages of the arg-max prediction.
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    present = np.unique(labels)
    out: dict = {"n": int(len(labels))}
    if k == 2:
        pred = (probs[:, 1] >= threshold).astype(np.int64)
        if len(present) == 2:
            out["auc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
            out["pr_auc"] = float(skm.average_precision_score(labels, probs[:, 1]))
        else:
            out["auc"] = out["pr_auc"] = math.nan
        avg = "binary"
    else:
        pred = probs.argmax(axis=1)
        per_class = []
        for i, name in enumerate(class_names):
            y = (labels == i).astype(np.int64)
            a = float(skm.roc_auc_score(y, probs[:, i])) if 0 < y.sum() < len(y) else math.nan
            out[f"auc_{name}"] = a
            per_class.append(a)
        valid = [a for a in per_class if not math.isnan(a)]
        out["auc"] = float(np.mean(valid)) if len(valid) == k else math.nan
        out["pr_auc"] = float(
            np.mean([skm.average_precision_score(labels == i, probs[:, i]) for i in range(k)])
        )
        avg = "macro"
    out["acc"] = float(skm.accuracy_score(labels, pred))
    out["balanced_acc"] = float(skm.balanced_accuracy_score(labels, pred)) if len(present) > 1 else (
        out["acc"])
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, pred, average=avg, labels=list(range(k)) if avg == "macro" else None,
        zero_division=0,
    )
    out.update(precision=float(p), recall=float(r), f1=float(f))
    out["confusion"] = skm.confusion_matrix(labels, pred, labels=list(range(k))).tolist()
    return out
