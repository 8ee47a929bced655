"""The training doctor: NaN/inf stops with a diagnosis, gradient spikes warn, overfit mode."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import run_job
from torch import nn

from raypipe.training.doctor import REMEDIES, GradientDoctor, TrainingDiverged
from raypipe.training.loop import train_one_epoch

REMEDY_ORDER = ("lower the learning rate", "use SGD", "initialisation", "clip gradients",
                "change the architecture")


def _assert_diagnosis(msg: str, *, epoch: int, lr_text: str) -> None:
    assert "training diverged" in msg
    assert f"epoch {epoch}" in msg and "step " in msg
    assert f"learning rate={lr_text}" in msg
    assert "Recent gradient norms: [" in msg
    positions = [msg.index(r) for r in REMEDY_ORDER]
    assert positions == sorted(positions), "remedies in the course's order"
    assert "No checkpoint was saved" in msg


# ---------------------------------------------------------------- GradientDoctor


def test_finite_steps_pass_and_are_summarised():
    d = GradientDoctor()
    d.start_epoch()
    for i, n in enumerate([1.0, 2.0, 3.0]):
        assert d.check(0.5, n, epoch=0, step=i, lr=0.1) is False
    s = d.epoch_summary()
    assert s == {"grad_norm_mean": 2.0, "grad_norm_max": 3.0, "grad_spikes": 0}
    d.start_epoch()
    assert math.isnan(d.epoch_summary()["grad_norm_mean"])


@pytest.mark.parametrize("loss,norm,what", [
    (float("nan"), 1.0, "loss"), (float("inf"), 1.0, "loss"), (0.3, float("nan"), "gradient norm"),
    (0.3, float("inf"), "gradient norm"),
])
def test_non_finite_raises_with_diagnosis(loss, norm, what):
    d = GradientDoctor()
    for i in range(4):
        d.check(0.7, 1.5 + i, epoch=3, step=i, lr=0.05)
    with pytest.raises(TrainingDiverged) as err:
        d.check(loss, norm, epoch=3, step=4, lr=0.05)
    msg = str(err.value)
    _assert_diagnosis(msg, epoch=3, lr_text="0.05")
    assert f"{what} is not finite" in msg and "step 4" in msg
    assert "[1.5, 2.5, 3.5, 4.5]" in msg  # the recent norms, oldest first
    assert len(REMEDIES) == 5


def test_fp16_overflow_is_not_divergence():
    d = GradientDoctor(grads_may_overflow=True)
    d.check(0.5, 1.0, epoch=0, step=0, lr=0.1)
    assert d.check(0.5, float("inf"), epoch=0, step=1, lr=0.1) is False  # scaler skips the step
    assert d.epoch_norms == [1.0]
    with pytest.raises(TrainingDiverged, match="loss is not finite"):
        d.check(float("nan"), 1.0, epoch=0, step=2, lr=0.1)


def test_exploding_gradient_warning(caplog):
    d = GradientDoctor(spike_factor=10.0)
    with caplog.at_level(logging.WARNING, logger="raypipe.training.doctor"):
        for i in range(8):
            assert d.check(1.0, 1.0 + 0.1 * (i % 2), epoch=1, step=i, lr=0.1) is False
        assert d.check(1.0, 5.0, epoch=1, step=8, lr=0.1) is False  # 5x: within the factor
        assert d.check(1.0, 50.0, epoch=1, step=9, lr=0.1) is True
    assert d.spikes == 1 and d.epoch_summary()["grad_spikes"] == 1
    assert d.epoch_summary()["grad_norm_max"] == 50.0
    warning = [r.getMessage() for r in caplog.records if "exploding gradient" in r.getMessage()]
    assert len(warning) == 1
    assert "step 9" in warning[0] and "running median" in warning[0]
    assert "train.grad_clip" in warning[0]


def test_no_spike_warning_before_enough_history(caplog):
    d = GradientDoctor(spike_factor=2.0, warmup_steps=5)
    with caplog.at_level(logging.WARNING, logger="raypipe.training.doctor"):
        for i, n in enumerate([1.0, 100.0, 1.0, 1000.0]):
            assert d.check(1.0, n, epoch=0, step=i, lr=0.1) is False
    assert not caplog.records


# ---------------------------------------------------------------- the plain-torch loop


def _tiny_batches(n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(8, 1, 8, 8, generator=g),
             "label": torch.randint(0, 2, (8,), generator=g)} for _ in range(n_batches)]


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))


def test_loop_stops_a_huge_learning_rate():
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e6, momentum=0.9)
    batches = _tiny_batches(20)
    with pytest.raises(TrainingDiverged) as err:
        for epoch in range(5):
            train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(), torch.device("cpu"),
                            GradientDoctor(), epoch=epoch)
    _assert_diagnosis(str(err.value), epoch=0, lr_text="1e+06")


def test_loop_reports_grad_norms_and_clipping():
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, _tiny_batches(), opt, nn.CrossEntropyLoss(),
                            torch.device("cpu"), GradientDoctor(), epoch=0, grad_clip=1e-3)
    assert stats["train_steps"] == 6 and stats["train_samples"] == 48
    assert stats["grad_norm_max"] >= stats["grad_norm_mean"] > 1e-3  # norms before clipping
    assert math.isfinite(stats["train_loss"])
    # clipping really limited the update: the weights barely moved
    fresh = _tiny_model()
    pairs = zip(model.parameters(), fresh.parameters(), strict=True)
    moved = sum(float((a - b).detach().norm()) for a, b in pairs)
    assert moved <= 6 * 0.01 * 1e-3 * 1.01


# ---------------------------------------------------------------- end to end on Ray


@pytest.mark.slow
def test_lr_1e6_run_is_stopped_by_the_doctor(ray_cluster, cache_dir, tmp_path):
    out = tmp_path / "runs"
    proc = run_job(
        "train.py", "train.lr=1e6", "train.epochs=2", "data.limit=48", "train.batch_size=16",
        "train.warmup_epochs=0", "train.max_failures=2", f"run.storage_path={out}",
        "run.name=diverge",
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == 1, err[-3000:]
    msg = err[err.index("error: "):]
    _assert_diagnosis(msg, epoch=int(msg.split("at epoch ")[1].split(",")[0]), lr_text="1e+06")
    assert "Traceback" not in msg, "the message is printed cleanly, not as a Ray traceback"
    assert len(msg.splitlines()) < 20
    # a diverged run is not retried by max_failures: it would only diverge again
    assert "[FailurePolicy] RETRY" not in proc.stdout + err
    run_dir = out / "diverge"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and "training diverged" in summary["error"]
    diverged_epoch = int(msg.split("at epoch ")[1].split(",")[0])
    assert len(summary["history"]) == diverged_epoch
    # no NaN checkpoint: none for the diverged epoch, and any earlier one is finite
    ckpts = sorted(run_dir.glob("checkpoint_epoch*"))
    assert all(int(c.name[-4:]) < diverged_epoch for c in ckpts)
    for c in ckpts:
        state = torch.load(c / "model.pt", map_location="cpu", weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in state["model"].values()
                   if v.is_floating_point())
