"""Shared start-up for the jobs: logging, config resolution, ``ray.init``, clean error exits."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from raypipe.config import Config, ConfigError, load_config

# errors whose message is the whole story: print it, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    from raypipe.data.decode import DecodeError
    from raypipe.data.pipeline import BadFileError
    from raypipe.data.sources import DataSourceError
    from raypipe.training.doctor import TrainingDiverged
    from raypipe.training.trainer import ResourceError, RunError

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


# object-storage settings the Ray workers need as much as the driver does. Only values travel:
# names of files (AWS_PROFILE, AWS_CA_BUNDLE, GOOGLE_APPLICATION_CREDENTIALS) would point at
# nothing on other nodes and break their own credential chain (instance role, service account).
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_EC2_METADATA_DISABLED",
)


def _job_env_vars() -> set[str]:
    """Env var names the submitted job's runtime env already sets (``ray job submit
    --runtime-env-json``); Ray refuses to merge a second value for the same name."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def forwarded_env() -> dict[str, str]:
    """The object-storage variables of this process to hand to every Ray worker of the job.

    Workers of a cluster started elsewhere (``ray start``, a test fixture, another shell) do not
    inherit the driver's environment, so S3 reads and checkpoint writes there would run without
    the endpoint or credentials. Values are passed to Ray only, never printed or logged.
    """
    taken = _job_env_vars()
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k) and k not in taken}


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local one.

    The S3 variables of this process travel to the workers through the job's runtime env.
    ``ray.init`` replaces the process's SIGTERM handler with a plain ``sys.exit``; the job's own
    (:func:`fail`: SIGTERM as Ctrl-C, so Ray Train aborts the run gracefully and gives back its
    share of the cluster) is put back.
    """
    import ray

    from raypipe.data.pipeline import configure_data_context

    if not ray.is_initialized():
        env = forwarded_env()
        if env:
            runtime_env = dict(kwargs.pop("runtime_env", None) or {})
            runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
            kwargs["runtime_env"] = runtime_env
        ours = signal.getsignal(signal.SIGTERM) is _sigterm_as_sigint
        ray.init(**kwargs)
        if ours and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    configure_data_context()


def _sigterm_as_sigint(signum: int, frame) -> None:
    """SIGTERM (``kill``, a scheduler stopping the job) takes the same path as Ctrl-C: whatever
    SIGINT handler is current (Ray Train's graceful abort during ``fit``, else KeyboardInterrupt)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def fail(main: Callable[[], int]) -> int:
    """Run ``main``; known errors print one clear message and exit non-zero. SIGINT and SIGTERM
    stop the run cleanly (exit 130) leaving checkpoints and a partial summary to resume from."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    global _OWNS_RAY
    before, _OWNS_RAY = _OWNS_RAY, not _ray_initialized()  # only a connection it opened is closed
    report = functools.partial(_report, stop_ray=_OWNS_RAY)
    try:
        return main()
    except KeyboardInterrupt:
        report("interrupted: checkpoints and summary written so far remain valid; re-run the same "
               "command (with the same run.name, or --resume) to continue.")
        return 130
    except ConfigError as exc:
        report(f"error: {exc}")
        return 2
    except _user_errors() as exc:
        report(f"error: {exc}")
        return 1
    finally:
        _OWNS_RAY = before


def exit_with(main: Callable[[], int]) -> NoReturn:
    """A job's entry point: :func:`fail` (main), then exit with its code. An interrupted job has
    already stopped Ray and written what it had; its interpreter shutdown can still abort inside
    Ray's core worker after a SIGTERM (exit -6 instead of 130, seen on a loaded machine), so that
    one ends here, with its streams and logs flushed, without the interpreter's shutdown."""
    code = fail(main)
    if code == 130:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# whether the running job opened its own connection to Ray (set by :func:`fail`): only that one is
# closed before its last lines
_OWNS_RAY = False


def settle() -> None:
    """Before a job prints its results: what :func:`_report` does before an error, so that the
    results are the last lines. Ray forwards its workers' logs to the driver as they arrive, and a
    search's last trial's data stage still had lines on the way after the summary was printed."""
    _quiet_ray(_OWNS_RAY)


def _quiet_ray(stop_ray: bool) -> None:
    if stop_ray and _ray_initialized():
        import ray

        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the message matters more than a clean shutdown
            pass
    bars = getattr(sys.modules.get("ray.experimental.tqdm_ray"), "_manager", None)
    if bars is not None:
        bars.hide_bars()  # and never shown again: the message is the last thing printed
    sys.stdout.flush()


def _report(message: str, stop_ray: bool) -> None:
    """Print ``message`` last: stop Ray first so that worker logs still streaming to this driver
    (tracebacks of the failure just reported) do not bury it, and take down Ray's progress bars
    for good. Those (``tqdm_ray``, drawn by this driver for the data stage) patch ``print`` to
    redraw themselves after every line, so a run interrupted while one was up ended on a bar,
    not on its message."""
    _quiet_ray(stop_ray)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
