"""A training worker killed mid-epoch restarts from the latest checkpoint.
(Resume and best-by-metric checkpoints: tests/test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

# small and fast: 48 training images of 32 px, 3 steps of 16 per epoch
SMALL = ["preprocess.image_size=32", "data.limit=48", "train.batch_size=16"]


def _epochs_kept(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("checkpoint_epoch")) for p in
                  run_dir.glob("checkpoint_epoch*"))


def _history(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _committed(run_dir: Path, epoch: int) -> bool:
    """Whether the checkpoint of ``epoch`` is complete (its marker written, after Ray Train
    persisted it)."""
    return (run_dir / f"checkpoint_epoch{epoch:04d}" / "complete.json").is_file()


def _train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of this test session's own cluster."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]]


@pytest.mark.slow
def test_worker_killed_mid_epoch_restarts_from_checkpoint(ray_cluster, cache_dir, tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "fault"
    log_path = tmp_path / "job.log"
    args = ["--verbose",  # Ray Train's own lines: its restart is checked below
            *SMALL, "train.epochs=3", "train.max_failures=1", "checkpoint.num_to_keep=3",
            f"run.storage_path={out}", "run.name=fault"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_cluster}
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 480
            # kill once epoch 0's checkpoint is complete (a checkpoint still in flight when a
            # worker dies is not kept, by Ray's design)
            while (not _committed(run_dir, 0) and job.poll() is None
                   and time.time() < deadline):
                time.sleep(0.3)
            assert _committed(run_dir, 0), log_path.read_text()[-3000:]
            assert len(_history(run_dir)) >= 1
            epoch0 = _history(run_dir)[0]
            pids = _train_worker_pids()
            assert len(pids) == 2, pids
            os.kill(pids[-1], signal.SIGKILL)  # one worker dies during the next epoch
            killed_during = len(_history(run_dir))
            rc = job.wait(timeout=600)
        finally:
            if job.poll() is None:
                job.kill()
    output = log_path.read_text()
    assert rc == 0, output[-4000:]
    assert killed_during < 3, "the kill landed after the last epoch"
    summary = json.loads((run_dir / "summary.json").read_text())
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2], "the right epoch count, none repeated"
    assert history[0]["train_loss"] == epoch0["train_loss"], "restarted from the checkpoint"
    # every epoch trains on its share of rows, before and after the restart (a resumed stream
    # skips the epochs already trained: no short or empty epoch)
    assert len({(h["train_samples"], h["train_steps"]) for h in history}) == 1, history
    assert _epochs_kept(run_dir) == [0, 1, 2], "no checkpoint lost"
    assert "[FailurePolicy] RETRY" in output, "Ray Train restarted the worker group"
    for e in (0, 1, 2):
        state = torch.load(run_dir / f"checkpoint_epoch{e:04d}" / "model.pt",
                           map_location="cpu", weights_only=True)
        assert state["epoch"] == e
