"""Checkpoints in raypipe's format for the export, inference and saliency tests, without a training
run: a model built from the config, saved by the training worker's own ``save_checkpoint``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raypipe.config import Config, load_config
from raypipe.data.sources import discover
from raypipe.inference import load_image, preprocess
from raypipe.models.resnet import create_model


def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics of ``x`` (N, C, H, W), so that activations have the scale a trained
    model's have (a fresh model's running statistics are 0 and 1)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def train_inputs(cfg: Config, n: int = 8) -> torch.Tensor:
    """The first ``n`` training images of ``cfg``'s dataset, preprocessed for validation."""
    split = discover(cfg.data)
    xs = []
    for r in sorted(split.train, key=lambda r: r.key)[:n]:
        with split.filesystem.open_input_file(r.path) as f:
            img, vmax = load_image(f.read(), cfg, r.key)
        xs.append(preprocess(img, vmax, cfg))
    return torch.from_numpy(np.stack(xs))


def meta_for(cfg: Config, class_names: list[str], checkpoint: str = "test") -> dict:
    """meta.json as the training worker writes it."""
    return {
        "epoch": 0, "metrics": {}, "history": [], "class_names": class_names,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "model": {"name": cfg.model.name, "in_channels": cfg.preprocess.channels,
                  "num_classes": len(class_names)},
        "config": cfg.to_dict(), "data": {}, "checkpoint": checkpoint,
    }


def save_test_checkpoint(directory: Path, data_root: Path | str, overrides: list[str] = (),
                         seed: int = 0, model: torch.nn.Module | None = None) -> Path:
    """A checkpoint folder for ``data_root`` (folder per class) with ``overrides`` applied; its
    model is ``model`` or a fresh one with BatchNorm statistics of the training images."""
    from raypipe.training.worker import save_checkpoint

    cfg = load_config(None, [f"data.root={data_root}", *overrides])
    class_names = discover(cfg.data).class_names
    if model is None:
        torch.manual_seed(seed)
        model = create_model(cfg.model.name, in_channels=cfg.preprocess.channels,
                             num_classes=len(class_names))
        calibrate_batchnorm(model, train_inputs(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    directory.mkdir(parents=True, exist_ok=True)
    meta = meta_for(cfg, class_names)
    del meta["checkpoint"]  # load_checkpoint adds where it was loaded from
    save_checkpoint(str(directory), model, optimizer, scheduler, None, 0, meta)
    from raypipe.training.checkpoints import mark_complete

    mark_complete(str(directory), 0)  # as a run does once the checkpoint is in storage
    return directory
