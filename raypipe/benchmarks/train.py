"""train: Ray Train overhead and the data-wait fraction.

1. Wall time per epoch of Ray Train with one worker vs a plain single-process PyTorch loop, on the
   same pre-decoded tensors, same model, batch size, steps and threads (target: overhead <= 10%).
2. The data-wait fraction (time the training loop waits for its next batch over the epoch time)
   of a real training run (``run_training``, one worker) fed by the Ray Data pipeline, ResNet-18
   at 128x128 on CPU, from the second epoch on (target: < 5%); the first epoch also holds the
   pipeline's start (and with ``pipeline.cache``, its decode pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np

from raypipe.benchmarks.common import (
    add_data_arguments,
    at_least,
    bench_config,
    cycled,
    data_root,
    ensure_ray,
    scratch_dir,
)


def _setup(spec: dict):
    """(model, optimizer, loss, batches) built identically in both contestants."""
    import torch

    from raypipe.models.resnet import create_model

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    model = create_model(spec["model"], in_channels=3, num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.from_numpy(spec["x"]), torch.from_numpy(spec["y"])
    b = spec["batch_size"]
    batches = [{"image": x[i:i + b], "label": y[i:i + b]} for i in range(0, len(x), b)]
    return model, opt, torch.nn.CrossEntropyLoss(), batches


def _epochs(model, opt, loss_fn, batches, epochs: int, device, report=None) -> list[float]:
    from raypipe.training import loop
    from raypipe.training.doctor import GradientDoctor

    times = []
    for e in range(epochs):
        stats = loop.train_one_epoch(model, batches, opt, loss_fn, device, GradientDoctor(), epoch=e)
        times.append(stats["epoch_time_s"])
        if report is not None:
            report(times)
    return times


def plain_loop(spec: dict) -> list[float]:
    import torch

    model, opt, loss_fn, batches = _setup(spec)
    return _epochs(model, opt, loss_fn, batches, spec["epochs"], torch.device("cpu"))


def ray_train_loop(spec: dict) -> None:
    """``train_loop_per_worker``: the same epochs under Ray Train, reporting epoch times."""
    import ray.train
    import ray.train.torch

    model, opt, loss_fn, batches = _setup(spec)
    model = ray.train.torch.prepare_model(model)

    def report(times):
        metrics = {"epochs_done": len(times), "epoch_time_s": times[-1], "epoch_times": list(times)}
        if len(times) < spec["epochs"]:
            ray.train.report(metrics)
            return
        # Ray Train keeps the metrics of checkpointed reports only: attach an empty one at the end
        with tempfile.TemporaryDirectory() as d:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    _epochs(model, opt, loss_fn, batches, spec["epochs"], ray.train.torch.get_device(), report)


def ray_train(spec: dict) -> tuple[list[float], float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypipe.training.trainer import fit

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        ray_train_loop, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": spec["threads"]}),
        run_config=RunConfig(name="bench-overhead", storage_path=scratch_dir("raypipe-bench-")),
    )
    result = fit(trainer)
    return list(result.metrics["epoch_times"]), time.perf_counter() - t0


def data_wait(args: argparse.Namespace) -> dict:
    """Epochs of a training run fed by the real pipeline (``run_training``), the data stage
    sized as training sizes it (``pipeline.workers=auto`` unless ``--cpus``). The headline is
    the mean over the epochs after the first."""
    from raypipe.data.pipeline import cache_choice
    from raypipe.data.sources import discover
    from raypipe.training.trainer import run_training

    storage = scratch_dir("raypipe-bench-")
    cfg = bench_config(args, data_root(args), args.cpus, [
        f"preprocess.image_size={args.wait_image_size}", f"model.name={args.model}",
        f"train.epochs={args.wait_epochs}",
        "train.num_workers=1", f"train.cpus_per_worker={args.threads}", "train.use_gpu=false",
        f"run.storage_path={storage}", "run.name=bench-wait", "run.tensorboard=false",
    ])
    split = discover(cfg.data)
    split = dataclasses.replace(split, train=cycled(split.train, args.images))
    cached = cache_choice(cfg, len(split.train), len(split.val))[0]
    summary = run_training(cfg, split)
    history = summary["history"]
    waits = [h["data_wait_frac"] for h in history]
    later = history[1:]
    return {"wait_model": args.model, "wait_image_size": args.wait_image_size,
            "wait_images": history[-1]["train_samples"], "wait_cached": cached,
            "data_wait_frac": float(np.mean(waits[1:])),
            "first_epoch_data_wait_frac": waits[0], "data_wait_frac_per_epoch": waits,
            "wait_images_per_s": float(np.mean([h["images_per_s"] for h in later])),
            "target_data_wait_frac_max": 0.05}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --images, --cache, --cpus: the data-wait run's (default: the data stage as training sizes it)
    add_data_arguments(p, images=256, image_size=128, cache="auto")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--tensor-size", type=int, default=64, help="side of the pre-decoded tensors")
    p.add_argument("--samples", type=at_least(1), default=256, help="pre-decoded tensors per epoch")
    p.add_argument("--epochs", type=at_least(1), default=3,
                   help="epochs of each; the fastest is compared")
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch threads = CPUs of the Ray Train worker")
    p.add_argument("--wait-image-size", type=int, default=128)
    p.add_argument("--wait-epochs", type=at_least(2), default=3,
                   help="epochs of the data-wait run (the figure is over those after the first)")
    p.add_argument("--skip-wait", action="store_true", help="only the overhead measurement")


def run(args: argparse.Namespace) -> dict:
    ensure_ray(args)
    rng = np.random.default_rng(0)
    s = args.tensor_size
    spec = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size,
            "epochs": args.epochs, "x": rng.random((args.samples, 3, s, s), dtype=np.float32),
            "y": rng.integers(0, 2, args.samples).astype(np.int64)}
    t0 = time.perf_counter()
    plain = plain_loop(spec)
    plain_wall = time.perf_counter() - t0
    ray_times, ray_wall = ray_train(spec)
    overhead = min(ray_times) / min(plain) - 1.0
    out = {
        "benchmark": "train", "model": args.model, "tensor_size": s, "samples": args.samples,
        "batch_size": args.batch_size, "threads": args.threads,
        "plain_epoch_s": plain, "ray_epoch_s": ray_times, "overhead": overhead,
        "plain_wall_s": plain_wall, "ray_wall_s": ray_wall, "target_overhead_max": 0.10,
    }
    table = [{"loop": "plain", "epoch_s": min(plain), "wall_s": plain_wall},
             {"loop": "ray_train_1_worker", "epoch_s": min(ray_times), "wall_s": ray_wall},
             {"loop": "overhead", "epoch_s": overhead}]
    if not args.skip_wait:
        out.update(data_wait(args))
        table.append({"loop": f"pipeline->{args.model}@{args.wait_image_size}",
                      "data_wait_frac": out["data_wait_frac"], "images_per_s": out["wait_images_per_s"]})
    out["table"] = table
    return out
