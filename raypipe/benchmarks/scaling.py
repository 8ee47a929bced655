"""scaling: epoch time of the Ray training input pipeline at N, 2N and 4N images; the fitted
slope (seconds per image) and R² of a straight line through them (cost should grow linearly)."""

from __future__ import annotations

import argparse

import numpy as np

from raypipe.benchmarks.ingest import (
    add_data_arguments,
    bench_config,
    data_root,
    ensure_ray,
    ray_epoch,
    split_of,
)


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
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4], help="epoch sizes in N")


def run(args) -> dict:
    ensure_ray(args)
    cfg = bench_config(args, data_root(args))
    rows = []
    for m in args.multiples:
        n, seconds, _ = ray_epoch(cfg, split_of(cfg, m * args.images), args.batch_size)
        rows.append({"images": n, "epoch_s": seconds, "images_per_s": n / seconds})
    slope, intercept, r2 = linear_fit([r["images"] for r in rows], [r["epoch_s"] for r in rows])
    return {
        "benchmark": "scaling", "points": rows, "slope_s_per_image": slope, "intercept_s": intercept,
        "r2": r2, "marginal_images_per_s": 1.0 / slope if slope > 0 else None,
        "table": rows + [{"images": "fit", "slope_s_per_image": slope, "intercept_s": intercept, "r2": r2}],
    }
