"""Losses: cross-entropy, weighted cross-entropy (inverse prevalence), focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn


def inverse_prevalence_weights(counts: list[int]) -> list[float]:
    """Class weights ``N / (K * n_k)``: each class contributes equally to the loss; a balanced
    dataset gets all ones. A class with no training samples gets weight 0."""
    total, k = float(sum(counts)), len(counts)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


def loss_facts(kind: str, class_names: list[str], counts: list[int],
               class_weights: list[float] | None) -> dict:
    """What a run's loss weighs, for the log, ``summary.json`` and ``report.md``: the loss, its
    per-class weights (``None`` for ``ce``, which ignores them) and where they come from."""
    uses = kind != "ce"
    weights = class_weights or inverse_prevalence_weights(counts)
    source = ("train.class_weights" if class_weights
              else f"inverse prevalence of the {sum(counts)} training files")
    return {"loss": kind,
            "class_weights": dict(zip(class_names, weights, strict=True)) if uses else None,
            "class_weights_from": source if uses else None}


def loss_text(facts: dict) -> str:
    """One line: ``weighted_ce, class weights NORMAL 0.583, PNEUMONIA 3.5 (inverse prevalence …)``."""
    if facts["class_weights"] is None:
        return f"{facts['loss']}, unweighted"
    weights = ", ".join(f"{name} {w:.3g}" for name, w in facts["class_weights"].items())
    return f"{facts['loss']}, class weights {weights} ({facts['class_weights_from']})"


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


def build_loss(kind: str, class_weights: list[float] | None, *, focal_gamma: float = 2.0,
               label_smoothing: float = 0.0) -> nn.Module:
    """``ce`` ignores weights; ``weighted_ce`` and ``focal`` use ``class_weights``."""
    w = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    if kind == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if kind == "weighted_ce":
        return nn.CrossEntropyLoss(weight=w, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(w, focal_gamma, label_smoothing)
    raise ValueError(f"unknown loss '{kind}', expected ce, weighted_ce or focal")
