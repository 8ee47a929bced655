"""scaling: epoch time of the Ray training input pipeline at N, 2N and 4N images; the fitted
slope (seconds per image) and R² of a straight line through them (cost should grow linearly).

Each epoch is a new pipeline, built and run as a training run's first epoch
(:func:`~raypipe.benchmarks.common.ray_epochs`). Before the clock the cluster is warmed as
``ingest`` warms it (:func:`~raypipe.benchmarks.ingest.warm_cluster`): otherwise the first size
alone pays for starting Ray Data's cluster-wide helper actors and importing torch, and the line
through three points bends at its first. Each size runs ``--repeats`` times, the sizes in turn,
and the fastest epoch of each counts (best of, as timing benchmarks take)."""

from __future__ import annotations

import argparse

import numpy as np

from raypipe.benchmarks.common import (
    add_data_arguments,
    at_least,
    bench_config,
    data_root,
    ensure_ray,
    ray_epochs,
    split_of,
    stage_cpus,
    stage_workers,
)
from raypipe.benchmarks.ingest import warm_cluster


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, R²) of the least-squares line y = slope * x + intercept."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (slope * xs + intercept)
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return float(slope), float(intercept), r2


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, images=256)
    p.add_argument("--multiples", type=at_least(1), nargs="+", default=[1, 2, 4],
                   help="epoch sizes in N")
    p.add_argument("--repeats", type=at_least(1), default=2,
                   help="epochs of each size, the sizes in turn; the fastest of each counts")


def run(args: argparse.Namespace) -> dict:
    ensure_ray(args)
    cpus = stage_cpus(args)
    cfg = bench_config(args, data_root(args), cpus)
    splits = [split_of(cfg, m * args.images) for m in args.multiples]
    warm_cluster(stage_workers(cpus, args.cpus_per_worker), args.cpus_per_worker)
    times: list[list[float]] = [[] for _ in splits]
    images = [0] * len(splits)
    for _ in range(args.repeats):  # sizes in turn, so that machine noise hits each alike
        for i, split in enumerate(splits):
            images[i], seconds, _ = ray_epochs(cfg, split, args.batch_size, 1)[0]
            times[i].append(seconds)
    rows = [{"images": n, "epoch_s": min(t), "images_per_s": n / min(t), "epochs_s": t}
            for n, t in zip(images, times, strict=True)]
    slope, intercept, r2 = linear_fit([r["images"] for r in rows], [r["epoch_s"] for r in rows])
    return {
        "benchmark": "scaling", "points": rows, "slope_s_per_image": slope,
        "intercept_s": intercept, "r2": r2,
        "marginal_images_per_s": 1.0 / slope if slope > 0 else None,
        "workers": cfg.pipeline.workers, "cache": args.cache,
        "table": [{k: v for k, v in r.items() if k != "epochs_s"} for r in rows]
        + [{"images": "fit", "slope_s_per_image": slope, "intercept_s": intercept, "r2": r2}],
    }
