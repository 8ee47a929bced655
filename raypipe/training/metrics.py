"""Validation metrics on the full set of predictions (never averaged per shard).

Plain numpy, with scikit-learn's definitions (the tests compare them value for value): every
training worker imports this module, and importing ``sklearn.metrics`` (with SciPy) cost each
worker process about 1.3 s of CPU at start-up.
"""

from __future__ import annotations

import math

import numpy as np


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
            out["auc"] = roc_auc(labels == 1, probs[:, 1])
            out["pr_auc"] = average_precision(labels == 1, probs[:, 1])
        else:
            out["auc"] = out["pr_auc"] = math.nan
        avg = "binary"
    else:
        pred = probs.argmax(axis=1)
        per_class = []
        for i, name in enumerate(class_names):
            a = roc_auc(labels == i, probs[:, i])  # NaN when class i is all or none of the labels
            out[f"auc_{name}"] = a
            per_class.append(a)
        valid = [a for a in per_class if not math.isnan(a)]
        out["auc"] = float(np.mean(valid)) if len(valid) == k else math.nan
        out["pr_auc"] = float(
            np.mean([average_precision(labels == i, probs[:, i]) for i in range(k)])
        )
        avg = "macro"
    confusion = confusion_matrix(labels, pred, k)
    tp = np.diag(confusion).astype(np.float64)
    true, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    out["acc"] = float(tp.sum() / len(labels)) if len(labels) else math.nan
    # balanced accuracy: mean recall over the classes present in the labels
    out["balanced_acc"] = float(np.mean(tp[true > 0] / true[true > 0])) if len(present) > 1 else (
        out["acc"])
    # binary: the positive (second) class; else macro over every class; 0 where undefined
    cls = [1] if avg == "binary" else list(range(k))
    p, r = _ratio(tp[cls], predicted[cls]), _ratio(tp[cls], true[cls])
    f = _ratio(2 * p * r, p + r)
    out.update(precision=float(p.mean()), recall=float(r.mean()), f1=float(f.mean()))
    out["confusion"] = confusion.tolist()
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 0 where ``den`` is 0 (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: row = true class, column = predicted class."""
    return np.bincount(np.asarray(labels) * k + np.asarray(pred), minlength=k * k).reshape(k, k)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive``: the chance that a random positive
    scores above a random negative, ties counting one half (Mann-Whitney U from mid-ranks).
    NaN without both classes."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # mid-rank of each run of tied scores (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision-recall steps, scikit-learn's definition): the
    precision at each distinct score threshold, weighted by the recall it adds; 0 without
    positives (as scikit-learn, which also warns)."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return 0.0
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    # the last index of each run of tied scores: one threshold per distinct score
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp = np.cumsum(y)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0.0, tp]) / n_pos
    return float(np.sum(recall_gain * precision))
