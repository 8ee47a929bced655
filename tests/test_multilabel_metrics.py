"""Multilabel metrics from sigmoid scores against scikit-learn; findings without an AUC named,
not averaged as 0.5; ``checkpoint.metric`` for one finding's AUC."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from raypipe.config import ConfigError, load_config
from raypipe.training.metrics import (
    checkpoint_metric_problem,
    finding_table,
    metrics_from_logits,
    multilabel_metrics,
    sigmoid,
    youden_threshold,
)

NAMES = ["Atelectasis", "Effusion", "Hernia", "Mass"]


def _set(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < [0.3, 0.2, 0.05, 0.1]).astype(np.int64)
    y[:2, 2] = 1
    logits = rng.normal(0, 1, (n, 4)) + 1.5 * y
    return y, logits


def test_multilabel_metrics_equal_sklearn():
    y, logits = _set()
    scores = sigmoid(logits)
    m = multilabel_metrics(y, scores, NAMES, threshold=0.6)
    for i, name in enumerate(NAMES):
        assert m[f"auc/{name}"] == pytest.approx(skm.roc_auc_score(y[:, i], scores[:, i]), abs=1e-12)
        assert m[f"ap/{name}"] == pytest.approx(
            skm.average_precision_score(y[:, i], scores[:, i]), abs=1e-12)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, scores, average="macro"), abs=1e-12)
    assert m["auc_micro"] == pytest.approx(skm.roc_auc_score(y, scores, average="micro"), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, scores, average="macro"),
                                        abs=1e-12)
    assert m["pr_auc_micro"] == pytest.approx(
        skm.average_precision_score(y, scores, average="micro"), abs=1e-12)
    pred = (scores >= 0.6).astype(int)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
    assert m["acc"] == pytest.approx((pred == y).mean())
    assert m["confusion"] == skm.multilabel_confusion_matrix(y, pred).tolist()
    balanced = np.mean([skm.balanced_accuracy_score(y[:, i], pred[:, i]) for i in range(4)])
    assert m["balanced_acc"] == pytest.approx(balanced)
    assert m["auc_undefined"] == [] and m["n"] == 80


def test_a_finding_absent_from_validation_has_no_auc_and_is_named():
    y, logits = _set(seed=1)
    y[:, 2] = 0  # no Hernia in validation
    y[:, 3] = 1  # every file has a Mass: no negatives
    scores = sigmoid(logits)
    m = multilabel_metrics(y, scores, NAMES)
    assert m["auc_undefined"] == ["Hernia", "Mass"]
    assert math.isnan(m["auc/Hernia"]) and math.isnan(m["auc/Mass"])
    defined = [skm.roc_auc_score(y[:, i], scores[:, i]) for i in (0, 1)]
    assert m["auc"] == pytest.approx(np.mean(defined), abs=1e-12)
    # counted as 0.5 they would move the mean: the test can tell the two apart
    assert abs(np.mean(defined + [0.5, 0.5]) - m["auc"]) > 0.05
    assert math.isnan(m["ap/Hernia"]) and m["ap/Mass"] == pytest.approx(1.0)
    assert m["pr_auc"] == pytest.approx(np.mean([m["ap/Atelectasis"], m["ap/Effusion"], 1.0]))
    none = multilabel_metrics(np.zeros((5, 1)), np.full((5, 1), 0.3), ["Hernia"])
    assert math.isnan(none["auc"]) and none["auc_undefined"] == ["Hernia"]
    assert math.isnan(none["pr_auc"])


def test_metrics_from_logits_pick_softmax_or_sigmoid():
    y, logits = _set()
    multi = metrics_from_logits(y, logits, NAMES, multilabel=True)
    assert multi["auc"] == multilabel_metrics(y, sigmoid(logits), NAMES)["auc"]
    labels = np.array([0, 1, 1, 0, 1])
    single = metrics_from_logits(labels, logits[:5, :2], ["a", "b"], multilabel=False)
    assert "confusion" in single and single["n"] == 5 and "auc_micro" not in single
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        multilabel_metrics(y[:, :3], sigmoid(logits), NAMES)


def test_sigmoid_is_stable_for_large_logits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = sigmoid(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert s[0] == 0.0 and s[-1] == 1.0 and s[2] == 0.5 and 0 < s[1] < s[2] < s[3] < 1


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**32 - 1), st.sampled_from([2, 5, 1000]))
def test_multilabel_metrics_equal_sklearn_with_ties_and_absent_findings(k, n, seed, levels):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.random(k)).astype(int)
    scores = rng.integers(0, levels, (n, k)) / levels  # few levels: many ties
    m = multilabel_metrics(y, scores, [str(i) for i in range(k)])
    defined = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(k):
            if 0 < y[:, i].sum() < n:
                a = skm.roc_auc_score(y[:, i], scores[:, i])
                assert m[f"auc/{i}"] == pytest.approx(a, abs=1e-12)
                defined.append(a)
            else:
                assert math.isnan(m[f"auc/{i}"]) and str(i) in m["auc_undefined"]
            if y[:, i].any():
                assert m[f"ap/{i}"] == pytest.approx(
                    skm.average_precision_score(y[:, i], scores[:, i]), abs=1e-12)
        assert (math.isnan(m["auc"]) and not defined) or m["auc"] == pytest.approx(np.mean(defined))
        if 0 < y.sum() < y.size:
            assert m["auc_micro"] == pytest.approx(
                skm.roc_auc_score(y.ravel(), scores.ravel()), abs=1e-12)
        pred = (scores >= 0.5).astype(int)
        # macro over every finding of its positive class (a (N, 1) array is not multilabel to
        # scikit-learn, so column by column)
        prf = [skm.precision_recall_fscore_support(y[:, i], pred[:, i], average="binary",
                                                   zero_division=0)[:3] for i in range(k)]
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(tuple(np.mean(prf, 0)))


def test_youden_threshold_and_the_per_finding_table():
    y, logits = _set(200, seed=3)
    scores = sigmoid(logits)
    for i in range(4):
        fpr, tpr, thresholds = skm.roc_curve(y[:, i], scores[:, i])
        best = np.max(tpr - fpr)
        t = youden_threshold(y[:, i], scores[:, i])
        pred = scores[:, i] >= t
        sens, spec = pred[y[:, i] == 1].mean(), (~pred[y[:, i] == 0]).mean()
        assert sens + spec - 1 == pytest.approx(best)
    rows = finding_table(y, scores, NAMES, threshold=0.5)
    assert [r["finding"] for r in rows] == NAMES
    hernia = rows[2]
    assert hernia["positives"] == int(y[:, 2].sum())
    assert hernia["prevalence"] == pytest.approx(y[:, 2].mean())
    assert hernia["auc"] == pytest.approx(skm.roc_auc_score(y[:, 2], scores[:, 2]))
    assert hernia["sensitivity"] == pytest.approx((scores[y[:, 2] == 1, 2] >= 0.5).mean())
    assert hernia["youden_sensitivity"] + hernia["youden_specificity"] >= (
        hernia["sensitivity"] + hernia["specificity"])
    assert math.isnan(youden_threshold(np.zeros(4, bool), np.arange(4.0)))


def test_checkpoint_metric_can_be_one_findings_auc():
    cfg = load_config(None, ["checkpoint.metric=val_auc/Effusion"])
    assert cfg.checkpoint.metric == "val_auc/Effusion" and cfg.checkpoint.resolved_mode == "max"
    assert load_config(None, ["checkpoint.metric=val_pr_auc"]).checkpoint.metric == "val_pr_auc"
    for bad in ("val_auc/", "val_recall", "auc/Effusion"):
        with pytest.raises(ConfigError, match="val_auc/<finding>"):
            load_config(None, [f"checkpoint.metric={bad}"])
    assert checkpoint_metric_problem("val_auc/Effusion", NAMES, multilabel=True) is None
    assert checkpoint_metric_problem("val_auc", NAMES, multilabel=True) is None
    assert "not one of the run's findings (Atelectasis, Effusion" in checkpoint_metric_problem(
        "val_auc/effusion", NAMES, multilabel=True)
    assert "one label per file" in checkpoint_metric_problem("val_auc/Effusion", ["a", "b"], False)
