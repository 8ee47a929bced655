"""Validation metrics on the full set of predictions (never averaged per shard): one label per
file (:func:`classification_metrics` of softmax probabilities) or multilabel
(:func:`multilabel_metrics` of sigmoid scores, one column per finding).

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
    ``threshold``; ``youden_threshold`` the score threshold of the largest Youden index. More
    classes: ``auc`` is the one-vs-rest macro AUC, plus ``auc_<class>`` each;
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
        # the operating point chosen on this set: what a test set is later scored at
        out["youden_threshold"] = youden_threshold(labels == 1, probs[:, 1])
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


# ---------------------------------------------------------------- multilabel


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Per-finding probabilities from logits, without overflow for large ``|logit|``."""
    z = np.asarray(logits, np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def multilabel_metrics(
    targets: np.ndarray, scores: np.ndarray, finding_names: list[str], threshold: float = 0.5
) -> dict:
    """Metrics from 0/1 ``targets`` (N, K) and sigmoid ``scores`` (N, K), one column per finding.

    ``auc/<finding>`` and ``ap/<finding>`` per finding; ``auc`` is their macro mean and
    ``auc_micro`` the AUC of all (file, finding) pairs at once; ``pr_auc`` the macro mean
    average precision and ``pr_auc_micro`` its micro form. A finding without positives or
    without negatives here has no AUC: its ``auc/<finding>`` is NaN, it is named in
    ``auc_undefined`` and left out of the macro mean (never counted as 0.5); ``auc`` is NaN when
    no finding has one. Likewise a finding without positives has no AP (NaN, left out of
    ``pr_auc``). At ``threshold``: ``acc`` (the share of right file-finding decisions),
    ``balanced_acc`` (mean over findings with both classes of (sensitivity + specificity) / 2),
    ``precision``/``recall``/``f1`` (macro over every finding, 0 where undefined, as
    scikit-learn's ``zero_division=0``) and ``confusion``: ``[[tn, fp], [fn, tp]]`` per finding.
    """
    y = np.asarray(targets).astype(bool)
    s = np.asarray(scores, np.float64)
    if y.shape != s.shape or y.ndim != 2 or y.shape[1] != len(finding_names):
        raise ValueError(f"targets {y.shape} and scores {s.shape} must both be (N, "
                         f"{len(finding_names)}), one column per finding")
    out: dict = {"n": int(len(y))}
    aucs, aps, undefined = [], [], []
    for i, name in enumerate(finding_names):
        auc = roc_auc(y[:, i], s[:, i])  # NaN without both classes
        ap = average_precision(y[:, i], s[:, i]) if y[:, i].any() else math.nan
        out[f"auc/{name}"], out[f"ap/{name}"] = auc, ap
        if math.isnan(auc):
            undefined.append(name)
        else:
            aucs.append(auc)
        if not math.isnan(ap):
            aps.append(ap)
    out["auc"] = float(np.mean(aucs)) if aucs else math.nan
    out["auc_micro"] = roc_auc(y.ravel(), s.ravel())
    out["auc_undefined"] = undefined
    out["pr_auc"] = float(np.mean(aps)) if aps else math.nan
    out["pr_auc_micro"] = average_precision(y.ravel(), s.ravel()) if y.any() else math.nan
    pred = s >= threshold
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0).astype(np.float64)
    fn = (~pred & y).sum(axis=0).astype(np.float64)
    tn = (~pred & ~y).sum(axis=0).astype(np.float64)
    out["acc"] = float((pred == y).mean()) if y.size else math.nan
    both = (tp + fn > 0) & (tn + fp > 0)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    out["balanced_acc"] = float(np.mean((sens + spec)[both] / 2)) if both.any() else math.nan
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f = _ratio(2 * p * r, p + r)
    out.update(precision=float(p.mean()), recall=float(r.mean()), f1=float(f.mean()))
    out["confusion"] = np.stack([np.stack([tn, fp], 1), np.stack([fn, tp], 1)], 1).astype(
        np.int64).tolist()
    return out


def metrics_from_logits(
    labels: np.ndarray, logits: np.ndarray, class_names: list[str], *, multilabel: bool,
    threshold: float = 0.5
) -> dict:
    """:func:`classification_metrics` of softmax probabilities (``labels`` int (N,)), or
    :func:`multilabel_metrics` of sigmoid scores (``labels`` 0/1 (N, K)), from the gathered
    logits (N, K)."""
    if multilabel:
        return multilabel_metrics(labels, sigmoid(logits), class_names, threshold)
    return classification_metrics(labels, softmax(np.asarray(logits, np.float64)), class_names,
                                  threshold)


def checkpoint_metric_problem(metric: str, class_names: list[str], multilabel: bool) -> str | None:
    """Why ``checkpoint.metric`` cannot rank this run's checkpoints, or None when it can:
    ``val_auc/<finding>`` needs a multilabel task with that finding."""
    if not metric.startswith("val_auc/"):
        return None
    finding = metric.removeprefix("val_auc/")
    if not multilabel:
        return (f"checkpoint.metric={metric} is one finding's AUC, but the task has one label per "
                "file. Use checkpoint.metric=val_auc.")
    if finding not in class_names:
        return (f"checkpoint.metric={metric}: '{finding}' is not one of the run's findings "
                f"({', '.join(class_names)}). Use val_auc/<one of them> or val_auc (macro).")
    return None


def bootstrap_auc_interval(positive: np.ndarray, scores: np.ndarray, *, resamples: int = 2000,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC: ``resamples`` draws of the files with
    replacement (seeded), each keeping both classes; NaN without both classes."""
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    if positive.all() or not positive.any():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    n, aucs = len(positive), []
    while len(aucs) < resamples:
        idx = rng.integers(0, n, n)
        y = positive[idx]
        if y.any() and not y.all():
            aucs.append(roc_auc(y, scores[idx]))
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def youden_threshold(positive: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (predict positive at ``score >= t``) with the largest Youden index,
    sensitivity + specificity - 1; NaN without both classes. Ties: the highest threshold."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # one threshold per distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    youden = tp / n_pos - fp / n_neg
    return float(s[last][int(np.argmax(youden))])


def sensitivity_specificity(positive: np.ndarray, scores: np.ndarray,
                            threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``score >= threshold``; NaN where a class is absent."""
    positive = np.asarray(positive, bool)
    pred = np.asarray(scores, np.float64) >= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    sens = float((pred & positive).sum() / n_pos) if n_pos else math.nan
    spec = float((~pred & ~positive).sum() / n_neg) if n_neg else math.nan
    return sens, spec


def finding_table(targets: np.ndarray, scores: np.ndarray, finding_names: list[str],
                  threshold: float = 0.5) -> list[dict]:
    """One row per finding: positives, prevalence, AUC, AP, and sensitivity/specificity at
    ``threshold`` and at the finding's Youden threshold (the evaluate job's table)."""
    y = np.asarray(targets).astype(bool)
    s = np.asarray(scores, np.float64)
    rows = []
    for i, name in enumerate(finding_names):
        yi, si = y[:, i], s[:, i]
        youden = youden_threshold(yi, si)
        sens, spec = sensitivity_specificity(yi, si, threshold)
        y_sens, y_spec = (sensitivity_specificity(yi, si, youden) if not math.isnan(youden)
                          else (math.nan, math.nan))
        rows.append({"finding": name, "positives": int(yi.sum()),
                     "prevalence": float(yi.mean()) if len(yi) else math.nan,
                     "auc": roc_auc(yi, si),
                     "ap": average_precision(yi, si) if yi.any() else math.nan,
                     "threshold": threshold, "sensitivity": sens, "specificity": spec,
                     "youden_threshold": youden, "youden_sensitivity": y_sens,
                     "youden_specificity": y_spec})
    return rows
