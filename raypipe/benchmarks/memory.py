"""memory: peak memory of the whole Ray session while streaming one epoch of N, then 10·N images.

Memory is sampled every ``--interval`` seconds over the driver and every process it started
(GCS, raylet, object store, workers and data actors when this driver started Ray): proportional set
size where the OS reports it (shared object-store pages counted once), else resident size.
Streaming means the 10·N peak stays within 1.2x of the N peak. One unmeasured epoch runs first,
so that both measured epochs start with the same pool of idle Ray worker processes.

``--many-epochs``: the large run is instead ``--factor`` epochs of the same N images through one
execution, as training runs them with ``pipeline.one_execution``: the stream runs ahead of its
consumer across epochs, so this checks that running ahead stays within the same bound.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import psutil

from raypipe.benchmarks.ingest import (
    add_data_arguments,
    bench_config,
    data_root,
    ensure_ray,
    ray_epoch,
    ray_run,
    split_of,
)


def session_memory() -> int:
    """Bytes used by this process and its descendants (PSS when available)."""
    me = psutil.Process(os.getpid())
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class PeakSampler:
    """Context manager sampling :func:`session_memory` in a thread; ``.peak`` in bytes."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, session_memory())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, session_memory())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, images=500)
    p.add_argument("--factor", type=int, default=10, help="the large epoch is factor x --images")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    p.add_argument("--many-epochs", action="store_true",
                   help="the large run is factor epochs of --images through one execution "
                        "(pipeline.one_execution) instead of one epoch of factor x --images")


def run(args) -> dict:
    ensure_ray(args)
    cfg = bench_config(args, data_root(args))
    # an unmeasured epoch first: Ray keeps the worker processes it started idle in its pool, so
    # without it the first measured epoch would start from a smaller session than the second
    ray_epoch(cfg, split_of(cfg, args.images), args.batch_size)
    rows = []
    for large in (False, True):
        time.sleep(1.0)  # let the previous epoch's actors exit before the baseline
        base = session_memory()
        with PeakSampler(args.interval) as s:
            if large and args.many_epochs:
                epochs = ray_run(cfg, split_of(cfg, args.images), args.batch_size, args.factor)
                got, seconds = sum(e[0] for e in epochs), sum(e[1] for e in epochs)
            else:
                n = args.factor * args.images if large else args.images
                got, seconds, _ = ray_epoch(cfg, split_of(cfg, n), args.batch_size)
        rows.append({"images": got, "baseline_mib": base / 2**20, "peak_mib": s.peak / 2**20,
                     "rise_mib": (s.peak - base) / 2**20, "samples": s.samples, "run_s": seconds})
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    return {
        "benchmark": "memory", "large_run": f"{args.factor} epochs of {args.images} images, one "
        "execution" if args.many_epochs else f"one epoch of {args.factor} x {args.images} images",
        "images_small": rows[0]["images"], "images_large": rows[1]["images"],
        "peak_small_mib": rows[0]["peak_mib"], "peak_large_mib": rows[1]["peak_mib"],
        "peak_ratio": ratio, "target_ratio_max": 1.2, "image_size": args.image_size,
        "scope": "driver and its descendant processes (the whole session when this driver started Ray)",
        "table": rows + [{"images": "ratio large/small", "peak_mib": ratio}],
    }
