"""The Ray Tune driver: one function trainable that runs a whole ``TorchTrainer`` per trial.

Ray Train V2 pattern: each Tune trial builds its own :class:`~raypipe.config.Config` (base config +
the trial's dotted overrides), then runs :func:`raypipe.training.trainer.run_training` with a
``TuneReportCallback`` that forwards every epoch's metrics (and checkpoint path) to Tune, where ASHA
and the search algorithm see them.

Layout of a search ``<storage>/<name>/``: Tune's own experiment state (what ``--resume`` restores)
and ``runs/<trial id>/``, one ordinary training run per trial. Trial ids survive a restore, so a
resumed trial continues its training run from its last checkpoint.

Resources: the Tune trial itself only waits on the trainer, so it reserves (almost) nothing; the
trainer's workers and data actors take their CPUs outside Tune's accounting. Hence Tune cannot see
how many trials fit, and ``max_concurrent_trials`` is computed here from the config and what
the cluster has or can scale to (:func:`raypipe.training.trainer.cluster_capacity`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from raypipe.config import Config, ConfigError, config_to_yaml, load_config, resolve_config_path

log = logging.getLogger(__name__)

# A Tune trial must request a non-empty bundle; one byte of memory is as close to nothing as Ray
# allows. Reserving a CPU here would leave the trainer's data actors short on a small cluster.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
RUNS_DIR = "runs"
CHECKPOINT_METRICS = ("val_auc", "val_loss", "val_acc", "val_balanced_acc", "val_pr_auc", "val_f1")


@dataclass
class SearchJob:
    """Everything a trial needs to rebuild its config; plain data so it pickles to the trials."""

    name: str
    storage_path: str
    base_config: str | None
    base_overrides: list[str]
    trial_overrides: list[str] = field(default_factory=list)
    presets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    subset: int | None = None
    metric: str = "val_auc"
    mode: str = "max"
    early_stopping: bool = False
    # track.uri and track.experiment of every trial (empty with tracking off), fixed once by
    # the driver so that all trials log to the same store and experiment
    track_overrides: list[str] = field(default_factory=list)

    @property
    def board_name(self) -> str:
        return f"raypipe-decisions-{self.name}"

    @property
    def search_dir(self) -> str:
        from raypipe.data.sources import join_uri

        return join_uri(self.storage_path, self.name)

    @property
    def runs_dir(self) -> str:
        """Where each trial's training run lives: ``<search dir>/runs/<trial id>``."""
        from raypipe.data.sources import join_uri

        return join_uri(self.search_dir, RUNS_DIR)

    def param_overrides(self, params: dict[str, Any]) -> list[str]:
        from raypipe.tune.space import trial_overrides

        return trial_overrides(params, self.presets)

    def final_config(self, params: dict[str, Any]) -> Config:
        """Base config + the sampled values: what a user would train with (no search-only
        overrides, no run name, results in the base storage)."""
        return load_config(self.base_config, self.base_overrides + self.param_overrides(params)
                           + ["run.name=null"])

    def trial_config(self, params: dict[str, Any], run_name: str) -> Config:
        extra = []
        if self.metric in CHECKPOINT_METRICS:  # keep the checkpoints the search ranks by
            extra = [f"checkpoint.metric={self.metric}", f"checkpoint.mode={self.mode}"]
        from raypipe.tune.space import yaml_scalar

        # quoted: YAML reads a trial id such as 68191_00001 as an integer
        run = [f"run.name={yaml_scalar(run_name)}",
               f"run.storage_path={yaml_scalar(self.runs_dir)}"]
        return load_config(
            self.base_config,
            self.base_overrides + self.trial_overrides + extra + self.param_overrides(params) + run
            + self.track_overrides,
        )


def absolute_config_path(path: str | None) -> str | None:
    """Tune runs trials in their own working directory: make the config path absolute."""
    return None if path is None else str(resolve_config_path(path).resolve())


def absolute_data_overrides(cfg: Config) -> list[str]:
    """Overrides making relative local data and weight paths absolute (trials run in another
    directory)."""
    out = []
    keys = [("data", k) for k in ("root", "manifest", "val_root", "val_manifest", "cache_dir")]
    for section, key in [*keys, ("model", "pretrained"), ("model", "cache_dir")]:
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
            from raypipe.tune.space import yaml_scalar

            out.append(f"{section}.{key}={yaml_scalar(os.path.abspath(value))}")
    return out


# ---------------------------------------------------------------- the trainable


def train_trial(params: dict[str, Any], job: SearchJob) -> None:
    """Tune function trainable: one ``TorchTrainer`` run, epochs reported to Tune as they finish.

    A failed run (e.g. ``TrainingDiverged``) raises, so Tune records the trial as errored with the
    root cause while the other trials go on. A run the scheduler stops ends cleanly (see
    :mod:`raypipe.tune.stopping`) and the trial returns normally."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypipe.data.sources import discover, subset
    from raypipe.training.trainer import run_dir_of, run_training
    from raypipe.tune.stopping import StopGate

    trial_id = tune.get_context().get_trial_id()
    cfg = job.trial_config(params, run_name=trial_id)
    split = discover(cfg.data)
    records = None
    if job.subset is not None and cfg.train.overfit_subset is None:
        records = subset(split.train, job.subset, cfg.data.split_seed)
    gate = StopGate(job.board_name, trial_id) if job.early_stopping else None
    run_training(cfg, split=split, train_records=records, callbacks=[TuneReportCallback()],
                 stop_gate=gate, track_params=params,
                 track_tags={"search": job.name, "trial_id": trial_id})
    if gate is not None and gate.stopped(last_epoch=cfg.train.epochs - 1):
        log.info("trial %s stopped early by the scheduler", trial_id)
        mark_stopped_early(run_dir_of(cfg))


# ---------------------------------------------------------------- resources


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial holds while it trains: its workers plus at least one data worker."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.pipeline.cpus_per_worker


def max_concurrent_trials(cfgs: list[Config], resources: dict[str, float],
                          requested: int | None = None, known_max: bool = True) -> int:
    """How many trials fit ``resources`` (what the cluster has or can scale to) at once (at
    least 1; at most ``requested``).

    Raises :class:`~raypipe.training.trainer.ResourceError` when not even one trial fits a
    cluster of ``known_max`` size."""
    from raypipe.training.trainer import resolve_layout

    fits = math.inf
    for cfg in cfgs:
        layout = resolve_layout(cfg, resources, known_max)
        fits = min(fits, math.floor(layout.total_cpus / trial_cpus(cfg) + 1e-9))
        if layout.use_gpu:
            gpus = cfg.train.num_workers * cfg.train.gpus_per_worker
            fits = min(fits, math.floor(layout.total_gpus / gpus + 1e-9))
    n = max(1, int(fits)) if fits != math.inf else 1
    return min(n, requested) if requested else n


# ---------------------------------------------------------------- running


def build_tuner(job: SearchJob, space: dict[str, Any], *, num_samples: int, concurrency: int,
                scheduler=None, search_alg=None, seed: int | None = None, resume: bool = False):
    """A ``tune.Tuner`` for ``job``; with ``resume`` and an existing search, restored from it.
    Without a ``search_alg``, grid and random search draw their points seeded by ``seed``
    (None: new draws each search)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raypipe.data.sources import get_filesystem

    trainable = tune.with_resources(tune.with_parameters(train_trial, job=job), TRIAL_RESOURCES)
    fs, storage = get_filesystem(job.storage_path)
    fs = fs if "://" in job.storage_path else None  # local: let Tune use plain paths
    if not fs:
        storage = job.storage_path
    search_dir = f"{storage.rstrip('/')}/{job.name}"
    if resume and tune.Tuner.can_restore(search_dir, storage_filesystem=fs):
        log.info("resuming search %s", job.search_dir)
        return tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False, storage_filesystem=fs)
    if search_alg is None:  # Tune's own default, plus the seed (it then takes the limit itself)
        search_alg = BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)
        concurrency = None
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=job.metric, mode=job.mode, num_samples=num_samples,
            max_concurrent_trials=concurrency, scheduler=scheduler, search_alg=search_alg,
        ),
        run_config=tune.RunConfig(
            name=job.name,
            storage_path=storage,
            storage_filesystem=fs,
            # one try per trial: a diverging configuration stays failed, the search goes on
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )


def asha(job: SearchJob, spec_scheduler, epochs: int):
    """ASHA over epochs (``training_iteration``) whose stops end the trainer cleanly; metric and
    mode come from the TuneConfig."""
    from raypipe.tune.stopping import BoardedASHA, board

    board(job.board_name)
    return BoardedASHA(
        job.board_name,
        time_attr="training_iteration", max_t=spec_scheduler.max_t or epochs,
        grace_period=min(spec_scheduler.grace_period, spec_scheduler.max_t or epochs),
        reduction_factor=spec_scheduler.reduction_factor,
    )


def grace_warning(spec_scheduler, warmup_epochs: int, epochs: int) -> str | None:
    """What to tell the user when ASHA's first rung falls inside the trials' learning-rate
    warm-up: the trials are then ranked on epochs trained at a fraction of their learning rate,
    and one slow to start is stopped for it (the default search lost its best trial that way)."""
    if spec_scheduler.type != "asha" or spec_scheduler.grace_period > warmup_epochs:
        return None
    if spec_scheduler.grace_period >= (spec_scheduler.max_t or epochs):
        return None  # no rung before the last epoch: nothing is stopped early
    return (f"scheduler.grace_period={spec_scheduler.grace_period}: ASHA may stop trials after epoch "
            f"{spec_scheduler.grace_period}, while their learning rate is still warming up "
            f"(train.warmup_epochs={warmup_epochs}); set scheduler.grace_period to at least "
            f"{warmup_epochs + 1} (--set scheduler.grace_period={warmup_epochs + 1}) so that trials "
            "are judged at their own learning rate")


# ---------------------------------------------------------------- results


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]
    best: float | None
    best_epoch: int | None
    val_loss: float | None
    val_auc: float | None
    val_loss_min: float | None
    epochs: int
    checkpoint: str | None
    error: str | None


def error_message(err: BaseException | None) -> str | None:
    """The root cause of a trial failure in one paragraph (Ray wraps it in several layers)."""
    if err is None:
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    i = text.rfind("TrainingDiverged: ")
    if i >= 0:  # the doctor's diagnosis is the whole story
        return " ".join(text[i:].split("\n\n")[0].split())
    # otherwise the innermost exception line ("ValueError: Input contains NaN.")
    lines = [ln.strip() for ln in text.splitlines()]
    causes = [ln for ln in lines if _EXC_LINE.match(ln) and not ln.startswith(_WRAPPERS)]
    if causes:
        return causes[-1]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else type(err).__name__


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Diverged|Stop)(\([\w.]+\))?: \S")
_WRAPPERS = ("ray.exceptions.RayTaskError", "RunError: WorkerGroupError", "ray.train.WorkerGroupError",
             "WorkerGroupError", "raypipe.training.trainer.RunError: WorkerGroupError")


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    # a trial that failed before its first report: Tune's directory is <trainable>_<id>_<n>_...
    base = os.path.basename(str(result.path).rstrip("/"))
    parts = base.split("_")
    for i in range(len(parts) - 1):
        if parts[i + 1].isdigit() and len(parts[i + 1]) == 5:
            return f"{parts[i]}_{parts[i + 1]}"
    return base


STOPPED_EARLY = "stopped early"


def mark_stopped_early(run_dir: str) -> None:
    """Label a trial's run summary as stopped by the search scheduler (not failed)."""
    from raypipe.data.sources import join_uri
    from raypipe.training.trainer import _read_json, write_summary

    summary = _read_json(join_uri(run_dir, "summary.json"))
    if isinstance(summary, dict):
        summary.update(status=STOPPED_EARLY, error=None)
        write_summary(run_dir, summary)


def _trial_run(runs_dir: str | None, trial_id: str) -> tuple[Any, str | None]:
    """(the trial run's per-epoch history as a DataFrame or None, its summary status). A resumed
    trial's Tune results hold only the epochs after the restore; its own history holds them all."""
    if not runs_dir:
        return None, None
    import pandas as pd

    from raypipe.data.sources import join_uri
    from raypipe.training.trainer import _read_json

    history = _read_json(join_uri(runs_dir, trial_id, "history.json"))
    summary = _read_json(join_uri(runs_dir, trial_id, "summary.json"))
    status = summary.get("status") if isinstance(summary, dict) else None
    if not isinstance(history, list) or not history:
        return None, status
    df = pd.DataFrame([{k: v for k, v in h.items() if not isinstance(v, list | dict)} for h in history])
    df["checkpoint_path"] = [join_uri(runs_dir, trial_id, f"checkpoint_epoch{int(e):04d}")
                             for e in df["epoch"]]
    return df, status


def trial_rows(grid, metric: str, mode: str, max_epochs: int, runs_dir: str | None = None) -> list[TrialRow]:
    """One row per trial, best-first; errored trials last with their message. With ``runs_dir``
    (``<search>/runs``) each trial's figures come from its own run history, so a trial resumed
    after an interrupted search counts all its epochs; a trial that neither finished nor was
    stopped by the scheduler is labelled ``interrupted``."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        run_df, run_status = _trial_run(runs_dir, _trial_id(result))
        if run_df is not None and metric in run_df:
            df = run_df
        best = best_epoch = loss = auc = ckpt = loss_min = None
        epochs = 0
        if df is not None and len(df) and metric in df:
            if "epoch" in df:
                epochs = int(df["epoch"].max()) + 1
            else:
                epochs = int(df["training_iteration"].max()) if "training_iteration" in df else len(df)
            values = df[metric].astype(float)
            if values.notna().any():
                i = values.idxmax() if mode == "max" else values.idxmin()
                row = df.loc[i]
                best = float(row[metric])
                best_epoch = int(row["epoch"]) if "epoch" in df else None
                loss = _float(row.get("val_loss"))
                auc = _float(row.get("val_auc"))
                ckpt = row.get("checkpoint_path") if isinstance(row.get("checkpoint_path"), str) else None
            if "val_loss" in df and df["val_loss"].astype(float).notna().any():
                loss_min = float(df["val_loss"].astype(float).min())
        if result.error:
            status = "error"
        elif epochs >= max_epochs:
            status = "done"
        elif runs_dir is None or run_status == STOPPED_EARLY:
            status = STOPPED_EARLY
        else:  # ended with the search (Ctrl-C): the same command resumes it
            status = "interrupted"
        rows.append(TrialRow(_trial_id(result), status, dict(result.config or {}), best, best_epoch,
                             loss, auc, loss_min, epochs, ckpt, error_message(result.error)))
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0, r.trial_id))
    return rows


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def table_records(rows: list[TrialRow], metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    keys = sorted({k for r in rows for k in r.params})
    header = ["rank", "trial_id", "status", *keys, f"best_{metric}", "best_epoch", "val_loss",
              "val_auc", "epochs", "checkpoint", "error"]
    out = []
    for rank, r in enumerate(rows, 1):
        out.append({
            "rank": rank, "trial_id": r.trial_id, "status": r.status,
            **{k: r.params.get(k, "") for k in keys},
            f"best_{metric}": r.best, "best_epoch": r.best_epoch, "val_loss": r.val_loss,
            "val_auc": r.val_auc, "epochs": r.epochs, "checkpoint": r.checkpoint or "",
            "error": r.error or "",
        })
    return header, out


def to_csv(header: list[str], records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header)
    w.writeheader()
    for rec in records:
        w.writerow({k: _cell(rec.get(k)) for k in header})
    return buf.getvalue()


def to_markdown(header: list[str], records: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> str:
    cols = [h for h in header if h not in skip]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in records:
        lines.append("| " + " | ".join(_cell(rec.get(c)).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_text(uri: str, text: str) -> None:
    from raypipe.training.trainer import _write_text

    _write_text(uri, text)


def write_search_outputs(job: SearchJob, rows: list[TrialRow], metric: str) -> dict[str, Any]:
    """``results.csv``, ``results.md``, ``best_config.yaml`` and ``best.json`` in the search
    directory; returns ``best.json``'s content."""
    from raypipe.data.sources import join_uri

    header, records = table_records(rows, metric)
    write_text(join_uri(job.search_dir, "results.csv"), to_csv(header, records))
    md = to_markdown(header, records, skip=("checkpoint",))
    write_text(join_uri(job.search_dir, "results.md"), md)
    best = next((r for r in rows if r.best is not None), None)
    out: dict[str, Any] = {"search_dir": job.search_dir, "metric": metric, "mode": job.mode,
                           "table_markdown": md, "trials": len(rows),
                           "failed": sum(r.status == "error" for r in rows),
                           "stopped_early": sum(r.status == STOPPED_EARLY for r in rows),
                           "interrupted": sum(r.status == "interrupted" for r in rows)}
    if best is not None:
        cfg = job.final_config(best.params)
        config_uri = join_uri(job.search_dir, "best_config.yaml")
        write_text(config_uri, "# best trial " + best.trial_id + f": {metric}={best.best}\n"
                   + config_to_yaml(cfg))
        out.update({"best_trial": best.trial_id, "best_value": best.best, "best_epoch": best.best_epoch,
                    "best_params": best.params, "best_overrides": job.param_overrides(best.params),
                    "best_checkpoint": best.checkpoint, "best_config": config_uri})
    write_text(join_uri(job.search_dir, "best.json"), json.dumps(out, indent=1, default=str))
    return out


def check_trial_configs(job: SearchJob, points: list[dict[str, Any]]) -> list[Config]:
    """Build the config of every example point now, so a bad key fails before Ray starts."""
    cfgs = []
    for p in points:
        try:
            cfgs.append(job.trial_config(p, run_name="check"))
        except ConfigError as exc:
            raise ConfigError(f"search point {p} gives an invalid config: {exc}") from None
    return cfgs
