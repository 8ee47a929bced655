"""Multilabel losses (binary cross-entropy per finding, positive weights, focal per finding)
against hand computations, and ``train.loss`` names across the two kinds of task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypipe.config import load_config
from raypipe.training.losses import (
    build_loss,
    loss_facts,
    loss_text,
    positive_weights,
    resolve_loss,
)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (8, 3))
    target = (rng.random((8, 3)) < [0.5, 0.2, 0.0]).astype(np.float32)
    target[0, 1] = 1.0
    return logits, target


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _bce(logits: np.ndarray, y: np.ndarray, w=None, gamma: float = 0.0) -> float:
    """-[w y (1-p)^g log p + (1-y) p^g log(1-p)], mean over files and findings, in float64."""
    p = 1 / (1 + np.exp(-logits))
    w = np.ones(logits.shape[1]) if w is None else np.asarray(w)
    terms = w * y * (1 - p) ** gamma * _log_sigmoid(logits) + (1 - y) * p ** gamma * _log_sigmoid(-logits)
    return float(-terms.mean())


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def test_positive_weights_are_negatives_over_positives():
    assert positive_weights([227, 13_317], 112_120) == pytest.approx(
        [(112_120 - 227) / 227, (112_120 - 13_317) / 13_317])
    assert positive_weights([5], 10) == [1.0]  # balanced
    # nothing to balance without positives or without negatives: weight 1, not 0 or infinity
    assert positive_weights([0, 10, 3], 10) == [1.0, 1.0, pytest.approx(7 / 3)]


def test_weighted_bce_equals_hand_computation_and_torch(batch):
    logits, y = batch
    w = positive_weights(y.sum(0).astype(int).tolist(), len(y))
    assert w[2] == 1.0  # the finding without positives in this batch
    got = float(build_loss("weighted_bce", w, multilabel=True)(_t(logits), _t(y)))
    assert got == pytest.approx(_bce(logits, y, w), rel=1e-5)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=_t(np.array(w)))(_t(logits), _t(y))
    assert got == pytest.approx(float(ref), rel=1e-6)
    plain = float(build_loss("bce", w, multilabel=True)(_t(logits), _t(y)))
    assert plain == pytest.approx(_bce(logits, y), rel=1e-5) and abs(plain - got) > 1e-3


def test_focal_per_finding(batch):
    logits, y = batch
    w = [2.0, 5.0, 1.0]
    focal = float(build_loss("focal", w, focal_gamma=2.0, multilabel=True)(_t(logits), _t(y)))
    assert focal == pytest.approx(_bce(logits, y, w, gamma=2.0), rel=1e-5)
    # gamma 0 is the weighted binary cross-entropy; focusing makes confident files count less
    f0 = float(build_loss("focal", w, focal_gamma=0.0, multilabel=True)(_t(logits), _t(y)))
    assert f0 == pytest.approx(float(build_loss("weighted_bce", w, multilabel=True)(
        _t(logits), _t(y))), rel=1e-5)
    assert focal < f0
    # extreme logits stay finite
    big = float(build_loss("focal", w, multilabel=True)(_t(logits * 100), _t(y)))
    assert np.isfinite(big)


def test_multilabel_label_smoothing_pulls_targets_towards_a_half(batch):
    logits, y = batch
    got = build_loss("bce", None, label_smoothing=0.2, multilabel=True)(_t(logits), _t(y))
    want = torch.nn.functional.binary_cross_entropy_with_logits(_t(logits), _t(y * 0.8 + 0.1))
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_a_loss_name_takes_the_form_of_the_task():
    """A config written for class folders (weighted_ce, the default) trains a multilabel
    manifest with the weighted binary cross-entropy, and says so."""
    assert load_config(None, []).train.loss == "weighted_ce"
    for asked, single, multi in [("weighted_ce", "weighted_ce", "weighted_bce"),
                                 ("weighted_bce", "weighted_ce", "weighted_bce"),
                                 ("weighted", "weighted_ce", "weighted_bce"),
                                 ("ce", "ce", "bce"), ("bce", "ce", "bce"),
                                 ("focal", "focal", "focal")]:
        assert (resolve_loss(asked, False), resolve_loss(asked, True)) == (single, multi), asked
    logits, y = torch.randn(6, 2), torch.tensor([0, 0, 0, 0, 1, 1])
    w = [0.75, 1.5]
    assert float(build_loss("weighted", w)(logits, y)) == pytest.approx(
        float(build_loss("weighted_ce", w)(logits, y)))
    # a single-label run's facts read as before
    facts = loss_facts("weighted", ["NORMAL", "PNEUMONIA"], [102, 17], None)
    assert facts == loss_facts("weighted_ce", ["NORMAL", "PNEUMONIA"], [102, 17], None)
    assert loss_text(facts).startswith("weighted_ce, class weights NORMAL 0.583")
    multi = loss_facts("weighted_ce", ["A", "B"], [1, 3], None, multilabel=True, total=4)
    assert multi["loss"] == "weighted_bce" and multi["loss_asked"] == "weighted_ce"
    assert loss_text(multi).startswith(
        "weighted_bce (train.loss=weighted_ce in its multilabel form), positive weights per "
        "finding A 3, B 0.333")
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*weighted_bce"):
        build_loss("hinge", None, multilabel=True)


def test_a_multilabel_run_says_each_findings_positive_weight():
    names, positives = ["Effusion", "Hernia", "Rare"], [13_317, 227, 0]
    facts = loss_facts("weighted", names, positives, None, multilabel=True, total=112_120)
    assert facts["loss"] == "weighted_bce"
    assert facts["class_weights"] == pytest.approx(
        {"Effusion": 98_803 / 13_317, "Hernia": 111_893 / 227, "Rare": 1.0})
    assert loss_text(facts) == (
        "weighted_bce, positive weights per finding Effusion 7.42, Hernia 493, Rare 1 "
        "(negatives / positives of the 112120 training files)")
    given = loss_facts("focal", names, positives, [1.0, 50.0, 1.0], multilabel=True,
                       total=112_120)
    assert given["class_weights"]["Hernia"] == 50.0 and loss_text(given).endswith(
        "(train.class_weights)")
    plain = loss_facts("bce", names, positives, None, multilabel=True, total=112_120)
    assert plain["class_weights"] is None and loss_text(plain) == "bce, unweighted"
    with pytest.raises(ValueError, match="3 findings.*one per finding"):
        loss_facts("weighted_bce", names, positives, [1.0, 2.0], multilabel=True, total=10)
