"""e2e: a whole training run, raypipe against an equivalent plain PyTorch loop on the same files.

Both sides take one resolved config (``--config``, by default the shipped ``xray.yaml``, with
``--image-size``, ``--batch-size``, ``--epochs`` and ``--set`` overrides) and train the same
split (:func:`raypipe.data.sources.discover`), model (:func:`raypipe.models.resnet.create_model`),
optimiser and schedule, loss with the same class weights, and augmentation of the same kinds and
ranges. raypipe runs as a user runs it (:func:`raypipe.api.train`, starting and stopping its
own local Ray unless one is already running). The plain side is the strongest single-process
script for one machine: every file decoded and resized once into a uint8 tensor (by threads),
augmentation per batch on tensors with ``torchvision.transforms.v2``, all cores to torch.

An epoch is what a user waits for: training, validation and a checkpoint (raypipe's
``epoch_wall_s``). ``startup_s``: from the call to the start of the first epoch (Ray's start,
listing, caching or decoding, training workers). The sides alternate which goes first over
``--rounds``; ``ratio`` is raypipe's mean later epoch (all but the first) over the plain loop's,
all rounds together, with each side's validation AUC beside it. ``cpu``: where each side's CPU
went over its later epochs (ms per training image by role and by process, :class:`CpuSampler`),
which a busy machine distorts less than wall times. The plain loop uses no DataLoader: its
augmentation is about 0.8 ms of CPU an image, 2 % of a training step, and a worker process
would take cores from torch's threads.
"""

from __future__ import annotations

import argparse
import bisect
import io
import math
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs

from raypipe.config import AugmentConfig, Config, ConfigError, PreprocessConfig
from raypipe.data.sources import DatasetSplit, Record, discover

if TYPE_CHECKING:  # torch is imported where it is used: the benchmark CLI loads every module
    import torch

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_DATA = SHARED_DATA / "kermany" / "train"


def cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- CPU accounting

# Ray worker processes by what they run (their titles); every other process under this one
# (raylet, GCS, dashboard, Ray Train's controller, Ray Data's coordinators) is ``ray_other``
TRAIN_TITLES = ("ray::RayTrainWorker",)
DATA_TITLES = ("ray::ReadRange", "ray::MapBatches", "ray::_prepare_part", "ray::IDLE")
ROLES = ("driver", "train_workers", "data_tasks", "ray_other")


def process_name(cmdline: list[str]) -> str:
    """A short name for a process: its Ray title without the method (``ray::SplitCoordinator``),
    the Python script or module it runs (``dashboard.py``), or its program (``raylet``)."""
    if not cmdline:
        return "?"
    title = " ".join(cmdline).strip()
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    if title.startswith("ray-dashboard-"):  # the dashboard's module processes
        return title.split()[0]
    if os.path.basename(cmdline[0]).startswith("python"):
        for i, arg in enumerate(cmdline[1:], 1):
            if arg == "-m" and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if arg.endswith(".py"):
                return os.path.basename(arg)
    return os.path.basename(cmdline[0])


def cpu_role(title: str, is_self: bool) -> str:
    """The role of a process under this one, from its command line as Ray titles it."""
    if is_self:
        return "driver"
    if title.startswith(TRAIN_TITLES):
        return "train_workers"
    if title.startswith(DATA_TITLES):
        return "data_tasks"
    return "ray_other"


class CpuSampler:
    """``with CpuSampler() as cpu:`` samples, every ``interval`` seconds, the CPU seconds of
    this process and every process under it (a local Ray started here: its raylet, GCS and
    workers) by :func:`cpu_role`; :meth:`between` gives each role's CPU seconds between two
    ``time.time()`` moments. Wall times stretch on a busy machine; CPU seconds stretch less. A
    process's CPU after its last sample (it exited) is not counted; the sampling itself (a few
    ms of the driver's CPU a sample) counts as the driver's."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.times: list[float] = []
        self.totals: list[dict[str, float]] = []
        self._last: dict[int, float] = {}
        self._sum = dict.fromkeys(ROLES, 0.0)
        self._named: dict[str, float] = {}
        self.named: list[dict[str, float]] = []  # cumulative CPU by process_name, per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="e2e-cpu")

    def _sample(self, baseline: bool = False) -> None:
        import psutil

        me = psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        for p in procs:
            try:
                t = p.cpu_times()
                cmdline = p.cmdline()
            except (psutil.Error, OSError):
                continue
            role = cpu_role(" ".join(cmdline), p.pid == me.pid)
            cpu = t.user + t.system
            if not baseline:  # a process first seen now counts from its start
                delta = max(0.0, cpu - self._last.get(p.pid, 0.0))
                self._sum[role] += delta
                name = "driver" if role == "driver" else process_name(cmdline)
                self._named[name] = self._named.get(name, 0.0) + delta
            self._last[p.pid] = cpu
        self.times.append(time.time())
        self.totals.append(dict(self._sum))
        self.named.append(dict(self._named))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _at(self, t: float) -> dict[str, float]:
        """Cumulative CPU seconds by role at ``t``, interpolated between samples."""
        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return self.totals[0]
        if i >= len(self.times):
            return self.totals[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
        a, b = self.totals[i - 1], self.totals[i]
        return {r: a[r] + w * (b[r] - a[r]) for r in ROLES}

    def between(self, t0: float, t1: float) -> dict[str, float]:
        a, b = self._at(t0), self._at(t1)
        return {r: b[r] - a[r] for r in ROLES}

    def by_process(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds by :func:`process_name` between the samples nearest ``t0`` and ``t1``."""
        def at(t: float) -> dict[str, float]:
            return self.named[min(bisect.bisect_left(self.times, t), len(self.times) - 1)]

        a, b = at(t0), at(t1)
        return {k: v - a.get(k, 0.0) for k, v in b.items() if v - a.get(k, 0.0) > 0}


def later_cpu(cpu: CpuSampler, epochs: list[dict]) -> dict | None:
    """CPU of the later epochs (all but the first): ms per training image by role, and the
    cores in use on average over them (``cores_busy``)."""
    later = epochs[1:]
    if not later:
        return None
    spent = dict.fromkeys(ROLES, 0.0)
    named: dict[str, float] = {}
    wall = 0.0
    for e in later:
        t0, t1 = e["started_at"], e["started_at"] + e["epoch_s"]
        for role, v in cpu.between(t0, t1).items():
            spent[role] += v
        for name, v in cpu.by_process(t0, t1).items():
            named[name] = named.get(name, 0.0) + v
        wall += e["epoch_s"]
    images = max(1, sum(e["images"] for e in later))
    top = sorted(named.items(), key=lambda kv: -kv[1])[:12]
    return {**{f"{r}_ms_per_image": 1000 * v / images for r, v in spent.items()},
            "total_ms_per_image": 1000 * sum(spent.values()) / images,
            "cores_busy": sum(spent.values()) / max(wall, 1e-9),
            "by_process_ms_per_image": {k: 1000 * v / images for k, v in top}}


# ---------------------------------------------------------------- the config both sides train


def e2e_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides of a run: the data, then the benchmark's options, then ``--set``
    (last, so that they win)."""
    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    if data is None:
        raise ConfigError(f"e2e needs --data <folder-per-class images>; the default {DEFAULT_DATA} "
                          "is not on this machine.")
    out = [f"data.root={data}", f"train.epochs={args.epochs}", "train.use_gpu=false"]
    if args.image_size is not None:
        out.append(f"preprocess.image_size={args.image_size}")
    if args.batch_size is not None:
        out.append(f"train.batch_size={args.batch_size}")
    return out + list(args.set)


def check_plain_supported(cfg: Config) -> None:
    """The plain loop implements the settings a plain script would: refuse the others rather
    than compare different work."""
    p, t, a = cfg.preprocess, cfg.train, cfg.augment
    unsupported = {
        "preprocess.threshold": p.threshold != "none", "preprocess.morphology": bool(p.morphology),
        "preprocess.equalize": p.equalize != "none", "train.ema_decay": t.ema_decay is not None,
        "train.mixup_alpha": t.mixup_alpha > 0, "train.overfit_subset": t.overfit_subset is not None,
        "augment.tta": a.tta != "none", "model.pretrained": cfg.model.pretrained is not None,
    }
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise ConfigError(f"e2e: the plain PyTorch loop does not implement {', '.join(bad)}; set "
                          "them to their defaults (--set key=value) to compare whole runs.")


# ---------------------------------------------------------------- plain side: data in memory


@dataclass
class InMemory:
    """A split decoded and resized once: ``images`` (N, C, S, S) uint8; ``lo``/``hi`` (N,) the
    intensities that each image's normalisation maps to 0 and 1; ``labels`` (N,) int64."""

    images: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def intensity_range(arr: np.ndarray, pre: PreprocessConfig) -> tuple[float, float]:
    """``(lo, hi)`` of ``preprocess.normalize`` for one resized uint8 image (as raypipe's
    :meth:`~raypipe.data.transforms.Preprocessor.intensity_range`)."""
    if pre.normalize == "divide255":
        return 0.0, 255.0
    if pre.normalize == "none":
        return 0.0, 1.0
    lo, hi = float(arr.min()), float(arr.max())
    if pre.normalize == "percentile":
        plo, phi = (float(v) for v in np.percentile(arr, pre.percentiles))
        if phi - plo > 1e-6 * max(1.0, abs(phi)):
            lo, hi = plo, phi
    return lo, hi


def load_image(fs: pafs.FileSystem, path: str, pre: PreprocessConfig) -> tuple[np.ndarray, float, float]:
    """One file -> ((C, S, S) uint8, lo, hi): PIL decode (JPEG at a reduced scale where it stays
    at least S), grayscale or RGB, resized as ``preprocess.resize_mode`` says."""
    from PIL import Image, ImageOps

    with fs.open_input_file(path) as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    mode, s = ("L" if pre.channels == 1 else "RGB"), pre.image_size
    if img.format == "JPEG":
        img.draft(mode, (s, s))
    img = img.convert(mode)
    if pre.resize_mode == "stretch":
        img = img.resize((s, s), Image.BILINEAR)
    elif pre.resize_mode == "crop":
        img = ImageOps.fit(img, (s, s), Image.BILINEAR)
    else:
        img = ImageOps.pad(img, (s, s), Image.BILINEAR, color=0)
    arr = np.array(img)  # a copy: PIL's buffer is read-only
    lo, hi = intensity_range(arr, pre)
    return np.ascontiguousarray(arr.reshape(s, s, -1).transpose(2, 0, 1)), lo, hi


def load_split(records: list[Record], fs: pafs.FileSystem, pre: PreprocessConfig,
               threads: int) -> InMemory:
    """Every record decoded once, ``threads`` files at a time (PIL releases the GIL)."""
    import torch

    s = pre.image_size
    images = torch.empty((len(records), pre.channels, s, s), dtype=torch.uint8)
    lo, hi = torch.empty(len(records)), torch.empty(len(records))

    def one(i: int) -> None:
        arr, lo[i], hi[i] = load_image(fs, records[i].path, pre)
        images[i] = torch.from_numpy(arr)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(one, range(len(records))))
    labels = torch.tensor([r.label for r in records], dtype=torch.int64)
    return InMemory(images, lo, hi, labels)


class BatchAugment:
    """``augment.*`` on a (B, C, S, S) float batch: each image its own geometric draw
    (``torchvision.transforms.v2``: random resized crop, affine with rotation, zoom, translation
    and shear, flips; bilinear, filled with 0, i.e. the normalised low intensity, as raypipe's
    warp), then brightness, contrast, gamma and noise drawn per image, vectorised over the batch.
    Randomness comes from torch's generator (seeded by the caller)."""

    def __init__(self, cfg: AugmentConfig, size: int):
        from torchvision.transforms import InterpolationMode, v2

        self.cfg = cfg
        steps: list = []
        if cfg.crop_scale < 1.0:
            steps.append(v2.RandomResizedCrop(size, scale=(cfg.crop_scale, 1.0), ratio=(1.0, 1.0),
                                              interpolation=InterpolationMode.BILINEAR))
        if cfg.rotation or cfg.translate or cfg.shear or tuple(cfg.zoom) != (1.0, 1.0):
            steps.append(v2.RandomAffine(
                degrees=cfg.rotation, translate=(cfg.translate, cfg.translate) if cfg.translate else None,
                scale=tuple(cfg.zoom), shear=cfg.shear or None,
                interpolation=InterpolationMode.BILINEAR, fill=0.0))
        if cfg.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(cfg.hflip))
        if cfg.vflip > 0:
            steps.append(v2.RandomVerticalFlip(cfg.vflip))
        self.geometric = v2.Compose(steps) if steps else None

    def kinds(self) -> list[str]:
        """The transforms applied, by name (for the result and tests)."""
        names = [type(t).__name__ for t in self.geometric.transforms] if self.geometric else []
        c = self.cfg
        names += [n for n, on in (("brightness", c.brightness > 0), ("contrast", c.contrast > 0),
                                  ("gamma", c.gamma > 0), ("noise", c.noise_std > 0)) if on]
        return names

    def _uniform(self, n: int, half_width: float) -> torch.Tensor:
        import torch

        return (torch.rand(n, 1, 1, 1) * 2 - 1) * half_width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        c, n = self.cfg, len(x)
        if self.geometric is not None:
            x = torch.stack([self.geometric(img) for img in x])
        if c.brightness > 0 or c.contrast > 0:  # (x - mean) * contrast + mean + brightness
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + self._uniform(n, c.contrast)) + mean + self._uniform(n, c.brightness)
        if c.gamma > 0:  # on the positive part, as raypipe's kernel
            g = torch.exp(self._uniform(n, c.gamma))
            x = torch.where(x > 0, x.clamp(min=0) ** g, x)
        if c.noise_std > 0:
            x = x + torch.randn_like(x) * c.noise_std
        return x


def model_input(mem: InMemory, idx: torch.Tensor, pre: PreprocessConfig,
                augment: BatchAugment | None) -> torch.Tensor:
    """The batch ``idx``: normalised per image, augmented, standardised when configured."""
    import torch

    lo, hi = mem.lo[idx].view(-1, 1, 1, 1), mem.hi[idx].view(-1, 1, 1, 1)
    scale = torch.where(hi - lo > 1e-6, 1.0 / (hi - lo), torch.zeros_like(hi))
    x = (mem.images[idx].float() - lo) * scale
    if augment is not None:
        x = augment(x)
    if pre.mean is not None and pre.std is not None:
        mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
        x = (x - mean) / torch.tensor(pre.std).view(1, -1, 1, 1)
    return x.contiguous()


# ---------------------------------------------------------------- plain side: the loop


def class_weights_of(cfg: Config, split: DatasetSplit) -> list[float] | None:
    """The loss's class weights, as raypipe's driver computes them for this split."""
    from raypipe.training.trainer import run_loss_facts

    weights = run_loss_facts(cfg, split, split.train)["class_weights"]
    return list(weights.values()) if weights else None


def _train_epoch(model, mem: InMemory, batch_size: int, pre: PreprocessConfig,
                 augment: BatchAugment | None, optimizer, loss_fn, grad_clip: float | None) -> dict:
    import torch

    model.train()
    order = torch.randperm(len(mem))
    total, n = torch.zeros(()), 0
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on one image (raypipe skips it too)
            continue
        x, y = model_input(mem, idx, pre, augment), mem.labels[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.detach() * len(y)  # summed in a tensor: no readback per step
        n += len(y)
    return {"train_s": time.perf_counter() - t0, "images": n, "train_loss": float(total) / max(n, 1)}


def _predict(model, mem: InMemory, batch_size: int, pre: PreprocessConfig) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        out = [model(model_input(mem, torch.arange(i, min(i + batch_size, len(mem))), pre, None))
               for i in range(0, len(mem), batch_size)]
    return torch.cat(out).float().numpy()


def plain_run(cfg: Config, threads: int) -> dict:
    """The plain PyTorch side: one process, ``threads`` torch threads. Returns its timings
    (``startup_s``: listing and decoding; per epoch ``epoch_s`` = train + validation +
    checkpoint) and validation AUCs."""
    import torch

    from raypipe.models.resnet import create_model
    from raypipe.training.losses import build_loss
    from raypipe.training.metrics import classification_metrics, softmax
    from raypipe.training.optim import EpochScheduler, build_optimizer

    check_plain_supported(cfg)
    t_call = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = discover(cfg.data)
        if any(not isinstance(r.label, int) for r in split.train[:1]):
            raise ConfigError("e2e: the plain PyTorch loop trains single-label classes; this "
                              "dataset is multi-label (give data.positive_finding).")
        pre, t = cfg.preprocess, cfg.train
        train = load_split(split.train, split.filesystem, pre, threads)
        val = load_split(split.val, split.filesystem, pre, threads)
        torch.manual_seed(t.seed)
        model = create_model(cfg.model.name, in_channels=pre.channels,
                             num_classes=len(split.class_names), init=cfg.model.init,
                             zero_init_residual=cfg.model.zero_init_residual)
        optimizer = build_optimizer(model.parameters(), t)
        scheduler = EpochScheduler(optimizer, t)
        loss_fn = build_loss(t.loss, class_weights_of(cfg, split), focal_gamma=t.focal_gamma,
                             label_smoothing=t.label_smoothing)
        augment = BatchAugment(cfg.augment, pre.image_size) if cfg.augment.enabled else None
        startup = time.perf_counter() - t_call
        epochs = []
        with tempfile.TemporaryDirectory(prefix="raypipe-e2e-plain-") as d:
            for epoch in range(t.epochs):
                started_at, t0 = time.time(), time.perf_counter()
                stats = _train_epoch(model, train, t.batch_size, pre, augment, optimizer, loss_fn,
                                     t.grad_clip)
                t_val = time.perf_counter()
                logits = _predict(model, val, t.batch_size, pre)
                m = classification_metrics(val.labels.numpy(), softmax(logits.astype(np.float64)),
                                           split.class_names, t.threshold)
                scheduler.step({"val_auc": m["auc"]})
                t_ckpt = time.perf_counter()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch},
                           os.path.join(d, "checkpoint.pt"))
                end = time.perf_counter()
                epochs.append({**stats, "validation_s": t_ckpt - t_val, "checkpoint_s": end - t_ckpt,
                               "epoch_s": end - t0, "started_at": started_at, "val_auc": m["auc"]})
    finally:
        torch.set_num_threads(previous)
    return {"startup_s": startup, "epochs": epochs, "threads": threads,
            "train_files": len(split.train), "val_files": len(split.val),
            "augment": augment.kinds() if augment else [],
            "wall_s": time.perf_counter() - t_call}


# ---------------------------------------------------------------- raypipe side


def raypipe_run(cfg: Config, num_cpus: int | None = None) -> dict:
    """raypipe's side: ``raypipe.train(cfg)`` in a scratch storage folder, in the Ray this
    process is connected to, else in a local Ray started here (and stopped after: its start is
    part of the run). Per epoch ``epoch_s`` is rank 0's ``epoch_wall_s``."""
    import ray

    from raypipe import api
    from raypipe.cli import init_ray

    t_call = time.time()
    own = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="raypipe-e2e-") as storage:
        run = cfg.run.model_copy(update={"storage_path": storage, "name": "e2e"})
        try:
            if own:
                init_ray(**({"num_cpus": num_cpus} if num_cpus else {}))
            summary = api.train(cfg.model_copy(update={"run": run}))
        finally:
            if own:
                ray.shutdown()
    end = time.time()
    hist = summary["history"]
    if not hist or "epoch_wall_s" not in hist[-1]:
        raise RuntimeError("the training workers' history has no epoch_wall_s: they run another "
                           "raypipe than this driver (on a cluster, install this one on its nodes; "
                           "from a checkout, export PYTHONPATH=<checkout> before Ray starts)")
    world = cfg.train.num_workers  # equal shards: every worker trains as many images as rank 0
    epochs = [{"epoch_s": h["epoch_wall_s"], "started_at": h["epoch_started_at"],
               "train_s": h["epoch_time_s"],
               "bn_stats_s": h["bn_stats_s"], "validation_s": h["validation_s"],
               "data_wait_frac": h["data_wait_frac"], "images": int(h["train_samples"]) * world,
               "train_loss": h["train_loss"], "val_auc": h["val_auc"]} for h in hist]
    last = hist[-1]
    return {"startup_s": hist[0]["epoch_started_at"] - t_call, "epochs": epochs,
            "train_files": summary["data"]["train_total"], "val_files": summary["data"]["val_total"],
            "teardown_s": end - last["epoch_started_at"] - last["epoch_wall_s"],
            "wall_s": end - t_call}


# ---------------------------------------------------------------- summary


def side_figures(run: dict) -> dict:
    """One side's figures from one run: start-up, first epoch, later epochs' mean, images/s
    of the later epochs (the first when there is one epoch), best and last validation AUC."""
    ep = run["epochs"]
    later = ep[1:] or ep
    later_s = statistics.fmean(e["epoch_s"] for e in later)
    aucs = [e["val_auc"] for e in ep]
    return {"startup_s": run["startup_s"], "first_epoch_s": ep[0]["epoch_s"],
            "later_epoch_s": later_s if len(ep) > 1 else None,
            "images_per_s": statistics.fmean(e["images"] for e in later) / later_s,
            "train_images": ep[0]["images"],
            "best_auc": max((a for a in aucs if not math.isnan(a)), default=math.nan),
            "last_auc": aucs[-1]}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mean_cpu(cpus: list[dict]) -> dict | None:
    """The rounds' :func:`later_cpu` figures averaged (a process missing from a round counts 0)."""
    if not cpus:
        return None
    out: dict = {k: _mean([c[k] for c in cpus]) for k, v in cpus[0].items() if not isinstance(v, dict)}
    names = {k for c in cpus for k in c["by_process_ms_per_image"]}
    by_process = {k: statistics.fmean(c["by_process_ms_per_image"].get(k, 0.0) for c in cpus)
                  for k in names}
    out["by_process_ms_per_image"] = dict(sorted(by_process.items(), key=lambda kv: -kv[1]))
    return out


def compare(rounds: list[dict]) -> dict:
    """Both sides' figures over the rounds and raypipe/plain of the later (and first) epochs."""
    out: dict = {}
    for side in ("raypipe", "plain"):
        figs = [side_figures(r[side]) for r in rounds]
        out[side] = {k: _mean([f[k] for f in figs]) for k in figs[0]}
        out[side]["later_epochs_s"] = [e["epoch_s"] for r in rounds for e in r[side]["epochs"][1:]]
        out[side]["cpu"] = mean_cpu([r[side]["cpu"] for r in rounds if r[side].get("cpu")])
    later = [(sum(e["epoch_s"] for e in r["raypipe"]["epochs"][1:]),
              sum(e["epoch_s"] for e in r["plain"]["epochs"][1:])) for r in rounds]
    out["ratio"] = (sum(a for a, _ in later) / sum(b for _, b in later)
                    if all(b > 0 for _, b in later) and len(rounds[0]["plain"]["epochs"]) > 1 else None)
    out["round_ratios"] = [a / b if b > 0 else None for a, b in later]
    out["ratio_first"] = (out["raypipe"]["first_epoch_s"] / out["plain"]["first_epoch_s"])
    return out


def table(rounds: list[dict], summary: dict) -> list[dict]:
    rows = []
    def cpu(c: dict | None) -> dict:
        return {"cpu_ms_per_image": c["total_ms_per_image"], "cores_busy": c["cores_busy"]} if c else {}

    for r in rounds:
        for side in r["order"]:
            rows.append({"round": r["round"], "side": side, **side_figures(r[side]),
                         **cpu(r[side].get("cpu"))})
    for side in ("raypipe", "plain"):
        rows.append({"round": "mean", "side": side,
                     **{k: v for k, v in summary[side].items() if not isinstance(v, list | dict)},
                     **cpu(summary[side]["cpu"])})
    rows.append({"ratio_later_epochs": summary["ratio"], "ratio_first_epoch": summary["ratio_first"]})
    return rows


# ---------------------------------------------------------------- entry points


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help=f"folder-per-class images (default: {DEFAULT_DATA} when present)")
    p.add_argument("--config", default="xray.yaml", help="raypipe config (default: the shipped xray.yaml)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each run (the first is reported apart)")
    p.add_argument("--image-size", type=int, default=None,
                   help="preprocess.image_size (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides, e.g. --set train.num_workers=1 (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the plain loop (default: every core of this machine)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started here")


def run(args: argparse.Namespace) -> dict:
    from raypipe.api import resolve_config
    from raypipe.cli import setup_logging

    setup_logging()  # raypipe's lines; Ray Data's and Ray Train's INFO lines stay in Ray's logs
    cfg = resolve_config(args.config, e2e_overrides(args))
    check_plain_supported(cfg)
    threads = args.threads or cores()
    load_before = os.getloadavg()
    rounds = []
    for r in range(args.rounds):
        order = ("raypipe", "plain") if r % 2 == 0 else ("plain", "raypipe")
        result: dict = {"round": r, "order": list(order)}
        for side in order:
            with CpuSampler() as cpu:
                out = raypipe_run(cfg, args.num_cpus) if side == "raypipe" else plain_run(cfg, threads)
            result[side] = {**out, "cpu": later_cpu(cpu, out["epochs"])}
        rounds.append(result)
    summary = compare(rounds)
    return {
        "benchmark": "e2e", "data": cfg.data.root, "config": args.config,
        "overrides": e2e_overrides(args), "image_size": cfg.preprocess.image_size,
        "channels": cfg.preprocess.channels, "batch_size": cfg.train.batch_size,
        "epochs": cfg.train.epochs, "model": cfg.model.name, "optimizer": cfg.train.optimizer,
        "raypipe_workers": cfg.train.num_workers, "raypipe_cpus_per_worker": cfg.train.cpus_per_worker,
        "plain_threads": threads, "cores": cores(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "same_split": all((r["raypipe"]["train_files"], r["raypipe"]["val_files"])
                          == (r["plain"]["train_files"], r["plain"]["val_files"]) for r in rounds),
        **summary, "rounds": rounds, "table": table(rounds, summary),
    }
