"""Autoscaling proven locally: the fake multi-node cluster of cluster/local.yaml starts with zero
workers, a real ``ray job submit`` (token auth on) makes it add worker nodes, the job succeeds, and
the idle nodes go away again.

The cluster runs in its own temp dir on free ports (the GCS port is handed to the fake provider
through ``provider.gcs_address``), so it never meets the shared ``ray_cluster`` fixture or any
other head node on this machine.
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
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_ports, kill_cluster

RAY = str(Path(sys.executable).parent / "ray")
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
IDLE_TIMEOUT_MIN = 0.2  # shorter than cluster/local.yaml's, to keep the test short


def _api(url: str, path: str, token: str | None) -> tuple[int, dict | None]:
    req = urllib.request.Request(url + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _alive_workers(url: str, token: str) -> int:
    """ALIVE nodes other than the head, from the state API."""
    try:
        code, body = _api(url, "/api/v0/nodes?limit=100&detail=false", token)
    except (urllib.error.URLError, OSError, ValueError):
        return -1
    if code != 200 or not body:
        return -1
    nodes = body["data"]["result"]["result"]
    return sum(1 for n in nodes if n["state"] == "ALIVE" and not n.get("is_head_node"))


@pytest.fixture
def fake_cluster(tmp_path):
    """cluster/local.yaml started with zero workers and token auth; yields (dashboard URL, env for
    the Ray CLI, token, the config used). Always stopped, even when the test fails."""
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
    env.pop("RAY_ADDRESS", None)
    start_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                 "RAYPIPE_AUTOSCALING_CONFIG": str(config_path)}
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
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while _alive_workers(url, token) < 0:
            assert time.time() < deadline, f"state API at {url} did not come up"
            time.sleep(1)
        yield url, env, token, cfg
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_job_scales_cluster_up_and_down(fake_cluster, tmp_path, cache_dir):
    url, env, token, cfg = fake_cluster
    max_workers = cfg["available_node_types"]["cpu_worker"]["max_workers"]
    assert _alive_workers(url, token) == 0  # starts with zero workers

    # token auth: a request without the token is refused, with it accepted
    assert _api(url, "/api/jobs/", None)[0] == 401
    assert _api(url, "/api/jobs/", token)[0] == 200

    # the head has 1 CPU; a 1-CPU trainer worker plus the data actors need worker nodes
    results = tmp_path / "results"
    runtime_env = {"env_vars": {"RAYPIPE_CACHE": str(cache_dir)}}
    # The working dir is used in place (local://), not uploaded: the fake nodes share one session
    # folder, and each new node's runtime-env agent deletes and re-unpacks an uploaded working dir
    # there, under the driver and TrainController already running in it (once a TrainController
    # died of it: "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). Real nodes have their own
    # disks; the upload path is tested on the shared cluster (test_job_submit).
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--no-wait", "--submission-id", "autoscale-test",
         "--working-dir", f"local://{ROOT}", "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/train.py", "train.epochs=1", "preprocess.image_size=32",
         "train.num_workers=1", "train.cpus_per_worker=1", "train.batch_size=16",
         "run.tensorboard=false", f"run.storage_path={results}", "run.name=autoscaled"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    peak, status, deadline = 0, None, time.time() + 420
    while time.time() < deadline:
        peak = max(peak, _alive_workers(url, token))
        code, job = _api(url, "/api/jobs/autoscale-test", token)
        status = job.get("status") if code == 200 and job else None
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _api(url, "/api/jobs/autoscale-test/logs", token)[1] or {}
    assert status == "SUCCEEDED", f"job {status}:\n{str(logs.get('logs', ''))[-4000:]}"
    assert 1 <= peak <= max_workers, f"worker nodes seen alive: {peak}"
    summary = json.loads((results / "autoscaled" / "summary.json").read_text())
    assert len(summary["history"]) == 1
    assert 0.0 <= summary["best_value"] <= 1.0

    # once idle, the worker nodes are removed again
    deadline = time.time() + IDLE_TIMEOUT_MIN * 60 + 90
    while _alive_workers(url, token) != 0:
        assert time.time() < deadline, "idle worker nodes were not removed after the idle timeout"
        time.sleep(2)
