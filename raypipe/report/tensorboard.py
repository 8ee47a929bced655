"""TensorBoard event files and the per-epoch progress line, written by rank 0 only.

Events go to ``<run dir>/tensorboard``: directly for a local run directory; for object storage
(``s3://``, ``gs://``) into a temporary local folder that is copied there after every epoch.
``tensorboard --logdir <run dir>/tensorboard`` shows the curves.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

SUBDIR = "tensorboard"

# metric name -> TensorBoard tag (grouped into panels by the prefix)
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "optim/lr",
    "grad_norm_mean": "optim/grad_norm_mean",
    "grad_norm_max": "optim/grad_norm_max",
    "images_per_s_total": "speed/images_per_s",
    "data_wait_frac": "speed/data_wait_frac",
    "epoch_time_s": "speed/epoch_time_s",
    "bn_stats_s": "speed/bn_stats_s",
    "validation_s": "speed/validation_s",
}


def scalar_tag(name: str) -> str | None:
    """The TensorBoard tag of metric ``name`` (MLflow logs it under the same name); None: not
    plotted."""
    if name in SCALARS:
        return SCALARS[name]
    if name.startswith("val_") and name not in ("val_samples",):
        return "val/" + name[4:]
    return None


class TensorBoardLogger:
    """Scalars once per epoch, a few input images once. Disabled (every call a no-op) unless
    ``enabled`` and a run directory is given: create it on every worker, enabled on rank 0."""

    def __init__(self, run_dir: str | None, enabled: bool = True, max_images: int = 8):
        self.enabled = bool(enabled and run_dir)
        self.max_images = max_images
        self._images_done = False
        self.writer = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        from raypipe.data.sources import join_uri

        self.dest = join_uri(run_dir, SUBDIR)
        # a local run directory takes the events itself: a temporary folder there was left
        # behind whenever the run was stopped or its worker killed before close()
        self.remote = "://" in self.dest
        self.local = tempfile.mkdtemp(prefix="raypipe-tb-") if self.remote else self.dest
        self.writer = SummaryWriter(log_dir=self.local)

    def tap(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Pass ``batches`` through unchanged, logging the first batch's images once per run."""
        for batch in batches:
            if self.enabled and not self._images_done:
                self._log_images(batch["image"])
            yield batch

    def _log_images(self, images) -> None:
        x = images[: self.max_images].detach().float().cpu()
        if x.ndim != 4 or len(x) == 0:
            return
        # min-max per image: inputs are normalised (maybe standardised), TensorBoard wants [0, 1]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        self.writer.add_images("inputs/train_batch", (x - lo) / (hi - lo).clamp_min(1e-8), 0)
        self._images_done = True

    def log_epoch(self, epoch: int, metrics: dict) -> None:
        """Write every known scalar of ``metrics`` at step ``epoch`` and publish the events."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            tag = scalar_tag(name)
            if tag and isinstance(value, int | float) and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()
        self._publish()

    def _publish(self) -> None:
        if not self.remote:
            return
        from raypipe.report.run_report import publish_dir

        try:
            publish_dir(self.local, self.dest)
        except OSError as exc:  # a full disk or a storage hiccup must not stop training
            log.warning("could not copy TensorBoard events to %s: %s", self.dest, exc)

    def close(self) -> None:
        if not self.enabled:
            return
        self.writer.close()
        self._publish()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
        self.enabled = False


def epoch_line(metrics: dict, epochs: int) -> str:
    """One progress line: epoch, time, throughput, data wait, losses and val AUC."""
    def f(key: str, fmt: str) -> str:
        v = metrics.get(key)
        return format(v, fmt) if isinstance(v, int | float) else "n/a"

    return (
        f"epoch {int(metrics.get('epoch', 0)) + 1}/{epochs}: {f('epoch_time_s', '.1f')} s, "
        f"{f('images_per_s_total', '.1f')} images/s (all workers), data wait "
        f"{100 * float(metrics.get('data_wait_frac', math.nan)):.1f}%, train_loss "
        f"{f('train_loss', '.4f')}, val_loss {f('val_loss', '.4f')}, val_auc {f('val_auc', '.4f')}, "
        f"lr {f('lr', '.3g')}"
    )


def event_dir(run_dir: str) -> str:
    """Where a run's TensorBoard events are (``tensorboard --logdir`` this)."""
    return os.path.join(run_dir, SUBDIR) if "://" not in run_dir else run_dir.rstrip("/") + "/" + SUBDIR
