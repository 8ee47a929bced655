"""End to end: ``jobs/train.py`` on the built-in dataset, as a user runs it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run_job


@pytest.mark.slow
@pytest.mark.xdist_group("machine_ray")  # starts its own Ray, as the README's command does
def test_the_readme_first_run_prints_a_console_people_can_read(cache_dir, tmp_path):
    """``python jobs/train.py`` as the README's first command runs it (its own local Ray; only the
    results go to a temporary folder): after Ray's start-up lines, at most 40 lines, and each of
    them one a user wants."""
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_job("train.py", f"run.storage_path={out}", "run.name=first", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    started = max(i for i, line in enumerate(lines) if "Started a local Ray instance" in line)
    after = lines[started + 1:]
    assert len(after) <= 40, "\n".join(after)
    text = "\n".join(after)
    for noise in ("Reporting training result", "Execution plan", "Starting execution",
                  "Checkpoint successfully created", "RayDeprecationWarning", "core_worker.cc",
                  "Traceback"):
        assert noise not in text, noise
    assert "dataset " in text and "2 classes; train 160" in text
    assert "loss: weighted_ce, class weights face 1, not_face 1" in text
    epochs = [line for line in after if line.startswith("epoch ")]
    assert len(epochs) == 8 and epochs[0].startswith("epoch 1/8: "), text
    assert proc.stdout.strip().splitlines()[-3:][0] == f"run directory: {out / 'first'}"


@pytest.mark.slow
def test_train_job_builtin_two_workers(ray_cluster, cache_dir, tmp_path):
    out = tmp_path / "results"
    proc = run_job(
        "train.py", "train.epochs=2", "train.num_workers=2", "preprocess.image_size=32",
        "pipeline.cache=false",  # every epoch streams from the files
        f"run.storage_path={out}", "run.name=e2e",
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    run_dir = out / "e2e"
    assert f"run directory: {run_dir}" in proc.stdout
    # the progress line of each epoch, once
    first = [line for line in (proc.stdout + proc.stderr).splitlines() if "epoch 1/2: " in line]
    assert len(first) == 1, first
    # and not Ray Train's own line per report per worker
    assert "Reporting training result" not in proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "val_auc"
    assert 0.0 <= summary["best_value"] <= 1.0
    assert len(summary["history"]) == 2
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert summary["data"]["class_names"] == ["face", "not_face"]
    assert summary["data"]["train_total"] + summary["data"]["val_total"] == 200
    assert summary["wall_time_s"] > 0
    # the built-in dataset is balanced, so inverse prevalence weighs both classes 1
    assert summary["loss"] == "weighted_ce"
    assert summary["class_weights"] == {"face": 1.0, "not_face": 1.0}
    assert ("loss: weighted_ce, class weights face 1, not_face 1 (inverse prevalence of the 160 "
            "training files)") in proc.stdout + proc.stderr
    assert "Loss: weighted_ce, class weights face 1" in (run_dir / "report.md").read_text()
    assert (run_dir / "config.yaml").is_file()
    ckpt = summary["best_checkpoint"]
    state = torch.load(os.path.join(ckpt, "model.pt"), map_location="cpu", weights_only=True)
    meta = json.loads(open(os.path.join(ckpt, "meta.json")).read())
    assert meta["class_names"] == ["face", "not_face"]
    assert meta["preprocess"]["image_size"] == 32
    from raypipe.models.resnet import create_model

    model = create_model(meta["model"]["name"], in_channels=meta["model"]["in_channels"],
                         num_classes=meta["model"]["num_classes"])
    model.load_state_dict(state["model"])
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 2)


def test_bad_override_fails_before_ray(tmp_path):
    proc = run_job("train.py", "train.lr=-1", "train.epohcs=3", env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "-1" in proc.stderr
    assert "train.epohcs" in proc.stderr and "Did you mean 'train.epochs'" in proc.stderr
    assert "Traceback" not in proc.stderr
