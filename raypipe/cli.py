"""Shared start-up for the jobs: logging, config resolution, ``ray.init``, clean error exits."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from raypipe.config import Config, ConfigError

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


def setup_logging(verbose: bool = False) -> None:
    """A job's console: raypipe's own INFO lines; Ray Data's and Ray Train's INFO lines in this
    process (executions started and finished, their plans) only when ``verbose``."""
    logger = logging.getLogger("raypipe")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    import ray.data  # noqa: F401 - its logging is set up on import; set the level after that

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def load(path: str | None, overrides: list[str], resume: bool = False,
         search: bool = False) -> Config:
    """The resolved config of a job (:func:`raypipe.api.resolve_config`)."""
    from raypipe.api import resolve_config

    return resolve_config(path, overrides, resume=resume, search=search)


def init_ray(verbose: bool = False, **kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local one.

    A local cluster's workers inherit this process's environment (object-storage credentials
    and endpoint among them); on a cluster started elsewhere they come from its nodes (roles,
    service accounts, or a Secret in the pods' environment: cluster/README.md), never from
    this process. ``ray.init`` replaces the process's SIGTERM handler with a plain
    ``sys.exit``; the job's own (:func:`fail`: SIGTERM as Ctrl-C, so Ray Train aborts the run
    gracefully and gives back its share of the cluster) is put back. Unless ``verbose``, what the
    job's Ray workers print (Ray Train's and Ray Data's INFO lines: worker group start, every
    report and checkpoint, every execution) stays in Ray's log files: the driver shows the run's
    progress itself, and worker errors reach it as exceptions.
    """
    import ray

    if not ray.is_initialized():
        ours = signal.getsignal(signal.SIGTERM) is _sigterm_as_sigint
        kwargs.setdefault("log_to_driver", verbose)
        ray.init(**kwargs)
        if ours and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _sigterm_as_sigint)


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
        report(f"error: {_message(exc)}")
        return 1
    finally:
        _OWNS_RAY = before


def _message(exc: BaseException) -> str:
    """One of our errors raised inside a Ray task reaches the driver wrapped with the task's
    traceback: its own message, not the traceback, is what the user reads."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        from raypipe.training.trainer import root_cause

        return root_cause(exc)
    return str(exc)


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
