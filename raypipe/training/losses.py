"""Losses. One label per file: cross-entropy, weighted cross-entropy (inverse prevalence), focal.
Multilabel (one sigmoid output per finding): binary cross-entropy with logits, weighted by a
positive weight per finding (negatives / positives in training), focal per finding.

A ``train.loss`` name says how the loss weighs; its form follows the data's task. ``ce`` and
``bce`` are unweighted, ``weighted_ce``, ``weighted_bce`` and ``weighted`` weighted, ``focal``
weighted and focused: on multilabel data ``ce``/``weighted_ce`` mean ``bce``/``weighted_bce``, on
one label per file the other way round (:func:`resolve_loss`; the run's loss line says so), so
a config written for class folders (``weighted_ce``, the default) trains a multilabel manifest
with the weighted binary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn

_SINGLE_LABEL = {"weighted": "weighted_ce", "ce": "ce", "weighted_ce": "weighted_ce",
                 "bce": "ce", "weighted_bce": "weighted_ce", "focal": "focal"}
_MULTILABEL = {"weighted": "weighted_bce", "ce": "bce", "weighted_ce": "weighted_bce",
               "bce": "bce", "weighted_bce": "weighted_bce", "focal": "focal"}


def resolve_loss(kind: str, multilabel: bool = False) -> str:
    """``train.loss`` in the data's task's form: ``weighted_ce`` on multilabel data is
    ``weighted_bce``, ``bce`` on one label per file is ``ce``, ``weighted`` either weighted
    loss."""
    table = _MULTILABEL if multilabel else _SINGLE_LABEL
    if kind not in table:
        raise ValueError(
            f"unknown loss '{kind}', expected ce, weighted_ce or focal (one label per file), "
            f"bce, weighted_bce or focal (multilabel), or weighted (either)")
    return table[kind]


def inverse_prevalence_weights(counts: list[int]) -> list[float]:
    """Class weights ``N / (K * n_k)``: each class contributes equally to the loss; a balanced
    dataset gets all ones. A class with no training samples gets weight 0."""
    total, k = float(sum(counts)), len(counts)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


def positive_weights(positives: list[int], total: int) -> list[float]:
    """Per-finding positive weights ``negatives / positives`` (``pos_weight`` of binary
    cross-entropy): a finding's positive files then weigh as much as its negative ones (Hernia,
    227 of 112,120 films: 492.9). A finding with no positive or no negative training file gets
    1: there is nothing to balance (and a weight of 0 or infinity would silence or swamp it)."""
    return [(total - p) / p if 0 < p < total else 1.0 for p in positives]


def loss_facts(kind: str, class_names: list[str], counts: list[int],
               class_weights: list[float] | None, *, multilabel: bool = False,
               total: int | None = None) -> dict:
    """What a run's loss weighs, for the log, ``summary.json`` and ``report.md``: the loss (with
    ``weighted`` resolved for the task), its per-class weights, or per-finding positive weights
    for multilabel (``None`` for ``ce`` and ``bce``, which ignore them), and where they come from.

    ``counts``: training files per class, or (multilabel) positive training files per finding,
    of ``total`` training files.
    """
    asked, kind = kind, resolve_loss(kind, multilabel)
    uses = kind not in ("ce", "bce")
    if multilabel:
        if total is None:
            raise ValueError("multilabel loss_facts needs total, the number of training files")
        weights = class_weights or positive_weights(counts, total)
        source = ("train.class_weights" if class_weights else
                  f"negatives / positives of the {total} training files")
    else:
        weights = class_weights or inverse_prevalence_weights(counts)
        source = ("train.class_weights" if class_weights
                  else f"inverse prevalence of the {sum(counts)} training files")
    if uses and len(weights) != len(class_names):
        raise ValueError(
            f"train.class_weights has {len(weights)} values but there are {len(class_names)} "
            f"{'findings' if multilabel else 'classes'} {class_names}: give one per "
            f"{'finding' if multilabel else 'class'}, in that order.")
    facts = {"loss": kind,
             "class_weights": dict(zip(class_names, weights, strict=True)) if uses else None,
             "class_weights_from": source if uses else None}
    if multilabel:
        facts["weights_are"] = "positive weights per finding" if uses else None
    if asked not in (kind, "weighted"):  # a name of the other task, used in this task's form
        facts["loss_asked"] = asked
    return facts


def loss_text(facts: dict) -> str:
    """One line: ``weighted_ce, class weights NORMAL 0.583, PNEUMONIA 3.5 (inverse prevalence …)``
    or ``weighted_bce, positive weights per finding Effusion 7.42, Hernia 493 (negatives / …)``."""
    name = facts["loss"]
    if facts.get("loss_asked"):
        task = "multilabel" if name.endswith("bce") else "one-label"
        name += f" (train.loss={facts['loss_asked']} in its {task} form)"
    if facts["class_weights"] is None:
        return f"{name}, unweighted"
    weights = ", ".join(f"{n} {w:.3g}" for n, w in facts["class_weights"].items())
    what = facts.get("weights_are") or "class weights"
    return f"{name}, {what} {weights} ({facts['class_weights_from']})"


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-w_y (1 - p_y)^gamma log p_y``, mean over the batch
    normalised by the weights like weighted cross-entropy."""

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = nnf.log_softmax(logits.float(), dim=1)
        logp_y = logp.gather(1, target[:, None])[:, 0]
        focal = (1.0 - logp_y.exp()).clamp(min=0).pow(self.gamma)
        loss = -focal * logp_y
        if self.label_smoothing > 0:
            smooth = -logp.mean(dim=1)
            loss = (1 - self.label_smoothing) * loss + self.label_smoothing * smooth
        if self.weight is None:
            return loss.mean()
        w = self.weight[target]
        return (w * loss).sum() / w.sum().clamp(min=1e-12)


def _smoothed(target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """0/1 targets pulled towards 1/2 (label smoothing of a two-class problem per finding)."""
    target = target.float()
    return target * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else target


class MultilabelBCELoss(nn.Module):
    """Binary cross-entropy with logits per finding, ``pos_weight`` (K,) multiplying the positive
    terms; mean over files and findings. Logits and targets are ``(N, K)``; targets 0/1 float."""

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nnf.binary_cross_entropy_with_logits(
            logits.float(), _smoothed(target, self.label_smoothing), pos_weight=self.pos_weight)


class MultilabelFocalLoss(nn.Module):
    """Focal loss per finding: ``-[w y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p)]`` with
    ``p = sigmoid(logit)`` and ``w`` the finding's positive weight; mean over files and findings.
    ``gamma = 0`` is :class:`MultilabelBCELoss`."""

    def __init__(self, pos_weight: torch.Tensor | None = None, gamma: float = 2.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        y = _smoothed(target, self.label_smoothing)
        logp, log1mp = nnf.logsigmoid(z), nnf.logsigmoid(-z)  # stable log p and log(1 - p)
        pos = (1.0 - logp.exp()).pow(self.gamma) * logp
        neg = logp.exp().pow(self.gamma) * log1mp
        if self.pos_weight is not None:
            pos = pos * self.pos_weight
        return -(y * pos + (1 - y) * neg).mean()


def build_loss(kind: str, class_weights: list[float] | None, *, focal_gamma: float = 2.0,
               label_smoothing: float = 0.0, multilabel: bool = False) -> nn.Module:
    """The loss module for ``train.loss`` (in the task's form, :func:`resolve_loss`). One label
    per file (targets int64 ``(N,)``): ``ce`` ignores weights, ``weighted_ce`` and ``focal`` use
    ``class_weights``. Multilabel (targets float ``(N, K)`` 0/1): ``bce`` ignores weights,
    ``weighted_bce`` and ``focal`` use ``class_weights`` as per-finding positive weights."""
    kind = resolve_loss(kind, multilabel)
    w = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    if multilabel:
        if kind == "bce":
            return MultilabelBCELoss(None, label_smoothing)
        if kind == "weighted_bce":
            return MultilabelBCELoss(w, label_smoothing)
        return MultilabelFocalLoss(w, focal_gamma, label_smoothing)
    if kind == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if kind == "weighted_ce":
        return nn.CrossEntropyLoss(weight=w, label_smoothing=label_smoothing)
    return FocalLoss(w, focal_gamma, label_smoothing)
