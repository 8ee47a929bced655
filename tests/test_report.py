"""Plots, TensorBoard events, the training-curve picture and report.md of a run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raypipe.report import plots

_RUN: dict = {}


def trained_run(tmp_path_factory, cache_dir) -> tuple:
    """(config, summary) of one 1-epoch, 32 px, 2-worker run on the built-in dataset, trained once per test
    session and shared by the report and evaluation tests."""
    if "run" not in _RUN:
        from raypipe.config import load_config
        from raypipe.training.trainer import run_training

        storage = tmp_path_factory.mktemp("runs")
        cfg = load_config(None, [
            "train.epochs=1", "preprocess.image_size=32", "train.num_workers=2",
            # two workers, weight averaging and mirror-image TTA, so that the evaluation tests
            # check that the job scores exactly the model training validated
            "train.ema_decay=0.9", "augment.tta=hflip",
            f"run.storage_path={storage}", "run.name=tiny", "data.cache_dir=" + str(cache_dir),
        ])
        before = set(_helper_processes())
        _RUN["run"] = (cfg, run_training(cfg))
        # the run's own data helpers (bad-file ledger, epoch clock) end with it
        deadline = time.monotonic() + 30
        while (new := set(_helper_processes()) - before) and time.monotonic() < deadline:
            time.sleep(0.25)
        _RUN["helpers_left"] = sorted(new)
    return _RUN["run"]


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory, cache_dir):
    return trained_run(tmp_path_factory, cache_dir)


def assert_png(path: str | Path, size: tuple[int, int] = plots.PIXELS) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size


# ---------------------------------------------------------------- plots, no Ray


def _scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p1 = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
    return labels, np.stack([1 - p1, p1], axis=1)


def test_youden_point_maximises_tpr_minus_fpr():
    labels, probs = _scores()
    y = plots.youden_point(labels, probs[:, 1])
    points = [plots.operating_point(labels, probs[:, 1], t) for t in np.unique(probs[:, 1])]
    best = max(p["tpr"] - p["fpr"] for p in points)
    assert y["j"] == pytest.approx(best)
    at = plots.operating_point(labels, probs[:, 1], y["threshold"])
    assert at["tpr"] - at["fpr"] == pytest.approx(y["j"])


def test_every_plot_is_a_png_of_fixed_size(tmp_path):
    labels, probs = _scores()
    names = ["neg", "pos"]
    assert_png(plots.roc_png(labels, probs, names, tmp_path / "roc.png", threshold=0.5))
    assert_png(plots.pr_png(labels, probs, names, tmp_path / "pr.png"))
    assert_png(plots.confusion_png([[50, 10], [5, 35]], names, tmp_path / "cm.png", 0.5))
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_auc": 0.5 + e / 10,
                "lr": 0.1 * 0.5 ** e} for e in range(4)]
    assert_png(plots.training_curves_png(history, tmp_path / "curves.png"))
    rng = np.random.default_rng(1)
    p3 = rng.dirichlet([1, 1, 1], 60)
    y3 = np.arange(60) % 3
    assert_png(plots.roc_png(y3, p3, ["a", "b", "c"], tmp_path / "roc3.png"))
    assert_png(plots.pr_png(y3, p3, ["a", "b", "c"], tmp_path / "pr3.png"))


def test_report_lists_skipped_files_and_prevalence():
    from raypipe.config import load_config
    from raypipe.report.run_report import render_report

    cfg = load_config(None, ["run.name=r1"])
    summary = {
        "run_dir": "/x/r1", "metric": "val_auc", "best_value": 0.9, "best_epoch": 3, "epochs": 4,
        "best_checkpoint": "/x/r1/checkpoint_epoch0003", "best_metrics": {"val_auc": 0.9},
        "wall_time_s": 12.0, "history": [{"epoch": 0, "lr": 0.1, "train_loss": 0.7}],
        "data": {"source": "/d", "class_names": ["a", "b"], "train": {"a": 30, "b": 10},
                 "val": {"a": 8, "b": 2}, "files_found": 51, "files_used": 50, "files_skipped": 1},
        "skipped": [{"file": "a/bad.jpg", "reason": "not a readable image"}],
    }
    text = render_report(cfg, summary, ["training_curves.png"])
    assert "`a/bad.jpg` | not a readable image" in text
    assert "| train | 40 | 30 | 10 | 0.750 | 0.250 |" in text
    assert "| val | 10 | 8 | 2 | 0.800 | 0.200 |" in text
    assert "![training_curves.png](training_curves.png)" in text
    assert "name: r1" in text  # resolved config
    # the best epoch counted from 1, as the per-epoch log lines count it ("epoch 4/4")
    assert "Best val_auc = 0.9 at epoch 4/4 (checkpoint `/x/r1/checkpoint_epoch0003`)" in text
    assert "at epoch ?" in render_report(cfg, {**summary, "best_epoch": None}, [])
    assert "Loss:" not in text  # a summary from before the loss was recorded
    weighted = {**summary, "loss": "weighted_ce", "class_weights": {"a": 2 / 3, "b": 2.0},
                "class_weights_from": "inverse prevalence of the 40 training files"}
    assert ("Loss: weighted_ce, class weights a 0.667, b 2 (inverse prevalence of the 40 "
            "training files).") in render_report(cfg, weighted, [])


def _scalars(logdir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_a_local_run_dir_itself_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    """A local run directory gets the events as they are written, so a run stopped before
    ``close`` (a killed worker) leaves them there and nothing in the temp folder."""
    import tempfile

    from raypipe.report.tensorboard import TensorBoardLogger

    def no_temp(*a, **k):
        raise AssertionError("a local run directory needs no temporary folder")

    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    tb = TensorBoardLogger(str(tmp_path / "run"))
    tb.log_epoch(0, {"train_loss": 0.5, "val_auc": 0.75})
    # not closed: the events of the epoch are already in the run directory
    assert _scalars(tmp_path / "run" / "tensorboard") == {"loss/train": [0.5], "val/auc": [0.75]}
    tb.close()


def test_tensorboard_copies_events_to_a_uri_and_removes_its_temp_folder(tmp_path):
    from raypipe.report.tensorboard import TensorBoardLogger

    tb = TensorBoardLogger((tmp_path / "run").as_uri())
    local = tb.local
    assert tb.remote and not Path(local).is_relative_to(tmp_path)
    tb.log_epoch(0, {"train_loss": 0.5})
    assert _scalars(tmp_path / "run" / "tensorboard") == {"loss/train": [0.5]}
    tb.log_epoch(1, {"train_loss": 0.25})
    tb.close()
    assert _scalars(tmp_path / "run" / "tensorboard") == {"loss/train": [0.5, 0.25]}
    assert not os.path.exists(local)


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_run_writes_tensorboard_events(run):
    from tensorboard.backend.event_processing import event_accumulator

    _, summary = run
    logdir = os.path.join(summary["run_dir"], "tensorboard")
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/train", "loss/val", "val/auc", "optim/lr", "optim/grad_norm_mean",
                "speed/images_per_s"):
        assert tag in tags["scalars"], tags["scalars"]
    assert [e.step for e in acc.Scalars("loss/train")] == [0]
    assert acc.Scalars("val/auc")[0].value == pytest.approx(summary["history"][0]["val_auc"], abs=1e-6)
    assert "inputs/train_batch" in tags["images"]
    img = acc.Images("inputs/train_batch")[0]
    assert img.height == 32 and img.width == 32 * 8  # a grid of the first batch's 8 images


@pytest.mark.slow
def test_run_writes_curves_and_report(run):
    cfg, summary = run
    run_dir = Path(summary["run_dir"])
    assert_png(run_dir / "training_curves.png")
    text = (run_dir / "report.md").read_text()
    # counted from 1 as the log lines count it; summary.json's best_epoch counts from 0
    assert f"Best val_auc = {summary['best_value']:.4g} at epoch 1/{summary['epochs']}" in text
    counts = json.loads((run_dir / "summary.json").read_text())["data"]
    n_train, n_val = counts["train_total"], counts["val_total"]
    assert f"| train | {n_train} |" in text and f"| val | {n_val} |" in text
    assert "image_size: 32" in text
    assert "None: every file was read." in text


def _helper_processes() -> list[int]:
    return _ray_processes("ray::BadFileLedger") + _ray_processes("ray::EpochClock")


def _ray_processes(title: str) -> list[int]:
    """This session's cluster's processes titled ``title`` (the cluster's processes descend from
    this one; other clusters on the machine are not looked at)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith(title):
            out.append(p.pid)
    return out


@pytest.mark.slow
def test_a_finished_run_leaves_no_controller_or_data_actors_behind(run):
    import signal

    # TorchTrainer.fit registers a SIGINT handler holding the run's controller; run_training puts
    # the previous handler back, so the controller (and the data actors it holds) goes with the run
    handler = signal.getsignal(signal.SIGINT)
    assert "controller" not in getattr(getattr(handler, "__code__", None), "co_freevars", ())
    deadline = time.monotonic() + 60
    while (left := _ray_processes("ray::TrainController") + _ray_processes("ray::SplitCoordinator")) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of a finished run still alive: {left}"
    assert _RUN["helpers_left"] == [], "the run's bad-file ledger / epoch clock outlived it"
