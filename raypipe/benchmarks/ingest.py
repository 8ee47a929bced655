"""ingest: images/s through the training input pipeline, Ray Data vs a torch DataLoader.

Both read the same files and apply the identical per-image work (read -> decode -> preprocess ->
augment) into batches of the same size, drained by a no-op consumer; the DataLoader gets as many
worker processes as the Ray pipeline gets CPUs. The Ray pipeline runs as a training run runs it:
every epoch through one execution (``pipeline.one_execution``, the default), or built once and
run once per epoch. Both run ``--rounds`` times, alternating which goes first. ``ratio``
compares all rounds' epochs, every start-up included (``round_ratios``: each round's),
``cold_ratio`` the first epochs (where Ray starts its worker processes or actors),
``steady_ratio`` everything after each round's first batch; ``ray_cpu``
(:mod:`raypipe.benchmarks.cpu`) where the Ray side's CPU went. This module also holds the
helpers the other benchmarks share (image folders, configs, record lists, draining).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from raypipe.benchmarks.cpu import StageCpu
from raypipe.config import Config, load_config
from raypipe.data.sources import DatasetSplit, Record, discover

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
KINDS = {"photo": ((320, 240), "RGB"), "film": ((1024, 1024), "L")}
# what the per-image work imports: both sides' processes have it before the clock
STAGE_MODULES = ["torch", "raypipe.data.decode", "raypipe.data.transforms"]


# ---------------------------------------------------------------- shared helpers


def add_data_arguments(p: argparse.ArgumentParser, images: int = 512, image_size: int = 128,
                       batch_size: int = 32, actors: int = 2, compute: str = "actors") -> None:
    p.add_argument("--data", default=None,
                   help="folder-per-class images (default: ../shared/data/flowers-sample when present, "
                        "else synthetic JPEGs)")
    p.add_argument("--kind", choices=sorted(KINDS), default="photo",
                   help="synthetic images: 320x240 RGB photos or 1024x1024 grayscale films")
    p.add_argument("--synthetic", action="store_true", help="use synthetic JPEGs even if real ones exist")
    p.add_argument("--images", type=int, default=images, help="images per epoch (files are cycled)")
    p.add_argument("--image-size", type=int, default=image_size)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--actors", type=int, default=actors,
                   help="CPUs of the Ray Data stage, one actor or task each (ingest: see "
                        "--lanes-per-cpu); the DataLoader gets as many workers")
    p.add_argument("--ray-data-batch", type=int, default=32,
                   help="pipeline.train.batch_size: files per part of a block at least (parts "
                        "grow to fill one output block), and the first blocks' size")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here")
    p.add_argument("--compute", choices=["auto", "actors", "tasks"], default=compute,
                   help="how the Ray Data stage runs (pipeline.train.compute); auto: as training "
                        "runs it, tasks on a cluster without GPUs and actors on one with GPUs")


def ensure_ray(args) -> None:
    """Join RAY_ADDRESS / an initialised session, or start a local Ray."""
    import ray

    from raypipe.cli import init_ray

    if ray.is_initialized():
        return
    kwargs = {"num_cpus": args.num_cpus} if getattr(args, "num_cpus", None) else {}
    init_ray(**kwargs)


def scratch_dir(prefix: str) -> str:
    """A new temporary folder, removed when this process exits (synthetic images, a benchmark's
    run storage): each benchmark run left its own behind, up to a few hundred MiB of checkpoints."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def synthetic_folder(kind: str, n_per_class: int = 16, seed: int = 0) -> str:
    """A temp folder-per-class dataset of realistic JPEGs (smooth structure plus noise), made
    once per process and removed when it exits."""
    from PIL import Image

    (w, h), mode = KINDS[kind]
    root = Path(scratch_dir(f"raypipe-bench-{kind}-"))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k, cls in enumerate(("a", "b")):
        (root / cls).mkdir()
        for i in range(n_per_class):
            fx, fy = rng.uniform(2, 12, 2)
            base = 127 + 60 * np.sin(xx / w * fx * (k + 1)) * np.cos(yy / h * fy)
            chans = 3 if mode == "RGB" else 1
            arr = base[..., None] + rng.normal(0, 20, (h, w, chans))
            arr = np.clip(arr, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)
            img.save(root / cls / f"{i:03d}.jpg", quality=90)
    return str(root)


def data_root(args) -> str:
    if args.data:
        return args.data
    real = SHARED_DATA / ("flowers-sample" if args.kind == "photo" else "chest-xray-sample")
    if real.is_dir() and not args.synthetic:
        return str(real)
    return synthetic_folder(args.kind)


def bench_config(args, root: str, extra: list[str] = ()) -> Config:
    """The benchmarks' config: ``args.actors`` CPUs for the Ray Data stage, cut into
    ``args.lanes_per_cpu`` tasks or actors per CPU (where a benchmark has that option; else one)."""
    channels = 3 if args.kind == "photo" else 1
    per_cpu = getattr(args, "lanes_per_cpu", 1)
    lanes = args.actors * per_cpu
    return load_config(None, [
        f"data.root={root}", f"preprocess.image_size={args.image_size}", f"preprocess.channels={channels}",
        "preprocess.normalize=divide255", "augment.enabled=true",
        f"pipeline.train={{min_actors: {lanes}, max_actors: {lanes}, cpus_per_actor: {1 / per_cpu!r}, "
        f"batch_size: {args.ray_data_batch}, compute: {args.compute}}}",
        f"pipeline.blocks={max(8, 4 * args.actors)}", f"train.batch_size={args.batch_size}", *extra,
    ])


def training_config(args, root: str, extra: list[str] = ()) -> Config:
    """:func:`bench_config` with ``--compute auto`` made what a training run on this cluster
    resolves it to (tasks without GPUs, actors with)."""
    import ray

    from raypipe.data.pipeline import resolve_compute

    return resolve_compute(bench_config(args, root, extra),
                           use_gpu=ray.cluster_resources().get("GPU", 0) > 0)


def cycled(records: list[Record], n: int) -> list[Record]:
    """``n`` records cycling through ``records`` with the classes interleaved (any prefix holds
    every class), each with its own key (so its own augmentation draw)."""
    by_label: dict[int, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    groups = list(by_label.values())
    longest = max(len(g) for g in groups)
    order = [g[i % len(g)] for i in range(longest) for g in groups]
    picks = (order[i % len(order)] for i in range(n))
    return [Record(r.path, r.label, f"{i}:{r.key}") for i, r in enumerate(picks)]


def split_of(cfg: Config, n: int) -> DatasetSplit:
    split = discover(cfg.data)
    files = split.train + split.val
    return DatasetSplit(split.filesystem, split.class_names, cycled(files, n), split.val[:2], split.source)


def drain(batches) -> tuple[int, float, float]:
    """(images, seconds, seconds to the first batch) for a no-op consumer of ``{"image", ...}``
    batches. The first batch's wait is the start-up (worker processes, imports, first files)."""
    t0, n, first = time.perf_counter(), 0, None
    for b in batches:
        if first is None:
            first = time.perf_counter() - t0
        n += len(b["image"])
    return n, time.perf_counter() - t0, first or 0.0


def training_pipeline(cfg: Config, split: DatasetSplit, whole_run: bool = False):
    """(dataset, epoch clock, bad-file ledger): the Ray training pipeline alone. Its validation set
    is not preprocessed ahead of time (``pipeline.cache_val_mb=0``), so nothing runs before the
    benchmark's clock starts. ``whole_run``: all ``train.epochs`` epochs in one execution. Once
    done with it, ``pipeline.release(ledger, clock)`` ends those two actors, as a
    training run does: the task processes that ran its batches keep handles to them, so each
    pipeline built in a benchmark's process left two idle actor processes for the rest of it
    (counted in ``memory``'s later peaks)."""
    from raypipe.data import pipeline

    cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"cache_val_mb": 0})})
    # one consumer: every epoch holds every training file
    train, _, ledger, clock = pipeline.build_datasets(cfg, split, whole_run=whole_run, world=1)
    return train, clock, ledger


def drain_epochs(batches, n: int, epochs: int) -> list[tuple[int, float, float]]:
    """:func:`drain` for a stream of ``epochs`` epochs of ``n`` images each, cut by row count
    as a training worker cuts it (:class:`~raypipe.training.worker.EpochStream`): each epoch's
    (images, seconds, seconds to its first batch), timed from the end of the epoch before."""
    from raypipe.training.worker import EpochStream

    stream = EpochStream(batches, n, epochs)
    return [drain(stream.epoch()) for _ in range(epochs)]


def ray_run(cfg: Config, split: DatasetSplit, batch_size: int,
            epochs: int) -> list[tuple[int, float, float]]:
    """``epochs`` epochs of the Ray training pipeline streamed through one execution, as a
    training run with ``pipeline.one_execution`` runs it; per epoch, see :func:`drain_epochs`."""
    import ray

    from raypipe.data.pipeline import epochs_per_execution, release, torch_batches

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    train, clock, ledger = training_pipeline(cfg, split, whole_run=True)
    per_run, out = epochs_per_execution(cfg, len(split.train)), []
    try:
        for first in range(0, epochs, per_run):  # one execution, unless over one_execution_max_rows
            ray.get(clock.set.remote(first))
            out += drain_epochs(torch_batches(train, batch_size=batch_size,
                                              prefetch_batches=cfg.pipeline.prefetch_batches),
                                len(split.train), min(per_run, epochs - first))
    finally:
        release(ledger, clock)
    return out


def ray_epoch(cfg: Config, split: DatasetSplit, batch_size: int, built=None,
              epoch: int = 0) -> tuple[int, float, float]:
    """One epoch of the Ray training pipeline (with augmentation), drained; see :func:`drain`.
    ``built``: a :func:`training_pipeline` to run again (as a training run runs its pipeline once
    per epoch), else a new one."""
    import ray

    from raypipe.data.pipeline import release, torch_batches

    train, clock, ledger = built or training_pipeline(cfg, split)
    try:
        ray.get(clock.set.remote(epoch))
        return drain(torch_batches(train, batch_size=batch_size,
                                   prefetch_batches=cfg.pipeline.prefetch_batches))
    finally:
        if built is None:  # a pipeline run again is the caller's to release
            release(ledger, clock)


# ---------------------------------------------------------------- DataLoader baseline


class FileDataset:
    """``torch.utils.data.Dataset`` doing exactly the Ray actors' per-image work."""

    def __init__(self, cfg: Config, split: DatasetSplit, epoch: int = 0):
        from raypipe.data.transforms import Augmenter, Preprocessor, TrainTransform

        self.records, self.fs = split.train, split.filesystem
        self.pre = Preprocessor(cfg.preprocess)
        aug = Augmenter(cfg.augment, cfg.train.seed) if cfg.augment.enabled else None
        self.train_tf = TrainTransform(self.pre, aug) if aug is not None else None
        self.gray = cfg.preprocess.channels == 1 and cfg.preprocess.threshold == "none"
        self.size, self.max_pixels, self.epoch = cfg.preprocess.image_size, cfg.data.max_pixels, epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from raypipe.data.decode import decode_image, value_range

        r = self.records[i]
        with self.fs.open_input_file(r.path) as f:
            img = decode_image(f.read(), max_pixels=self.max_pixels, gray=self.gray, draft_size=self.size)
        if self.train_tf is not None:  # the same fused resize + augmentation as the Ray actors
            x = self.train_tf(img, value_range(img), r.key, self.epoch)
        else:
            x = self.pre(img, value_range(img))
        return {"image": np.ascontiguousarray(x.transpose(2, 0, 1), np.float32), "label": r.label}


@functools.cache
def loader_context():
    """Where the DataLoader's worker processes come from. This process runs Ray's threads, and a
    process forked from it can inherit a lock one of them held and wait on it forever (a default,
    forked DataLoader once hung here for 15 minutes after three epochs). A fork server is a fresh
    process without them, started once with the per-image modules imported, so its forked workers
    start as cheaply as plain forks. The server is started here, before any clock runs, as the
    forking parent was ready before."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*STAGE_MODULES, __name__])
    warm = ctx.Process(target=int)
    warm.start()
    warm.join()
    return ctx


def warm_cluster(pool=None) -> list[int]:
    """Before any clock: what a running cluster already has when a job starts, and what the
    DataLoader's side has before its first epoch. A fresh local Ray starts Ray Data's
    cluster-wide helper actors (its autoscaling coordinator and stats actor: detached, started
    once per cluster) at its first execution, and the process imports Ray Data's executor then;
    one execution of one row does that here. torch is imported here too: both pipelines hand
    over torch tensors, and the Ray pipeline's first epoch used to pay its import (about 1.2 s)
    where the DataLoader, run second, found it done.

    ``pool`` (the stage's :class:`~raypipe.config.ActorPool`): each of its lanes' worker
    processes imports the per-image modules too, as the DataLoader's fork server has
    (:func:`loader_context`). The pipeline's datasets were once built with ``from_arrow``, whose
    metadata tasks happened to import Ray Data in every lane's process before the clock; without
    them the first round's first batch took 0.55-0.59 s instead of 0.23-0.24 s. Returns the processes
    (pids) that did."""
    import ray
    import torch  # noqa: F401

    ray.data.range(1).materialize()
    if pool is None:
        return []
    # held together, so that each lane's task runs in a process of its own
    ready = ray.remote(_import_stage).options(num_cpus=pool.cpus_per_actor)
    return ray.get([ready.remote(0.5) for _ in range(pool.max_actors)])


def _import_stage(hold_s: float) -> int:
    import importlib

    for name in [*STAGE_MODULES, "raypipe.data.pipeline"]:
        importlib.import_module(name)
    time.sleep(hold_s)
    return os.getpid()


def dataloader_epoch(cfg: Config, split: DatasetSplit, batch_size: int,
                     workers: int) -> tuple[int, float, float]:
    import torch

    loader = torch.utils.data.DataLoader(FileDataset(cfg, split), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, prefetch_factor=2 if workers else None,
                                         multiprocessing_context=loader_context() if workers else None)
    return drain(loader)


# ---------------------------------------------------------------- the benchmark


def at_least_one(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, compute="auto")
    p.add_argument("--epochs", type=int, default=8,
                   help="epochs of each; the ratio is over all of them, every start-up included "
                        "(the first epoch alone: cold_ratio)")
    p.add_argument("--lanes-per-cpu", type=int, default=1,
                   help="Ray Data tasks (or actors) per CPU of the stage, each with 1/k CPU (the "
                        "shipped configs give each 0.5 CPU). 2 lanes per CPU hide Ray Data's "
                        "scheduling gaps on epochs of thousands of images and cost on small ones "
                        "(docs/performance-log.md). The DataLoader keeps one worker per CPU, its "
                        "fastest setting here")
    p.add_argument("--one-execution", choices=["true", "false"], default="true",
                   help="pipeline.one_execution: every epoch through one Ray Data execution, as "
                        "training runs it (true, the default), or one execution per epoch")
    p.add_argument("--rounds", type=at_least_one, default=3,
                   help="rounds of both, each --epochs long, alternating which runs first (with "
                        "--one-execution false: epoch by epoch); ratio is over all rounds together "
                        "(each side's images over its seconds), round_ratios each round's")


def rate(times: list[tuple[int, float, float]]) -> float:
    """Images per second over the given epochs of (images, seconds, first batch)."""
    return sum(t[0] for t in times) / max(sum(t[1] for t in times), 1e-9)


def steady_rate(runs: list[list[tuple[int, float, float]]], batch_size: int) -> float:
    """Images per second over the given runs' epochs, each run after its first epoch's first
    batch (the run's start-up)."""
    images = sum(sum(t[0] for t in times) - min(batch_size, times[0][0]) for times in runs)
    return images / max(sum(sum(t[1] for t in times) - times[0][2] for times in runs), 1e-9)


def run(args) -> dict:
    from raypipe.data.pipeline import release

    ensure_ray(args)
    root = data_root(args)
    cfg = training_config(args, root, [f"pipeline.one_execution={args.one_execution}"])
    one_execution = cfg.pipeline.one_execution
    pool = cfg.pipeline.train
    split = split_of(cfg, args.images)
    loader_context()
    warm_cluster(pool)
    stage = StageCpu(pool.max_actors * pool.cpus_per_actor)  # where the Ray side's CPU goes
    built = None if one_execution else training_pipeline(cfg, split)  # per epoch: built once

    def ray_side() -> list[tuple[int, float, float]]:
        # every epoch in one execution, a new one each round as each training run has its own
        with stage:
            return ray_run(cfg, split, args.batch_size, args.epochs)

    def dataloader_side() -> list[tuple[int, float, float]]:
        return [dataloader_epoch(cfg, split, args.batch_size, args.actors) for _ in range(args.epochs)]

    ray_rounds, dl_rounds = [], []
    sides = [(ray_rounds, ray_side), (dl_rounds, dataloader_side)]
    for r in range(args.rounds):  # alternate which goes first, so that drift hits both alike
        if one_execution:
            for rounds, side in sides if r % 2 == 0 else sides[::-1]:
                rounds.append(side())
        else:  # one execution per epoch: alternate epoch by epoch
            ray_times, dl_times = [], []
            for epoch in range(args.epochs):
                with stage:
                    ray_times.append(ray_epoch(cfg, split, args.batch_size, built, epoch))
                dl_times.append(dataloader_epoch(cfg, split, args.batch_size, args.actors))
            ray_rounds.append(ray_times)
            dl_rounds.append(dl_times)
    if built is not None:
        release(*built[1:])
    cpu = stage.summary()
    ray_times = [t for times in ray_rounds for t in times]
    dl_times = [t for times in dl_rounds for t in times]
    # every round whole, every start-up included: what training runs of these epochs get. (Not
    # the best epoch: one execution hands over blocks of up to pipeline.block_rows rows, so
    # epochs cut by row count borrow rows from each other; only their sum is a fair time)
    ray_ips, dl_ips = rate(ray_times), rate(dl_times)
    round_ratios = [rate(a) / rate(b) for a, b in zip(ray_rounds, dl_rounds, strict=True)]
    # the first epoch of each round: Ray's worker processes (or actors) and their imports start there
    cold_ratio = rate([t[0] for t in ray_rounds]) / rate([t[0] for t in dl_rounds])
    # after each round's first batch: throughput once the workers run
    ray_steady, dl_steady = steady_rate(ray_rounds, args.batch_size), steady_rate(dl_rounds, args.batch_size)
    ray_first = [t[0][2] for t in ray_rounds]
    dl_first = [t[0][2] for t in dl_rounds]
    ray_startup, dl_startup = float(np.mean(ray_first)), float(np.mean(dl_first))
    return {
        "benchmark": "ingest", "data": root, "images": args.images, "image_size": args.image_size,
        "batch_size": args.batch_size, "cpus": args.actors, "cpu_count": os.cpu_count(),
        "ray_lanes": pool.max_actors, "dataloader_workers": args.actors, "epochs": args.epochs,
        "rounds": args.rounds,
        "ray_images": sum(t[0] for t in ray_times), "dataloader_images": sum(t[0] for t in dl_times),
        "ray_images_per_s": ray_ips, "dataloader_images_per_s": dl_ips, "ratio": ray_ips / dl_ips,
        "round_ratios": round_ratios, "median_round_ratio": float(np.median(round_ratios)),
        "cold_ratio": cold_ratio, "compute": pool.compute,
        "one_execution": one_execution,
        "ray_startup_s": ray_startup, "dataloader_startup_s": dl_startup,
        "ray_first_batch_s": ray_first, "dataloader_first_batch_s": dl_first,
        "ray_steady_images_per_s": ray_steady, "dataloader_steady_images_per_s": dl_steady,
        "steady_ratio": ray_steady / dl_steady,
        "ray_epoch_s": [t[1] for t in ray_times], "dataloader_epoch_s": [t[1] for t in dl_times],
        "target_ratio": 1.0, "ray_cpu": cpu,
        "table": [{"pipeline": "ray_data", "images_per_s": ray_ips, "run_s": sum(t[1] for t in ray_times),
                   "first_batch_s": ray_startup, "steady_images_per_s": ray_steady},
                  {"pipeline": "torch_dataloader", "images_per_s": dl_ips,
                   "run_s": sum(t[1] for t in dl_times), "first_batch_s": dl_startup,
                   "steady_images_per_s": dl_steady},
                  {"pipeline": "ratio ray/dataloader", "images_per_s": ray_ips / dl_ips,
                   "steady_images_per_s": ray_steady / dl_steady},
                  {"pipeline": "ratio, each round", "rounds": " / ".join(f"{x:.3f}" for x in round_ratios),
                   "median": float(np.median(round_ratios))},
                  {"pipeline": "ratio, first epochs", "images_per_s": cold_ratio},
                  {"ray_stage_cpus": "busy / waiting for a CPU / idle", "busy": cpu["lane_busy"],
                   "cpu_wait": cpu["lane_cpu_wait"], "idle": cpu["lane_idle"],
                   "driver_cores": cpu["driver_cores"], "ray_system_cores": cpu["ray_system_cores"]}],
    }
