"""Plain-torch training and evaluation over any iterable of ``{"image", "label"}`` batches.

No Ray here: the same functions run under Ray Train (fed by ``iter_torch_batches``) and in unit
tests (fed by a list of tensors).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raypipe.train.doctor import GradientDoctor, TrainingDiverged


def autocast_context(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (so the switch is harmless on CPU)."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _to_device(batch: dict, device: torch.device, channels_last: bool):
    x = batch["image"].to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["label"].to(device, non_blocking=True).long()


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
) -> dict:
    """One pass over ``batches``. Returns loss (sample-weighted mean), sample count, steps,
    images/s, data-wait fraction and gradient-norm statistics."""
    model.train()
    doctor.start_epoch()
    lr = float(optimizer.param_groups[0]["lr"])
    total_loss, n, steps, wait = 0.0, 0, 0, 0.0
    t0 = t_prev = time.perf_counter()
    for batch in batches:
        t_batch = time.perf_counter()
        wait += t_batch - t_prev
        x, y = _to_device(batch, device, channels_last)
        # BatchNorm cannot train on one sample (1x1 feature maps raise); equal shards give every
        # DDP worker the same batch sizes, so all workers skip such a remainder together
        if len(y) < 2:
            t_prev = time.perf_counter()
            continue
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
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
        total_loss += loss_value * len(y)
        n += len(y)
        steps += 1
        t_prev = time.perf_counter()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return {
        "train_loss": total_loss / max(n, 1),
        "train_samples": n,
        "train_steps": steps,
        "images_per_s": n / elapsed,
        "data_wait_frac": wait / elapsed,
        "epoch_time_s": elapsed,
        **doctor.epoch_summary(),
    }


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[dict], device: torch.device, amp: str = "none",
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), logits (N, K)) float32 for every sample in ``batches``."""
    model.eval()
    labels, logits = [], []
    for batch in batches:
        x, y = _to_device(batch, device, channels_last)
        if len(y) == 0:
            continue
        with autocast_context(device, amp):
            out = model(x)
        logits.append(out.float().cpu().numpy())
        labels.append(y.cpu().numpy())
    if not labels:
        return np.zeros((0,), np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(labels), np.concatenate(logits)


def evaluate_loss(logits: np.ndarray, labels: np.ndarray, loss_fn: nn.Module) -> float:
    """Validation loss on the full (gathered) prediction set, with the training loss function."""
    if len(labels) == 0:
        return float("nan")
    with torch.no_grad():
        return float(loss_fn(torch.from_numpy(logits), torch.from_numpy(labels).long()))
