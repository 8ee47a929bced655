"""Experiment tracking in MLflow (``track.mlflow: true``), done by the process that runs
:func:`~raypipe.training.trainer.run_training` (the driver, or a search's trial), so training
workers need no MLflow access or credentials.

A run becomes one MLflow run: the resolved config as params (``train.lr``, ...), each finished
epoch's metrics under TensorBoard's names (``loss/train``, ``val/auc``, ...) at step = epoch, the
best checkpoint's metrics as ``best/<name>`` with its URI as the tag ``best_checkpoint``, and the
run directory's files (``report.md``, ``training_curves.png``, ``summary.json``, ...) as
artifacts. A run resumed under the same name continues its MLflow run.

Tracking never fails a run: every MLflow call happens on one background thread, and the first
failure (an unreachable server, a bad URI) is one warning saying what to check, after which the
run goes on untracked.

Plain :class:`mlflow.MlflowClient` calls bound to ``track.uri``, rather than Ray's MLflow
integration: ``setup_mlflow`` and ``MLflowLoggerCallback`` set MLflow's process-wide tracking URI
and active run (the user's own ``mlflow`` calls in the same process would land in our run),
``MLflowLoggerCallback`` is a Tune logger that Ray Train V2's ``RunConfig`` does not take, and it
logs Tune's result dicts at ``training_iteration``, without the run's report files or best
checkpoint, which exist only after the run's last report.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from raypipe.config import Config, ConfigError
from raypipe.report.tensorboard import scalar_tag

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"  # the local store's folder under run.storage_path
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
DEFAULT_EXPERIMENT = "raypipe"
BEST_PREFIX = "best/"
MAX_PARAM_CHARS = 6000  # MLflow refuses longer param values
MAX_TAG_CHARS = 5000
HEALTH_TIMEOUT_S = 5.0
# how long the end of a run waits for the last MLflow calls (artifacts) before going on
CLOSE_TIMEOUT_S = 60.0
INTERRUPTED_CLOSE_TIMEOUT_S = 10.0


# ---------------------------------------------------------------- names and values (pure)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.05, "momentum": None}}`` -> ``{"train.lr": "0.05",
    "train.momentum": "null"}``: each value as it is written after ``key=`` in an override, so a
    run's params paste back as the overrides of its config."""
    from raypipe.tune.space import yaml_scalar

    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
            continue
        text = yaml_scalar(value)
        out[name] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def epoch_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics TensorBoard plots, under its names (``val_auc`` -> ``val/auc``); like
    TensorBoard, non-finite values are left out."""
    out = {}
    for name, value in metrics.items():
        tag = scalar_tag(name)
        if tag and _finite(value):
            out[tag] = float(value)
    return out


def best_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``best/<name>`` for every finite number among the best checkpoint's metrics."""
    return {BEST_PREFIX + k: float(v) for k, v in metrics.items() if _finite(v)}


def local_store(storage_path: str) -> str:
    """The tracking URI of the local store under ``storage_path`` (a SQLite database: MLflow 3
    refuses its old file store unless told otherwise)."""
    root = Path(os.path.abspath(os.path.expanduser(storage_path))) / STORE_DIR
    return f"sqlite:///{root / DB_FILE}"


def artifact_root(uri: str) -> str | None:
    """Where new experiments of a SQLite store keep their artifacts: ``artifacts/`` beside the
    database (MLflow's default, ``./mlruns``, depends on the working directory). None for other
    stores: a tracking server decides for itself."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(os.path.abspath(uri[len(prefix):]))
    return (db.parent / ARTIFACTS_DIR).as_uri()


def tracking_uri(cfg: Config, storage_path: str | None = None) -> str:
    """``track.uri``, or the local store under ``storage_path`` (default ``run.storage_path``)."""
    if cfg.track.uri:
        return cfg.track.uri
    storage = storage_path or cfg.run.storage_path
    if "://" in storage:
        raise ConfigError(
            f"track.mlflow=true with track.uri=null keeps a local MLflow store under "
            f"run.storage_path, but that is '{storage}', which a local database cannot live in. "
            "Set track.uri to a tracking server (track.uri=http://<host>:5000) or a local database "
            "(track.uri=sqlite:////absolute/path/mlflow.db).")
    return local_store(storage)


def redact(uri: str) -> str:
    """``uri`` without the password it may carry (``postgresql://user:secret@host/db`` ->
    ``postgresql://user:***@host/db``), for messages and params."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", uri)


def check_tracking(cfg: Config, storage_path: str | None = None) -> None:
    """With ``track.mlflow`` on, fail before any training when tracking cannot work at all:
    ``mlflow`` is not installed, or there is nowhere for the local store."""
    if not cfg.track.mlflow:
        return
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "track.mlflow=true needs the mlflow package, which is not installed: pip install "
            "'raypipe[track]' (or pip install mlflow); or set track.mlflow=false.")
    tracking_uri(cfg, storage_path)


def advice(uri: str) -> str:
    """What to check when MLflow at ``uri`` fails."""
    if uri.startswith(("http://", "https://")):
        return (f"Check that the tracking server is running and reachable from this machine "
                f"(curl {uri.rstrip('/')}/health should answer OK) and that track.uri is its "
                "address; or set track.uri=null to log to the local store under run.storage_path.")
    if uri.startswith("sqlite:///"):
        return (f"Check that {uri[len('sqlite:///'):]} is a writable path on this machine (its "
                "folder is created if missing); or point track.uri at a tracking server.")
    return "Check track.uri and the credentials MLflow needs for it."


def is_run_file(name: str) -> bool:
    """Whether a file at the top of a run directory is one of the run's results to keep as an
    artifact (report.md, training_curves.png, summary.json, config.yaml, history.json, ...),
    rather than Ray Train's bookkeeping (hidden markers, checkpoint_manager_snapshot.json).
    Checkpoints and TensorBoard events are folders and stay in the run directory."""
    return not name.startswith((".", "checkpoint_"))


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer."""


def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailable` when the HTTP tracking server at ``uri`` does not answer
    within ``timeout`` seconds. MLflow's own client would retry it for minutes first. Any HTTP
    answer counts as reachable (authentication is MLflow's business); non-HTTP URIs pass."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):  # TLS settings are MLflow's to apply, not ours
            return
        raise TrackingUnavailable(
            f"no answer from {redact(uri)} within {timeout:g} s ({reason})") from None


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing (two trials may race to create it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def prepare_experiment(uri: str, name: str) -> bool:
    """Create experiment ``name`` (and a new local store's tables) before a search's trials
    start, so that concurrent trials do not race to set up the same database. A failure is a
    warning (each trial then says so too): the search goes on. Returns whether it worked."""
    try:
        check_reachable(uri)
        from mlflow import MlflowClient

        ensure_experiment(MlflowClient(tracking_uri=uri), name, artifact_root(uri))
        return True
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a search
        log.warning("MLflow: could not set up experiment '%s' at %s: %s. %s The search goes on; "
                    "its trials try again.", name, redact(uri), _short(exc), advice(redact(uri)))
        return False


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:500] + "…"


# ---------------------------------------------------------------- one run


class MlflowTracker:
    """Logs one training run to MLflow from a background thread. ``with MlflowTracker(...)``
    around the run: entering opens the MLflow run (or the one a resumed run had) and logs the
    params; :meth:`log_epoch` (a :class:`~raypipe.report.console.RunProgress` listener) logs
    each finished epoch; :meth:`finished` hands over the summary; leaving logs the best
    checkpoint and the run directory's files and closes the run as FINISHED, FAILED (an
    exception) or KILLED (Ctrl-C). Off (every call a no-op) unless ``cfg.track.mlflow``."""

    def __init__(self, cfg: Config, params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None):
        from raypipe.data.sources import join_uri

        self.enabled = cfg.track.mlflow
        self.run_name = cfg.run.name or "run"
        self.run_dir = join_uri(cfg.run.storage_path, self.run_name)
        self.uri = tracking_uri(cfg) if self.enabled else ""
        self.shown_uri = redact(self.uri)
        self.experiment = cfg.track.experiment or DEFAULT_EXPERIMENT
        # a trial's sampled values too, under the names of its search space (e.g. a preset's)
        self.params = {**flatten_params(cfg.to_dict()), **flatten_params(params or {})}
        if cfg.track.uri:
            self.params["track.uri"] = redact(self.params["track.uri"])
        self.tags = {"run_dir": self.run_dir, **(tags or {})}
        self.run_id: str | None = None
        self._experiment_id: str | None = None
        self.summary: dict | None = None
        self._client: Any = None
        self._failed = False
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def listeners(self) -> list[Callable[[dict], None]]:
        """What to call with each finished epoch's metrics."""
        return [self.log_epoch] if self.enabled else []

    def __enter__(self) -> MlflowTracker:
        if self.enabled:
            self._thread = threading.Thread(target=self._work, daemon=True,
                                            name="raypipe-mlflow")
            self._thread.start()
            self._submit("open the run", self._open)
        return self

    def log_epoch(self, metrics: Mapping[str, Any]) -> None:
        values, step = epoch_metrics(metrics), int(metrics.get("epoch", 0))
        self._submit(f"log epoch {step + 1}", lambda: self._log_metrics(values, step))

    def finished(self, summary: dict) -> None:
        """The run's ``summary.json`` content: its best checkpoint is logged at the end."""
        self.summary = summary

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.enabled:
            return
        if exc_type is None:
            status, timeout = "FINISHED", CLOSE_TIMEOUT_S
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            status, timeout = "KILLED", INTERRUPTED_CLOSE_TIMEOUT_S
        else:
            status, timeout = "FAILED", CLOSE_TIMEOUT_S
        error = None if exc is None or status == "KILLED" else _short(exc)
        self._submit("close the run", lambda: self._close(status, error))
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            if not self._failed:
                log.info("MLflow: run %s logged to experiment '%s': %s", self.run_name,
                         self.experiment, self.where())
        else:
            log.warning("MLflow: run %s was not fully logged to %s within %.0f s; going on without "
                        "waiting (its results are in %s). %s", self.run_name, self.shown_uri,
                        timeout, self.run_dir, advice(self.shown_uri))

    def where(self) -> str:
        """Where to see the run: its page on a tracking server, or the command that opens a UI
        on a local store."""
        if self.uri.startswith(("http://", "https://")):
            return (f"{self.shown_uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/"
                    f"{self.run_id}")
        return f"mlflow ui --backend-store-uri {self.shown_uri}"

    # -- the background thread

    def _submit(self, what: str, call: Callable[[], None]) -> None:
        if self.enabled and not self._failed:
            self._queue.put(lambda: self._attempt(what, call))

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            task()

    def _attempt(self, what: str, call: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the run
            self._failed = True
            log.warning("MLflow tracking is off for the rest of run %s: could not %s at %s: %s. "
                        "%s Training goes on; its results are in %s.", self.run_name, what,
                        self.shown_uri, _short(exc), advice(self.shown_uri), self.run_dir)

    def _open(self) -> None:
        check_reachable(self.uri)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = client = MlflowClient(tracking_uri=self.uri)
        self._experiment_id = experiment_id = ensure_experiment(client, self.experiment,
                                                                artifact_root(self.uri))
        logged: dict[str, str] = {}
        previous = self._previous_run(experiment_id)
        if previous is not None:  # a resumed run continues its MLflow run
            self.run_id, logged = previous.info.run_id, dict(previous.data.params)
            client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow: continuing run %s (%s)", self.run_id, self.run_name)
        else:
            self.run_id = client.create_run(experiment_id, run_name=self.run_name,
                                            tags=self.tags).info.run_id
        changed = sorted(k for k, v in self.params.items() if k in logged and logged[k] != v)
        if changed:  # MLflow keeps a param's first value
            log.warning("MLflow: run %s resumed with other values of %s; MLflow keeps the first "
                        "ones (the run's config.yaml has the new ones)", self.run_name,
                        ", ".join(changed))
        params = [Param(k, v) for k, v in self.params.items() if k not in logged]
        client.log_batch(self.run_id, params=params)
        log.info("MLflow: logging run %s to experiment '%s' at %s", self.run_name,
                 self.experiment, self.shown_uri)

    def _previous_run(self, experiment_id: str) -> Any:
        if "'" in self.run_dir:  # cannot be quoted in MLflow's filter syntax
            return None
        runs = self._client.search_runs([experiment_id], f"tags.run_dir = '{self.run_dir}'",
                                        max_results=1)
        return runs[0] if runs else None

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                     for k, v in values.items()])

    def _close(self, status: str, error: str | None) -> None:
        client, summary = self._client, self.summary or {}
        if summary.get("best_metrics"):
            self._log_metrics(best_metrics(summary["best_metrics"]),
                              int(summary.get("best_epoch") or 0))
        if summary.get("best_checkpoint"):
            client.set_tag(self.run_id, "best_checkpoint", str(summary["best_checkpoint"]))
        if error:
            client.set_tag(self.run_id, "error", error[:MAX_TAG_CHARS])
        self._log_run_files()
        client.set_terminated(self.run_id, status=status)

    def _log_run_files(self) -> None:
        """The run directory's own files, copied through a local folder since the run directory
        may be in object storage."""
        import pyarrow.fs as pafs

        from raypipe.data.sources import get_filesystem

        fs, root = get_filesystem(self.run_dir)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File and is_run_file(i.base_name)]
        if not files:
            return
        with tempfile.TemporaryDirectory(prefix="raypipe-mlflow-") as tmp:
            for info in files:
                with fs.open_input_stream(info.path) as f:
                    Path(tmp, info.base_name).write_bytes(f.read())
            self._client.log_artifacts(self.run_id, tmp)
