"""Plain-torch training and evaluation over any iterable of ``{"image", "label"}`` batches.

No Ray here: the same functions run under Ray Train (fed by ``iter_torch_batches``) and in unit
tests (fed by a list of tensors).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raypipe.training.doctor import GradientDoctor, TrainingDiverged
from raypipe.training.freeze import frozen_modules, hold_frozen_batchnorm


def autocast_context(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (so the switch is harmless on CPU)."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_device(batch: dict, device: torch.device, channels_last: bool):
    """(images, labels) on ``device``: labels as class indices (int64), or multi-hot float
    vectors as they come (multilabel)."""
    x = batch["image"].to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = batch["label"].to(device, non_blocking=True)
    return x, (y.float() if y.is_floating_point() else y.long())


class WeightAverage:
    """Exponential moving average of a model's weights and BatchNorm statistics, updated after
    every optimiser step. The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so the first
    steps are not held back by the random initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        now_state = unwrap(model).state_dict()
        for avg, now in zip(self.module.state_dict().values(), now_state.values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(now.detach(), 1.0 - d)
            else:  # e.g. BatchNorm's num_batches_tracked
                avg.copy_(now)
        self.steps += 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def mixup_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
               alpha: float) -> torch.Tensor:
    """Mixup (Zhang et al., 2018): train on ``lam * x + (1 - lam) * x[perm]`` with the loss mixed
    the same way, ``lam ~ Beta(alpha, alpha)``; works with any of the loss functions (weighted,
    focal, smoothed)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(y), device=y.device)
    out = model(lam * x + (1 - lam) * x[perm])
    return lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y[perm])


def forward_eval(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits for evaluation; ``tta="hflip"`` averages them with the mirror image's logits."""
    out = model(x)
    if tta == "hflip":
        out = (out + model(torch.flip(x, dims=[-1]))) / 2
    return out


def _check_all_workers(doctor: GradientDoctor, loss: float, grad_norm: float,
                       device: torch.device, *, epoch: int, step: int, lr: float) -> None:
    """``doctor.check`` on every data-parallel worker at once. A divergence on one worker is
    shared with all of them first, so they all stop at the same step (a worker that carried on
    alone would wait forever in the next gradient all-reduce)."""
    healthy = doctor.is_finite(loss, grad_norm)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if healthy else 1.0], device=device)  # NCCL needs CUDA
        dist.all_reduce(flag)
        if healthy and flag.item() > 0:
            raise TrainingDiverged(doctor.diagnosis(
                "loss on another worker", loss, grad_norm, epoch, step, lr))
    doctor.check(loss, grad_norm, epoch=epoch, step=step, lr=lr)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                       amp: str = "none", freeze: str = "none") -> None:
    """Replace every BatchNorm layer's running statistics with the mean of its statistics over
    ``batches``, computed with the model's current weights (the parameters do not change).
    PyTorch's running statistics are an exponential average over training steps, each taken with
    the weights of its step: with a few steps per epoch (small datasets, subsets) they still hold
    earlier epochs' weights and their initial 0 and 1, which the current weights do not match, and
    validation can put every image in one class while training is fine. The layers of a frozen
    part (``freeze``, see :mod:`raypipe.training.freeze`) keep their statistics and run in eval
    mode, as they did in training."""
    held = frozen_modules(model, freeze)
    kept = {id(m) for m in batchnorm_layers(nn.ModuleList(held))}
    layers = [layer for layer in batchnorm_layers(model) if id(layer) not in kept]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    modes = [(m, m.training) for m in model.modules()]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches below
    model.train()
    hold_frozen_batchnorm(held)
    try:
        with autocast_context(device, amp):
            for x in batches:
                model(x)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        for m, training in modes:
            m.training = training


class RecentInputs:
    """The last inputs of an epoch, at least ``samples`` images (whole batches), for
    :func:`recompute_bn_stats`."""

    def __init__(self, samples: int):
        self.samples = samples
        self.batches: collections.deque[torch.Tensor] = collections.deque()
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if self.samples <= 0:
            return
        self.batches.append(x.detach())
        self.count += len(x)
        while self.count - len(self.batches[0]) >= self.samples:
            self.count -= len(self.batches.popleft())


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    doctor: GradientDoctor,
    *,
    epoch: int,
    grad_clip: float | None = None,
    amp: str = "none",
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    ema: WeightAverage | None = None,
    mixup_alpha: float = 0.0,
    bn_stats_samples: int = 0,
    freeze: str = "none",
) -> dict:
    """One pass over ``batches`` (updating ``ema`` after every step). With ``bn_stats_samples``,
    the BatchNorm statistics of the model (and of ``ema``'s) are then recomputed over the epoch's
    last that many training images (:func:`recompute_bn_stats`). Returns loss (sample-weighted
    mean), sample count, steps, images/s, data-wait fraction, the epoch's time and the part of it
    the recompute took, and gradient-norm statistics. ``freeze``: the part of the model whose
    parameters the caller froze (:func:`raypipe.training.freeze.set_frozen`); its BatchNorm
    layers run in eval mode."""
    model.train()
    hold_frozen_batchnorm(frozen_modules(unwrap(model), freeze))
    recent = RecentInputs(bn_stats_samples)
    doctor.start_epoch()
    lr = float(optimizer.param_groups[0]["lr"])
    total_loss, n, steps, wait = 0.0, 0, 0, 0.0
    t0 = t_prev = time.perf_counter()
    for batch in batches:
        t_batch = time.perf_counter()
        wait += t_batch - t_prev
        x, y = to_device(batch, device, channels_last)
        # BatchNorm cannot train on one sample (1x1 feature maps raise); equal shards give every
        # DDP worker the same batch sizes, so all workers skip such a remainder together
        if len(y) < 2:
            t_prev = time.perf_counter()
            continue
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            if mixup_alpha > 0:
                loss = mixup_loss(model, x, y, loss_fn, mixup_alpha)
            else:
                loss = loss_fn(model(x), y)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        )
        loss_value = float(loss.detach())
        _check_all_workers(doctor, loss_value, grad_norm, device, epoch=epoch, step=steps, lr=lr)
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(model)
        recent.add(x)
        total_loss += loss_value * len(y)
        n += len(y)
        steps += 1
        t_prev = time.perf_counter()
    t_bn = time.perf_counter()
    if recent.batches:
        # the unwrapped module: a DDP forward would broadcast rank 0's buffers at every batch
        for net in (unwrap(model), *([ema.module] if ema is not None else [])):
            recompute_bn_stats(net, recent.batches, device, amp, freeze)
        recent.batches.clear()
    t_end = time.perf_counter()
    elapsed = max(t_end - t0, 1e-9)
    return {
        "train_loss": total_loss / max(n, 1),
        "train_samples": n,
        "train_steps": steps,
        "images_per_s": n / elapsed,
        "data_wait_frac": wait / elapsed,
        "epoch_time_s": elapsed,
        "bn_stats_s": t_end - t_bn,  # part of epoch_time_s: what bn_stats: precise costs
        **doctor.epoch_summary(),
    }


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[dict], device: torch.device, amp: str = "none",
    channels_last: bool = False, tta: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), logits (N, K)) float32 for every sample in ``batches``; ``tta`` as in
    :func:`forward_eval`."""
    model.eval()
    labels, logits = [], []
    for batch in batches:
        x, y = to_device(batch, device, channels_last)
        if len(y) == 0:
            continue
        with autocast_context(device, amp):
            out = forward_eval(model, x, tta)
        logits.append(out.float().cpu().numpy())
        labels.append(y.cpu().numpy())
    if not labels:
        return np.zeros((0,), np.int64), np.zeros((0, 0), np.float32)  # a worker with no rows
    return np.concatenate(labels), np.concatenate(logits)


def evaluate_loss(logits: np.ndarray, labels: np.ndarray, loss_fn: nn.Module) -> float:
    """Validation loss on the full (gathered) prediction set, with the training loss function
    (``labels``: class indices, or multi-hot float vectors)."""
    if len(labels) == 0:
        return float("nan")
    target = torch.from_numpy(labels)
    target = target.float() if target.is_floating_point() else target.long()
    with torch.no_grad():
        return float(loss_fn(torch.from_numpy(logits), target))
