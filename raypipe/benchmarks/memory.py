"""memory: peak memory of the whole Ray session while streaming one epoch of N, then 10·N images.

Memory is sampled every ``--interval`` seconds over the driver and every process it started
(GCS, raylet, object store, data tasks' workers when this driver started Ray): proportional set
size where the OS reports it (shared object-store pages counted once), else resident size. The
epochs stream from the files (``pipeline.cache=false``): streaming means the 10·N peak stays
within 1.2x of the N peak. One unmeasured epoch runs first, so that both measured epochs start
with the same pool of idle Ray worker processes.
"""

from __future__ import annotations

import argparse
import time

from raypipe.benchmarks.common import (
    MIB,
    PeakSampler,
    add_data_arguments,
    at_least,
    bench_config,
    data_root,
    ensure_ray,
    ray_epochs,
    session_memory,
    split_of,
    stage_cpus,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, images=500, cache=None)  # the streaming path: memory must stay flat
    p.add_argument("--factor", type=at_least(2), default=10,
                   help="the large epoch is factor x --images")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples")


def run(args: argparse.Namespace) -> dict:
    ensure_ray(args)
    cfg = bench_config(args, data_root(args), stage_cpus(args))
    # an unmeasured epoch first: Ray keeps the worker processes it started idle in its pool, so
    # without it the first measured epoch would start from a smaller session than the second
    ray_epochs(cfg, split_of(cfg, args.images), args.batch_size, 1)
    rows = []
    for n in (args.images, args.factor * args.images):
        split = split_of(cfg, n)
        time.sleep(1.0)  # let the previous epoch's processes settle before the baseline
        base = session_memory()[0]
        with PeakSampler(args.interval) as s:
            got, seconds, _ = ray_epochs(cfg, split, args.batch_size, 1)[0]
        rows.append({"images": got, "baseline_mib": base / MIB, "peak_mib": s.peak / MIB,
                     "rise_mib": (s.peak - base) / MIB, "driver_peak_mib": s.driver_peak / MIB,
                     "samples": s.samples, "run_s": seconds})
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    return {
        "benchmark": "memory", "images_small": rows[0]["images"], "images_large": rows[1]["images"],
        "peak_small_mib": rows[0]["peak_mib"], "peak_large_mib": rows[1]["peak_mib"],
        "peak_ratio": ratio, "target_ratio_max": 1.2, "image_size": args.image_size,
        "workers": cfg.pipeline.workers, "cache": False,
        "scope": "driver and its descendant processes (the whole session when this driver "
                 "started Ray)",
        "table": rows + [{"images": "ratio large/small", "peak_mib": ratio}],
    }
