"""Hyperparameter search: spec parsing and resource sizing (fast), then real Tune searches on the
built-in dataset (Ray, slow): a tiny grid, ASHA early stopping next to a diverging trial, resume."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest
import yaml

from raypipe.config import ConfigError, load_config
from raypipe.training.trainer import ResourceError
from raypipe.tune import driver as drv
from raypipe.tune.space import (
    TuneSpec,
    example_points,
    load_tune_spec,
    param_space,
    trial_overrides,
    yaml_scalar,
)

# one trial = 1 training worker (0.5 CPU) + at least one data worker (0.5): two trials fit 2 CPUs
SMALL = ["train.num_workers=1", "train.cpus_per_worker=0.5", "pipeline.cpus_per_worker=0.5",
         "preprocess.image_size=32", "train.batch_size=16",
         "train.epochs=1"]


# ---------------------------------------------------------------- spec and space (no Ray)


def test_shipped_spec_builds_valid_trial_configs(tmp_path):
    spec = load_tune_spec("tune.yaml")
    job = drv.SearchJob("s", str(tmp_path), drv.absolute_config_path(None), [],
                        spec.trial_overrides, spec.presets)
    cfgs = drv.check_trial_configs(job, example_points(spec))
    assert {c.train.optimizer for c in cfgs} == {"sgd", "rmsprop", "adam"}
    assert {c.model.name for c in cfgs} == {"resnet18", "resnet34"}
    assert {c.augment.enabled for c in cfgs} == {True, False}
    assert all(c.train.epochs == 4 for c in cfgs)  # the search-only override
    assert all(c.run.storage_path == str(tmp_path / "s" / "runs") and c.run.name == "check"
               for c in cfgs)


def test_grid_and_random_spaces():
    from ray.tune.search.sample import Categorical, Float

    spec = TuneSpec(search="grid", space={"train.lr": [0.1, 0.01], "train.momentum": {"uniform": [0.5, 0.9]}})
    space = param_space(spec)
    assert space["train.lr"] == {"grid_search": [0.1, 0.01]}
    assert isinstance(space["train.momentum"], Float)
    spec = spec.model_copy(update={"search": "random"})
    assert isinstance(param_space(spec)["train.lr"], Categorical)


def _first_draws(tuner, space: dict, n: int) -> list[dict]:
    """The trial configs the tuner's search generator hands out before any trial finishes."""
    from ray.tune.experiment import Experiment

    alg = tuner._local_tuner._tune_config.search_alg
    alg.add_configurations([Experiment("draws", run=lambda c: None, config=space, num_samples=n)])
    draws = []
    while (trial := alg.next_trial()) is not None:
        draws.append(trial.config)
    return draws


def test_random_search_draws_the_same_trials_for_the_same_seed(tmp_path):
    spec = load_tune_spec("tune.yaml")
    assert spec.search == "random" and spec.seed == 0
    job = drv.SearchJob("s", str(tmp_path), drv.absolute_config_path(None), [],
                        spec.trial_overrides, spec.presets)
    space = param_space(spec)

    def draws(seed):
        tuner = drv.build_tuner(job, space, num_samples=8, concurrency=3, seed=seed)
        return _first_draws(tuner, space, 8)

    first = draws(0)
    # the concurrency limit still holds: three trials are handed out, the rest wait
    assert len(first) == 3
    assert draws(0) == first
    assert draws(1) != first
    # no seed: new draws each search (two unseeded draws of 3 from this space match by chance
    # with probability below 1e-8)
    assert draws(None) != draws(None)


def test_asha_is_warned_off_judging_trials_in_their_warm_up():
    from raypipe.tune.driver import grace_warning
    from raypipe.tune.space import SchedulerSpec

    shipped = load_tune_spec("tune.yaml", [])
    trial = load_config(None, shipped.trial_overrides)
    assert trial.train.warmup_epochs == 1 and shipped.scheduler.grace_period == 2
    assert grace_warning(shipped.scheduler, trial.train.warmup_epochs, trial.train.epochs) is None
    early = SchedulerSpec(grace_period=1)
    msg = grace_warning(early, 1, 4)
    assert "scheduler.grace_period=1" in msg and "train.warmup_epochs=1" in msg
    assert "--set scheduler.grace_period=2" in msg
    assert grace_warning(SchedulerSpec(grace_period=2), 2, 4) is not None
    assert grace_warning(SchedulerSpec(type="none", grace_period=1), 1, 4) is None
    assert grace_warning(early, 1, 1) is None  # one epoch: no rung, nothing stopped early
    assert grace_warning(early, 0, 4) is None


def test_spec_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  train.lr: {logunifrom: [0.001, 0.1]}\n")
    with pytest.raises(ConfigError, match="train.lr.*loguniform"):
        load_tune_spec(str(bad))
    bad.write_text("space:\n  augment_set: [none, heavy]\npresets:\n  augment_set:\n    none: {}\n")
    with pytest.raises(ConfigError, match=r"heavy"):
        load_tune_spec(str(bad))
    bad.write_text("serach: grid\n")
    with pytest.raises(ConfigError, match="serach"):
        load_tune_spec(str(bad))
    job = drv.SearchJob("s", str(tmp_path), None, [])
    with pytest.raises(ConfigError, match="train.lrr"):
        drv.check_trial_configs(job, [{"train.lrr": 0.1}])


def test_trial_overrides_round_trip_values():
    presets = {"augment_set": {"none": {"augment.enabled": False, "augment.zoom": [1.0, 1.0]}}}
    out = trial_overrides({"train.lr": 1e-6, "augment_set": "none", "model.name": "resnet34"}, presets)
    cfg = load_config(None, out)
    assert cfg.train.lr == 1e-6 and cfg.augment.enabled is False and cfg.model.name == "resnet34"
    assert yaml.safe_load(yaml_scalar(1e-6)) == 1e-6  # "1e-06" alone would be a YAML string


def test_concurrency_follows_cpus_and_config():
    default = load_config(None)
    small = load_config(None, SMALL)
    assert drv.trial_cpus(default) == 2.0 and drv.trial_cpus(small) == 1.0
    assert drv.max_concurrent_trials([default], {"CPU": 2}) == 1
    assert drv.max_concurrent_trials([small], {"CPU": 2}) == 2
    assert drv.max_concurrent_trials([small], {"CPU": 16}) == 16
    assert drv.max_concurrent_trials([small], {"CPU": 16}, requested=3) == 3
    assert drv.max_concurrent_trials([small, default], {"CPU": 8}) == 4  # the largest trial decides
    gpu = load_config(None, ["train.use_gpu=true", "train.num_workers=2"])
    assert drv.max_concurrent_trials([gpu], {"CPU": 64, "GPU": 4}) == 2
    with pytest.raises(ResourceError, match="num_workers"):
        drv.max_concurrent_trials([load_config(None, ["train.num_workers=4"])], {"CPU": 2})


def test_error_message_finds_theroot_cause():
    wrapped = ("ray.exceptions.RayTaskError(RunError): ray::ImplicitFunc.train()\n"
               "raypipe.training.trainer.RunError: WorkerGroupError: Training failed\n"
               "  File \"x.py\", line 3\nValueError: Input contains NaN.\n")
    assert drv.error_message(RuntimeError(wrapped)) == "ValueError: Input contains NaN."
    diverged = "RunError: TrainingDiverged: training diverged: loss is not finite\n  at epoch 0\n\nTraceback"
    assert drv.error_message(RuntimeError(diverged)).startswith("TrainingDiverged: training diverged")
    assert drv.error_message(None) is None


@pytest.mark.ray
def test_stop_gate_reads_the_schedulers_decision_for_each_epoch(ray_cluster):
    import ray

    from raypipe.tune.stopping import CONTINUE, STOP, StopGate, board

    decisions = board("raypipe-decisions-gate-test")
    ray.get([decisions.post.remote("t1", 0, CONTINUE), decisions.post.remote("t1", 1, STOP),
             decisions.post.remote("t2", 2, STOP)])
    gate = StopGate("raypipe-decisions-gate-test", "t1", timeout_s=0.3)
    assert gate.should_stop(1) and not gate.should_stop(0)
    # no decision within the timeout: the run goes on
    t0 = time.monotonic()
    assert not gate.should_stop(5) and time.monotonic() - t0 >= 0.3
    # stopped before its last epoch (3 epochs: 0..2) vs. the "stop" every trial gets at its last
    assert gate.stopped(last_epoch=2)
    assert not StopGate("raypipe-decisions-gate-test", "t2").stopped(last_epoch=2)
    assert not StopGate("raypipe-decisions-gate-test", "t3").stopped(last_epoch=2)


# ---------------------------------------------------------------- real searches (Ray)


def _spec(tmp_path, name: str, **kw) -> TuneSpec:
    return TuneSpec(name=name, storage_path=str(tmp_path), subset=32, **kw)


def _read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _wait_for_cpus(expected: float, timeout: float = 60.0) -> float:
    """Free CPUs once the trials' actors are gone (what a leak would keep)."""
    import ray

    deadline = time.monotonic() + timeout
    free = ray.available_resources().get("CPU", 0.0)
    while free < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        free = ray.available_resources().get("CPU", 0.0)
    return free


@pytest.mark.ray
@pytest.mark.slow
def test_grid_with_asha_stops_a_bad_trial_fails_a_diverging_one_and_resumes(ray_cluster, tmp_path,
                                                                            caplog):
    from raypipe.tune.search import run_tune

    # ASHA's verdicts are Tune's; what is tested is that they are carried out, so the verdict
    # is made certain rather than left to what three tiny epochs learn (a frozen network's
    # validation AUC can beat a trained one's here). One trial at a time, in this order, ranked
    # by validation loss: "focal" (focal loss, gamma 4: an undecided prediction weighs 1/16 of its
    # cross-entropy) sets the bar at the first rung; "frozen" (cross-entropy, lr 0: about 0.69)
    # falls far above it and is stopped; "diverging" (lr 1e6) fails at once.
    arms = {"focal": {"train.loss": "focal", "train.focal_gamma": 4.0, "train.lr": 0.01},
            "frozen": {"train.loss": "ce", "train.lr": 0.0},
            "diverging": {"train.lr": 1.0e6}}
    spec = _spec(tmp_path, "asha", search="grid", max_concurrent_trials=1, metric="val_loss",
                 mode="min", scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                 trial_overrides=["train.epochs=3"],
                 space={"arm": list(arms)}, presets={"arm": arms})
    with caplog.at_level("WARNING", logger="raypipe.tune.search"):
        best = run_tune(None, SMALL, spec)
    # grace period 1 with the base config's warm-up epoch: the user is told
    assert "scheduler.grace_period=1" in caplog.text and "warming up" in caplog.text
    table = _read_csv(tmp_path / "asha" / "results.csv")
    assert len(table) == 3 and best["trials"] == 3
    rows = {r["arm"]: r for r in table}
    assert set(rows) == set(arms)
    assert rows["diverging"]["status"] == "error"
    assert any(w in rows["diverging"]["error"].lower() for w in ("diverged", "nan", "not finite"))
    assert best["failed"] == 1 and best["stopped_early"] == 1, table
    # stopped after its first epoch, and it trained no further: its run holds that epoch only
    assert rows["frozen"]["status"] == "stopped early" and int(rows["frozen"]["epochs"]) == 1
    frozen_run = tmp_path / "asha" / "runs" / rows["frozen"]["trial_id"]
    assert [h["epoch"] for h in json.loads((frozen_run / "history.json").read_text())] == [0]
    assert json.loads((frozen_run / "summary.json").read_text())["status"] == "stopped early"
    assert rows["focal"]["status"] == "done" and int(rows["focal"]["epochs"]) == 3

    # the table is sorted by the metric (trials with a value first) and the best is its top row
    scored = [float(r["best_val_loss"]) for r in table if r["best_val_loss"] not in ("", "nan")]
    assert len(scored) == 2 and scored == sorted(scored)
    assert best["best_trial"] == table[0]["trial_id"] == rows["focal"]["trial_id"]
    assert math.isclose(best["best_value"], scored[0], rel_tol=1e-3)
    # the best config is a plain training config carrying the winning values, without the
    # search-only trial overrides (a full run trains for the base config's epochs)
    cfg = load_config(best["best_config"])
    assert cfg.train.loss == "focal" and cfg.train.focal_gamma == 4.0 and cfg.train.lr == 0.01
    assert cfg.run.name is None and cfg.train.epochs == 1
    assert best["best_checkpoint"] and (tmp_path / "asha" / "runs" / table[0]["trial_id"]).is_dir()
    # a stopped trial ends its trainer cleanly: no placement group or data actor is left behind
    assert _wait_for_cpus(2.0) == 2.0

    # an existing search name resumes: every trial has ended, so nothing reruns and the table holds
    again = run_tune(None, SMALL, spec)
    assert again["best_trial"] == best["best_trial"] and again["trials"] == 3
    assert again["failed"] == 1
    assert _wait_for_cpus(2.0) == 2.0


def test_grid_from_the_command_line_runs_the_grid_once():
    from raypipe.jobs import tune as job
    assert "num_samples=1" in job.spec_overrides(job.parse_args(["--search", "grid"]))
    explicit = job.spec_overrides(job.parse_args(["--search", "grid", "--num-samples", "3"]))
    assert "num_samples=1" not in explicit and "num_samples=3" in explicit
    assert job.spec_overrides(job.parse_args(["--search", "random"])) == ["search=random"]
    tuned = load_tune_spec("tune.yaml", job.spec_overrides(job.parse_args(["--search", "grid"])))
    assert tuned.num_samples == 1 and tuned.search == "grid"


@pytest.mark.ray
@pytest.mark.slow
def test_search_interrupted_mid_trial_resumes_and_counts_every_epoch(ray_cluster, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    from raypipe.tune.search import run_tune

    # enough epochs that the trial cannot finish between the first epoch and the Ctrl-C taking
    # effect (epochs of 32 images take about 0.3 s)
    epochs = 8
    cli = ["--name", "irq", "--search", "grid", "--set", f"storage_path={tmp_path}", "--set", "subset=32",
           "--set", "space={train.lr: [0.05, 0.01]}", "--set", f"trial_overrides=[train.epochs={epochs}]",
           "--set", "scheduler={type: none}", "--set", "max_concurrent_trials=1", *SMALL]
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "tune.py"), *cli], cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def epochs_done() -> int:
        n = 0
        for h in (tmp_path / "irq" / "runs").glob("*/history.json"):
            try:
                n = max(n, len(json.loads(h.read_text())))
            except ValueError:
                pass
        return n

    deadline = time.monotonic() + 300
    while epochs_done() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of the first trial
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "interrupted: run the same command again (same --name irq)" in err
    first = _read_csv(tmp_path / "irq" / "results.csv")
    assert [r["status"] for r in first] == ["interrupted"] and int(first[0]["epochs"]) < epochs
    interrupted = first[0]["trial_id"]

    # the same search again: the interrupted trial continues from its checkpoint, the other runs
    spec = _spec(tmp_path, "irq", search="grid", max_concurrent_trials=1, scheduler={"type": "none"},
                 trial_overrides=[f"train.epochs={epochs}"], space={"train.lr": [0.05, 0.01]})
    best = run_tune(None, SMALL, spec)
    rows = {r["trial_id"]: r for r in _read_csv(tmp_path / "irq" / "results.csv")}
    assert len(rows) == 2 and best["interrupted"] == 0 and best["failed"] == 0
    assert all(r["status"] == "done" and int(r["epochs"]) == epochs for r in rows.values())
    history = json.loads((tmp_path / "irq" / "runs" / interrupted / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(epochs))  # epochs before the interrupt were kept
    assert _wait_for_cpus(2.0) == 2.0
