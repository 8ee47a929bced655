"""Faults: an interrupted driver leaves valid checkpoints and summary and resumes; an unwritable or
full results destination and unreachable object storage give one clear error naming the path.

(A training worker killed mid-epoch is covered with the training tests; S3 against a live fake
server with the object-storage tests.)"""

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
from conftest import ROOT, TAME, make_image_folder

from raypipe.config import load_config
from raypipe.data.sources import DataSourceError, discover
from raypipe.training import checkpoints as ck
from raypipe.training.trainer import RunError, _explain_storage, _write_text, run_training

# ---------------------------------------------------------------- results destination


def _tiny_cfg(root: Path, storage: str, *extra: str):
    return load_config(None, [f"data.root={root}", f"run.storage_path={storage}", "run.name=r",
                              "train.batch_size=4", *extra])


def test_unwritable_storage_fails_before_training_naming_the_path(tmp_path: Path) -> None:
    """No Ray needed: the run directory is written before the trainer is built."""
    root = make_image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(RunError, match=r"cannot write '.*results.txt/r/config.yaml'.*"
                                       r"run.storage_path is writable"):
        run_training(_tiny_cfg(root, str(blocker)))


def test_unwritable_storage_fails_naming_the_path(tmp_path: Path) -> None:
    """sysfs refuses new folders even to root, so this holds for any user."""
    root = make_image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    with pytest.raises(RunError, match="cannot write '/sys/raypipe-results/r/config.yaml'"):
        run_training(_tiny_cfg(root, "/sys/raypipe-results"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_destination_is_a_clear_error() -> None:
    with pytest.raises(RunError, match=r"cannot write '/dev/full'.*No space left.*has space"):
        _write_text("/dev/full", "x" * 100_000)


def test_storage_failure_inside_ray_names_the_destination() -> None:
    cfg = load_config(None, ["run.storage_path=/mnt/results", "run.name=exp1"])
    text = _explain_storage("OSError: [Errno 28] No space left on device: '/mnt/results/x'", cfg)
    assert "run.storage_path='/mnt/results'" in text and "run.name=exp1" in text
    assert _explain_storage("ValueError: shapes differ", cfg) == "ValueError: shapes differ"


# ---------------------------------------------------------------- object storage unreachable


@pytest.fixture
def dead_endpoint(monkeypatch):
    """S3 settings pointing at a port nobody listens on."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def test_unreachable_data_storage_is_retried_then_a_clear_error(dead_endpoint) -> None:
    cfg = load_config(None, ["data.root=s3://bucket/flowers"])
    t0 = time.monotonic()
    with pytest.raises(DataSourceError, match=r"s3://bucket/flowers.*(endpoint|reach)"):
        discover(cfg.data)
    assert time.monotonic() - t0 < 120  # bounded retries, not a hang


def test_unreachable_results_storage_is_a_clear_error(dead_endpoint) -> None:
    with pytest.raises(RunError, match=r"cannot write 's3://results/exp/config.yaml'"):
        _write_text("s3://results/exp/config.yaml", "x")


# ---------------------------------------------------------------- driver interrupted


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epochs(proc: subprocess.Popen, history: Path, n: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"job ended (rc {proc.returncode}) before epoch {n}: {err[-3000:]}")
        try:
            if len(json.loads(history.read_text())) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no epoch {n} within {timeout} s")


def _interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint_epoch*/model.pt"))


def _epochs_kept(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("checkpoint_epoch")) for p in run_dir.glob("checkpoint_epoch*"))


EPOCHS = 10  # enough that each interrupt lands well before the end (an epoch here: 0.4 s)


@pytest.mark.slow
def test_interrupted_run_keeps_its_results_resumes_and_keeps_the_best(ray_cluster, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    storage = tmp_path / "runs"
    args = [f"data.root={root}", f"run.storage_path={storage}", f"train.epochs={EPOCHS}",
            "train.batch_size=8", "preprocess.image_size=32", "augment.enabled=false",
            "run.tensorboard=false", "checkpoint.metric=val_acc", "checkpoint.num_to_keep=1",
            "train.amp=bf16", "train.channels_last=true", *TAME]  # amp, channels-last: harmless on CPU
    env = {"RAY_ADDRESS": ray_cluster}

    # 1. an unnamed run (named <config>-<time>), Ctrl-C after two epochs (by then epoch 0's
    # checkpoint is surely registered: Ray Train commits a checkpoint asynchronously)
    proc = _start(args, env)
    deadline = time.monotonic() + 120
    while not list(storage.glob("default-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    (run_dir,) = storage.glob("default-*")
    history = run_dir / "history.json"
    _wait_for_epochs(proc, history, 2)
    rc, err = _interrupt(proc, signal.SIGINT)
    assert rc == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: checkpoints and summary"), err[-2000:]
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["status"] == "interrupted" and f"run.name={run_dir.name}" in first["resume"]
    assert 2 <= len(first["history"]) < EPOCHS - 1
    assert first["data"]["files_found"] == first["data"]["files_used"] == 16
    epoch0 = first["history"][0]
    # at least one complete checkpoint, and every complete one loads safely (a folder a Ctrl-C
    # caught while it was written is left as it is, unmarked)
    complete = [p.parent for p in _checkpoints(run_dir) if ck.is_complete(str(p.parent))]
    assert complete
    for folder in complete:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        assert state["epoch"] < EPOCHS and state["model"]

    # 2. the same command with --resume picks that run up; stopped again with SIGTERM (as a
    # scheduler would), which takes Ctrl-C's path: Ray Train's graceful abort
    proc = _start(["--resume", *args], env)
    _wait_for_epochs(proc, history, len(first["history"]) + 1)
    rc, err = _interrupt(proc, signal.SIGTERM)
    assert rc == 130, err[-3000:]
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["status"] == "interrupted"
    assert len(first["history"]) < len(second["history"]) < EPOCHS
    assert second["history"][0] == epoch0  # continued, not restarted

    # 3. and once more finishes the run
    proc = _start(["--resume", *args], env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"run directory: {run_dir}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert history[0] == epoch0
    assert list(storage.glob("default-*")) == [run_dir]  # no second run was started

    # best by val_acc: num_to_keep=1 keeps the best (Ray also keeps the latest, to resume from)
    acc = {h["epoch"]: h["val_acc"] for h in history}
    assert summary["metric"] == "val_acc" and summary["mode"] == "max"
    assert summary["best_value"] == max(acc.values())
    assert acc[summary["best_epoch"]] == max(acc.values())
    kept = _epochs_kept(run_dir)
    assert summary["best_epoch"] in kept and EPOCHS - 1 in kept
    # Ray Train deletes the checkpoints it registered beyond num_to_keep; one an interruption
    # caught before Ray registered it is not Ray's to delete, and raypipe deletes none on a guess:
    # any other folder kept is one of the epochs around the two interruptions
    stops = {len(first["history"]) - 1, len(first["history"]),
             len(second["history"]) - 1, len(second["history"])}
    assert set(kept) - {summary["best_epoch"], EPOCHS - 1} <= stops, (kept, stops)
    for e in set(acc) - set(kept):
        assert acc[e] <= acc[summary["best_epoch"]], "a better checkpoint was deleted"

    # a checkpoint holds everything needed to continue and to reproduce inputs
    best = Path(summary["best_checkpoint"])
    assert best.name == f"checkpoint_epoch{summary['best_epoch']:04d}"
    state = torch.load(best / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch"}
    assert state["epoch"] == summary["best_epoch"]
    assert state["scheduler"]["epoch"] == summary["best_epoch"] + 1
    meta = json.loads((best / "meta.json").read_text())
    assert meta["class_names"] == ["a", "b"]
    assert meta["preprocess"]["image_size"] == 32
    assert meta["config"]["checkpoint"]["metric"] == "val_acc"
    assert meta["config"]["train"]["amp"] == "bf16"

    # once finished, running it again trains nothing more and reports the same best
    again = run_training(load_config(None, [*args, f"run.name={run_dir.name}"]))
    assert [h["epoch"] for h in again["history"]] == list(range(EPOCHS))
    assert again["best_value"] == summary["best_value"]


def test_the_message_stays_last_under_rays_progress_bars(capfd) -> None:
    """Ray's progress bars (``tqdm_ray``, drawn by the driver for the data stage) patch ``print``
    to redraw themselves after every line: a run interrupted while one was up ended on a bar
    (seen once in the suite), not on "interrupted: ...". The message is the last line."""
    import builtins

    from ray.experimental import tqdm_ray

    from raypipe import cli

    printing = builtins.print
    manager = tqdm_ray.instance()  # patches print, as in a job whose data stage shows bars
    try:
        manager.process_state_update({
            "__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": 90, "pos": 0, "desc": "Running Dataset",
            "total": 120, "unit": "row", "ip": manager.ip, "pid": 1, "uuid": "bar", "closed": False})
        cli._report("interrupted: the message", stop_ray=False)
        err = capfd.readouterr().err
        assert "Running Dataset" in err  # the bar was drawn
        assert err.strip().splitlines()[-1] == "interrupted: the message", err[-500:]
    finally:
        manager.unhide_bars()
        manager.process_state_update({
            "__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": 120, "pos": 0, "desc": "Running Dataset",
            "total": 120, "unit": "row", "ip": manager.ip, "pid": 1, "uuid": "bar", "closed": True})
        builtins.print = printing
        tqdm_ray._manager = None


LATE_LINES_JOB = '''
import time

from raypipe.cli import exit_with, init_ray, settle


def main():
    init_ray(verbose=True, address="local", num_cpus=1, include_dashboard=False)
    import ray

    @ray.remote(num_cpus=0)
    def chatter():
        for i in range(60):
            print(f"worker line {i}", flush=True)
            time.sleep(0.1)

    ref = chatter.remote()  # noqa: F841 - still printing when the results are
    time.sleep(2.0)
    settle()
    print("RESULT")
    time.sleep(1.5)  # a job's last steps after its results (interpreter and Ray shutdown)
    return 0


exit_with(main)
'''


@pytest.mark.slow
@pytest.mark.xdist_group("machine_ray")  # starts its own Ray
def test_a_jobs_results_are_its_last_lines(tmp_path) -> None:
    """With --verbose Ray forwards its workers' logs to the driver as they come. A job that
    started Ray stops it before printing its results, so nothing follows them."""
    script = tmp_path / "job.py"
    script.write_text(LATE_LINES_JOB)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker line 0" in proc.stdout  # the worker's lines did reach the driver
    assert proc.stdout.strip().splitlines()[-1] == "RESULT", proc.stdout[-1500:]
