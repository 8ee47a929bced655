"""The training doctor: stops on NaN/inf with a diagnosis, warns on exploding gradients."""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

log = logging.getLogger(__name__)

REMEDIES = (
    "1. lower the learning rate (train.lr), e.g. by 10x;",
    "2. use SGD (train.optimizer=sgd) -- adaptive optimisers can blow up on this data;",
    "3. check the weight initialisation (model.init=kaiming or xavier);",
    "4. clip gradients (train.grad_clip=1.0);",
    "5. only then change the architecture (model.name).",
)


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf. The message holds the diagnosis and remedies."""


class GradientDoctor:
    """Tracks per-step gradient norms; raises :class:`TrainingDiverged` on a non-finite loss or
    gradient and warns when a norm jumps ``spike_factor`` x above the running median."""

    def __init__(self, spike_factor: float = 10.0, window: int = 50):
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self.epoch_norms: list[float] = []

    def start_epoch(self) -> None:
        self.epoch_norms = []
        self.spikes = 0

    def check(self, loss: float, grad_norm: float, *, epoch: int, step: int, lr: float) -> None:
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise TrainingDiverged(self.diagnosis(what, loss, grad_norm, epoch, step, lr))
        if len(self.recent) >= 5:
            median = statistics.median(self.recent)
            if median > 0 and grad_norm > self.spike_factor * median:
                self.spikes += 1
                log.warning(
                    "exploding gradient? epoch %d step %d: norm %.3g is %.1fx the running "
                    "median %.3g (lr %.3g). Consider train.grad_clip or a lower train.lr.",
                    epoch, step, grad_norm, grad_norm / median, median, lr,
                )
        self.recent.append(grad_norm)
        self.epoch_norms.append(grad_norm)

    def diagnosis(self, what: str, loss: float, grad_norm: float, epoch: int, step: int,
                  lr: float) -> str:
        norms = ", ".join(f"{n:.3g}" for n in list(self.recent)[-8:]) or "none yet"
        return (
            f"training diverged: {what} is not finite at epoch {epoch}, step {step} "
            f"(loss={loss}, grad norm={grad_norm}, learning rate={lr:.3g}). "
            f"Recent gradient norms: [{norms}]. No checkpoint was saved for this epoch. "
            "Exploding gradients come from outputs growing too large, most often a too-high "
            "learning rate. Remedies, in order: " + " ".join(REMEDIES)
        )

    def epoch_summary(self) -> dict:
        n = self.epoch_norms
        if not n:
            return {"grad_norm_mean": math.nan, "grad_norm_max": math.nan, "grad_spikes": 0}
        return {"grad_norm_mean": float(sum(n) / len(n)), "grad_norm_max": float(max(n)),
                "grad_spikes": self.spikes}
