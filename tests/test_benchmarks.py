"""Each benchmark subcommand runs at tiny size and writes well-formed JSON with its fields.
(No timing assertions: the targets are checked by running the benchmarks, not by tests.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from raypipe.benchmarks.scaling import linear_fit

TINY = ["--synthetic", "--image-size", "16", "--batch-size", "4", "--actors", "1", "--ray-data-batch", "4"]


def _job():
    spec = importlib.util.spec_from_file_location("benchmark_job", ROOT / "jobs" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, what: str, *args: str) -> dict:
    out = tmp_path / f"{what}.json"
    assert _job().main([what, "--json", str(out), *args]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == what and result["table"]
    return result


def _positive(result: dict, *keys: str) -> None:
    for k in keys:
        v = result[k]
        assert isinstance(v, int | float) and math.isfinite(v) and v > 0, (k, v)


def test_linear_fit_recovers_a_line():
    slope, intercept, r2 = linear_fit([1, 2, 4], [3.0, 5.0, 9.0])
    assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
    x = np.arange(10.0)
    assert linear_fit(x, x + np.sin(x))[2] < 1.0


def test_processes_are_told_apart_by_the_titles_ray_gives_them():
    from raypipe.benchmarks.cpu import role_of

    assert role_of(["ray::IDLE"], "python") == "lane"  # a task worker, between tasks or in one
    assert role_of(["ray::MapWorker(MapBatches(ImageBatchProcessor))"], "python") == "lane"
    assert role_of(["ray::EpochClock"], "python") == "system"  # a helper actor
    assert role_of(["/opt/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"], "raylet") == "system"
    assert role_of(["python", "-u", "/x/site-packages/ray/dashboard/dashboard.py"], "python") == "system"
    assert role_of(["python", "-c", "from multiprocessing.forkserver import main"], "python") is None
    # a worker process that has not taken its title yet may become a lane: not classified yet
    assert role_of(["python", "/x/site-packages/ray/_private/workers/default_worker.py",
                    "--node-ip-address=1"], "python") is None
    assert role_of(["/home/ray/venv/bin/python", "train.py"], "python") is None  # a user named ray


def test_stage_cpu_counts_a_lane_that_exits_inside_the_span(tmp_path):
    """A process titled as a Ray task worker burns 0.4 CPU-seconds and exits while measured: its
    CPU counts as the lane's (up to the last sample), and an untitled one's does not."""
    import subprocess
    import sys

    from raypipe.benchmarks.cpu import StageCpu

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    with StageCpu(cpus=1, interval=0.02) as stage:
        lane = subprocess.Popen(["bash", "-c", f'exec -a "ray::IDLE" {sys.executable} -c "$0"', burn])
        other = subprocess.Popen([sys.executable, "-c", burn])
        assert lane.wait(30) == 0 and other.wait(30) == 0
    s = stage.summary()
    assert 0.3 <= stage.cpu["lane"] < 0.6  # the lane's 0.4 s, not the other's too
    assert s["lane_busy"] == pytest.approx(stage.cpu["lane"] / stage.wall)
    assert stage.wall >= 0.4 and s["driver_cores"] >= 0 and s["lane_cpu_wait"] >= 0
    assert s["lane_idle"] == pytest.approx(max(0.0, 1 - s["lane_busy"] - s["lane_cpu_wait"]))


def test_a_lane_that_ends_between_two_readings_keeps_the_wait_readable(monkeypatch):
    """A lane process that ends between the reading of its CPU time and of its wait for a CPU
    (Ray ends idle workers) made the whole span's ``lane_cpu_wait`` unreadable (None); seen once
    in the suite's ``gpu`` run. Here the lane's wait cannot be read after its third reading, as
    when it has gone: it keeps its last full reading."""
    import subprocess
    import sys

    from raypipe.benchmarks import cpu

    reads: list[int] = []  # of the lane started here (other lanes may be about: the shared cluster)
    ours: list[int] = []
    real = cpu.cpu_wait_s

    def gone_after_three(pid: int) -> float | None:
        if pid in ours:
            reads.append(pid)
            if len(reads) > 3:
                return None
        return real(pid)

    monkeypatch.setattr(cpu, "cpu_wait_s", gone_after_three)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    with cpu.StageCpu(cpus=1, interval=0.02) as stage:
        lane = subprocess.Popen(["bash", "-c", f'exec -a "ray::IDLE" {sys.executable} -c "$0"', burn])
        ours.append(lane.pid)
        assert lane.wait(30) == 0
    s = stage.summary()
    assert len(reads) > 3 and 0 < stage.cpu["lane"] < 0.6
    assert s["lane_cpu_wait"] is not None and s["lane_cpu_wait"] >= 0


def test_stage_cpu_counts_a_lane_worker_that_becomes_an_actor_as_rays_own():
    """Ray may start a helper actor in an idle pooled worker: a process titled ``ray::IDLE`` when
    the span starts (so taken for a lane) retitles itself as an actor, as Ray does, and burns
    0.4 CPU-seconds: they count as Ray's own, not the lane's."""
    import subprocess
    import sys

    from raypipe.benchmarks.cpu import StageCpu, became_actor

    assert became_actor(["ray::BadFileLedger", "", ""]) and became_actor(["ray::_StatsActor.update"])
    assert not became_actor(["ray::IDLE", ""]) and not became_actor(["ray::MapBatches(process_batch)"])
    assert not became_actor(["ray::get_table_block_metadata_schema"])  # a task on a pooled worker
    code = ("import sys, time\nimport ray._raylet as r\nr.setproctitle('ray::IDLE')\n"
            "print('ready', flush=True)\ntime.sleep(0.3)\nr.setproctitle('ray::BadFileLedger')\n"
            "t = time.process_time()\nwhile time.process_time() - t < 0.4: pass")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # titled, its start-up done
    with StageCpu(cpus=1, interval=0.02) as stage:
        assert proc.wait(30) == 0
    assert stage.cpu["lane"] < 0.15  # idle while a lane
    assert stage.cpu["system"] >= 0.3  # the actor's burn


@pytest.mark.slow
def test_ingest(ray_cluster, tmp_path):
    r = _run(tmp_path, "ingest", *TINY, "--images", "8", "--epochs", "3", "--rounds", "2")  # compute: auto
    assert r["one_execution"]  # one stream for every epoch, as training runs it
    assert r["ray_images"] == r["dataloader_images"] == 48  # every image of every epoch, both rounds
    assert len(r["ray_epoch_s"]) == len(r["dataloader_epoch_s"]) == 6
    _positive(r, "ray_images_per_s", "dataloader_images_per_s", "ratio", "cold_ratio", "steady_ratio")
    assert r["ratio"] == pytest.approx(r["ray_images_per_s"] / r["dataloader_images_per_s"])
    assert r["ray_images_per_s"] == pytest.approx(48 / sum(r["ray_epoch_s"]))
    # each round its own ratio, the pooled one between the least and the most
    assert len(r["round_ratios"]) == len(r["ray_first_batch_s"]) == 2
    assert min(r["round_ratios"]) <= r["ratio"] <= max(r["round_ratios"])
    assert r["median_round_ratio"] == pytest.approx(sum(r["round_ratios"]) / 2)
    assert r["compute"] == "tasks"  # auto, as training resolves it on a cluster without GPUs
    assert (r["ray_lanes"], r["dataloader_workers"]) == (r["cpus"], r["cpus"])
    cpu = r["ray_cpu"]  # where the Ray side's CPU went: the lanes' work was seen, the rest adds up
    assert cpu["lane_busy"] > 0 and cpu["driver_cores"] > 0 and cpu["ray_system_cores"] >= 0
    assert cpu["lane_cpu_wait"] >= 0  # Linux: the wait for a CPU is read
    assert cpu["lane_idle"] == pytest.approx(max(0.0, 1 - cpu["lane_busy"] - cpu["lane_cpu_wait"]))
    assert cpu["wall_s"] >= sum(r["ray_epoch_s"])
    two = _run(tmp_path, "ingest", *TINY, "--images", "8", "--epochs", "2", "--lanes-per-cpu", "2",
               "--one-execution", "false", "--rounds", "1")
    assert (two["ray_lanes"], two["ray_images"]) == (2 * two["cpus"], 16)  # 0.5 CPU a lane
    assert not two["one_execution"] and len(two["ray_epoch_s"]) == 2  # one execution per epoch
    assert two["round_ratios"] == [pytest.approx(two["ratio"])]


@pytest.mark.slow
def test_memory(ray_cluster, tmp_path):
    r = _run(tmp_path, "memory", *TINY, "--images", "4", "--factor", "2", "--interval", "0.1")
    assert (r["images_small"], r["images_large"]) == (4, 8)
    _positive(r, "peak_small_mib", "peak_large_mib", "peak_ratio")
    assert r["peak_ratio"] == pytest.approx(r["peak_large_mib"] / r["peak_small_mib"])
    many = _run(tmp_path, "memory", *TINY, "--images", "4", "--factor", "3", "--interval", "0.1",
                "--many-epochs")  # three epochs of the same 4 images through one execution
    assert (many["images_small"], many["images_large"]) == (4, 12)
    assert many["large_run"] == "3 epochs of 4 images, one execution"
    _positive(many, "peak_small_mib", "peak_large_mib", "peak_ratio")


@pytest.mark.slow
def test_scaling(ray_cluster, tmp_path):
    r = _run(tmp_path, "scaling", *TINY, "--images", "4", "--multiples", "1", "2", "4", "--repeats", "2")
    assert [p["images"] for p in r["points"]] == [4, 8, 16]
    assert all(len(p["epochs_s"]) == 2 and p["epoch_s"] == min(p["epochs_s"]) for p in r["points"])
    assert r["r2"] <= 1.0 and isinstance(r["slope_s_per_image"], float)
    assert r["compute"] == "tasks"  # auto, as training resolves it on a cluster without GPUs


@pytest.mark.slow
def test_train(ray_cluster, tmp_path):
    r = _run(tmp_path, "train", *TINY, "--samples", "8", "--tensor-size", "16", "--epochs", "1",
             "--wait-images", "8", "--wait-image-size", "16", "--wait-epochs", "1", "--compute", "tasks")
    assert len(r["plain_epoch_s"]) == len(r["ray_epoch_s"]) == 1
    _positive(r, "plain_wall_s", "ray_wall_s", "wait_images_per_s")
    assert r["overhead"] == pytest.approx(min(r["ray_epoch_s"]) / min(r["plain_epoch_s"]) - 1)
    assert r["wait_images"] == 8 and 0.0 <= r["data_wait_frac"] <= 1.0
    assert r["data_wait_frac_per_epoch"] == [r["data_wait_frac"]] and r["wait_compute"] == "tasks"


@pytest.mark.slow
def test_gpu_runs_tiny_on_cpu(ray_cluster, tmp_path):
    r = _run(tmp_path, "gpu", *TINY, "--image-size", "32", "--model", "resnet18", "--steps", "2",
             "--warmup", "1", "--device", "cpu")
    assert r["device"] == "cpu" and r["pipeline_steps"] == 2
    _positive(r, "synthetic_images_per_s", "pipeline_images_per_s")
    assert 0.0 <= r["pipeline_data_wait_frac"] <= 1.0
    cpu = r["pipeline_ray_cpu"]  # the data stage's CPUs over the loop: its actors were seen working
    assert cpu["lane_busy"] > 0 and cpu["lane_cpu_wait"] >= 0 and cpu["driver_cores"] > 0


def test_benchmark_scratch_folders_go_when_the_benchmark_exits():
    """Synthetic images and a benchmark's run storage are temporary: each run left them behind
    (170 folders, 2 GiB in /tmp over a few days of benchmarks and tests)."""
    code = ("import os; from raypipe.benchmarks.ingest import scratch_dir, synthetic_folder as s; "
            "a = s('photo', 1); assert s('photo', 1) == a; b = scratch_dir('raypipe-bench-'); "
            "open(os.path.join(b, 'x'), 'w').close(); print(a); print(b); "
            "print(sum(len(f) for _, _, f in os.walk(a)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    assert out[2] == "2"  # one JPEG per class was there while it ran
    for path in out[:2]:
        assert not os.path.exists(path), path


@pytest.mark.ray
def test_warming_imports_the_stage_in_a_process_per_lane(ray_cluster):
    """Before the clock each lane's process has what the DataLoader's fork server has."""
    from raypipe.benchmarks.ingest import warm_cluster
    from raypipe.config import load_config

    cfg = load_config(None, ["pipeline.train={min_actors: 1, max_actors: 2, cpus_per_actor: 1}"])
    pids = warm_cluster(cfg.pipeline.train)
    assert len(pids) == len(set(pids)) == 2, pids  # each lane its own process
    assert warm_cluster() == []


def test_ingest_rounds_must_be_at_least_one(capsys):
    with pytest.raises(SystemExit):
        _job().main(["ingest", "--rounds", "0"])
    err = capsys.readouterr().err
    assert "--rounds" in err and "'0': expected a whole number of at least 1" in err


@pytest.mark.ray
def test_a_benchmark_pipeline_ends_its_helper_actors(ray_cluster, tmp_path, monkeypatch):
    """Each pipeline a benchmark builds ends its bad-file ledger and epoch clock once drained, as
    a training run does. The task processes that ran its batches keep handles to them, so they
    lived as long as the benchmark's process: two idle actor processes a pipeline, in
    ``memory``'s second peak and in every later round of ``ingest``."""
    import ray
    from conftest import make_image_folder

    from raypipe.benchmarks import ingest
    from raypipe.config import load_config
    from raypipe.data import pipeline

    helpers, build = [], pipeline.build_datasets

    def build_and_keep(*args, **kwargs):
        built = build(*args, **kwargs)
        helpers.append(built[2:])  # (ledger, clock)
        return built

    monkeypatch.setattr(pipeline, "build_datasets", build_and_keep)
    root = make_image_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    cfg = load_config(None, [f"data.root={root}", "preprocess.image_size=16", "pipeline.blocks=2"])
    split = ingest.split_of(cfg, 8)
    assert ingest.ray_epoch(cfg, split, 4)[0] == 8
    assert [e[0] for e in ingest.ray_run(cfg, split, 4, 2)] == [8, 8]
    assert len(helpers) == 2
    for actor in (a for pair in helpers for a in pair):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
