"""Shared start-up for the jobs: logging, config resolution, ``ray.init``, clean error exits."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from raypipe.config import Config, ConfigError, load_config

# errors whose message is the whole story: print it, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    from raypipe.data.decode import DecodeError
    from raypipe.data.pipeline import BadFileError
    from raypipe.data.sources import DataSourceError
    from raypipe.train.doctor import TrainingDiverged
    from raypipe.train.trainer import ResourceError, RunError

    return USER_ERRORS + (
        DataSourceError, DecodeError, BadFileError, ResourceError, RunError, TrainingDiverged,
    )


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _config_stem(path: str | None) -> str:
    return Path(path).stem if path else "default"


def _expand_storage(storage: str) -> str:
    if "://" in storage:
        return storage.rstrip("/")
    return os.path.abspath(os.path.expanduser(storage))


def _latest_run(storage: str, stem: str) -> str | None:
    if "://" in storage:
        import pyarrow.fs as pafs

        from raypipe.data.sources import get_filesystem

        fs, root = get_filesystem(storage)
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except OSError:
            return None
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    else:
        p = Path(storage)
        names = [d.name for d in p.iterdir() if d.is_dir()] if p.is_dir() else []
    names = sorted(n for n in names if n.startswith(stem + "-"))
    return names[-1] if names else None


def load(path: str | None, overrides: list[str], resume: bool = False) -> Config:
    """The resolved config: storage path made absolute, run name chosen.

    Without ``run.name`` each run gets ``<config>-<YYYYmmdd-HHMMSS>``; ``--resume`` picks the
    latest such run of the same config instead. Re-using an explicit ``run.name`` resumes it.
    """
    cfg = load_config(path, overrides)
    storage = _expand_storage(cfg.run.storage_path)
    name = cfg.run.name
    if name is None:
        stem = _config_stem(path)
        name = _latest_run(storage, stem) if resume else None
        if resume and name is None:
            raise ConfigError(
                f"--resume: no earlier run of '{stem}' in {storage}. Run without --resume, or "
                "give run.name=<name of the run to continue>."
            )
        name = name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.run = cfg.run.model_copy(update={"name": name, "storage_path": storage})
    return cfg


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local one."""
    import ray

    from raypipe.data.pipeline import configure_data_context

    if not ray.is_initialized():
        ray.init(**kwargs)
    configure_data_context()


def fail(main: Callable[[], int]) -> int:
    """Run ``main``; known errors print one clear message and exit non-zero."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: checkpoints and summary written so far remain valid; re-run the same "
              "command (with the same run.name, or --resume) to continue.", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
