"""The shipped flowers config on real photos (``../shared/data`` when present): one short epoch on a
handful of them keeps the real-image path working. The quality figures come from running the jobs
(README, "Results on real images"), not from tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.config import CONFIG_DIR, load_config

pytestmark = pytest.mark.slow


def test_flowers_config_trains_one_epoch_on_real_photos(ray_cluster, shared_data: Path, tmp_path):
    from raypipe.training.trainer import run_training

    src = shared_data / "flowers-sample"
    root = tmp_path / "flowers"
    for cls in ("daisy", "roses"):
        (root / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.jpg"))[:10]:
            (root / cls / f.name).symlink_to(f)
    cfg = load_config(CONFIG_DIR / "flowers.yaml", [
        f"data.root={root}", "train.epochs=1", "train.batch_size=8",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=real", "run.tensorboard=false",
    ])
    summary = run_training(cfg)
    assert summary["status"] == "finished", summary
    data = summary["data"]
    assert data["files_found"] == data["files_used"] == 20 and data["files_skipped"] == 0
    assert data["val_total"] == 4 and data["class_names"] == ["daisy", "roses"]
    m = summary["best_metrics"]
    assert m["train_samples"] == 8 and m["val_samples"] == 4  # per worker (of 2) / gathered
    assert m["train_loss"] > 0 and 0.0 <= m["val_auc"] <= 1.0
    assert Path(summary["best_checkpoint"], "model.pt").is_file()
