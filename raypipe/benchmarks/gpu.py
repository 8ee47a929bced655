"""gpu: ResNet-50 training at 224x224, bf16 autocast, channels-last: images/s on synthetic on-device
tensors, and with the real Ray Data pipeline feeding it (plus its data-wait fraction).

Made for a CUDA machine (``python jobs/benchmark.py gpu``); on CPU it runs too (autocast and
channels-last are CUDA-only switches there), which the tests use at tiny sizes.
"""

from __future__ import annotations

import argparse
import time

from raypipe.benchmarks.common import (
    TrainingFeed,
    add_data_arguments,
    at_least,
    bench_config,
    data_root,
    ensure_ray,
    split_of,
    stage_workers,
)
from raypipe.benchmarks.cpu import StageCpu


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(args, device):
    import torch

    from raypipe.models.resnet import create_model

    torch.manual_seed(0)
    model = create_model(args.model, in_channels=3, num_classes=2).to(device)
    if args.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # fp16 steps go through a grad scaler, as training's do (train.amp=fp16); off elsewhere
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    return model, opt, torch.nn.CrossEntropyLoss(), scaler


def _step(model, opt, loss_fn, scaler, x, y, device, amp: str) -> float:
    from raypipe.training.loop import autocast_context

    opt.zero_grad(set_to_none=True)
    with autocast_context(device, amp):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()  # the identity when the scaler is off
    scaler.step(opt)
    scaler.update()
    return float(loss.detach())  # a sync, as in the real training loop


def synthetic(args, device) -> dict:
    """images/s on one batch of random tensors that never leaves the device."""
    import torch

    model, opt, loss_fn, scaler = _model(args, device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch_size,), device=device)
    for _ in range(args.warmup):
        _step(model, opt, loss_fn, scaler, x, y, device, args.amp)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _step(model, opt, loss_fn, scaler, x, y, device, args.amp)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"synthetic_images_per_s": args.steps * args.batch_size / seconds, "synthetic_s": seconds}


def with_pipeline(args: argparse.Namespace, device) -> dict:
    """images/s and data-wait fraction when Ray Data feeds the model (after ``warmup`` batches),
    through the training input as a one-worker run consumes it (its first epoch)."""
    import ray

    ensure_ray(args)
    root = data_root(args)
    # the loop here runs in the driver: leave it two of the cluster's CPUs
    cpus = args.cpus if args.cpus is not None else \
        max(1.0, float(ray.cluster_resources().get("CPU", 1.0)) - 2)
    cfg = bench_config(args, root, cpus, [f"pipeline.prefetch_batches={args.prefetch}"])
    n = (args.warmup + args.steps) * args.batch_size
    with TrainingFeed(cfg, split_of(cfg, n)) as feed:
        out = _fed(args, device, feed, stage_workers(cpus, args.cpus_per_worker))
    return {**out, "data": root, "cpus": cpus}


def _fed(args: argparse.Namespace, device, feed: TrainingFeed, workers: int) -> dict:
    """:func:`with_pipeline`'s loop over ``feed``'s first epoch."""
    from raypipe.training.loop import to_device

    model, opt, loss_fn, scaler = _model(args, device)
    wait = busy = 0.0
    images = steps = 0
    # where the data stage's CPUs went over the whole loop, start-up included: data workers busy
    # all the time mean the stage is what the GPU waits for; idle ones, that it is not
    with StageCpu(workers * args.cpus_per_worker) as stage:
        t_prev = time.perf_counter()
        for i, batch in enumerate(feed.epoch(0, args.batch_size, drop_last=True)):
            t_batch = time.perf_counter()
            x, y = to_device(batch, device, args.channels_last)  # as the training loop does
            _step(model, opt, loss_fn, scaler, x, y, device, args.amp)
            t_end = time.perf_counter()
            if i >= args.warmup:  # the first batches include the pipeline's start
                wait += t_batch - t_prev
                busy += t_end - t_batch
                images += len(x)
                steps += 1
            t_prev = t_end
    total = max(wait + busy, 1e-9)
    return {"pipeline_images_per_s": images / total, "pipeline_data_wait_frac": wait / total,
            "pipeline_steps": steps, "ray_workers": workers,
            "pipeline_ray_cpu": stage.summary()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --cpus: the data stage's CPUs, default the cluster's less two (the loop runs in the driver)
    add_data_arguments(p, image_size=224, batch_size=128)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--steps", type=at_least(1), default=50, help="timed steps")
    p.add_argument("--warmup", type=at_least(0), default=5, help="untimed steps first")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--prefetch", type=at_least(0), default=4,
                   help="pipeline.prefetch_batches: batches prefetched from Ray Data")
    p.add_argument("--skip-pipeline", action="store_true", help="synthetic tensors only")


def run(args: argparse.Namespace) -> dict:
    import torch

    device = _device(args.device)
    out = {"benchmark": "gpu", "device": str(device), "model": args.model, "image_size": args.image_size,
           "batch_size": args.batch_size, "amp": args.amp if device.type == "cuda" else "none (CPU)",
           "channels_last": bool(args.channels_last and device.type == "cuda"), "steps": args.steps,
           "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    out.update(synthetic(args, device))
    table = [{"feed": "synthetic on-device", "images_per_s": out["synthetic_images_per_s"]}]
    if not args.skip_pipeline:
        out.update(with_pipeline(args, device))
        cpu = out["pipeline_ray_cpu"]
        table.append({"feed": "ray data pipeline", "images_per_s": out["pipeline_images_per_s"],
                      "data_wait_frac": out["pipeline_data_wait_frac"],
                      "lanes_busy": cpu["lane_busy"], "lanes_cpu_wait": cpu["lane_cpu_wait"],
                      "lanes_idle": cpu["lane_idle"]})
        out["pipeline_vs_synthetic"] = out["pipeline_images_per_s"] / out["synthetic_images_per_s"]
    out["table"] = table
    return out
