"""Optimisers and epoch-level learning-rate schedules (with optional linear warm-up)."""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as sched

from raypipe.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


def _main_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int):
    s = cfg.schedule
    if s == "none":
        return sched.LambdaLR(opt, lambda _: 1.0)
    if s == "step":
        return sched.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if s == "multistep":
        return sched.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    if s == "exponential":
        return sched.ExponentialLR(opt, gamma=cfg.gamma)
    if s == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=max(1, epochs))
    if s == "onecycle":
        return sched.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(2, epochs + 1))
    if s == "plateau":
        mode = "max" if cfg.plateau_metric == "val_auc" else "min"
        return sched.ReduceLROnPlateau(opt, mode=mode, factor=cfg.gamma,
                                       patience=cfg.plateau_patience)
    raise ValueError(f"unknown schedule '{s}'")


class EpochScheduler:
    """Steps once per epoch: linear warm-up for ``warmup_epochs``, then the main schedule.

    ``step(metrics)`` takes the epoch's validation metrics (used by reduce-on-plateau).
    """

    def __init__(self, opt: torch.optim.Optimizer, cfg: TrainConfig):
        self.opt = opt
        self.cfg = cfg
        self.warmup = cfg.warmup_epochs
        self.epoch = 0
        self.warm = (
            sched.LinearLR(opt, start_factor=1.0 / (self.warmup + 1), end_factor=1.0,
                           total_iters=self.warmup)
            if self.warmup > 0 else None
        )
        self.main = _main_schedule(opt, cfg, cfg.epochs - self.warmup)

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def step(self, metrics: dict | None = None) -> None:
        self.epoch += 1
        if self.warm is not None and self.epoch <= self.warmup:
            self.warm.step()
            if self.epoch == self.warmup and not isinstance(self.main, sched.ReduceLROnPlateau):
                for g in self.opt.param_groups:  # main schedule starts from the base LR
                    g["lr"] = g["initial_lr"]
            return
        if isinstance(self.main, sched.ReduceLROnPlateau):
            value = (metrics or {}).get(self.cfg.plateau_metric)
            if value is not None:
                self.main.step(value)
        else:
            self.main.step()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "warm": self.warm.state_dict() if self.warm is not None else None,
            "main": self.main.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        if self.warm is not None and state.get("warm") is not None:
            self.warm.load_state_dict(state["warm"])
        self.main.load_state_dict(state["main"])
