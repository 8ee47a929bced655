"""The training doctor: stops on NaN/inf with a diagnosis, warns on exploding gradients."""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

log = logging.getLogger(__name__)

# The order is the course's: cheapest and most likely fix first, architecture last.
REMEDIES = (
    "1. lower the learning rate (train.lr), e.g. by 10x;",
    "2. use SGD (train.optimizer=sgd) -- adaptive optimisers can blow up on this data;",
    "3. check the weight initialisation (model.init=kaiming or xavier);",
    "4. clip gradients (train.grad_clip=1.0);",
    "5. only then change the architecture (model.name).",
)


class TrainingDiverged(RuntimeError):
    """Loss, gradients or weights became NaN/inf. The message holds the diagnosis and remedies."""


class GradientDoctor:
    """Tracks per-step gradient norms; raises :class:`TrainingDiverged` on a non-finite loss or
    gradient and warns when a norm jumps ``spike_factor`` x above the running median of the
    last ``window`` norms (after ``warmup_steps`` norms have been seen).

    ``grads_may_overflow``: with an fp16 grad scaler an inf gradient norm is routine (the scaler
    skips that step and lowers its scale), so only a non-finite loss counts as divergence.
    """

    def __init__(self, spike_factor: float = 10.0, window: int = 50, warmup_steps: int = 5,
                 grads_may_overflow: bool = False):
        self.spike_factor = spike_factor
        self.warmup_steps = warmup_steps
        self.grads_may_overflow = grads_may_overflow
        self.recent: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self.epoch_norms: list[float] = []

    def start_epoch(self) -> None:
        self.epoch_norms = []
        self.spikes = 0

    def is_finite(self, loss: float, grad_norm: float) -> bool:
        """Whether this step is healthy (an fp16 gradient overflow is, see the class doc)."""
        return math.isfinite(loss) and (self.grads_may_overflow or math.isfinite(grad_norm))

    def check(self, loss: float, grad_norm: float, *, epoch: int, step: int, lr: float) -> bool:
        """Record one step. Raises :class:`TrainingDiverged` if it is not finite; returns True
        (and logs a warning) when the gradient norm is a spike."""
        if not self.is_finite(loss, grad_norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise TrainingDiverged(self.diagnosis(what, loss, grad_norm, epoch, step, lr))
        if not math.isfinite(grad_norm):  # fp16 overflow: the scaler skips this step
            return False
        spike = False
        if len(self.recent) >= self.warmup_steps:
            median = statistics.median(self.recent)
            if median > 0 and grad_norm > self.spike_factor * median:
                spike = True
                self.spikes += 1
                log.warning(
                    "exploding gradient? epoch %d step %d: norm %.3g is %.1fx the running "
                    "median %.3g (lr %.3g). Consider train.grad_clip or a lower train.lr.",
                    epoch, step, grad_norm, grad_norm / median, median, lr,
                )
        self.recent.append(grad_norm)
        self.epoch_norms.append(grad_norm)
        return spike

    def diagnosis(self, what: str, loss: float, grad_norm: float, epoch: int, step: int,
                  lr: float) -> str:
        """The failure message: where, with which LR, the recent norms and the remedies."""
        norms = ", ".join(f"{n:.3g}" for n in list(self.recent)[-8:]) or "none yet"
        return (
            f"training diverged: {what} is not finite at epoch {epoch}, step {step} "
            f"(loss={loss}, grad norm={grad_norm}, learning rate={lr:.3g}).\n"
            f"Recent gradient norms: [{norms}].\n"
            "No checkpoint was saved for this epoch; earlier checkpoints are intact.\n"
            "Exploding gradients come from outputs growing too large, most often a too-high "
            "learning rate. Remedies, in order:\n  " + "\n  ".join(REMEDIES)
        )

    def epoch_summary(self) -> dict:
        """Per-epoch gradient-norm statistics for the epoch's metrics."""
        n = self.epoch_norms
        if not n:
            return {"grad_norm_mean": math.nan, "grad_norm_max": math.nan, "grad_spikes": 0}
        return {"grad_norm_mean": float(sum(n) / len(n)), "grad_norm_max": float(max(n)),
                "grad_spikes": self.spikes}
