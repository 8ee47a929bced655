"""Optimisers and epoch-level learning-rate schedules (with optional linear warm-up)."""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as sched

from raypipe.config import TrainConfig

# ``train.momentum: null`` means the optimiser's usual momentum. RMSprop's is 0 (PyTorch's and
# Keras's default): its squared-gradient average starts at zero, so its first step moves each
# weight 10x the learning rate; without momentum the steps shrink from there (3x by the 8th),
# with 0.9 they grow to 25x and stay there for dozens of steps. With SGD's 0.9 every RMSprop
# trial of the default search diverged (val AUC 0.5 at lr 0.01 and 0.001).
DEFAULT_MOMENTUM = {"sgd": 0.9, "rmsprop": 0.0}


def momentum_of(cfg: TrainConfig) -> float:
    """The momentum the optimiser uses: ``train.momentum``, or the optimiser's usual one."""
    return cfg.momentum if cfg.momentum is not None else DEFAULT_MOMENTUM.get(cfg.optimizer, 0.0)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    momentum = momentum_of(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum,
                               nesterov=cfg.nesterov and momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=momentum,
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


# Keys of a scheduler's state that come from the config rather than from training progress:
# on resume they follow the current config (e.g. a larger train.epochs stretches the cosine).
_CONFIG_KEYS = ("T_max", "step_size", "gamma", "milestones", "patience", "factor", "total_steps",
                "_schedule_phases")


class EpochScheduler:
    """Steps once per epoch: ``warmup_epochs`` of linear warm-up (epoch ``e`` runs at
    ``lr * (e + 1) / (warmup_epochs + 1)``), then the main schedule, started fresh from the
    base LR exactly as torch's own scheduler would run it alone.

    ``step(metrics)`` takes the epoch's validation metrics (used by reduce-on-plateau, which
    watches ``train.plateau_metric``). ``lr`` is the LR the coming epoch uses.
    """

    def __init__(self, opt: torch.optim.Optimizer, cfg: TrainConfig):
        self.opt = opt
        self.cfg = cfg
        self.warmup = cfg.warmup_epochs
        self.epoch = 0
        self.base_lrs = [float(g["lr"]) for g in opt.param_groups]
        self.main = None
        if self.warmup > 0:
            self._set_warmup_lr()
        else:
            self._start_main()

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def _set_warmup_lr(self) -> None:
        factor = (self.epoch + 1) / (self.warmup + 1)
        for g, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * factor

    def _start_main(self) -> None:
        for g, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            g["lr"] = base
            g["initial_lr"] = base
        self.main = _main_schedule(self.opt, self.cfg, self.cfg.epochs - self.warmup)

    def step(self, metrics: dict | None = None) -> None:
        self.epoch += 1
        if self.epoch < self.warmup:
            self._set_warmup_lr()
        elif self.main is None:
            self._start_main()
        elif isinstance(self.main, sched.ReduceLROnPlateau):
            value = (metrics or {}).get(self.cfg.plateau_metric)
            if value is not None and value == value:  # a NaN metric carries no signal
                self.main.step(value)
        else:
            self.main.step()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "base_lrs": self.base_lrs,
            "main": self.main.state_dict() if self.main is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore progress; call after ``optimizer.load_state_dict`` (which restores the LR)."""
        self.epoch = int(state["epoch"])
        self.base_lrs = list(state.get("base_lrs", self.base_lrs))
        if state.get("main") is None:
            self.main = None
            if self.epoch < self.warmup:
                self._set_warmup_lr()
            else:
                self._start_main()
            return
        lrs = [g["lr"] for g in self.opt.param_groups]
        if self.main is None:
            self._start_main()
        fresh = self.main.state_dict()
        self.main.load_state_dict(
            {**state["main"], **{k: fresh[k] for k in _CONFIG_KEYS if k in fresh}})
        for g, lr in zip(self.opt.param_groups, lrs, strict=True):
            g["lr"] = lr
