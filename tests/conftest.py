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

# fixtures that start Ray (or a server a job talks to); a test that uses one is marked ``ray``
RAY_FIXTURES = {"ray_cluster"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection looks at the markers
def pytest_collection_modifyitems(config, items) -> None:
    """Tiers: a test that uses a Ray fixture is ``ray``; one that is neither ``ray`` nor
    ``slow`` (end-to-end jobs in subprocesses, servers, clusters) is ``fast``: pure Python, no
    Ray, no subprocess jobs (``python -m pytest -m fast``)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if not any(item.get_closest_marker(name) for name in ("ray", "slow")):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) shared by every Ray test; yields its address so jobs
    started as subprocesses join it instead of starting their own."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
                   log_to_driver=False, ignore_reinit_error=True)
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
