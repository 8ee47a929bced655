"""MLflow tracking (``track.mlflow``): names and params (fast), the tracker against a local store
and an unreachable server (no Ray), then real runs and a search logged to a real ``mlflow server``
and to the local store, read back through ``MlflowClient`` (Ray, slow)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_ports, make_image_folder

from raypipe.config import Config, ConfigError, config_help, load_config
from raypipe.report import tracking
from raypipe.report.tracking import (
    MlflowTracker,
    best_metrics,
    epoch_metrics,
    flatten_params,
    local_store,
    tracking_uri,
)


def _client(uri: str):
    """An ``MlflowClient`` reading ``uri`` (the test extra installs mlflow)."""
    return pytest.importorskip("mlflow").MlflowClient(uri)

# 2 CPUs: one training worker and one data worker of half a CPU each, so two trials fit at once
SMALL = ["train.num_workers=1", "train.cpus_per_worker=0.5", "pipeline.cpus_per_worker=0.5",
         "pipeline.workers=1", "preprocess.image_size=16", "train.batch_size=8", "train.lr=0.01",
         "train.grad_clip=1.0", "run.tensorboard=false"]

METRICS = {"epoch": 1, "lr": 0.01, "train_loss": 0.5, "val_loss": 0.6, "val_auc": 0.75,
           "val_acc": 0.5, "val_samples": 8, "train_steps": 4, "images_per_s_total": 100.0,
           "grad_norm_max": math.nan, "data_wait_frac": 0.1}


# ---------------------------------------------------------------- names and values


def test_params_are_the_flattened_config_and_read_back_as_overrides():
    cfg = load_config(None, ["train.lr=0.003", "preprocess.percentiles=[2.0, 98.0]",
                             "track.mlflow=true"])
    params = flatten_params(cfg.to_dict())
    leaves = sum(len(field.annotation.model_fields) for field in Config.model_fields.values())
    assert len(params) == leaves  # one param per config key, nothing nested left
    assert params["train.lr"] == "0.003" and params["train.momentum"] == "null"
    assert params["preprocess.percentiles"] == "[2.0, 98.0]" and params["track.mlflow"] == "true"
    assert all(isinstance(v, str) for v in params.values())
    # every param pasted back as a key=value override gives the same config
    assert load_config(None, [f"{k}={v}" for k, v in params.items()]) == cfg
    long = flatten_params({"data": {"class_names": ["x" * 100] * 100}})["data.class_names"]
    assert len(long) == tracking.MAX_PARAM_CHARS and long.endswith("…")


def test_epoch_metrics_take_tensorboards_names_and_skip_what_it_skips():
    assert epoch_metrics(METRICS) == {
        "optim/lr": 0.01, "loss/train": 0.5, "loss/val": 0.6, "val/auc": 0.75, "val/acc": 0.5,
        "speed/images_per_s": 100.0, "speed/data_wait_frac": 0.1}


def test_best_metrics_are_prefixed_and_finite():
    best = best_metrics({"val_auc": 0.9, "epoch": 3, "val_loss": math.inf, "diverged": True,
                         "note": "x"})
    assert best == {"best/val_auc": 0.9, "best/epoch": 3.0}


def test_the_local_store_lives_under_the_storage_path(tmp_path):
    cfg = load_config(None, ["track.mlflow=true", f"run.storage_path={tmp_path}"])
    uri = tracking_uri(cfg)
    assert uri == local_store(str(tmp_path)) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert tracking.artifact_root(uri) == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None
    server = load_config(None, ["track.uri=http://mlflow.internal:5000", "run.storage_path=s3://b/r"])
    assert tracking_uri(server) == "http://mlflow.internal:5000"
    # object storage cannot hold the local database: told at start-up, with what to set
    remote = load_config(None, ["track.mlflow=true", "run.storage_path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=r"track.uri=http://<host>:5000.*sqlite:////"):
        tracking.check_tracking(remote)
    tracking.check_tracking(remote.model_copy(update={"track": server.track}))


def test_a_password_in_the_tracking_uri_is_neither_a_param_nor_shown():
    cfg = load_config(None, ["track.mlflow=true", "track.uri=postgresql://ml:s3cret@db:5432/mlflow"])
    tracker = MlflowTracker(cfg)
    assert tracker.params["track.uri"] == "postgresql://ml:***@db:5432/mlflow"
    assert tracker.shown_uri == "postgresql://ml:***@db:5432/mlflow"
    assert tracker.uri == cfg.track.uri  # what MLflow connects with


def test_track_config_keys_are_listed_and_checked():
    text = config_help()
    for key in ("track.mlflow = false", "track.uri = null", "track.experiment = null"):
        assert key in text
    with pytest.raises(ConfigError, match=r"track.uri.*needs a scheme.*http://host:5000"):
        load_config(None, ["track.uri=/tmp/mlruns"])


def test_a_runs_experiment_is_its_configs_name_and_a_search_names_its_own(tmp_path):
    from raypipe.api import resolve_config

    storage = f"run.storage_path={tmp_path}"
    assert resolve_config("flowers", [storage]).track.experiment == "flowers"
    assert resolve_config(None, [storage]).track.experiment == "default"
    assert resolve_config(None, [storage, "track.experiment=xray"]).track.experiment == "xray"
    assert resolve_config(None, [storage], search=True).track.experiment is None


# ---------------------------------------------------------------- a local store, no Ray


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One storage path (and so one local MLflow store) for the tests below: setting up a new
    store's database takes seconds."""
    return tmp_path_factory.mktemp("storage")


@pytest.mark.slow
def test_a_searchs_trials_share_its_store_and_experiment(store, tmp_path):
    from raypipe.tune.search import _base_job

    base = load_config(None, ["track.mlflow=true", f"run.storage_path={tmp_path / 'runs'}"])
    job = _base_job(None, [], base, "lr-search", str(store))
    trial = job.trial_config({"train.lr": 0.02}, run_name="t_00001")
    # trials run in <search>/runs, but log to the store of the search's storage
    assert trial.run.storage_path == str(store / "lr-search" / "runs")
    assert trial.track.uri == local_store(str(store))
    assert trial.track.experiment == "lr-search" and trial.train.lr == 0.02
    # the experiment (and the store) exist before any trial starts
    assert _client(trial.track.uri).get_experiment_by_name("lr-search") is not None
    named = _base_job(None, [], base.model_copy(update={"track": base.track.model_copy(
        update={"experiment": "xray"})}), "lr-search", str(store))
    assert named.trial_config({}, run_name="t").track.experiment == "xray"
    off = _base_job(None, [], load_config(None), "s", str(tmp_path))
    assert off.track_overrides == [] and not off.trial_config({}, "t").track.mlflow


def _fake_run(storage: Path, name: str, extra: list[str] = ()) -> Config:
    """A config (experiment ``name``) and a run directory holding the files a finished run
    leaves at its top."""
    cfg = load_config(None, ["track.mlflow=true", f"run.storage_path={storage}",
                             f"run.name={name}", f"track.experiment={name}", *extra])
    run_dir = storage / name
    (run_dir / "checkpoint_epoch0001").mkdir(parents=True)
    (run_dir / "report.md").write_text("# Run\n")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's, not ours
    (run_dir / ".validate_storage_marker").write_text("")
    return cfg


@pytest.mark.slow
def test_tracker_logs_a_run_to_the_local_store_and_a_resumed_run_continues_it(store, caplog):
    cfg = _fake_run(store, "r1")
    with caplog.at_level(logging.INFO, logger="raypipe"), MlflowTracker(
            cfg, params={"arm": "focal"}, tags={"search": "s"}) as tracker:
        for epoch in (0, 1):
            tracker.log_epoch({**METRICS, "epoch": epoch, "val_auc": 0.5 + epoch / 4})
        tracker.finished({"best_metrics": {"val_auc": 0.75, "epoch": 1}, "best_epoch": 1,
                          "best_checkpoint": str(store / "r1" / "checkpoint_epoch0001")})
    # the user is told how to look at it
    assert f"mlflow ui --backend-store-uri {local_store(str(store))}" in caplog.text
    client = _client(local_store(str(store)))
    experiment = client.get_experiment_by_name("r1")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["arm"] == "focal"
    assert run.data.tags["search"] == "s" and run.data.tags["run_dir"] == str(store / "r1")
    assert run.data.tags["best_checkpoint"].endswith("checkpoint_epoch0001")
    history = client.get_metric_history(run.info.run_id, "val/auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    assert run.data.metrics["best/val_auc"] == 0.75
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "report.md", "summary.json"]
    # artifacts sit beside the database, not in the working directory
    assert run.info.artifact_uri.startswith((store / "mlruns" / "artifacts").as_uri())

    # the same run name again (a resume) continues the MLflow run, a changed value is kept first
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    with MlflowTracker(resumed) as tracker:
        tracker.log_epoch({**METRICS, "epoch": 2, "val_auc": 1.0})
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/auc")] == [0, 1, 2]
    assert again.data.params["train.epochs"] == str(cfg.train.epochs)


@pytest.mark.slow
def test_a_failed_run_is_closed_failed_with_its_error(store):
    cfg = _fake_run(store, "bad")
    with pytest.raises(RuntimeError, match="boom"), MlflowTracker(cfg) as tracker:
        tracker.log_epoch(METRICS)
        raise RuntimeError("boom: the data went away")
    client = _client(local_store(str(store)))
    (run,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert run.info.status == "FAILED" and "boom" in run.data.tags["error"]
    assert "loss/train" in run.data.metrics


def test_an_unreachable_server_is_one_warning_and_nothing_waits(tmp_path, caplog):
    (port,) = free_ports(1)
    uri = f"http://127.0.0.1:{port}"
    cfg = _fake_run(tmp_path, "r", [f"track.uri={uri}"])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="raypipe"), MlflowTracker(cfg) as tracker:
        for epoch in range(3):
            tracker.log_epoch({**METRICS, "epoch": epoch})
        tracker.finished({"best_metrics": {"val_auc": 1.0}})
    assert time.monotonic() - t0 < 15  # MLflow's own client would retry for minutes
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"no answer from {uri}" in warnings[0] and f"curl {uri}/health" in warnings[0]
    assert "Training goes on" in warnings[0] and "track.uri=null" in warnings[0]


# ---------------------------------------------------------------- real runs (Ray), a real server


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store, its artifacts uploaded through it."""

    def __init__(self, root: Path):
        (self.port,) = free_ports(1)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                 "--artifacts-destination", str(root / "server-artifacts")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                # no background job runner: one process fewer to start on a busy machine
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def ready(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not up in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        # its own process group: the server and the uvicorn and job-runner processes it starts
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started before the Ray cluster fixture, so the two start together; ``ready()`` waits."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", {"a": 20, "b": 20})


def _runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    return client.search_runs([exp.experiment_id])


def _check_run(client, run, summary: dict, epochs: int, tmp: Path) -> None:
    """A finished run's params, per-epoch metrics, best checkpoint and files, as logged."""
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(epochs)
    assert run.data.params["preprocess.image_size"] == "16"
    history = summary["history"]
    for name, tag in (("val_auc", "val/auc"), ("train_loss", "loss/train")):
        logged = client.get_metric_history(run.info.run_id, tag)
        assert [m.step for m in logged] == list(range(epochs))
        assert [m.value for m in logged] == pytest.approx([h[name] for h in history])
    best = summary["best_metrics"]
    assert run.data.metrics["best/val_auc"] == pytest.approx(best["val_auc"])
    assert run.data.metrics["best/epoch"] == summary["best_epoch"]
    assert run.data.tags["best_checkpoint"] == summary["best_checkpoint"]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "training_curves.png", "summary.json", "config.yaml"} <= files
    into = tmp / f"downloaded-{run.info.run_id}"
    into.mkdir()
    local = client.download_artifacts(run.info.run_id, "summary.json", str(into))
    assert json.loads(Path(local).read_text())["best_checkpoint"] == summary["best_checkpoint"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # the server takes seconds to start on an idle machine, minutes on a busy one
def test_a_run_logged_to_a_tracking_server(mlflow_server, ray_cluster, images, tmp_path,
                                           caplog):
    import raypipe

    uri = mlflow_server.ready()
    with caplog.at_level(logging.INFO, logger="raypipe"):
        summary = raypipe.train(None, [f"data.root={images}", *SMALL, "train.epochs=2",
                                       "track.mlflow=true", f"track.uri={uri}",
                                       f"run.storage_path={tmp_path}", "run.name=served"])
    client = _client(uri)
    (run,) = _runs(client, "default")  # the config's name
    assert run.info.run_name == "served"
    assert f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in caplog.text
    _check_run(client, run, summary, 2, tmp_path)  # its files uploaded through the server
    # the resolved config is the params: the run reads back as the config it trained
    params = {k: yaml.safe_load(v) for k, v in run.data.params.items()}
    assert params["data.root"] == str(images) and params["track.uri"] == uri
    assert not (tmp_path / "mlruns").exists()  # nothing in the local store


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_search_logs_its_trials_to_the_local_store_with_no_server(ray_cluster, images,
                                                                      tmp_path):
    from raypipe.tune.search import run_tune
    from raypipe.tune.space import TuneSpec

    spec = TuneSpec(name="lr-search", search="grid", subset=None, scheduler={"type": "none"},
                    max_concurrent_trials=2, trial_overrides=["train.epochs=2"],
                    space={"train.lr": [0.01, 0.003]})
    best = run_tune(None, [f"data.root={images}", *SMALL, "track.mlflow=true",
                           f"run.storage_path={tmp_path}"], spec)
    assert best["trials"] == 2 and best["failed"] == 0
    store = tmp_path / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = _client(f"sqlite:///{store}")
    runs = _runs(client, "lr-search")  # the search's name groups its trials
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.003", "0.01"]
    for run in runs:
        trial_id = run.data.tags["trial_id"]
        assert run.data.tags["search"] == "lr-search" and run.info.run_name == trial_id
        run_dir = tmp_path / "lr-search" / "runs" / trial_id
        assert run.data.tags["run_dir"] == str(run_dir)
        _check_run(client, run, json.loads((run_dir / "summary.json").read_text()), 2, tmp_path)
