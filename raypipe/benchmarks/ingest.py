"""ingest: images/s through the training input pipeline, Ray Data vs a torch DataLoader.

Both read the same files and apply the identical per-image work (read -> decode -> preprocess ->
augment) into batches of the same size, drained by a no-op consumer. The Ray side runs as a
one-worker training run runs it (:class:`~raypipe.benchmarks.common.TrainingFeed`):
``build_datasets``, the run's ``DataConfig`` split, and per epoch the clock set and one Ray Data
execution through ``iter_torch_batches``; each round builds its pipeline anew, as each training
run does, and that build counts in its first epoch. The DataLoader gets as many worker
processes as the Ray stage gets CPUs (``--cpus``). Both run ``--rounds`` times, alternating which
goes first. ``ratio`` compares all rounds' epochs, every start-up included (``round_ratios``:
each round's), ``cold_ratio`` the first epochs, ``steady_ratio`` everything after each round's
first batch; ``ray_cpu`` (:mod:`raypipe.benchmarks.cpu`) where the Ray side's CPU went.
``--cache false`` (the default) measures the streaming path, ``true`` the cached one (its decode
pass counts in each round's first epoch).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np

from raypipe.benchmarks.common import (
    Epoch,
    add_data_arguments,
    at_least,
    bench_config,
    data_root,
    drain,
    ensure_ray,
    ray_epochs,
    split_of,
    stage_cpus,
    stage_workers,
)
from raypipe.benchmarks.cpu import StageCpu
from raypipe.config import Config
from raypipe.data.sources import DatasetSplit

# what the per-image work imports: both sides' processes have it before the clock
STAGE_MODULES = ["torch", "raypipe.data.decode", "raypipe.data.transforms"]


# ---------------------------------------------------------------- DataLoader baseline


class FileDataset:
    """``torch.utils.data.Dataset`` doing exactly a Ray data task's per-image work on the
    training files of ``split`` in epoch ``epoch``."""

    def __init__(self, cfg: Config, split: DatasetSplit, epoch: int = 0):
        from raypipe.data.transforms import Augmenter, Preprocessor, TrainTransform

        self.records, self.fs = split.train, split.filesystem
        self.pre = Preprocessor(cfg.preprocess)
        aug = Augmenter(cfg.augment, cfg.train.seed) if cfg.augment.enabled else None
        self.train_tf = TrainTransform(self.pre, aug) if aug is not None else None
        self.gray = cfg.preprocess.channels == 1 and cfg.preprocess.threshold == "none"
        self.size, self.max_pixels = cfg.preprocess.image_size, cfg.data.max_pixels
        self.window, self.epoch = cfg.preprocess.window, epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from raypipe.data.decode import decode_image, value_range

        r = self.records[i]
        with self.fs.open_input_file(r.path) as f:
            img = decode_image(f.read(), max_pixels=self.max_pixels, gray=self.gray,
                               draft_size=self.size, window=self.window)
        if self.train_tf is not None:  # the same fused resize + augmentation as the data tasks
            x = self.train_tf(img, value_range(img), r.key, self.epoch)
        else:
            x = self.pre(img, value_range(img))
        return {"image": np.ascontiguousarray(x.transpose(2, 0, 1), np.float32), "label": r.label}


@functools.cache
def loader_context():
    """Where the DataLoader's worker processes come from. This process runs Ray's threads, and a
    process forked from it can inherit a lock one of them held and wait on it forever. A fork
    server is a fresh process without them, started once (here, before any clock) with the
    per-image modules imported, so its forked workers start as cheaply as plain forks."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*STAGE_MODULES, __name__])
    warm = ctx.Process(target=int)
    warm.start()
    warm.join()
    return ctx


def dataloader_epoch(cfg: Config, split: DatasetSplit, batch_size: int, workers: int,
                     epoch: int) -> Epoch:
    import torch

    loader = torch.utils.data.DataLoader(
        FileDataset(cfg, split, epoch), batch_size=batch_size, shuffle=True, num_workers=workers,
        prefetch_factor=2 if workers else None,
        multiprocessing_context=loader_context() if workers else None)
    return drain(loader)


# ---------------------------------------------------------------- warming


def warm_cluster(workers: int = 0, cpus_per_worker: float = 1.0) -> list[int]:
    """Before any clock: what a running cluster already has when a job starts, and what the
    DataLoader's side has before its first epoch. A fresh local Ray starts Ray Data's
    cluster-wide helper actors at its first execution, and this process imports Ray Data's
    executor then: one execution of one row does that here. torch is imported here too (both
    sides hand over torch tensors). Then ``workers`` task worker processes import the per-image
    modules, as the DataLoader's fork server has (:func:`loader_context`); each task waits for
    all the others to have started, so that each runs in a process of its own. Returns their
    pids."""
    import ray
    import torch  # noqa: F401

    ray.data.range(1).materialize()
    if workers <= 0:
        return []
    arrivals = ray.remote(num_cpus=0)(Arrivals).remote()
    ready = ray.remote(_import_stage).options(num_cpus=cpus_per_worker)
    try:
        return ray.get([ready.remote(arrivals, workers) for _ in range(workers)])
    finally:
        ray.kill(arrivals)


class Arrivals:
    """How many of :func:`warm_cluster`'s tasks have started (a Ray actor there)."""

    def __init__(self) -> None:
        self.n = 0

    def arrive(self) -> None:
        self.n += 1

    def count(self) -> int:
        return self.n


def _import_stage(arrivals, workers: int, timeout_s: float = 60.0) -> int:
    """Import the per-image modules, then wait (at most ``timeout_s``: the cluster may not hold
    them all at once) until all ``workers`` tasks have."""
    import importlib

    import ray

    for name in [*STAGE_MODULES, "raypipe.data.pipeline"]:
        importlib.import_module(name)
    ray.get(arrivals.arrive.remote())
    deadline = time.monotonic() + timeout_s
    while ray.get(arrivals.count.remote()) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()


# ---------------------------------------------------------------- the benchmark


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, cache="false")
    p.add_argument("--epochs", type=at_least(1), default=8,
                   help="epochs of each per round; the ratio is over all of them, every start-up "
                        "included (the first epoch alone: cold_ratio)")
    p.add_argument("--rounds", type=at_least(1), default=3,
                   help="rounds of both, each --epochs long, alternating which runs first; ratio "
                        "is over all rounds together (each side's images over its seconds), "
                        "round_ratios each round's")


def rate(times: list[Epoch]) -> float:
    """Images per second over the given epochs."""
    return sum(t[0] for t in times) / max(sum(t[1] for t in times), 1e-9)


def steady_rate(runs: list[list[Epoch]], batch_size: int) -> float:
    """Images per second over the given runs' epochs, each run after its first epoch's first
    batch (the run's start-up)."""
    images = sum(sum(t[0] for t in times) - min(batch_size, times[0][0]) for times in runs)
    return images / max(sum(sum(t[1] for t in times) - times[0][2] for times in runs), 1e-9)


def run(args: argparse.Namespace) -> dict:
    ensure_ray(args)
    root = data_root(args)
    cpus = stage_cpus(args)
    workers = stage_workers(cpus, args.cpus_per_worker)
    loader_workers = max(1, round(cpus))
    cfg = bench_config(args, root, cpus)
    split = split_of(cfg, args.images)
    loader_context()
    warm_cluster(workers, args.cpus_per_worker)
    stage = StageCpu(workers * args.cpus_per_worker)  # where the Ray side's CPU goes

    def ray_side() -> list[Epoch]:
        with stage:
            return ray_epochs(cfg, split, args.batch_size, args.epochs)

    def dataloader_side() -> list[Epoch]:
        return [dataloader_epoch(cfg, split, args.batch_size, loader_workers, e)
                for e in range(args.epochs)]

    ray_rounds: list[list[Epoch]] = []
    dl_rounds: list[list[Epoch]] = []
    sides = [(ray_rounds, ray_side), (dl_rounds, dataloader_side)]
    for r in range(args.rounds):  # alternate which goes first, so that drift hits both alike
        for rounds, side in sides if r % 2 == 0 else sides[::-1]:
            rounds.append(side())
    return _result(args, root, workers, loader_workers, ray_rounds, dl_rounds, stage.summary())


def _result(args: argparse.Namespace, root: str, workers: int, loader_workers: int,
            ray_rounds: list[list[Epoch]], dl_rounds: list[list[Epoch]], cpu: dict) -> dict:
    ray_times = [t for times in ray_rounds for t in times]
    dl_times = [t for times in dl_rounds for t in times]
    ray_ips, dl_ips = rate(ray_times), rate(dl_times)
    round_ratios = [rate(a) / rate(b) for a, b in zip(ray_rounds, dl_rounds, strict=True)]
    # the first epoch of each round: the pipeline's build and the first execution's start
    cold_ratio = rate([t[0] for t in ray_rounds]) / rate([t[0] for t in dl_rounds])
    ray_steady = steady_rate(ray_rounds, args.batch_size)
    dl_steady = steady_rate(dl_rounds, args.batch_size)
    ray_first, dl_first = [t[0][2] for t in ray_rounds], [t[0][2] for t in dl_rounds]
    ray_startup, dl_startup = float(np.mean(ray_first)), float(np.mean(dl_first))
    return {
        "benchmark": "ingest", "data": root, "images": args.images, "image_size": args.image_size,
        "batch_size": args.batch_size, "cpus": workers * args.cpus_per_worker,
        "cpu_count": os.cpu_count(), "ray_workers": workers,
        "cpus_per_worker": args.cpus_per_worker, "files_per_batch": args.files_per_batch,
        "cache": args.cache, "dataloader_workers": loader_workers, "epochs": args.epochs,
        "rounds": args.rounds,
        "ray_images": sum(t[0] for t in ray_times), "dataloader_images": sum(t[0] for t in dl_times),
        "ray_images_per_s": ray_ips, "dataloader_images_per_s": dl_ips, "ratio": ray_ips / dl_ips,
        "round_ratios": round_ratios, "median_round_ratio": float(np.median(round_ratios)),
        "cold_ratio": cold_ratio,
        "ray_startup_s": ray_startup, "dataloader_startup_s": dl_startup,
        "ray_first_batch_s": ray_first, "dataloader_first_batch_s": dl_first,
        "ray_steady_images_per_s": ray_steady, "dataloader_steady_images_per_s": dl_steady,
        "steady_ratio": ray_steady / dl_steady,
        "ray_epoch_s": [t[1] for t in ray_times], "dataloader_epoch_s": [t[1] for t in dl_times],
        "target_ratio": 1.0, "ray_cpu": cpu,
        "table": [{"pipeline": "ray_data", "images_per_s": ray_ips,
                   "run_s": sum(t[1] for t in ray_times), "first_batch_s": ray_startup,
                   "steady_images_per_s": ray_steady},
                  {"pipeline": "torch_dataloader", "images_per_s": dl_ips,
                   "run_s": sum(t[1] for t in dl_times), "first_batch_s": dl_startup,
                   "steady_images_per_s": dl_steady},
                  {"pipeline": "ratio ray/dataloader", "images_per_s": ray_ips / dl_ips,
                   "steady_images_per_s": ray_steady / dl_steady},
                  {"pipeline": "ratio, each round",
                   "rounds": " / ".join(f"{x:.3f}" for x in round_ratios),
                   "median": float(np.median(round_ratios))},
                  {"pipeline": "ratio, first epochs", "images_per_s": cold_ratio},
                  {"ray_stage_cpus": "busy / waiting for a CPU / idle", "busy": cpu["lane_busy"],
                   "cpu_wait": cpu["lane_cpu_wait"], "idle": cpu["lane_idle"],
                   "driver_cores": cpu["driver_cores"],
                   "ray_system_cores": cpu["ray_system_cores"]}],
    }
