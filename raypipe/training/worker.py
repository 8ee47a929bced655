"""The only Ray Train glue inside the workers: model preparation, dataset shards, gathering,
reporting and checkpoints. The training arithmetic lives in :mod:`raypipe.training.loop`."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raypipe.config import Config
from raypipe.data.pipeline import torch_batches
from raypipe.models.resnet import create_model
from raypipe.report.tensorboard import TensorBoardLogger, epoch_line
from raypipe.training import loop
from raypipe.training.doctor import GradientDoctor, TrainingDiverged
from raypipe.training.losses import build_loss
from raypipe.training.metrics import classification_metrics, softmax
from raypipe.training.optim import EpochScheduler, build_optimizer

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_epoch"  # + the epoch, four digits: checkpoint_epoch0003


def gather_predictions(labels: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's (labels, logits), concatenated in rank order on every worker. Shards may
    be uneven or empty."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return labels, logits
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (labels, logits))
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return labels, logits
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def epoch_metrics(
    labels: np.ndarray, logits: np.ndarray, class_names: list[str], loss_fn, threshold: float
) -> dict:
    """``val_*`` metrics from the full gathered validation predictions."""
    m = classification_metrics(labels, softmax(logits.astype(np.float64)), class_names, threshold)
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
    torch.save(state, os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, default=float)


def _restore(checkpoint, model, optimizer, scheduler, scaler,
             ema: loop.WeightAverage | None = None) -> tuple[int, list]:
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
    loop.unwrap(model).load_state_dict(state.get("train_model", state["model"]))
    if ema is not None:
        ema.module.load_state_dict(state["model"])
        ema.steps = int(state.get("ema_steps", 0))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("resumed from checkpoint at epoch %d", state["epoch"])
    return int(state["epoch"]) + 1, list(meta.get("history", []))


class NextEpochBatches:
    """The next epoch's training batches, started now in a background thread: Ray Data starts a
    new execution (and new actors) for every epoch, which otherwise stalls the first step of each
    epoch. The thread asks for the first batch while this epoch validates and checkpoints;
    :meth:`batches` hands over that batch and the rest of the iterator."""

    _END = object()

    def __init__(self, make: Callable[[], Iterable[dict]]):
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._start, args=(make,), daemon=True,
                                        name="raypipe-next-epoch")
        self._thread.start()

    def _start(self, make: Callable[[], Iterable[dict]]) -> None:
        try:
            it = iter(make())
            self._out["first"], self._out["it"] = next(it, self._END), it
        except BaseException as exc:  # handed to the training thread by batches()
            self._out["error"] = exc

    def batches(self) -> Iterator[dict]:
        """A generator, so that waiting for the thread happens at the first ``next`` and counts as
        data wait in the training loop."""
        self._thread.join()
        if "error" in self._out:
            raise self._out["error"]
        first, it = self._out["first"], self._out["it"]
        if first is not self._END:
            yield first
            yield from it


class EpochStream:
    """One stream of batches for every epoch of a run (``pipeline.one_execution``), cut into
    epochs by row count. Each worker's shard holds the same number of rows (an equal split), in
    batches of the same sizes, so every worker cuts at the same step and DDP stays in step. A
    batch that holds the last rows of one epoch and the first of the next is split there: the
    epoch ends with a short batch, as its own execution would end, and the next begins with the
    rest. So each epoch gets exactly its share of rows, and the last epoch of an execution is not
    short by what earlier epochs' last batches would have borrowed. The last epoch takes whatever
    is left.

    ``rows_per_epoch``: a number, or a function asked at the start of each epoch and, within
    ``slack`` rows of its end, before each batch (rows per worker and epoch, less the training
    files found unreadable so far, whose rows never come; the count grows while the first epoch
    streams). Every worker asks at the same batches, so the function may be a collective."""

    def __init__(self, batches: Iterable[dict], rows_per_epoch: int | Callable[[], int],
                 epochs: int, slack: int = 0):
        self._it = iter(batches)
        self._rows = rows_per_epoch if callable(rows_per_epoch) else lambda: rows_per_epoch
        self.slack = max(0, slack)
        self.epochs_left = epochs
        self._seen = self._end = 0
        self._carry: dict | None = None  # the next epoch's part of a batch split at a cut

    def epoch(self) -> Iterator[dict]:
        self.epochs_left -= 1
        last = self.epochs_left <= 0
        start = self._end
        self._end = start + max(1, self._rows())  # kept current, should the epoch stop early
        while True:
            if not last and self._seen >= self._end - self.slack:
                if self.slack:
                    self._end = start + max(1, self._rows())
                if self._seen >= self._end:
                    break
            batch = self._carry if self._carry is not None else next(self._it, None)
            self._carry = None
            if batch is None:
                break
            rows = len(batch["label"])
            if not last and self._seen + rows > self._end:  # the cut falls inside this batch
                keep = self._end - self._seen
                batch, self._carry = ({k: v[:keep] for k, v in batch.items()},
                                      {k: v[keep:] for k, v in batch.items()})
                rows = keep
            self._seen += rows
            yield batch


def _share_rank0_buffers(*modules: torch.nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm running statistics). DDP keeps the weights
    equal, but each worker's statistics follow its own last batch (DDP broadcasts rank 0's at
    the start of each forward, then each worker updates them with its own batch), so without this
    every worker would validate a slightly different model, and none exactly the one the
    checkpoint (rank 0's) holds."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def _barrier(world: int) -> None:
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def quiet_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO, from every worker: a line of several
    hundred characters holding the whole metrics dict, two per epoch of a two-worker run. Rank 0
    already prints the epoch's line and the history keeps every value, so only warnings of that
    logger (named after its file) are kept."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_func(config: dict) -> None:
    """``train_loop_per_worker``. ``config``: {"cfg": resolved config dict, "meta": run facts}."""
    quiet_report_log()
    cfg = Config.model_validate(config["cfg"])
    facts = config["meta"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()
    if cfg.pipeline.deterministic and device.type == "cuda":  # cuDNN's fastest kernels may not be
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    model = create_model(
        cfg.model.name, in_channels=cfg.preprocess.channels,
        num_classes=len(facts["class_names"]), init=cfg.model.init,
        zero_init_residual=cfg.model.zero_init_residual, pretrained=cfg.model.pretrained,
    )
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    weight_decay_off = t.overfit_subset is not None
    optimizer = build_optimizer(
        model.parameters(), t.model_copy(update={"weight_decay": 0.0}) if weight_decay_off else t
    )
    scheduler = EpochScheduler(optimizer, t)
    loss_fn = build_loss(t.loss, facts["class_weights"], focal_gamma=t.focal_gamma,
                         label_smoothing=t.label_smoothing).to(device)
    eval_loss_fn = build_loss(t.loss, facts["class_weights"], focal_gamma=t.focal_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and device.type == "cuda")
    ema = loop.WeightAverage(model, t.ema_decay) if t.ema_decay else None
    start_epoch, history = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler, scaler,
                                    ema)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, t.batch_size // world)
    doctor = GradientDoctor(t.grad_spike_factor, grads_may_overflow=scaler.is_enabled())
    clock = facts.get("clock")
    tb = TensorBoardLogger(facts.get("run_dir"), enabled=cfg.run.tensorboard and rank == 0)

    def train_batches(epoch: int) -> Iterable[dict]:
        # the augmentation actors seed their draws with the epoch they read from the clock (with
        # one execution for several epochs: the execution's first, to which each slot adds its own)
        if clock is not None:
            ray.get(clock.set.remote(epoch))
        # no local shuffle buffer: each epoch's slots are already a full permutation of the
        # files (epoch_order), and with one execution for several epochs a buffer would carry
        # rows of one epoch into the next one's cut
        return torch_batches(train_shard, batch_size=per_worker_batch,
                             prefetch_batches=cfg.pipeline.prefetch_batches)

    def epoch_rows() -> int:
        # the same on every worker (rank 0's count of unreadable training files), so that every
        # worker cuts its stream at the same step
        bad = ray.get(facts["ledger"].training_count.remote()) if rank == 0 and facts.get("ledger") else 0
        return (facts["train_rows"] - _from_rank0(bad, device)) // world

    # an epoch may come out short by the unreadable files data.max_bad_fraction allows
    slack = 0 if cfg.data.on_bad_file == "fail" else \
        -(-int(facts["train_rows"] * cfg.data.max_bad_fraction) // world)

    def stream_from(epoch: int) -> EpochStream:
        # one execution for the next epochs_per_execution epochs (all the rest, unless the run
        # is longer than pipeline.one_execution_max_rows rows); a resumed run starts at its epoch
        epochs = min(facts["epochs_per_execution"], t.epochs - epoch)
        return EpochStream(train_batches(epoch), epoch_rows, epochs, slack)

    def start_next_epoch(epoch: int) -> NextEpochBatches:
        # every worker is done with this epoch's batches before the clock moves on, so no sample
        # of this epoch is drawn with the next epoch's seed
        _barrier(world)
        return NextEpochBatches(lambda: train_batches(epoch))

    # the next epoch's actors may start during validation only where the cluster holds both
    # actor pools at once (else they would take the CPUs the validation actors wait for)
    overlap_validation = bool(facts.get("overlap_validation"))
    upcoming: NextEpochBatches | None = None
    stream: EpochStream | None = None
    for epoch in range(start_epoch, t.epochs):
        lr = scheduler.lr
        if facts.get("whole_run"):
            if stream is None or stream.epochs_left <= 0:  # the execution's epochs are done
                stream = stream_from(epoch)
            batches = stream.epoch()
        else:
            batches = upcoming.batches() if upcoming is not None else train_batches(epoch)
        upcoming = None
        try:
            stats = loop.train_one_epoch(
                model, tb.tap(batches), optimizer, loss_fn, device, doctor, epoch=epoch,
                grad_clip=t.grad_clip, amp=t.amp, channels_last=t.channels_last, scaler=scaler,
                ema=ema, mixup_alpha=0.0 if t.overfit_subset is not None else t.mixup_alpha,
                bn_stats_samples=t.bn_stats_samples if t.bn_stats == "precise" else 0,
            )
            _check_finite("a model weight or BatchNorm statistic",
                          loop.unwrap(model).state_dict().values(), doctor, epoch, stats, lr)
            _share_rank0_buffers(loop.unwrap(model), *([ema.module] if ema is not None else []))
            prefetch = (not facts.get("whole_run") and cfg.pipeline.prefetch_next_epoch
                        and epoch + 1 < t.epochs)
            if prefetch and overlap_validation:
                upcoming = start_next_epoch(epoch + 1)
            labels, logits = loop.predict(
                ema.module if ema is not None else loop.unwrap(model),
                torch_batches(val_shard, batch_size=per_worker_batch,
                              prefetch_batches=cfg.pipeline.prefetch_batches),
                device, amp=t.amp, channels_last=t.channels_last, tta=cfg.augment.tta,
            )
            labels, logits = gather_predictions(labels, logits)
            if prefetch and not overlap_validation:  # the validation actors are done: room now
                upcoming = start_next_epoch(epoch + 1)
            _check_finite("the validation output", [torch.from_numpy(logits)], doctor, epoch,
                          stats, lr)
        except TrainingDiverged as exc:
            report_divergence(str(exc), epoch, cfg, facts.get("run_dir"), rank)
            tb.close()
            return
        val, confusion = epoch_metrics(labels, logits, facts["class_names"], eval_loss_fn,
                                       t.threshold)
        metrics = {"epoch": epoch, "lr": lr, **stats, **val}
        metrics["images_per_s_total"] = _sum_over_workers(stats["images_per_s"], device)
        scheduler.step(metrics)
        history.append({**metrics, "val_confusion": confusion})
        tb.log_epoch(epoch, metrics)
        if rank == 0:
            # worker loggers are not configured; stdout reaches the driver's console. Written,
            # not printed: Ray Train's print in its workers also logs every line it prints
            # wherever Ray has wrapped the workers' stdout (it always has), so each came twice
            sys.stdout.write(epoch_line(metrics, t.epochs) + "\n")
            sys.stdout.flush()
        _report(metrics, history, rank, model, optimizer, scheduler, scaler, epoch, cfg, facts, ema)
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
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "model": {"name": cfg.model.name, "in_channels": cfg.preprocess.channels,
                  "num_classes": len(facts["class_names"])},
        "config": cfg.to_dict(),
        "data": facts.get("data", {}),
    }
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizer, scheduler, scaler, epoch, meta, ema)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:04d}",
        )
    # after the report, which has persisted the checkpoint: history.json never lists an epoch
    # that a restart would have to train again
    _write_history(facts.get("run_dir"), history)


def _write_history(run_dir: str | None, history: list) -> None:
    if run_dir:
        _write_run_file(run_dir, "history.json", json.dumps(history, indent=1, default=float))


def _write_run_file(run_dir: str, name: str, text: str) -> None:
    from raypipe.data.sources import get_filesystem, join_uri

    fs, path = get_filesystem(join_uri(run_dir, name))
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
