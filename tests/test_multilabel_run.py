"""A multi-label run end to end: a manifest of films with zero or more findings, split by patient,
weighted binary cross-entropy, AUC per finding each epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TAME
from PIL import Image

FINDINGS = ["Effusion", "Hernia", "Mass"]


def nih_like(root: Path, patients: int = 30, films: int = 2, seed: int = 0) -> Path:
    """``root/images/*.png`` and ``root/Data_Entry.csv`` in NIH's columns: each finding brightens
    its own part of the film, so it can be learned."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,View Position"]
    for p in range(patients):
        for f in range(films):
            has = [name for name in FINDINGS if rng.random() < 0.4]
            img = rng.integers(0, 60, (24, 24), dtype=np.uint8)
            if "Effusion" in has:
                img[:, :12] += 150
            if "Hernia" in has:
                img[:12] += 150
            if "Mass" in has:
                img[8:16, 8:16] = 250
            name = f"{p:08d}_{f:03d}.png"
            Image.fromarray(img, "L").save(root / "images" / name)
            rows.append(f"{name},{'|'.join(has) or 'No Finding'},{f},{p},{'PA' if f % 2 else 'AP'}")
    (root / "Data_Entry.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_a_multilabel_run_reports_every_findings_auc_and_keeps_patients_apart(ray_cluster, tmp_path):
    from raypipe.api import resolve_config
    from raypipe.training.trainer import run_training

    data = nih_like(tmp_path / "nih")
    cfg = resolve_config(None, [f"data.manifest={data / 'Data_Entry.csv'}", f"data.root={data / 'images'}",
                                "data.val_fraction=0.3", "preprocess.image_size=16", "train.epochs=2",
                                "train.batch_size=8", "checkpoint.metric=val_auc/Effusion",
                                f"run.storage_path={tmp_path / 'runs'}", "run.name=ml", *TAME])
    summary = run_training(cfg)
    assert summary["status"] == "finished" and summary["loss"] == "weighted_bce"
    assert set(summary["class_weights"]) == set(FINDINGS)
    data_facts = summary["data"]
    assert data_facts["task"] == "multilabel" and data_facts["class_names"] == FINDINGS
    assert data_facts["groups_on_both_sides"] == 0
    last = summary["history"][-1]
    for name in FINDINGS:
        assert 0.0 <= last[f"val_auc/{name}"] <= 1.0
    assert summary["metric"] == "val_auc/Effusion" and summary["best_value"] is not None
    assert np.isclose(last["val_auc"], np.nanmean([last[f"val_auc/{n}"] for n in FINDINGS]))
    meta = json.loads((Path(summary["best_checkpoint"]) / "meta.json").read_text())
    assert meta["task"] == "multilabel" and meta["class_names"] == FINDINGS
    assert meta["model"]["num_classes"] == 3

    # the evaluate job on the multi-label checkpoint: a table per finding, one ROC figure, a
    # score, a truth and a decision per finding for each film
    import pandas as pd

    from raypipe.evaluate import evaluate

    res = evaluate(summary["run_dir"], data=str(data / "Data_Entry.csv"), out=str(tmp_path / "eval"))
    assert res["task"] == "multilabel" and res["images"] == 60 and res["labeled"] == 60
    rows = {r["finding"]: r for r in res["metrics"]["findings"]}
    assert set(rows) == set(FINDINGS)
    for r in rows.values():
        assert 0 <= r["auc"] <= 1 and 0 < r["prevalence"] < 1 and 0 <= r["youden_sensitivity"] <= 1
    table = pd.read_parquet(tmp_path / "eval" / "predictions.parquet")
    assert {f"{kind}_{n}" for kind in ("score", "true", "predicted") for n in FINDINGS} <= set(table.columns)
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 1000
