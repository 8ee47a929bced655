"""A real head node (``ray start --head`` on free ports, token auth on) and a real ``ray job submit``."""

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
from conftest import ROOT, free_ports, kill_cluster

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def head_node(tmp_path):
    """A head node with token auth; yields (dashboard URL, env with the token). Always stopped."""
    temp_dir = tempfile.mkdtemp(prefix="rpjob", dir="/tmp")  # short: socket paths have a length limit
    token_file = tmp_path / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, metrics, nm, om, rte = free_ports(9)
    cmd = [
        RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--node-ip-address=127.0.0.1",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--runtime-env-agent-port={rte}",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        url = f"http://127.0.0.1:{dash}"
        _wait_for_jobs_api(url, token)
        yield url, env, token
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _jobs_api(url: str, token: str | None) -> int:
    req = urllib.request.Request(f"{url}/api/jobs/")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_for_jobs_api(url: str, token: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if _jobs_api(url, token) == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"jobs API at {url} did not come up in {timeout}s")


@pytest.mark.slow
@pytest.mark.xdist_group("machine_ray")  # `ray start --head`: the machine's current cluster
def test_ray_job_submit_with_token_auth(head_node, tmp_path, cache_dir):
    url, env, token = head_node
    # a request without the token is refused; with it, accepted
    assert _jobs_api(url, None) == 401
    assert _jobs_api(url, token) == 200

    results = tmp_path / "results"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
         "python", "jobs/train.py", "train.epochs=1", "preprocess.image_size=32",
         f"run.storage_path={results}", "run.name=submitted"],
        env={**env, "RAYPIPE_CACHE": str(cache_dir)}, cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout
    summary = json.loads((results / "submitted" / "summary.json").read_text())
    assert len(summary["history"]) == 1
    assert 0.0 <= summary["best_value"] <= 1.0

    # the CLI without the token is refused too
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "missing_token")
    refused = subprocess.run([RAY, "job", "list", "--address", url], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
