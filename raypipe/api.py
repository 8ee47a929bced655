"""The Python API: ``raypipe.train(config="configs/flowers.yaml", overrides={...})``.

It does what ``jobs/train.py`` does (the job calls it): the same run naming, resuming and
``summary.json``, returned as a dict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from raypipe.config import Config, ConfigError, load_config, with_overrides

Overrides = Mapping[str, Any] | Sequence[str] | None


def override_list(overrides: Overrides) -> list[str]:
    """``{"train.lr": 0.01}`` or ``["train.lr=0.01"]`` -> ``["train.lr=0.01"]``."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import yaml

        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a dict or a list of 'key=value' strings, got the string "
                          f"{overrides!r}. Use [{overrides!r}].")
    return list(overrides)


def expand_storage(storage: str) -> str:
    if "://" in storage:
        return storage.rstrip("/")
    return os.path.abspath(os.path.expanduser(storage))


def latest_run(storage: str, stem: str) -> str | None:
    import pyarrow.fs as pafs

    from raypipe.data.sources import get_filesystem

    fs, root = get_filesystem(storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith(stem + "-"))
    return names[-1] if names else None


def resolve_config(config: str | os.PathLike | Config | None = None, overrides: Overrides = None,
                   resume: bool = False, *, search: bool = False) -> Config:
    """The config a run trains with: ``config`` (a YAML path or a shipped config's name; a
    :class:`Config`; None: the built-in dataset's), overrides applied, the storage path made
    absolute and the run named.

    Without ``run.name`` each run gets ``<config>-<YYYYmmdd-HHMMSS>``; ``resume`` picks the
    latest such run of the same config instead. An explicit ``run.name`` that exists resumes it.
    Without ``track.experiment`` the run's MLflow experiment is the config's name, unless
    ``search`` (the base config of a search, whose trials go to the search's experiment).
    """
    extra = override_list(overrides)
    if isinstance(config, Config):
        stem, cfg = "run", with_overrides(config, extra)
    else:
        stem = Path(config).stem if config else "default"
        cfg = load_config(config, extra)
    storage = expand_storage(cfg.run.storage_path)
    name = cfg.run.name
    if name is None:
        name = latest_run(storage, stem) if resume else None
        if resume and name is None:
            raise ConfigError(
                f"resume: no earlier run of '{stem}' in {storage}. Start a new run (no resume), or "
                "give run.name=<name of the run to continue>."
            )
        name = name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    track = cfg.track
    if track.experiment is None and not search:
        track = track.model_copy(update={"experiment": stem})
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name, "storage_path": storage}),
                                  "track": track})


def train(config: str | os.PathLike | Config | None = None, overrides: Overrides = None, *,
          resume: bool = False) -> dict:
    """Train as ``python jobs/train.py`` does and return the run's summary (``summary.json``):
    ``run_dir``, ``best_value`` of ``metric``, ``best_checkpoint``, ``history``, ...

    Joins the Ray cluster this process is connected to, or the one ``RAY_ADDRESS`` names, or
    starts a local one. Errors are raised (:class:`~raypipe.config.ConfigError`,
    :class:`~raypipe.training.trainer.RunError`, ...), their messages saying what to change.
    """
    import ray

    from raypipe.training.trainer import run_training

    cfg = resolve_config(config, overrides, resume=resume)
    if not ray.is_initialized():
        ray.init()
    return run_training(cfg, progress=True)
