"""The only Ray Train glue inside the workers: model preparation, dataset shards, gathering,
reporting and checkpoints. The training arithmetic lives in :mod:`raypipe.training.loop`."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raypipe.config import Config
from raypipe.models.pretrained import PretrainedError, fetch_pretrained, state_digest
from raypipe.models.resnet import ResNet, create_model, load_pretrained
from raypipe.report.tensorboard import TensorBoardLogger
from raypipe.training import checkpoints, loop
from raypipe.training.doctor import GradientDoctor, TrainingDiverged
from raypipe.training.freeze import set_frozen
from raypipe.training.losses import build_loss
from raypipe.training.metrics import metrics_from_logits
from raypipe.training.optim import EpochScheduler, build_optimizer

log = logging.getLogger(__name__)


def _all_gather(obj: Any) -> list[Any]:
    """``obj`` of every worker, in rank order, on every worker."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def load_start_weights(model: ResNet, cfg: Config, rank: int) -> dict | None:
    """Load ``model.pretrained`` into this worker's ``model`` (fetched once per node), then check
    with every other worker that all of them loaded the same tensors. DDP would hide a worker
    that loaded something else (it copies rank 0's weights to all at start), but such a worker
    points at a real fault: a local path holding different files on different nodes. Returns
    the start's provenance for the checkpoints' meta (None without ``model.pretrained``)."""
    uri = cfg.model.pretrained
    if not uri:
        return None
    weights = fetch_pretrained(uri, cfg.model.cache_dir)
    loaded = load_pretrained(model, weights.path, cfg.model.name, source=uri)
    mine = {"rank": rank, "node": socket.gethostname(), "file_sha256": weights.sha256,
            "loaded_sha256": state_digest(loaded), "downloaded": weights.downloaded}
    workers = _all_gather(mine)
    if len({(w["file_sha256"], w["loaded_sha256"]) for w in workers}) > 1:
        seen = "; ".join(f"rank {w['rank']} on {w['node']}: file sha256 {w['file_sha256'][:16]}"
                         for w in workers)
        raise PretrainedError(
            f"model.pretrained: the workers loaded different weights from '{uri}' ({seen}). A "
            "local path must hold the same file on every node: put the file in object storage "
            "(s3:// or gs://) and give its URI, or copy the same file to every node.")
    log.info("model.pretrained: rank %d loaded %d tensors from %s (file sha256 %s, loaded "
             "sha256 %s, %s)", rank, len(loaded), uri, weights.sha256[:16],
             mine["loaded_sha256"][:16], "downloaded" if weights.downloaded else "not downloaded")
    return {"source": uri, "file_sha256": weights.sha256, "loaded_sha256": mine["loaded_sha256"],
            "tensors_loaded": len(loaded), "workers": workers}


def gather_predictions(labels: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's (labels, logits), concatenated in rank order on every worker. Shards may
    be uneven or empty."""
    parts = [p for p in _all_gather((labels, logits)) if len(p[0])]
    if not parts:
        return labels, logits
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def epoch_metrics(
    labels: np.ndarray, logits: np.ndarray, class_names: list[str], loss_fn, threshold: float,
    multilabel: bool = False,
) -> dict:
    """``val_*`` metrics from the full gathered validation predictions (multilabel: per finding,
    ``val_auc/<finding>``, and their macro mean ``val_auc``)."""
    m = metrics_from_logits(labels, logits, class_names, multilabel=multilabel, threshold=threshold)
    out = {f"val_{k}": v for k, v in m.items() if k not in ("confusion", "n")}
    out["val_loss"] = loop.evaluate_loss(logits, labels, loss_fn)
    out["val_samples"] = m["n"]
    return out, m["confusion"]


def save_checkpoint(
    directory: str, model, optimizer, scheduler, scaler, epoch: int, meta: dict,
    ema: loop.WeightAverage | None = None,
) -> None:
    """Tensors and plain containers only, so it loads with ``torch.load(weights_only=True)``.
    ``model`` holds the weights that were validated (the moving average when ``ema`` is on; the
    trained weights are then kept as ``train_model`` for resuming)."""
    state = {
        "model": (ema.module if ema is not None else loop.unwrap(model)).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
    }
    if ema is not None:
        state["train_model"], state["ema_steps"] = loop.unwrap(model).state_dict(), ema.steps
    torch.save(state, os.path.join(directory, checkpoints.MODEL_FILE))
    with open(os.path.join(directory, checkpoints.META_FILE), "w") as f:
        json.dump(meta, f, indent=1, default=float)


def _restore(uri: str | None, model, optimizer, scheduler, scaler,
             ema: loop.WeightAverage | None = None) -> tuple[int, list]:
    """Load the complete checkpoint at ``uri`` (None: start afresh); returns (next epoch,
    history so far)."""
    if uri is None:
        return 0, []
    state, meta = checkpoints.read_checkpoint(uri)
    loop.unwrap(model).load_state_dict(state.get("train_model", state["model"]))
    if ema is not None:
        ema.module.load_state_dict(state["model"])
        ema.steps = int(state.get("ema_steps", 0))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s (epoch %d)", uri, state["epoch"])
    return int(state["epoch"]) + 1, list(meta.get("history", []))


def _share_rank0_buffers(*modules: torch.nn.Module, average_bn: bool = False) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics). DDP keeps the weights
    equal, but each worker's statistics follow its own last batch (DDP broadcasts rank 0's at
    the start of each forward, then each worker updates them with its own batch), so without this
    every worker would validate a slightly different model, and none exactly the one the
    checkpoint (rank 0's) holds.

    ``average_bn`` (``bn_stats: precise``, where each worker recomputed its statistics over its
    own share of the epoch's last images, as many batches each): the BatchNorm running means and
    variances are averaged over the workers instead, which is the mean over all those batches,
    what one worker recomputing over every one of them would get."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for module in modules:
        averaged: set[int] = set()
        if average_bn:
            for layer in loop.batchnorm_layers(module):
                for buf in (layer.running_mean, layer.running_var):
                    if buf is not None:
                        dist.all_reduce(buf)
                        buf /= world
                        averaged.add(id(buf))
        for buf in module.buffers():
            if id(buf) not in averaged:
                dist.broadcast(buf, src=0)


def _barrier(world: int) -> None:
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def train_func(config: dict) -> None:
    """``train_loop_per_worker``. ``config``: {"cfg": resolved config dict, "meta": run facts}."""
    cfg = Config.model_validate(config["cfg"])
    facts = config["meta"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, round(t.cpus_per_worker)))
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()
    if cfg.pipeline.deterministic and device.type == "cuda":  # cuDNN's fastest kernels may not be
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    model = create_model(
        cfg.model.name, in_channels=cfg.preprocess.channels,
        num_classes=len(facts["class_names"]), init=cfg.model.init,
        zero_init_residual=cfg.model.zero_init_residual,
    )
    start = load_start_weights(model, cfg, rank)
    if start is not None:
        facts = {**facts, "pretrained": start}
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    resume_uri = checkpoints.latest_complete(facts["run_dir"])
    first_epoch = checkpoints.epoch_of(resume_uri) + 1 if resume_uri else 0
    freezing = cfg.model.freeze != "none" and first_epoch < cfg.model.freeze_epochs
    # frozen parameters get no gradient: DDP must not wait for them (see training/freeze.py)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True} if freezing else None)
    weight_decay_off = t.overfit_subset is not None
    optimizer = build_optimizer(
        model.parameters(), t.model_copy(update={"weight_decay": 0.0}) if weight_decay_off else t
    )
    scheduler = EpochScheduler(optimizer, t)
    multilabel = bool(facts.get("multilabel"))
    loss_fn = build_loss(t.loss, facts["class_weights"], focal_gamma=t.focal_gamma,
                         label_smoothing=t.label_smoothing, multilabel=multilabel).to(device)
    eval_loss_fn = build_loss(t.loss, facts["class_weights"], focal_gamma=t.focal_gamma,
                              multilabel=multilabel)
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and device.type == "cuda")
    ema = loop.WeightAverage(model, t.ema_decay) if t.ema_decay else None
    start_epoch, history = _restore(resume_uri, model, optimizer, scheduler, scaler, ema)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, t.batch_size // world)
    # bn_stats: precise: each worker recomputes over its share of the images, then they average
    bn_samples = math.ceil(t.bn_stats_samples / world) if t.bn_stats == "precise" else 0
    doctor = GradientDoctor(t.grad_spike_factor, grads_may_overflow=scaler.is_enabled())
    clock = facts.get("clock")
    tb = TensorBoardLogger(facts.get("run_dir"), enabled=cfg.run.tensorboard and rank == 0)

    def batches(shard, **kwargs) -> Iterable[dict]:
        return shard.iter_torch_batches(batch_size=per_worker_batch, pin_memory=device.type == "cuda",
                                        **kwargs)

    for epoch in range(start_epoch, t.epochs):
        # the whole epoch as a user waits for it: training, validation, checkpoint, history
        started_at, t_start = time.time(), time.perf_counter()
        lr = scheduler.lr
        frozen = cfg.model.freeze if epoch < cfg.model.freeze_epochs else "none"
        if cfg.model.freeze != "none" and set_frozen(loop.unwrap(model), cfg.model.freeze,
                                                     frozen != "none"):
            log.info("epoch %d: model.freeze=%s %s", epoch, cfg.model.freeze,
                     "held fixed" if frozen != "none" else "released: every weight trains")
        # the training stage reads the epoch (its file order, its augmentation seeds) from the
        # clock: set it once every worker is done with the previous epoch's batches
        if rank == 0 and clock is not None:
            ray.get(clock.set.remote(epoch))
        _barrier(world)
        try:
            stats = loop.train_one_epoch(
                model, tb.tap(batches(train_shard, prefetch_batches=cfg.pipeline.prefetch_batches)),
                optimizer, loss_fn, device, doctor, epoch=epoch,
                grad_clip=t.grad_clip, amp=t.amp, channels_last=t.channels_last, scaler=scaler,
                ema=ema, mixup_alpha=0.0 if t.overfit_subset is not None else t.mixup_alpha,
                bn_stats_samples=bn_samples,
                freeze=frozen,
            )
            _check_finite("a model weight or BatchNorm statistic",
                          loop.unwrap(model).state_dict().values(), doctor, epoch, stats, lr)
            _share_rank0_buffers(loop.unwrap(model), *([ema.module] if ema is not None else []),
                                 average_bn=bn_samples > 0)
            t_val = time.perf_counter()
            labels, logits = loop.predict(
                ema.module if ema is not None else loop.unwrap(model),
                batches(val_shard, prefetch_batches=cfg.pipeline.prefetch_batches),
                device, amp=t.amp, channels_last=t.channels_last, tta=cfg.augment.tta,
            )
            labels, logits = gather_predictions(labels, logits)
            val_time = time.perf_counter() - t_val
            _check_finite("the validation output", [torch.from_numpy(logits)], doctor, epoch,
                          stats, lr)
        except TrainingDiverged as exc:
            report_divergence(str(exc), epoch, cfg, facts.get("run_dir"), rank)
            tb.close()
            return
        val, confusion = epoch_metrics(labels, logits, facts["class_names"], eval_loss_fn,
                                       t.threshold, multilabel)
        metrics = {"epoch": epoch, "lr": lr, "epoch_started_at": started_at, **stats, **val,
                   "validation_s": val_time}
        metrics["images_per_s_total"] = _sum_over_workers(stats["images_per_s"], device)
        scheduler.step(metrics)
        history.append({**metrics, "val_confusion": confusion})
        tb.log_epoch(epoch, metrics)
        if rank == 0 and clock is not None:  # for the driver's progress display
            clock.record.remote({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        _report(metrics, history, rank, model, optimizer, scheduler, scaler, epoch, cfg, facts, ema)
        if rank == 0:  # after the checkpoint: history.json's epoch_wall_s holds its time too
            history[-1]["epoch_wall_s"] = time.perf_counter() - t_start
            _write_history(facts["run_dir"], history)
        gate = facts.get("stop_gate")
        if gate is not None and epoch + 1 < t.epochs:
            # a search scheduler's verdict on this epoch, the same on every worker
            if _from_rank0(int(rank == 0 and gate.should_stop(epoch)), device):
                break
    tb.close()


def _check_finite(what: str, tensors, doctor: GradientDoctor, epoch: int, stats: dict,
                  lr: float) -> None:
    """Finite gradients can still step the weights (or BatchNorm's running statistics) to inf;
    never checkpoint such a model. Weights and gathered outputs are identical on every DDP
    worker, so all of them reach the same verdict and stop together."""
    if all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        return
    raise TrainingDiverged(doctor.diagnosis(
        what, stats["train_loss"], stats["grad_norm_max"], epoch, stats["train_steps"], lr))


DIVERGED_FILE = "diverged.txt"


def report_divergence(message: str, epoch: int, cfg: Config, run_dir: str | None,
                      rank: int) -> None:
    """End the run on divergence without raising, so that ``FailureConfig(max_failures)`` does
    not restart it from the last checkpoint only to diverge again (Ray Train retries every
    worker exception and offers no public hook to exempt one). Rank 0 writes the diagnosis to
    ``<run_dir>/diverged.txt``, from which the driver raises :class:`TrainingDiverged`; every
    worker reports NaN metrics and no checkpoint, so a Tune search sees a failed trial rather
    than a missing metric."""
    log.error("%s", message)
    if rank == 0 and run_dir:
        _write_run_file(run_dir, DIVERGED_FILE, message)
    nan = float("nan")
    metrics = {"epoch": epoch, "diverged": 1, "train_loss": nan, "val_loss": nan,
               "val_auc": nan, "val_acc": nan, cfg.checkpoint.metric: nan}
    ray.train.report(metrics, checkpoint=None)


def _sum_over_workers(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL takes CUDA tensors only
    dist.all_reduce(t)
    return float(t.item())


def _from_rank0(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _report(metrics, history, rank, model, optimizer, scheduler, scaler, epoch, cfg, facts,
            ema=None):
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    meta = {
        "epoch": epoch,
        "metrics": metrics,
        "history": history,
        "class_names": facts["class_names"],
        "task": facts.get("task"),
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "model": {"name": cfg.model.name, "in_channels": cfg.preprocess.channels,
                  "num_classes": len(facts["class_names"])},
        "pretrained": facts.get("pretrained"),  # where the weights started: source, hashes
        "config": cfg.to_dict(),
        "data": facts.get("data", {}),
    }
    name = checkpoints.checkpoint_name(epoch)
    uri = checkpoints.join_uri(facts["run_dir"], name)
    checkpoints.unmark(uri)  # a folder written again is not complete until its new marker
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizer, scheduler, scaler, epoch, meta, ema)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=name)
    # the report has persisted the files: now the folder is complete; and history.json never
    # lists an epoch that a restart would have to train again
    checkpoints.mark_complete(uri, epoch)


def _write_history(run_dir: str | None, history: list) -> None:
    if run_dir:
        _write_run_file(run_dir, "history.json", json.dumps(history, indent=1, default=float))


def _write_run_file(run_dir: str, name: str, text: str) -> None:
    from raypipe.data.sources import get_filesystem, join_uri

    fs, path = get_filesystem(join_uri(run_dir, name))
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
