"""What a training run prints while it runs: one progress bar for the run and one line per
epoch, drawn by the driver from the metrics rank 0 leaves with the run's epoch clock."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from raypipe.report.tensorboard import epoch_line

POLL_S = 1.0


class RunProgress:
    """``with RunProgress(clock, epochs, start):`` around ``fit()``: a ``tqdm`` bar over the
    run's epochs (images/s and the last validation AUC beside it) and each epoch's line above
    it, as the epochs finish. ``enabled=False``: nothing is shown. Each of ``listeners`` (e.g.
    the MLflow tracker) is called with every finished epoch's metrics, shown or not."""

    def __init__(self, clock: Any, epochs: int, start_epoch: int = 0, enabled: bool = True,
                 metric: str = "val_auc", listeners: Sequence[Callable[[dict], None]] = ()):
        self.clock, self.epochs, self.start, self.metric = clock, epochs, start_epoch, metric
        self.show = enabled and clock is not None
        self.listeners = list(listeners) if clock is not None else []
        self.enabled = self.show or bool(self.listeners)
        self.seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bar = None

    def __enter__(self) -> RunProgress:
        if self.show:
            from tqdm.auto import tqdm

            # no bar where stderr is not a terminal (a log file, ray job logs): the lines only
            self.bar = tqdm(total=self.epochs, initial=self.start, unit="epoch", desc="training",
                            file=sys.stderr, dynamic_ncols=True, leave=True, disable=None)
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="raypipe-progress")
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Show the epochs finished since the last poll (a lost poll is made up by the next)."""
        import ray

        try:
            new = ray.get(self.clock.since.remote(self.seen), timeout=10)
        except Exception:  # the run ended and took the clock with it: nothing more to show
            return
        self.show_epochs(new)

    def catch_up(self, history: Sequence[dict]) -> None:
        """After the run: the epochs of ``history`` (this run's, from its start epoch) that no
        poll delivered (the clock's last messages can be lost when its actor goes first, or a
        poll times out on a loaded machine), so that every epoch is shown exactly once."""
        if self.enabled:
            self._stop_watching()
            self.show_epochs([h for h in history if h.get("epoch", -1) >= self.start + self.seen])

    def _stop_watching(self) -> None:
        """Stop the watcher thread, once, and show what its last poll would have."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.poll()

    def show_epochs(self, new: Sequence[dict]) -> None:
        for metrics in new:
            self.seen += 1
            for listener in self.listeners:
                listener(metrics)
            if self.bar is None:
                continue
            self.bar.write(epoch_line(metrics, self.epochs), file=sys.stderr)  # beside the bar
            postfix = {"img/s": f"{metrics.get('images_per_s_total', math.nan):.0f}"}
            value = metrics.get(self.metric)
            if isinstance(value, int | float):
                postfix[self.metric] = f"{value:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        self._stop_watching()
        if self.bar is not None:
            self.bar.close()
