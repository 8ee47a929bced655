"""Driver side: check resources, build the ``TorchTrainer`` from config, run it, write the summary."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypipe.config import Config, config_to_yaml
from raypipe.data import pipeline
from raypipe.data.sources import DatasetSplit, Record, discover, get_filesystem, join_uri, subset
from raypipe.train.losses import inverse_prevalence_weights
from raypipe.train.worker import train_func

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """The requested workers and data actors cannot fit the cluster."""


class RunError(RuntimeError):
    """The training run failed; the message holds the root cause."""


@dataclass
class Layout:
    use_gpu: bool
    train_cpus: float
    data_cpus: float
    total_cpus: float
    total_gpus: float


def resolve_layout(cfg: Config, resources: dict[str, float]) -> Layout:
    """Check that trainer workers and the smallest data actor pools fit ``resources``
    (``ray.cluster_resources()``); raise :class:`ResourceError` saying what to change if not."""
    t, p = cfg.train, cfg.pipeline
    total_cpus = float(resources.get("CPU", 0))
    total_gpus = float(resources.get("GPU", 0))
    use_gpu = total_gpus > 0 if t.use_gpu == "auto" else bool(t.use_gpu)
    if use_gpu and t.num_workers * t.gpus_per_worker > total_gpus:
        raise ResourceError(
            f"train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker} GPUs "
            f"requested, the cluster has {total_gpus:g} GPUs. Lower train.num_workers, set "
            "train.use_gpu=false, or add GPU nodes."
        )
    train_cpus = t.num_workers * t.cpus_per_worker
    data_cpus = max(p.train.min_actors * p.train.cpus_per_actor,
                    p.val.min_actors * p.val.cpus_per_actor)
    if train_cpus + data_cpus > total_cpus + 1e-9:
        raise ResourceError(
            f"the run needs {train_cpus:g} CPUs for training (train.num_workers={t.num_workers} "
            f"x train.cpus_per_worker={t.cpus_per_worker}) plus {data_cpus:g} for the data "
            f"actors (pipeline.train.min_actors x pipeline.train.cpus_per_actor), but the "
            f"cluster has {total_cpus:g} CPUs. Without CPUs left for Ray Data the job would hang. "
            "Lower train.num_workers or train.cpus_per_worker (e.g. 0.5), or "
            "pipeline.*.cpus_per_actor, or add nodes."
        )
    return Layout(use_gpu, train_cpus, data_cpus, total_cpus, total_gpus)


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


def _read_json(uri: str) -> Any:
    fs, path = get_filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, FileNotFoundError, json.JSONDecodeError):
        return None


def validate_split(split: DatasetSplit, cfg: Config) -> None:
    """Problems that would only show after minutes of training: fail now, clearly."""
    val_labels = {r.label for r in split.val}
    if len(val_labels) < 2:
        raise RunError(
            f"the validation split has {len(split.val)} images of {len(val_labels)} class(es); "
            "AUC needs both classes. Add images, raise data.val_fraction, or give data.val_root."
        )
    train_counts = split.train_label_counts()
    if min(train_counts) == 0:
        empty = [n for n, c in zip(split.class_names, train_counts, strict=True) if c == 0]
        raise RunError(f"classes {empty} have no training images after the split.")
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


def build_trainer(
    cfg: Config, split: DatasetSplit, train_records: list[Record] | None = None,
    callbacks: list | None = None,
) -> tuple[TorchTrainer, Any]:
    """A ready-to-fit TorchTrainer and the bad-file ledger actor."""
    layout = resolve_layout(cfg, ray.cluster_resources())
    records = split.train if train_records is None else train_records
    train_ds, val_ds, ledger, clock = pipeline.build_datasets(cfg, split, records)
    counts = [0] * len(split.class_names)
    for r in records:
        counts[r.label] += 1
    weights = cfg.train.class_weights or inverse_prevalence_weights(counts)
    facts = {
        "class_names": split.class_names,
        "class_weights": weights,
        "run_dir": run_dir_of(cfg),
        "clock": clock,
        "data": split.counts(),
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
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or [],
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=pipeline.dataset_config(),
    )
    return trainer, ledger


def _root_cause(exc: BaseException) -> str:
    """The innermost meaningful message of a Ray Train failure."""
    seen, cur, msgs = set(), exc, []
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        msgs.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    text = "\n".join(msgs)
    for marker in ("TrainingDiverged", "BadFileError", "DecodeError", "RunError"):
        idx = text.rfind(marker + ":")
        if idx >= 0:
            return text[idx:].split("\n\n")[0].strip()
    return msgs[-1] if msgs else str(exc)


def _best(result, metric: str, mode: str) -> tuple[Any, dict]:
    pairs = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    pairs = [(c, m) for c, m in pairs if not math.isnan(float(m[metric]))] or pairs
    if not pairs:
        return None, {}
    sign = 1 if mode == "max" else -1
    return max(pairs, key=lambda cm: sign * float(cm[1][metric]))


def checkpoint_uri(cfg: Config, checkpoint) -> str:
    path = checkpoint.path
    if "://" in cfg.run.storage_path:
        return cfg.run.storage_path.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


def run_training(
    cfg: Config, split: DatasetSplit | None = None, train_records: list[Record] | None = None,
    callbacks: list | None = None,
) -> dict:
    """Run one training job end to end; returns (and writes) ``summary.json``'s content."""
    t0 = time.time()
    split = split or discover(cfg.data)
    if cfg.train.overfit_subset is not None and train_records is None:
        train_records = subset(split.train, cfg.train.overfit_subset, cfg.data.split_seed)
    validate_split(split, cfg)
    run_dir = run_dir_of(cfg)
    _write_text(join_uri(run_dir, "config.yaml"), config_to_yaml(cfg))
    log.info("classes %s; counts %s", split.class_names, split.counts())
    trainer, ledger = build_trainer(cfg, split, train_records, callbacks)
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the root cause
        raise RunError(_root_cause(exc)) from exc
    if result.error is not None:
        raise RunError(_root_cause(result.error))
    bad = ray.get(ledger.items.remote())
    metric, mode = cfg.checkpoint.metric, cfg.checkpoint.resolved_mode
    best_ckpt, best_metrics = _best(result, metric, mode)
    history = _read_json(join_uri(run_dir, "history.json")) or []
    records = split.train if train_records is None else train_records
    found = len(records) + len(split.val) + len(split.skipped)
    summary = {
        "run_dir": run_dir,
        "metric": metric,
        "mode": mode,
        "best_value": best_metrics.get(metric),
        "best_epoch": best_metrics.get("epoch"),
        "best_checkpoint": checkpoint_uri(cfg, best_ckpt) if best_ckpt else None,
        "best_metrics": {k: v for k, v in best_metrics.items() if isinstance(v, int | float)},
        "history": history,
        "data": {
            **split.counts(),
            "files_found": found,
            "files_used": found - len(split.skipped) - len(bad),
            "files_skipped": len(split.skipped) + len(bad),
        },
        "skipped": [{"file": k, "reason": r} for k, r in split.skipped]
        + [{"file": k, "reason": r} for k, r in sorted(bad.items())],
        "epochs": cfg.train.epochs,
        "wall_time_s": time.time() - t0,
    }
    _write_text(join_uri(run_dir, "summary.json"), json.dumps(summary, indent=1, default=float))
    return summary
