"""The driver's epoch lines: every epoch shown once, even when the clock's messages are lost."""

from __future__ import annotations

from raypipe.report.console import RunProgress


class _GoneClock:
    """A clock whose actor is already gone: every poll fails."""

    class since:  # noqa: N801 - shaped like an actor method
        @staticmethod
        def remote(n):
            raise RuntimeError("actor died")


def test_epochs_no_poll_delivered_are_shown_from_the_history(capsys):
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_auc": 0.5 + e / 10,
                "images_per_s_total": 100.0, "epoch_s": 1.0, "lr": 0.1} for e in range(4)]
    seen = []
    with RunProgress(_GoneClock(), epochs=4, start_epoch=1, listeners=[seen.append]) as progress:
        progress.catch_up(history)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("epoch ")]  # beside the bar
    # a resumed run (from epoch 1): epochs 2..4 of 4, once each, in order
    assert [line.split(":")[0] for line in lines] == ["epoch 2/4", "epoch 3/4", "epoch 4/4"]
    assert [m["epoch"] for m in seen] == [1, 2, 3]
