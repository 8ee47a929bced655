"""Driver side: check resources, build the ``TorchTrainer`` from config, run it, write the summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypipe.config import Config, config_to_yaml
from raypipe.data import pipeline
from raypipe.data.sources import (
    DatasetSplit,
    Record,
    discover,
    get_filesystem,
    join_uri,
    label_counts,
    subset,
)
from raypipe.models.resnet import REGISTRY
from raypipe.report.console import RunProgress
from raypipe.training import checkpoints
from raypipe.training.doctor import TrainingDiverged
from raypipe.training.losses import loss_facts, loss_text
from raypipe.training.metrics import checkpoint_metric_problem
from raypipe.training.worker import DIVERGED_FILE, train_func

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The requested workers and data workers cannot fit the cluster."""


class RunError(RuntimeError):
    """The training run failed; the message holds the root cause."""


# total CPUs / GPUs an autoscaling cluster can grow to, set on its nodes by the cluster config
# (cluster/*.yaml): without them, a cluster that starts small is taken at its present size
MAX_ENV = {"CPU": "RAYPIPE_MAX_CPUS", "GPU": "RAYPIPE_MAX_GPUS"}


@dataclass
class Layout:
    use_gpu: bool
    train_cpus: float
    data_workers: int
    total_cpus: float
    total_gpus: float


def cluster_capacity() -> tuple[dict[str, float], bool]:
    """(the CPUs and GPUs the cluster has or can scale to, whether that is its known maximum):
    ``ray.cluster_resources()`` raised to ``RAYPIPE_MAX_CPUS`` / ``RAYPIPE_MAX_GPUS`` where the
    cluster's nodes set them."""

    import ray

    capacity = {k: float(v) for k, v in ray.cluster_resources().items() if k in MAX_ENV}
    known = False
    for key, env in MAX_ENV.items():
        raw = os.environ.get(env)
        if raw is None:
            continue
        try:
            most = float(raw)
        except ValueError:
            raise ResourceError(f"{env}={raw!r} is not a number. Set it (in the cluster config) to "
                                f"the most {key}s the cluster can scale to, or unset it.") from None
        capacity[key], known = max(capacity.get(key, 0.0), most), True
    return capacity, known


def resolve_layout(cfg: Config, resources: dict[str, float], known_max: bool = True) -> Layout:
    """Where the training workers and the data workers go. Raises :class:`ResourceError` saying
    what to change when they cannot fit ``resources`` (the cluster's CPUs and GPUs, at most
    what it can scale to); where ``known_max`` is False (an autoscaling cluster that did not say
    how far it grows) a shortfall is only warned about and Ray's autoscaler is left to try."""
    t, p = cfg.train, cfg.pipeline
    total_cpus = float(resources.get("CPU", 0))
    total_gpus = float(resources.get("GPU", 0))
    use_gpu = total_gpus > 0 if t.use_gpu == "auto" else bool(t.use_gpu)
    problems = []
    if use_gpu and t.num_workers * t.gpus_per_worker > total_gpus:
        problems.append(
            f"train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker} GPUs "
            f"requested, the cluster has {total_gpus:g} GPUs. Lower train.num_workers, set "
            "train.use_gpu=false, or add GPU nodes.")
    train_cpus = t.num_workers * t.cpus_per_worker
    data_cpus = p.cpus_per_worker
    if train_cpus + data_cpus > total_cpus + 1e-9:
        problems.append(
            f"the run needs {train_cpus:g} CPUs for training (train.num_workers={t.num_workers} "
            f"x train.cpus_per_worker={t.cpus_per_worker}) plus at least {data_cpus:g} for a data "
            f"worker (pipeline.cpus_per_worker), but the cluster has {total_cpus:g} CPUs. "
            "Without CPUs left for Ray Data the job would hang. Lower train.num_workers or "
            "train.cpus_per_worker (e.g. 0.5), or pipeline.cpus_per_worker, or add nodes.")
    if problems and known_max:
        raise ResourceError(" ".join(problems))
    for problem in problems:
        log.warning("%s Going on: the cluster may scale up (set RAYPIPE_MAX_CPUS / "
                    "RAYPIPE_MAX_GPUS on its nodes to have this checked up front; Ray Train waits "
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default, for its workers).",
                    problem)
    workers = pipeline.data_workers(cfg, max(total_cpus - train_cpus, p.cpus_per_worker))
    return Layout(use_gpu, train_cpus, workers, total_cpus, total_gpus)


def run_dir_of(cfg: Config) -> str:
    return join_uri(cfg.run.storage_path, cfg.run.name)


def _write_text(uri: str, text: str) -> None:
    fs, path = get_filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    try:
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    except OSError as exc:
        raise RunError(
            f"cannot write '{uri}': {exc}. Check that run.storage_path is writable and has space."
        ) from exc


def _read_text(uri: str) -> str | None:
    fs, path = get_filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (OSError, FileNotFoundError):
        return None


def _remove(uri: str) -> None:
    fs, path = get_filesystem(uri)
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def _read_json(uri: str) -> Any:
    fs, path = get_filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, FileNotFoundError, json.JSONDecodeError):
        return None


def validate_split(split: DatasetSplit, cfg: Config) -> None:
    """Problems that would only show after minutes of training: fail now, clearly."""
    train_counts = split.train_label_counts()
    if split.multilabel:
        undefined = split.undefined_auc()
        if len(undefined) == len(split.class_names):
            raise RunError(
                f"no finding has both positive and negative films on the validation side "
                f"({len(split.val)} films), so no AUC can be computed. Add films, raise "
                "data.val_fraction, or give data.val_manifest.")
        if undefined:
            log.warning("findings %s have no positive (or no negative) validation film: their AUC "
                        "is undefined and left out of val_auc (the macro mean). Raise "
                        "data.val_fraction or leave them out with data.findings.", undefined)
        absent = [n for n, c in zip(split.class_names, train_counts, strict=True) if c == 0]
        if absent:
            raise RunError(f"findings {absent} have no positive training film after the split. "
                           "Leave them out with data.findings, or add films.")
    else:
        val_labels = {r.label for r in split.val}
        if len(val_labels) < 2:
            raise RunError(
                f"the validation split has {len(split.val)} images of {len(val_labels)} class(es); "
                "AUC needs both classes. Add images, raise data.val_fraction, or give data.val_root."
            )
        if min(train_counts) == 0:
            empty = [n for n, c in zip(split.class_names, train_counts, strict=True) if c == 0]
            raise RunError(f"classes {empty} have no training images after the split.")
    problem = checkpoint_metric_problem(cfg.checkpoint.metric, split.class_names, split.multilabel)
    if problem:
        raise RunError(problem)
    if cfg.train.batch_size > len(split.train) and cfg.train.overfit_subset is None:
        raise RunError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set "
            f"({len(split.train)} images). Lower train.batch_size."
        )
    if cfg.train.class_weights is not None and len(cfg.train.class_weights) != len(
        split.class_names
    ):
        raise RunError(
            f"train.class_weights has {len(cfg.train.class_weights)} values but there are "
            f"{len(split.class_names)} classes {split.class_names}."
        )


def check_pretrained(cfg: Config, num_classes: int) -> Config:
    """Fetch and check ``model.pretrained`` on the driver, so a wrong or missing file fails
    before any worker starts (a worker error would also be retried ``train.max_failures``
    times). Returns ``cfg`` with a relative local path made absolute (workers run in another
    directory) and ``preprocess.mean/std`` resolved from ``model.pretrained_stats``, which
    then reach the data stage, the workers and every checkpoint's meta."""
    m = cfg.model
    if not m.pretrained:
        if m.freeze != "none" and m.freeze_epochs > 0:
            log.warning("model.freeze=%s without model.pretrained: the frozen part keeps its "
                        "random initial weights for %d epoch(s)", m.freeze, m.freeze_epochs)
        return cfg
    import torch

    from raypipe.models.pretrained import (
        PretrainedError,
        fetch_pretrained,
        input_statistics,
        is_remote,
    )
    from raypipe.models.resnet import ResNet, adapt_state_dict, read_state_dict

    cfg = cfg.model_copy(deep=True)
    if not is_remote(cfg.model.pretrained):
        cfg.model.pretrained = os.path.abspath(os.path.expanduser(cfg.model.pretrained))
    try:
        weights = fetch_pretrained(cfg.model.pretrained, cfg.model.cache_dir)
        state = read_state_dict(weights.path, source=m.pretrained)
        block, layers = REGISTRY[m.name]
        with torch.device("meta"):  # shapes are all the check needs
            model = ResNet(block, layers, cfg.preprocess.channels, num_classes, init="default")
        adapt_state_dict(model, state, m.name, source=m.pretrained)
    except PretrainedError as exc:
        raise RunError(str(exc)) from None
    cfg.preprocess, message = input_statistics(cfg.preprocess, m, state)
    log.info("model.pretrained: %s (sha256 %s) fits %s; %s", m.pretrained, weights.sha256[:16],
             m.name, message)
    if m.freeze != "none" and m.freeze_epochs > 0:
        log.info("model.freeze: %s held fixed for the first %d epoch(s)", m.freeze,
                 m.freeze_epochs)
    return cfg


def build_trainer(
    cfg: Config, split: DatasetSplit, train_records: list[Record] | None = None,
    callbacks: list | None = None, stop_gate: Any = None,
) -> tuple[TorchTrainer, pipeline.Datasets]:
    """A ready-to-fit TorchTrainer and its datasets (with their bad-file ledger and epoch clock).
    ``stop_gate`` (a search scheduler's :class:`~raypipe.tune.stopping.StopGate`) is asked after
    each epoch but the last whether to go on."""
    capacity, known_max = cluster_capacity()
    layout = resolve_layout(cfg, capacity, known_max)
    records = split.train if train_records is None else train_records
    data = pipeline.build_datasets(cfg, split, records, layout.data_workers)
    loss = run_loss_facts(cfg, split, records)
    log.info("loss: %s", loss_text(loss))
    facts = {
        "class_names": split.class_names,
        "task": split.task,
        "multilabel": split.multilabel,
        # None for plain cross-entropy, which has no use for them
        "class_weights": list(loss["class_weights"].values()) if loss["class_weights"] else None,
        "run_dir": run_dir_of(cfg),
        "clock": data.clock,
        "data": split.counts(),
        "stop_gate": stop_gate,
    }
    resources = {"CPU": cfg.train.cpus_per_worker}
    if layout.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    fs, storage = get_filesystem(cfg.run.storage_path)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": cfg.to_dict(), "meta": facts},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=layout.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep,
                checkpoint_score_attribute=cfg.checkpoint.metric,
                checkpoint_score_order=cfg.checkpoint.resolved_mode,
            ),
            failure_config=FailureConfig(
                max_failures=cfg.train.max_failures,
                # Ray Train retries a worker group that did not start within
                # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S forever by default. On a cluster whose
                # maximum is known the pre-check has shown the workers fit, so waiting for the
                # autoscaler is right however long nodes take to boot; on one of unknown size
                # they may never come, so the first timeout ends the run (ResourceError).
                controller_failure_limit=-1 if known_max else 0,
            ),
            callbacks=callbacks or [],
        ),
        datasets={"train": data.train, "val": data.val},
        dataset_config=pipeline.dataset_config(cfg.pipeline.deterministic),
    )
    return trainer, data


# our own errors, most specific first: when one of them is anywhere in the failure, it is the story
_OWN_ERRORS = ("TrainingDiverged", "BadFileError", "StorageUnreachableError", "DataSourceError",
               "DecodeError", "PretrainedError", "ResourceError", "RunError")
# where a message ends and Ray's wrapping (tracebacks, retry advice) begins
_MESSAGE_ENDS = ("\n\n", "\nTraceback", "\n  File ", "\nThe above exception", "\n(",
                 "\nray.exceptions.", "\nFailed to apply UDF")


def _failure_texts(exc: BaseException) -> list[str]:
    """``Type: message`` of ``exc`` and of everything it wraps: causes, contexts, and Ray Train's
    per-worker failures (whose full traceback text holds the worker's original exception)."""
    seen, stack, msgs = set(), [exc], []
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        msgs.append(f"{type(cur).__name__}: {cur}")
        failures = getattr(cur, "worker_failures", None) or {}
        stack.extend(failures[k] for k in sorted(failures, reverse=True))
        stack += [getattr(cur, "controller_failure", None), getattr(cur, "_base_exc", None),
                  cur.__context__, cur.__cause__]
    return msgs


# Ray Train's own failures to start the workers, said in raypipe's words
_NO_WORKERS = {
    "WorkerGroupStartupTimeoutError": (
        "the cluster did not provide the training workers (train.num_workers x "
        "train.cpus_per_worker CPUs, and GPUs where used) within Ray Train's "
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default). Lower train.num_workers or "
        "train.cpus_per_worker, or add nodes; on an autoscaling cluster that needs longer to "
        "start them, set RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S higher in its nodes' "
        "environment, and RAYPIPE_MAX_CPUS / RAYPIPE_MAX_GPUS to have the size checked up front "
        "(cluster/README.md)."),
    "InsufficientClusterResourcesError": (
        "the cluster cannot grow to hold the training workers: {message} Lower "
        "train.num_workers or the resources per worker, or raise the cluster's maximum size."),
}


def root_cause(exc: BaseException) -> str:
    """The innermost meaningful message of a Ray Train failure: our own error's message when one
    of them caused it (raised in a training worker or in a Ray Data actor), else the innermost."""
    msgs = _failure_texts(exc)
    text = "\n".join(msgs)
    for name, advice in _NO_WORKERS.items():
        idx = text.rfind(name + ":")
        if idx >= 0:
            message = text[idx + len(name) + 1:].strip().split("\n")[0]
            return "ResourceError: " + advice.format(message=message)
    for marker in _OWN_ERRORS:
        idx = text.rfind(marker + ":")
        if idx >= 0:
            found = text[idx:]
            cut = min((i for i in (found.find(end) for end in _MESSAGE_ENDS) if i > 0),
                      default=len(found))
            return found[:cut].strip()
    return msgs[-1] if msgs else str(exc)


def overfit_report(cfg: Config, history: list[dict]) -> dict:
    """``final_train_loss`` and, in overfit mode (``train.overfit_subset``), ``overfit_passed``:
    whether the last epoch's training loss fell below ``train.overfit_loss`` (None otherwise).
    A model that cannot overfit a handful of images has a bug or a bad setting to fix first."""
    final = float(history[-1]["train_loss"]) if history else None
    passed = None
    if cfg.train.overfit_subset is not None and final is not None:
        passed = bool(final < cfg.train.overfit_loss)
        log.info("overfit check on %d images: final train loss %.4g %s threshold %g -> %s",
                 cfg.train.overfit_subset, final, "<" if passed else ">=",
                 cfg.train.overfit_loss, "passed" if passed else "FAILED")
    return {"final_train_loss": final, "overfit_passed": passed}


def run_training(
    cfg: Config, split: DatasetSplit | None = None, train_records: list[Record] | None = None,
    callbacks: list | None = None, stop_gate: Any = None, progress: bool = False,
    track_params: dict[str, Any] | None = None, track_tags: dict[str, str] | None = None,
) -> dict:
    """Run one training job end to end; returns (and writes) ``summary.json``'s content.
    ``progress``: show a progress bar and each epoch's line on this process's console.
    With ``track.mlflow``, the run is logged to MLflow from this process, with ``track_params``
    (a search trial's sampled values) beside the config and ``track_tags`` on the run."""
    from raypipe.report.tracking import MlflowTracker, check_tracking

    t0 = time.time()
    check_tracking(cfg)
    if split is None:
        split = discover(cfg.data)  # which logs the split
    else:
        log.info("dataset %s: %s", split.source, split.describe())
    if cfg.train.overfit_subset is not None and train_records is None:
        train_records = subset(split.train, cfg.train.overfit_subset, cfg.data.split_seed)
    validate_split(split, cfg)
    cfg = check_pretrained(cfg, len(split.class_names))
    run_dir = run_dir_of(cfg)
    _write_text(join_uri(run_dir, "config.yaml"), config_to_yaml(cfg))
    if train_records is not None:
        log.info("training on %d of the %d training images", len(train_records), len(split.train))
    _remove(join_uri(run_dir, DIVERGED_FILE))  # a resumed run starts healthy
    resume = checkpoints.latest_complete(run_dir)
    start = checkpoints.epoch_of(resume) + 1 if resume else 0
    if resume:
        log.info("resuming %s after epoch %d (%s)", cfg.run.name, start, resume)
    records = split.train if train_records is None else train_records
    try:
        trainer, data = build_trainer(cfg, split, train_records, callbacks, stop_gate)
    except pipeline.DataStageFailed as exc:
        cause = _explain_storage(root_cause(exc.error), cfg)
        _write_partial_summary(cfg, split, records, exc.ledger, "failed", cause, t0)
        pipeline.release(exc.ledger)
        raise RunError(cause) from exc.error
    try:
        # the tracker closes the MLflow run after the progress watcher's last epochs
        with MlflowTracker(cfg, track_params, track_tags) as tracker, RunProgress(
                data.clock, cfg.train.epochs, start, enabled=progress,
                metric=cfg.checkpoint.metric, listeners=tracker.listeners) as progress:
            summary = _fit_and_summarise(cfg, split, records, trainer, data.ledger, t0)
            progress.catch_up(summary.get("history") or [])
            tracker.finished(summary)
        return summary
    finally:
        # the data stage's task processes keep a few pipelines' handles to these actors (see
        # pipeline.process_block), which would keep them alive after the run
        pipeline.release(data.ledger, data.clock)


def _fit_and_summarise(cfg: Config, split: DatasetSplit, records: list[Record],
                       trainer: TorchTrainer, ledger: Any, t0: float) -> dict:
    """Fit, then ``summary.json``; a run that does not finish writes what it has and raises."""
    run_dir = run_dir_of(cfg)
    try:
        result = fit(trainer)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ray Train turns SIGINT into a graceful abort that ends in SystemExit: keep what we have
        _write_partial_summary(cfg, split, records, ledger, "interrupted", None, t0)
        raise KeyboardInterrupt from exc
    except Exception as exc:  # Ray wraps worker errors; surface the root cause
        cause = _explain_storage(root_cause(exc), cfg)
        _write_partial_summary(cfg, split, records, ledger, "failed", cause, t0)
        raise RunError(cause) from exc
    if result.error is not None:
        cause = _explain_storage(root_cause(result.error), cfg)
        _write_partial_summary(cfg, split, records, ledger, "failed", cause, t0)
        raise RunError(cause)
    diverged = _read_text(join_uri(run_dir, DIVERGED_FILE))
    if diverged:
        _write_partial_summary(cfg, split, records, ledger, "diverged", diverged, t0)
        raise TrainingDiverged(diverged)
    bad = _bad_files(ledger)
    metric, mode = cfg.checkpoint.metric, cfg.checkpoint.resolved_mode
    best_ckpt, best_metrics = checkpoints.best_complete(run_dir, metric, mode)
    history = _read_json(join_uri(run_dir, "history.json")) or []
    data, skipped = file_accounting(split, records, bad)
    summary = {
        "status": "finished",
        "run_dir": run_dir,
        "metric": metric,
        "mode": mode,
        "best_value": best_metrics.get(metric),
        "best_epoch": best_metrics.get("epoch"),
        "best_checkpoint": best_ckpt,
        "best_metrics": {k: v for k, v in best_metrics.items() if isinstance(v, int | float)},
        "history": history,
        "data": data,
        "skipped": skipped,
        **run_loss_facts(cfg, split, records),
        "epochs": cfg.train.epochs,
        **overfit_report(cfg, history),
        "wall_time_s": time.time() - t0,
    }
    write_summary(run_dir, summary)
    _write_report(cfg, summary)
    return summary


def fit(trainer: TorchTrainer):
    """``trainer.fit()``; every ``fit`` of a raypipe process goes through here. In the main thread
    ``fit`` installs a SIGINT handler that holds the run's controller actor and is never removed:
    in a process that trains more than once, each finished run's controller and its data workers
    would live on until the next run. The previous handler is put back, so they go with the run."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if previous is not None:  # None: not the main thread, or a handler not set from Python
            signal.signal(signal.SIGINT, previous)


_STORAGE_ERRORS = ("No space left", "Errno 28", "Read-only file system", "Errno 30",
                   "Permission denied", "Errno 13", "Disk quota exceeded")


def _explain_storage(cause: str, cfg: Config) -> str:
    """A failure to write checkpoints or history says where and what to do about it."""
    if any(m in cause for m in _STORAGE_ERRORS):
        return (f"{cause}\nWriting results under run.storage_path='{cfg.run.storage_path}' failed: "
                "free some space or point run.storage_path at a writable location, then re-run "
                f"with run.name={cfg.run.name} to resume from the last checkpoint.")
    return cause


def run_loss_facts(cfg: Config, split: DatasetSplit, records: list[Record]) -> dict:
    """:func:`~raypipe.training.losses.loss_facts` of this run's training files."""
    try:
        return loss_facts(cfg.train.loss, split.class_names,
                          label_counts(records, len(split.class_names), split.multilabel),
                          cfg.train.class_weights, multilabel=split.multilabel, total=len(records))
    except ValueError as exc:
        raise RunError(str(exc)) from None


def file_accounting(
    split: DatasetSplit, records: list[Record], bad: dict[str, str]
) -> tuple[dict, list[dict]]:
    """(``data`` section, ``skipped`` list) of the summary: files found = used + skipped, where
    skipped counts files refused when listing and files that failed to read or decode."""
    found = len(records) + len(split.val) + len(split.skipped)
    skipped = [{"file": k, "reason": r} for k, r in split.skipped]
    skipped += [{"file": k, "reason": r} for k, r in sorted(bad.items())]
    data = {
        **split.counts(),
        "files_found": found,
        "files_used": found - len(skipped),
        "files_skipped": len(skipped),
    }
    return data, skipped


def write_summary(run_dir: str, summary: dict) -> None:
    """``summary.json`` and ``skipped.csv`` (file, reason: one row per skipped file)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "reason"])
    writer.writerows([s["file"], s["reason"]] for s in summary.get("skipped", []))
    _write_text(join_uri(run_dir, "skipped.csv"), buf.getvalue())
    _write_text(join_uri(run_dir, "summary.json"), json.dumps(summary, indent=1, default=float))


def _bad_files(ledger: Any, timeout: float = 30.0) -> dict[str, str]:
    try:
        return ray.get(ledger.items.remote(), timeout=timeout)
    except Exception:  # noqa: BLE001 - a partial summary must not hide the original error
        log.warning("could not read the bad-file ledger; the skipped list may be incomplete")
        return {}


def _write_partial_summary(
    cfg: Config, split: DatasetSplit, records: list[Record], ledger: Any, status: str,
    error: str | None, t0: float,
) -> None:
    """Best effort: what an interrupted or failed run had done (epochs so far, files skipped),
    so nothing is lost silently. Checkpoints already reported stay valid for resuming."""
    run_dir = run_dir_of(cfg)
    data, skipped = file_accounting(split, records, _bad_files(ledger, timeout=10.0))
    summary = {
        "status": status,
        "error": error,
        "run_dir": run_dir,
        "metric": cfg.checkpoint.metric,
        "history": _read_json(join_uri(run_dir, "history.json")) or [],
        "data": data,
        "skipped": skipped,
        **run_loss_facts(cfg, split, records),
        "epochs": cfg.train.epochs,
        "resume": f"re-run the same command with run.name={cfg.run.name} to continue",
        "wall_time_s": time.time() - t0,
    }
    try:
        write_summary(run_dir, summary)
    except RunError as exc:
        log.warning("could not write the partial summary: %s", exc)


def _write_report(cfg: Config, summary: dict) -> None:
    """training_curves.png and report.md; a failure here must not turn a finished run into an error."""
    from raypipe.report.run_report import write_run_report

    try:
        write_run_report(cfg, summary)
    except Exception as exc:  # plotting or storage trouble: the run's results are already saved
        log.warning("could not write the run report in %s: %s", summary["run_dir"], exc)
