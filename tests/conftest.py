"""Shared fixtures: one local Ray cluster for the whole session, tiny real image folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

# small batches (four images per worker) on random pixels: keep the optimiser tame so that the
# doctor never stops a run whose test is about something else
TAME = ("train.lr=0.01", "train.grad_clip=1.0")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"



@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) shared by every Ray test; yields its address so jobs
    started as subprocesses join it instead of starting their own."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                   log_to_driver=False, ignore_reinit_error=True)
    from raypipe.data.pipeline import configure_data_context

    configure_data_context(show_progress=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Cache for the built-in dataset, shared by tests."""
    d = tmp_path_factory.mktemp("cache")
    os.environ["RAYPIPE_CACHE"] = str(d)
    return d


def make_image_folder(root: Path, classes: dict[str, int], size=(24, 20), mode="RGB",
                      fmt="png", seed=0) -> Path:
    """``root/<class>/<i>.<fmt>`` with real, learnable images: class k is brighter in one half."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = size[1], size[0]
            arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            if k % 2:
                arr[:, : w // 2] += 150
            else:
                arr[: h // 2] += 150
            img = Image.fromarray(arr, "RGB")
            if mode != "RGB":
                img = img.convert(mode)
            img.save(d / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "imgs", {"cats": 12, "dogs": 12})


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (real-image samples are optional)")
    return SHARED_DATA


def run_job(script: str, *args: str, env: dict | None = None, timeout: int = 600,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``jobs/<script>`` as a user would; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now on every interface."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def kill_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes: every one of them names its temp dir on the command
    line (``ray stop`` would stop every cluster on the machine)."""
    me = os.getpid()
    victims = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != me and any(temp_dir in part for part in (p.info["cmdline"] or [])):
                victims.append(p)
                victims.extend(p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)


def ray_snapshot(registered: list[str], latest: str | None = None) -> str:
    """``checkpoint_manager_snapshot.json`` as Ray Train writes it (its own model, so a change of
    Ray's format fails here)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    def result(name):
        return _TrainingResultState(checkpoint_dir_name=name, metrics={"epoch": 0})

    return _CheckpointManagerState(
        checkpoint_results=[result(n) for n in registered],
        checkpoint_report_indices=list(range(len(registered))),
        latest_checkpoint_result=result(latest) if latest else None,
        pending_training_results=[], pending_validation_specs=[], current_report_index=0,
        validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    ).model_dump_json()


def record_cpu_limits(ds, into: list) -> None:
    """Append (monotonic time, CPU limit) to ``into`` at every scheduling step of ``ds``'s
    executions, in whichever process runs them (``into`` is only read back from the driver's)."""
    import time

    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class RecordLimits(ExecutionCallback):  # local: sent by value with the dataset's context
        def on_execution_step(self, executor) -> None:
            into.append((time.monotonic(), executor._resource_manager._global_limits.cpu))

    ds.context.custom_execution_callback_classes = [
        *ds.context.custom_execution_callback_classes, RecordLimits]


def new_execution_cpus() -> float:
    """The CPUs Ray Data gives a new execution of raypipe's on the shared cluster now."""
    import time

    import ray

    from raypipe.config import load_config
    from raypipe.data import pipeline

    seen: list[tuple[float, float]] = []
    probe = pipeline._bounded(ray.data.range(1), load_config(None, []))
    record_cpu_limits(probe, seen)
    probe.map_batches(lambda b: (time.sleep(0.3), b)[1], batch_size=None).materialize()
    return max((cpu for _, cpu in seen), default=0.0)


def reservations() -> dict[str, dict]:
    """What Ray Data's autoscaling coordinator holds for each requester on the shared cluster
    (``data-<execution>``: a Ray Data execution; ``train-<run>``: a Ray Train run's workers):
    its priority, the CPUs reserved to it, and the seconds until its last ask expires."""
    import time

    import ray

    try:
        actor = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # no execution has asked yet
        return {}

    def held(coordinator) -> dict:
        now = time.time()
        return {rid: {"priority": r.priority, "expires_in_s": round(r.expiration_time - now, 1),
                      "cpus": sum(node.get("CPU", 0) for node in r.reserved_resources.values())}
                for rid, r in coordinator._ongoing_reqs.items() if r.expiration_time > now}

    return ray.get(actor.__ray_call__.remote(held))


def wait_for_full_share(cpus: float = 2.0, timeout_s: float = 60.0) -> None:
    """Until the shared cluster's CPUs are free and a new Ray Data execution is given all of
    them, for tests that time the data stage's lanes: an earlier test's actors may still be
    ending, and a process killed in the middle of an execution (the fault tests kill several)
    keeps its share for up to ``raypipe.data.pipeline.RESERVATION_EXPIRE_S``."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free, given = ray.available_resources().get("CPU", 0.0), 0.0
        if free >= cpus:
            given = new_execution_cpus()
            if given >= cpus:
                return
        assert time.monotonic() < deadline, (
            f"after {timeout_s} s: {free} of the cluster's CPUs free, a new execution given "
            f"{given}; reserved: {reservations()}")
        time.sleep(1.0)
