"""Autoscaling from zero, proven locally: the fake multi-node cluster of cluster/local.yaml starts
with zero workers and a head that takes no work (0 CPUs), as the cloud configs do. A real
``ray job submit`` (token auth on) of a training run, then of a 2-trial search, makes it add
worker nodes; each job succeeds and the idle nodes go away again. Started as cluster/README.md
step 0 starts it, with ``RAYPIPE_MAX_CPUS`` in ``ray start``'s environment; and without it, a
job whose training workers can never fit ends after Ray Train's worker-group timeout with
raypipe's ResourceError instead of waiting forever (and a fast test pins the failure policy
raypipe gives Ray Train for either case).

Each cluster runs in its own temp dir on free ports (the GCS port is handed to the fake provider
through ``provider.gcs_address``), so it never meets the shared ``ray_cluster`` fixture or any
other head node on this machine, and it is killed even when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, free_ports, kill_cluster, make_image_folder

# a fake cluster's head takes Ray's default port and is the machine's "current" cluster, which a
# ray.init() without an address joins: the tests that start Ray that way run in one test
# process, one after another (xdist group "machine_ray")
pytestmark = pytest.mark.xdist_group("machine_ray")
RAY = str(Path(sys.executable).parent / "ray")
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
IDLE_TIMEOUT_MIN = 0.2  # shorter than cluster/local.yaml's, to keep the tests short
# tiny runs: 16 px images, one epoch, small batches
TINY = ["train.epochs=1", "preprocess.image_size=16", "train.batch_size=8", "run.tensorboard=false"]


@dataclass
class FakeCluster:
    url: str  # the dashboard (jobs and state API)
    env: dict  # for the Ray CLI: token auth
    token: str
    config: dict  # the cluster config it runs

    @property
    def max_workers(self) -> int:
        return self.config["available_node_types"]["cpu_worker"]["max_workers"]

    @property
    def max_cpus(self) -> int:
        types = self.config["available_node_types"]
        return types["ray.head.default"]["resources"]["CPU"] + (
            self.max_workers * types["cpu_worker"]["resources"]["CPU"])


def _api(url: str, path: str, token: str | None) -> tuple[int, dict | None]:
    req = urllib.request.Request(url + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _alive_workers(cluster: FakeCluster) -> int:
    """ALIVE nodes other than the head, from the state API (-1 while it does not answer)."""
    try:
        code, body = _api(cluster.url, "/api/v0/nodes?limit=100&detail=false", cluster.token)
    except (urllib.error.URLError, OSError, ValueError):
        return -1
    if code != 200 or not body:
        return -1
    nodes = body["data"]["result"]["result"]
    return sum(1 for n in nodes if n["state"] == "ALIVE" and not n.get("is_head_node"))


def _start(tmp_path: Path, tell_max: bool):
    """cluster/local.yaml started with zero workers and token auth, as README step 0 does (with
    ``RAYPIPE_MAX_CPUS`` where ``tell_max``); yields a :class:`FakeCluster`, always stopped."""
    temp_dir = tempfile.mkdtemp(prefix="rpas", dir="/tmp")  # short: socket paths have a length limit
    import ray._private.services

    ip = ray._private.services.get_node_ip_address()
    gcs, dash, client, agent = free_ports(4)
    cfg = yaml.safe_load(LOCAL_YAML.read_text())
    cfg["provider"]["gcs_address"] = f"{ip}:{gcs}"
    cfg["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    config_path = Path(temp_dir) / "local.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    token = secrets.token_hex(32)
    token_file = tmp_path / "auth_token"
    token_file.write_text(token)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    for name in ("RAY_ADDRESS", "RAYPIPE_MAX_CPUS", "RAYPIPE_MAX_GPUS",
                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"):
        env.pop(name, None)
    # every Ray process of the cluster imports this checkout's raypipe
    start_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                 "PYTHONPATH": str(ROOT)}
    cluster = FakeCluster(f"http://127.0.0.1:{dash}", env, token, cfg)
    if tell_max:
        start_env["RAYPIPE_MAX_CPUS"] = str(cluster.max_cpus)
    head_cpus = cfg["available_node_types"]["ray.head.default"]["resources"]["CPU"]
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", f"--num-cpus={head_cpus}",
        f"--autoscaling-config={config_path}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=start_env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        deadline = time.time() + 120
        while _alive_workers(cluster) < 0:
            assert time.time() < deadline, f"state API at {cluster.url} did not come up"
            time.sleep(1)
        yield cluster
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def fake_cluster(tmp_path):
    """The local fake cluster at zero workers, its maximum told to jobs (``RAYPIPE_MAX_CPUS``)."""
    yield from _start(tmp_path, tell_max=True)


@pytest.fixture
def fake_cluster_of_unknown_size(tmp_path):
    """The same cluster without ``RAYPIPE_MAX_*``: jobs see only the nodes that are up."""
    yield from _start(tmp_path, tell_max=False)


def _submit(cluster: FakeCluster, submission_id: str, entrypoint: list[str],
            env_vars: dict[str, str]) -> None:
    """``ray job submit --no-wait`` with this checkout as the working dir, used in place
    (``local://``): the fake nodes share one session folder, and each new node's runtime-env agent
    deletes and re-unpacks an uploaded working dir there, under the driver and TrainController
    already running in it (once a TrainController died of it: "oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so"). Real nodes have their own disks; the upload path is tested on the shared
    cluster (test_job_submit)."""
    runtime_env = {"env_vars": env_vars}
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.url, "--no-wait",
         "--submission-id", submission_id, "--working-dir", f"local://{ROOT}",
         "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *entrypoint],
        env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]


def _follow(cluster: FakeCluster, submission_id: str, timeout: float) -> tuple[str | None, int, str]:
    """Wait for the job to end: (its status, the most worker nodes seen alive meanwhile, its
    log)."""
    peak, status, deadline = 0, None, time.time() + timeout
    while time.time() < deadline:
        peak = max(peak, _alive_workers(cluster))
        code, job = _api(cluster.url, f"/api/jobs/{submission_id}", cluster.token)
        status = job.get("status") if code == 200 and job else None
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _api(cluster.url, f"/api/jobs/{submission_id}/logs", cluster.token)[1] or {}
    return status, peak, str(logs.get("logs", ""))


def _scales_down(cluster: FakeCluster) -> None:
    """Once idle, the worker nodes are removed again."""
    deadline = time.time() + IDLE_TIMEOUT_MIN * 60 + 120
    while _alive_workers(cluster) != 0:
        assert time.time() < deadline, "idle worker nodes were not removed after the idle timeout"
        time.sleep(2)


@pytest.mark.slow
def test_job_scales_cluster_up_and_down(fake_cluster, tmp_path, cache_dir):
    cluster = fake_cluster
    assert _alive_workers(cluster) == 0  # starts with zero workers

    # token auth: a request without the token is refused, with it accepted
    assert _api(cluster.url, "/api/jobs/", None)[0] == 401
    assert _api(cluster.url, "/api/jobs/", cluster.token)[0] == 200

    # README step 0's run: the head has no CPUs, so the 1-CPU trainer worker and the 1-CPU data
    # workers need worker nodes
    results = tmp_path / "results"
    _submit(cluster, "autoscale-train",
            ["jobs/train.py", *TINY, "train.num_workers=1", "train.cpus_per_worker=1",
             "pipeline.cpus_per_worker=1", f"run.storage_path={results}", "run.name=autoscaled"],
            {"RAYPIPE_CACHE": str(cache_dir)})
    status, peak, logs = _follow(cluster, "autoscale-train", timeout=420)
    assert status == "SUCCEEDED", f"job {status}:\n{logs[-4000:]}"
    assert 1 <= peak <= cluster.max_workers, f"worker nodes seen alive: {peak}"
    assert "Going on: the cluster may scale up" not in logs  # checked against RAYPIPE_MAX_CPUS
    summary = json.loads((results / "autoscaled" / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["history"]) == 1
    assert 0.0 <= summary["best_value"] <= 1.0
    _scales_down(cluster)


@pytest.mark.slow
def test_search_scales_cluster_up_and_down(fake_cluster, tmp_path, cache_dir):
    """jobs/tune.py: two trials of one training worker (0.5 CPU) and 0.5-CPU data workers, which
    raypipe runs side by side because RAYPIPE_MAX_CPUS says the cluster grows to 2 CPUs."""
    cluster = fake_cluster
    assert _alive_workers(cluster) == 0
    results = tmp_path / "results"
    spec = {"name": "zero", "storage_path": str(results), "search": "grid", "num_samples": 1,
            "subset": 16, "scheduler": {"type": "none"}, "trial_overrides": ["train.epochs=1"],
            "space": {"train.lr": [0.01, 0.003]}}
    spec_file = tmp_path / "search.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    _submit(cluster, "autoscale-search",
            ["jobs/tune.py", "--space", str(spec_file), *TINY, "train.num_workers=1",
             "train.cpus_per_worker=0.5", "pipeline.cpus_per_worker=0.5",
             f"run.storage_path={results}"],
            {"RAYPIPE_CACHE": str(cache_dir)})
    status, peak, logs = _follow(cluster, "autoscale-search", timeout=420)
    assert status == "SUCCEEDED", f"job {status}:\n{logs[-4000:]}"
    assert "running up to 2 trial(s) at a time" in logs, logs[-4000:]
    assert 1 <= peak <= cluster.max_workers, f"worker nodes seen alive: {peak}"
    best = json.loads((results / "zero" / "best.json").read_text())
    assert best["trials"] == 2 and best["failed"] == 0, best
    assert 0.0 <= best["best_value"] <= 1.0
    runs = sorted((results / "zero" / "runs").glob("*/summary.json"))
    assert len(runs) == 2
    for run in runs:
        summary = json.loads(run.read_text())
        assert summary["status"] == "finished" and len(summary["history"]) == 1, summary
    _scales_down(cluster)


@pytest.mark.slow
def test_job_on_a_cluster_of_unknown_size_ends_when_its_workers_never_come(
        fake_cluster_of_unknown_size, tmp_path, cache_dir):
    """No RAYPIPE_MAX_*: the shortfall is only warned about (the cluster may grow), Ray Train
    waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for three 1-CPU workers the 2-CPU cluster can
    never hold, and the job ends then with raypipe's ResourceError (Ray Train's default would
    retry the start forever)."""
    cluster = fake_cluster_of_unknown_size
    timeout_s = 20
    results = tmp_path / "results"
    t0 = time.time()
    _submit(cluster, "never-fits",
            ["jobs/train.py", *TINY, "train.num_workers=3", "train.cpus_per_worker=1",
             "pipeline.cpus_per_worker=1", "pipeline.cache=false",
             f"run.storage_path={results}", "run.name=never-fits"],
            {"RAYPIPE_CACHE": str(cache_dir),
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(timeout_s)})
    status, _, logs = _follow(cluster, "never-fits", timeout=420)
    elapsed = time.time() - t0
    assert status == "FAILED", f"job {status}:\n{logs[-4000:]}"
    # not the pre-check: it let the run go on
    assert "Going on: the cluster may scale up" in logs, logs[-4000:]
    assert "ResourceError: the cluster did not provide the training workers" in logs, logs[-4000:]
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in logs
    # one timeout and the job's start and teardown, not a retry loop
    assert elapsed < timeout_s + 150, f"the job took {elapsed:.0f} s to end"
    summary = json.loads((results / "never-fits" / "summary.json").read_text())
    assert summary["status"] == "failed" and "did not provide the training workers" in summary["error"]


@pytest.mark.parametrize("known_max", [True, False])
def test_trainer_waits_for_its_workers_only_where_the_cluster_size_is_known(known_max, tmp_path,
                                                                            monkeypatch):
    """The TorchTrainer raypipe builds (no Ray started): Ray Train's controller retries a worker
    group that did not start in time without limit by default. raypipe keeps that where the
    pre-check has seen the cluster's maximum (the workers fit; nodes may take minutes to boot) and
    allows no retry where the size is unknown (the workers may never come)."""
    from raypipe.config import load_config
    from raypipe.data.sources import discover
    from raypipe.training import trainer

    root = make_image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    cfg = load_config(None, [f"data.root={root}", f"run.storage_path={tmp_path / 'runs'}",
                             "run.name=r", "train.num_workers=2", "train.cpus_per_worker=1"])
    built: dict = {}
    monkeypatch.setattr(trainer, "cluster_capacity", lambda: ({"CPU": 4.0}, known_max))
    monkeypatch.setattr(trainer.pipeline, "build_datasets",
                        lambda *a, **k: SimpleNamespace(train="train", val="val", clock=None))
    monkeypatch.setattr(trainer, "TorchTrainer", lambda *a, **k: built.update(k) or "trainer")
    trainer.build_trainer(cfg, discover(cfg.data))
    failure = built["run_config"].failure_config
    assert failure.max_failures == cfg.train.max_failures
    assert failure.controller_failure_limit == (-1 if known_max else 0)
