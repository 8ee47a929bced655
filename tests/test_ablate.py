"""Ablation: variant derivation, the overfit verdict and its diagnosis, the table and chart (fast),
then the overfit check and a small component grid on the built-in dataset (Ray, slow)."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import pytest
import torch
from conftest import run_job

from raypipe.config import ConfigError, load_config
from raypipe.tune import ablation as abl
from raypipe.tune.driver import TrialRow

SMALL = ["train.num_workers=1", "train.cpus_per_worker=0.5", "pipeline.cpus_per_worker=0.5",
         "preprocess.image_size=32", "train.batch_size=16"]


# ---------------------------------------------------------------- variants (no Ray)


def test_one_variant_per_component_that_is_on():
    v = abl.component_variants(load_config(None))
    assert list(v)[0] == abl.FULL and v[abl.FULL] == {}
    for name in ("no_grayscale", "no_normalize", "no_augmentation", "no_hflip", "no_rotation",
                 "no_weighted_loss", "no_lr_decay"):
        assert name in v
    assert "no_vflip" not in v and "no_threshold" not in v  # off in the default config
    assert v["no_lr_decay"]["train.schedule"] == "none"
    seg = load_config(None, ["preprocess.threshold=otsu", "preprocess.morphology=[opening, closing]"])
    v = abl.component_variants(seg)
    assert v["no_threshold"] == {"preprocess.threshold": "none"}
    assert v["no_opening"] == {"preprocess.morphology": ["closing"]}
    # every variant is one valid config differing from the full one
    from raypipe.tune.space import trial_overrides

    full = seg.to_dict()
    for name in v:
        cfg = load_config(None, ["preprocess.threshold=otsu", "preprocess.morphology=[opening, closing]"]
                          + trial_overrides({"variant": name}, {"variant": v}))
        assert (cfg.to_dict() == full) == (name == abl.FULL)


def test_exclude_and_extra():
    spec = abl.AblationSpec(exclude=["no_hflip"], extra={"tiny_lr": {"train.lr": 0.001}})
    v = abl.ablation_variants(load_config(None), spec)
    assert "no_hflip" not in v and v["tiny_lr"] == {"train.lr": 0.001}
    with pytest.raises(ConfigError, match="no_such"):
        abl.ablation_variants(load_config(None), abl.AblationSpec(exclude=["no_such"]))


# ---------------------------------------------------------------- verdict and diagnosis (no Ray)


def _history(losses, grad=1.0):
    return [{"epoch": i, "train_loss": x, "grad_norm_mean": grad, "grad_norm_max": grad * 2}
            for i, x in enumerate(losses)]


def test_overfit_verdict():
    ok = abl.overfit_verdict(_history([0.9, 0.5, 0.2, 0.08, 0.03]), threshold=0.1, lr=0.05)
    assert ok.passed and ok.falling and ok.diagnosis == ""
    stalled = abl.overfit_verdict(_history([0.9, 0.3, 0.3, 0.31, 0.3]), threshold=0.1, lr=0.05)
    assert not stalled.passed and "above the threshold" in stalled.diagnosis
    flat = abl.overfit_verdict(_history([0.69, 0.70, 0.69, 0.69]), threshold=0.1, lr=0.0)
    assert not flat.passed and not flat.falling
    assert "flat" in flat.diagnosis and "learning rate is 0" in flat.diagnosis
    # with lr 0 the loss still moves with the batches (BatchNorm statistics): never "overshoot"
    noisy = abl.overfit_verdict(_history([0.69, 0.78, 0.74]), threshold=0.1, lr=0.0)
    assert "flat" in noisy.diagnosis and "rose" not in noisy.diagnosis
    # the causes come in the course's order, architecture last
    pos = [flat.diagnosis.index(k) for k in ("activation", "learning rate not tuned", "SGD",
                                              "initialisation", "architecture")]
    assert pos == sorted(pos)


def test_diagnosis_names_nan_and_gradient_extremes():
    d = abl.diagnose(_history([0.7, 0.69, 0.7], grad=1e-7), 0.1, 0.05)
    assert "tiny" in d
    d = abl.diagnose(_history([5.0, 80.0, 900.0], grad=1e5), 0.1, 10.0)
    assert "huge" in d and "rose" in d
    d = abl.diagnose(_history([0.7, float("nan")]), 0.1, 1e6,
                     error="TrainingDiverged: training diverged: loss is not finite")
    assert "NaN" in d and "TrainingDiverged" in d


def _row(variant, seed, auc, loss):
    return TrialRow(f"t{variant}{seed}", "done", {"variant": variant, "train.seed": seed}, auc, 0, loss,
                    auc, loss, 1, None, None)


def test_summary_table_and_chart(tmp_path):
    rows = [_row("full", 0, 0.9, 0.3), _row("full", 1, 0.8, 0.4), _row("no_hflip", 0, 0.7, 0.5),
            _row("no_hflip", 1, 0.6, 0.6),
            TrialRow("tx", "error", {"variant": "no_lr_decay", "train.seed": 0}, None, None, None,
                     None, None, 0, None, "ValueError: boom")]
    header, table = abl.summarise(rows, ["full", "no_hflip", "no_lr_decay"])
    by = {r["variant"]: r for r in table}
    assert math.isclose(by["full"]["best_val_auc"], 0.85) and by["full"]["delta_auc"] == 0.0
    assert math.isclose(by["no_hflip"]["delta_auc"], -0.2) and math.isclose(by["no_hflip"]["delta_loss"], 0.2)
    assert by["no_hflip"]["seeds"] == 2 and by["no_hflip"]["auc_std"] > 0
    assert by["no_lr_decay"]["best_val_auc"] is None and "boom" in by["no_lr_decay"]["failed"]
    png = tmp_path / "chart.png"
    abl.bar_chart(table, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- real runs (Ray)


@pytest.mark.ray
@pytest.mark.slow
def test_overfit_check_passes_on_builtin_data(ray_cluster, tmp_path):
    from raypipe.tune.search import run_ablation

    # the shipped settings (Adam, lr 0.001), on fewer images and epochs to stay quick
    spec = abl.load_ablation_spec("ablation.yaml", ["name=fit", f"storage_path={tmp_path}",
                                                    "overfit.images=16", "overfit.epochs=10",
                                                    "overfit.batch_size=4"])
    out = run_ablation(None, SMALL, spec, grid=False)
    o = out["overfit"]
    assert o["passed"], o["diagnosis"]
    assert o["final_loss"] < o["threshold"] and o["losses"][-1] < o["losses"][0]
    # the run behind it: the 16 images every epoch, no augmentation, no weight decay
    summary = json.loads((tmp_path / "fit" / "overfit" / "summary.json").read_text())
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses == pytest.approx(o["losses"]) and len(losses) == 10
    assert all(h["train_samples"] == 16 for h in summary["history"])
    assert summary["overfit_passed"] is True and summary["final_train_loss"] == pytest.approx(losses[-1])
    meta = json.loads((pathlib.Path(summary["best_checkpoint"]) / "meta.json").read_text())
    assert meta["config"]["augment"]["enabled"] is False
    assert meta["config"]["train"]["overfit_subset"] == 16
    ckpt = torch.load(f"{summary['best_checkpoint']}/model.pt", map_location="cpu", weights_only=True)
    assert all(g["weight_decay"] == 0.0 for g in ckpt["optimizer"]["param_groups"])


@pytest.mark.ray
@pytest.mark.slow
def test_overfit_check_fails_with_diagnosis_when_learning_is_impossible(ray_cluster, tmp_path):
    r = run_job("ablate.py", "--overfit-only", "--name", "frozen", "--set", "overfit.lr=0",
                "--set", "overfit.epochs=3", "--set", "overfit.images=16", "--set", "overfit.batch_size=8",
                *SMALL, f"run.storage_path={tmp_path}", env={"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "overfit check: FAILED" in r.stdout
    assert "flat" in r.stdout and "learning rate is 0" in r.stdout
    assert r.stdout.index("1. activation") < r.stdout.index("5. network architecture")
    assert not (tmp_path / "frozen" / "ablation.csv").exists()  # the grid does not run


@pytest.mark.ray
@pytest.mark.slow
def test_component_grid_writes_table_and_chart(ray_cluster, tmp_path):
    # the full config and one variant: each variant is the same kind of trial, and the suite's time
    # goes into trial start-ups
    keep = {"full", "no_augmentation"}
    drop = [n for n in abl.component_variants(load_config(None)) if n not in keep]
    r = run_job("ablate.py", "--skip-overfit", "--name", "grid", "--set", f"exclude=[{', '.join(drop)}]",
                "--set", "subset=32", "--set", "trial_overrides=[train.epochs=1]",
                *SMALL, f"run.storage_path={tmp_path}", env={"RAY_ADDRESS": ray_cluster})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "grid"
    with open(d / "ablation.csv") as f:
        table = {row["variant"]: row for row in csv.DictReader(f)}
    assert set(table) == keep
    for row in table.values():
        assert 0.0 <= float(row["best_val_auc"]) <= 1.0 and row["seeds"] == "1"
    assert float(table["full"]["delta_auc"]) == 0.0
    expected = float(table["no_augmentation"]["best_val_auc"]) - float(table["full"]["best_val_auc"])
    assert math.isclose(float(table["no_augmentation"]["delta_auc"]), expected, abs_tol=1e-3)
    assert "| no_augmentation |" in (d / "ablation.md").read_text()
    assert (d / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "chart:" in r.stdout
