"""What the benchmarks share: their data (image folders, files cycled to a count), their config,
the training input fed as a training run feeds it, draining, and the memory a session uses."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from raypipe.config import Config, load_config
from raypipe.data.sources import DatasetSplit, Record, discover

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
KINDS = {"photo": ((320, 240), "RGB"), "film": ((1024, 1024), "L")}
# (images, seconds, seconds to the first batch) of one epoch
Epoch = tuple[int, float, float]


# ---------------------------------------------------------------- arguments


def at_least(low: int):
    """argparse type: a whole number of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least {low}")
        return value
    return parse


def add_pipeline_arguments(p: argparse.ArgumentParser, cache: str | None = "false") -> None:
    """How the data stage is sized: the ``pipeline.*`` keys a user sizes. ``cache``: the
    default of ``--cache``; None: no such option, the stage streams (``pipeline.cache=false``)."""
    p.add_argument("--cpus", type=float, default=None,
                   help="CPUs of the Ray Data stage: pipeline.workers = cpus / cpus-per-worker "
                        "tasks at a time (a DataLoader compared with it gets this many worker "
                        "processes); default: every CPU of the cluster")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="pipeline.cpus_per_worker")
    p.add_argument("--files-per-batch", type=at_least(1), default=32,
                   help="pipeline.files_per_batch: files per data task (one output block)")
    if cache is None:
        p.set_defaults(cache="false")
    else:
        p.add_argument("--cache", choices=["auto", "true", "false"], default=cache,
                       help="pipeline.cache: false streams every epoch from the files; true "
                            "decodes and resizes them once and augments from the object store "
                            "each epoch; auto: true when they fit a quarter of the object store")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here")


def add_data_arguments(p: argparse.ArgumentParser, images: int = 512, image_size: int = 128,
                       batch_size: int = 32, cache: str | None = "false") -> None:
    p.add_argument("--data", default=None,
                   help="folder-per-class images (default: ../shared/data/flowers-sample when "
                        "present, else synthetic JPEGs)")
    p.add_argument("--kind", choices=sorted(KINDS), default="photo",
                   help="synthetic images: 320x240 RGB photos or 1024x1024 grayscale films")
    p.add_argument("--synthetic", action="store_true",
                   help="use synthetic JPEGs even if real ones exist")
    p.add_argument("--images", type=at_least(1), default=images,
                   help="images per epoch (the files are cycled, each copy with its own "
                        "augmentation key)")
    p.add_argument("--image-size", type=int, default=image_size)
    p.add_argument("--batch-size", type=at_least(1), default=batch_size)
    add_pipeline_arguments(p, cache)


# ---------------------------------------------------------------- Ray and data


def ensure_ray(args: argparse.Namespace) -> None:
    """Join RAY_ADDRESS / an initialised session, or start a local Ray."""
    import ray

    from raypipe.cli import init_ray

    if ray.is_initialized():
        return
    kwargs = {"num_cpus": args.num_cpus} if getattr(args, "num_cpus", None) else {}
    init_ray(**kwargs)


def stage_cpus(args: argparse.Namespace) -> float:
    """``--cpus``, else every CPU of the cluster."""
    import ray

    if args.cpus is not None:
        return float(args.cpus)
    return float(ray.cluster_resources().get("CPU", 1.0))


def stage_workers(cpus: float, cpus_per_worker: float) -> int:
    """Data tasks at a time that ``cpus`` CPUs hold, at least 1."""
    return max(1, math.floor(cpus / cpus_per_worker + 1e-9))


def scratch_dir(prefix: str) -> str:
    """A new temporary folder, removed when this process exits (synthetic images, a
    benchmark's run storage)."""
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


def data_root(args: argparse.Namespace) -> str:
    if args.data:
        return args.data
    real = SHARED_DATA / ("flowers-sample" if args.kind == "photo" else "chest-xray-sample")
    if real.is_dir() and not args.synthetic:
        return str(real)
    return synthetic_folder(args.kind)


def pipeline_overrides(args: argparse.Namespace, cpus: float | None = None) -> list[str]:
    """``pipeline.*`` overrides from the arguments; ``cpus`` fixes the workers (else the
    config's ``auto``)."""
    out = [f"pipeline.cpus_per_worker={args.cpus_per_worker!r}",
           f"pipeline.files_per_batch={args.files_per_batch}", f"pipeline.cache={args.cache}"]
    if cpus is not None:
        out.append(f"pipeline.workers={stage_workers(cpus, args.cpus_per_worker)}")
    return out


def bench_config(args: argparse.Namespace, root: str, cpus: float | None,
                 extra: Iterable[str] = ()) -> Config:
    """The benchmarks' config: ``args``' images and data stage, augmentation on."""
    channels = 3 if args.kind == "photo" else 1
    return load_config(None, [
        f"data.root={root}", f"preprocess.image_size={args.image_size}",
        f"preprocess.channels={channels}", "preprocess.normalize=divide255", "augment.enabled=true",
        f"train.batch_size={args.batch_size}", *pipeline_overrides(args, cpus), *extra,
    ])


def cycled(records: list[Record], n: int) -> list[Record]:
    """``n`` records cycling through ``records`` with the classes interleaved (any prefix holds
    every class), each with its own key (so its own augmentation draw)."""
    by_label: dict[str, list[Record]] = {}
    for r in records:  # repr: a multi-label vector is a list
        by_label.setdefault(repr(r.label), []).append(r)
    groups = list(by_label.values())
    longest = max(len(g) for g in groups)
    order = [g[i % len(g)] for i in range(longest) for g in groups]
    picks = (order[i % len(order)] for i in range(n))
    return [Record(r.path, r.label, f"{i}:{r.key}") for i, r in enumerate(picks)]


def split_of(cfg: Config, n: int) -> DatasetSplit:
    """The dataset of ``cfg`` with ``n`` training images (all its files, cycled) and two
    validation images (so that building the validation set costs next to nothing)."""
    split = discover(cfg.data)
    files = split.train + split.val
    return dataclasses.replace(split, train=cycled(files, n), val=split.val[:2])


# ---------------------------------------------------------------- the training input


class TrainingFeed:
    """The training input of a one-worker training run, built and consumed as the run does:
    ``build_datasets``, the training set split for its worker by the run's ``DataConfig``
    (``pipeline.dataset_config``), then per epoch the clock set and one ``iter_torch_batches``
    pass (one Ray Data execution). ``build_s``: the time ``build_datasets`` took (with
    ``pipeline.cache``, the pass that decodes the files once). A context manager: on exit the
    pipeline's helper actors end, as a run ends them."""

    def __init__(self, cfg: Config, split: DatasetSplit):
        from raypipe.data import pipeline

        self.cfg = cfg
        workers = cfg.pipeline.workers
        t0 = time.perf_counter()
        self.data = pipeline.build_datasets(
            cfg, split, workers=None if workers == "auto" else int(workers))
        self.build_s = time.perf_counter() - t0
        shards = pipeline.dataset_config(cfg.pipeline.deterministic).configure(
            {"train": self.data.train}, world_size=1, worker_handles=None, worker_node_ids=None)
        self.shard = shards[0]["train"]

    def epoch(self, epoch: int, batch_size: int, **kwargs: Any) -> Iterator[dict]:
        """Epoch ``epoch``'s batches (``kwargs``: more of ``iter_torch_batches``' options)."""
        import ray

        ray.get(self.data.clock.set.remote(epoch))
        kwargs.setdefault("prefetch_batches", self.cfg.pipeline.prefetch_batches)
        return self.shard.iter_torch_batches(batch_size=batch_size, **kwargs)

    def __enter__(self) -> TrainingFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        from raypipe.data.pipeline import release

        release(self.data.ledger, self.data.clock)


def drain(batches: Iterable[dict]) -> Epoch:
    """(images, seconds, seconds to the first batch) for a no-op consumer of ``{"image", ...}``
    batches. The first batch's wait is the start-up (the execution, the first files)."""
    t0, n, first = time.perf_counter(), 0, None
    for b in batches:
        if first is None:
            first = time.perf_counter() - t0
        n += len(b["image"])
    return n, time.perf_counter() - t0, first or 0.0


def ray_epochs(cfg: Config, split: DatasetSplit, batch_size: int, epochs: int) -> list[Epoch]:
    """``epochs`` epochs of a new training feed, drained; the first epoch's time (and wait for
    its first batch) includes building the feed, as a run's first epoch waits for it."""
    t0 = time.perf_counter()
    with TrainingFeed(cfg, split) as feed:
        build = time.perf_counter() - t0
        out = []
        for e in range(epochs):
            n, seconds, first = drain(feed.epoch(e, batch_size))
            out.append((n, seconds + build, first + build) if e == 0 else (n, seconds, first))
    return out


# ---------------------------------------------------------------- memory


def session_memory() -> tuple[int, int]:
    """(bytes used by this process and its descendants, bytes of this process): proportional
    set size where the OS reports it (pages shared with the object store counted once), else
    resident size. The descendants are the whole Ray session when this process started Ray."""
    me = psutil.Process(os.getpid())
    total = mine = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        used = getattr(info, "pss", info.rss)
        total += used
        if p.pid == me.pid:
            mine = used
    return total, mine


class PeakSampler:
    """Context manager sampling :func:`session_memory` in a thread: ``peak`` (the session) and
    ``driver_peak`` (this process), in bytes."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self.driver_peak, self.samples = interval, 0, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        total, mine = session_memory()
        self.peak, self.driver_peak = max(self.peak, total), max(self.driver_peak, mine)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="PeakSampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


MIB = 2 ** 20
