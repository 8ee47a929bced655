"""Batch evaluation of a checkpoint with Ray Data: predictions, metrics, pictures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_job
from sklearn import metrics as skm
from test_report import assert_png, trained_run

from raypipe.data.sources import discover
from raypipe.evaluate import EvaluationError, evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory, cache_dir):
    return trained_run(tmp_path_factory, cache_dir)


def test_job_evaluates_the_validation_split(run, ray_cluster, tmp_path):
    cfg, summary = run
    out = tmp_path / "eval"
    proc = run_job("evaluate.py", "--checkpoint", summary["best_checkpoint"], "--out", str(out),
                   env={"RAY_ADDRESS": ray_cluster}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_val = len(discover(cfg.data).val)
    table = pd.read_parquet(out / "predictions.parquet")
    assert len(table) == n_val
    assert list(table.columns) == ["path", "key", "true_label", "score_face", "score_not_face",
                                   "predicted_label"]
    csv = pd.read_csv(out / "predictions.csv")
    assert len(csv) == n_val and np.allclose(csv["score_face"], table["score_face"])
    assert np.allclose(table["score_face"] + table["score_not_face"], 1.0, atol=1e-5)

    m = json.loads((out / "metrics.json").read_text())["metrics"]
    y = (table["true_label"] == "not_face").to_numpy().astype(int)
    s = table["score_not_face"].to_numpy()
    pred = (table["predicted_label"] == "not_face").to_numpy().astype(int)
    assert m["n"] == n_val
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, s))
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert (pred == (s >= cfg.train.threshold)).all()
    assert m["confusion"] == skm.confusion_matrix(y, pred).tolist()
    assert m["loss"] == pytest.approx(skm.log_loss(y, table[["score_face", "score_not_face"]].to_numpy(),
                                                     labels=[0, 1]), rel=1e-6)
    assert m["youden_point"]["j"] >= m["chosen_point"]["tpr"] - m["chosen_point"]["fpr"] - 1e-9
    # the job scores exactly the model training validated: the moving average with mirror-image
    # TTA, and with rank 0's BatchNorm statistics on both workers. The loss pins the scores; the
    # AUC can move only through positive/negative pairs scored within float noise of each other
    # (a one-epoch model may score many images almost alike: 0.4875 vs 0.5225 was seen so)
    assert m["loss"] == pytest.approx(summary["best_metrics"]["val_loss"], rel=1e-4)
    near_ties = float((np.abs(s[y == 1][:, None] - s[y == 0][None, :]) < 1e-4).mean())
    assert abs(m["auc"] - summary["best_metrics"]["val_auc"]) <= near_ties + 1e-6
    import torch
    state = torch.load(Path(summary["best_checkpoint"]) / "model.pt", weights_only=True)
    assert state["ema_steps"] > 0
    assert not torch.equal(state["model"]["fc.weight"], state["train_model"]["fc.weight"])
    for name in ("roc.png", "pr.png", "confusion.png"):
        assert_png(out / name)
    assert "results:" in proc.stdout
    lo, hi = m["auc_ci95"]
    assert lo <= m["auc"] <= hi and "bootstrap interval" in proc.stdout


def test_the_threshold_chosen_on_validation_scores_other_images(run, tmp_path):
    """Score a test set at the operating point chosen on validation: the checkpoint records the
    validation set's Youden threshold, and ``--threshold validation`` uses it."""
    _, summary = run
    recorded = summary["best_metrics"]["val_youden_threshold"]
    assert 0.0 <= recorded <= 1.0
    res = evaluate(summary["best_checkpoint"], out=str(tmp_path / "v"), threshold="validation")
    assert res["threshold"] == pytest.approx(recorded) and "Youden" in res["threshold_from"]
    table = pd.read_parquet(tmp_path / "v" / "predictions.parquet")
    assert ((table["score_not_face"] >= recorded) == (table["predicted_label"] == "not_face")).all()
    with pytest.raises(EvaluationError, match="between 0 and 1"):
        evaluate(summary["best_checkpoint"], out=str(tmp_path / "w"), threshold="1.5")


def test_labeled_and_unlabeled_folders(run, tmp_path, cache_dir):
    _, summary = run
    root = Path(discover(run[0].data).source)
    # labeled: two class folders, one holding a file that is not an image
    labeled = tmp_path / "labeled"
    for cls in ("face", "not_face"):
        (labeled / cls).mkdir(parents=True)
        for p in sorted((root / cls).glob("*.png"))[:12]:
            shutil.copy(p, labeled / cls / p.name)
    (labeled / "face" / "broken.png").write_bytes(b"not an image")  # 1 of 25: under max_bad_fraction
    res = evaluate(summary["run_dir"], str(labeled), str(tmp_path / "out1"))  # run dir -> best
    assert res["checkpoint"] == summary["best_checkpoint"]
    assert res["images"] == 24 and res["labeled"] == 24
    assert [s["file"] for s in res["skipped"]] == ["face/broken.png"]
    table = pd.read_parquet(tmp_path / "out1" / "predictions.parquet")
    assert len(table) == 24 and set(table["true_label"]) == {"face", "not_face"}
    assert res["metrics"]["n"] == 24

    # unlabeled: a flat folder -> predictions only, no metrics, no pictures
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((root / "face").glob("*.png"))[:3] + sorted((root / "not_face").glob("*.png"))[:4]:
        shutil.copy(p, flat / f"{p.parent.name}_{p.name}")
    res = evaluate(summary["best_checkpoint"], str(flat), str(tmp_path / "out2"))
    assert res["images"] == 7 and res["labeled"] == 0 and "metrics" not in res
    table = pd.read_parquet(tmp_path / "out2" / "predictions.parquet")
    assert len(table) == 7 and (table["true_label"].fillna("") == "").all()
    assert set(table["predicted_label"]) <= {"face", "not_face"}
    assert not (tmp_path / "out2" / "roc.png").exists()
    assert json.loads((tmp_path / "out2" / "metrics.json").read_text())["images"] == 7


def test_bad_checkpoint_path_says_what_to_pass(tmp_path):
    with pytest.raises(EvaluationError, match="neither a complete checkpoint folder"):
        evaluate(str(tmp_path))
