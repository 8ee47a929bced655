"""Each benchmark subcommand runs at tiny size and writes well-formed JSON with its fields.
(No timing assertions: the targets are checked by running the benchmarks, not by tests.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from raypipe.benchmarks.scaling import linear_fit

TINY = ["--synthetic", "--image-size", "16", "--batch-size", "4", "--cpus", "1", "--files-per-batch", "4"]


def _job():
    """What ``jobs/benchmark.py`` runs, in this process (so that it joins the test cluster)."""
    from raypipe.jobs import benchmark

    return benchmark


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
    from raypipe.benchmarks.cpu import ray_package, role_of

    ray_dir = ray_package()
    assert role_of(["ray::IDLE"], "python") == "lane"  # a task worker, between tasks or in one
    assert role_of(["ray::MapBatches(process_block)"], "python") == "lane"
    assert role_of(["ray::ReadRange->MapBatches(process_block)"], "python") == "lane"
    assert role_of(["ray::_prepare_part"], "python") == "lane"  # the cache's decode pass
    assert role_of(["ray::EpochClock"], "python") == "system"  # a helper actor
    assert role_of(["ray::SplitCoordinator.start_epoch"], "python") == "system"
    assert role_of(["/opt/ray/core/src/ray/raylet/raylet", "--node_ip_address=1"], "raylet") == "system"
    assert role_of(["python", "-u", f"{ray_dir}dashboard/dashboard.py"], "python") == "system"
    assert role_of(["ray-dashboard-DataHead-0 (python -c ...)"], "python") == "system"
    assert role_of(["python", "-c", "from multiprocessing.forkserver import main"], "python") is None
    # a worker process that has not taken its title yet may become a lane: not classified yet
    assert role_of(["python", f"{ray_dir}x/workers/default_worker.py", "--node-ip-address=1"],
                   "python") is None
    assert role_of(["/home/ray/venv/bin/python", "/home/ray/train.py"], "python") is None  # a user named ray


def test_stage_cpu_counts_a_lane_that_exits_inside_the_span(tmp_path):
    """A process titled as a Ray task worker burns 0.4 CPU-seconds and exits while measured: its
    CPU counts as the lane's (up to the last sample), and an untitled one's does not."""
    import subprocess
    import sys

    from raypipe.benchmarks.cpu import StageCpu

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    with StageCpu(cpus=1, interval=0.02, descendants=True) as stage:
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
    with cpu.StageCpu(cpus=1, interval=0.02, descendants=True) as stage:
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
    assert not became_actor(["ray::IDLE", ""]) and not became_actor(["ray::MapBatches(process_block)"])
    assert not became_actor(["ray::ReadRange"])  # the stage's row ids, though CamelCase
    assert not became_actor(["ray::get_table_block_metadata_schema"])  # a task on a pooled worker
    code = ("import sys, time\nimport ray._raylet as r\nr.setproctitle('ray::IDLE')\n"
            "print('ready', flush=True)\ntime.sleep(0.3)\nr.setproctitle('ray::BadFileLedger')\n"
            "t = time.process_time()\nwhile time.process_time() - t < 0.4: pass")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # titled, its start-up done
    with StageCpu(cpus=1, interval=0.02, descendants=True) as stage:
        assert proc.wait(30) == 0
    assert stage.cpu["lane"] < 0.15  # idle while a lane
    assert stage.cpu["system"] >= 0.3  # the actor's burn


@pytest.mark.slow
def test_ingest(ray_cluster, tmp_path):
    r = _run(tmp_path, "ingest", *TINY, "--images", "8", "--epochs", "2", "--rounds", "2")
    assert r["cache"] == "false"  # the streaming path unless asked
    assert r["ray_images"] == r["dataloader_images"] == 32  # every image of every epoch, both rounds
    assert len(r["ray_epoch_s"]) == len(r["dataloader_epoch_s"]) == 4
    _positive(r, "ray_images_per_s", "dataloader_images_per_s", "ratio", "cold_ratio", "steady_ratio")
    assert r["ratio"] == pytest.approx(r["ray_images_per_s"] / r["dataloader_images_per_s"])
    assert r["ray_images_per_s"] == pytest.approx(32 / sum(r["ray_epoch_s"]))
    # each round its own ratio, the pooled one between the least and the most
    assert len(r["round_ratios"]) == len(r["ray_first_batch_s"]) == 2
    assert min(r["round_ratios"]) <= r["ratio"] <= max(r["round_ratios"])
    assert r["median_round_ratio"] == pytest.approx(sum(r["round_ratios"]) / 2)
    assert (r["ray_workers"], r["dataloader_workers"]) == (1, 1)  # --cpus 1: one of each
    cpu = r["ray_cpu"]  # where the Ray side's CPU went: the data tasks' work was seen
    assert cpu["lane_busy"] > 0 and cpu["driver_cores"] > 0 and cpu["ray_system_cores"] >= 0
    assert cpu["lane_cpu_wait"] >= 0  # Linux: the wait for a CPU is read
    assert cpu["lane_idle"] == pytest.approx(max(0.0, 1 - cpu["lane_busy"] - cpu["lane_cpu_wait"]))
    assert cpu["wall_s"] >= sum(r["ray_epoch_s"])
    cached = _run(tmp_path, "ingest", *TINY, "--images", "8", "--epochs", "2", "--rounds", "1",
                  "--cache", "true", "--cpus-per-worker", "0.5")
    assert (cached["cache"], cached["ray_workers"], cached["ray_images"]) == ("true", 2, 16)
    assert cached["round_ratios"] == [pytest.approx(cached["ratio"])]


@pytest.mark.slow
def test_memory(ray_cluster, tmp_path):
    r = _run(tmp_path, "memory", *TINY, "--images", "4", "--factor", "2", "--interval", "0.1")
    assert (r["images_small"], r["images_large"], r["cache"]) == (4, 8, False)
    _positive(r, "peak_small_mib", "peak_large_mib", "peak_ratio")
    assert r["peak_ratio"] == pytest.approx(r["peak_large_mib"] / r["peak_small_mib"])
    assert all(row["driver_peak_mib"] <= row["peak_mib"] for row in r["table"][:2])


@pytest.mark.slow
def test_scaling(ray_cluster, tmp_path):
    r = _run(tmp_path, "scaling", *TINY, "--images", "4", "--multiples", "1", "2", "4",
             "--repeats", "2")
    assert [p["images"] for p in r["points"]] == [4, 8, 16]
    assert all(len(p["epochs_s"]) == 2 and p["epoch_s"] == min(p["epochs_s"]) for p in r["points"])
    assert r["r2"] <= 1.0 and isinstance(r["slope_s_per_image"], float)


@pytest.mark.slow
def test_train(ray_cluster, tmp_path):
    r = _run(tmp_path, "train", *TINY, "--samples", "8", "--tensor-size", "16", "--epochs", "1",
             "--images", "8", "--wait-image-size", "16", "--wait-epochs", "2")
    assert len(r["plain_epoch_s"]) == len(r["ray_epoch_s"]) == 1
    _positive(r, "plain_wall_s", "ray_wall_s", "wait_images_per_s")
    assert r["overhead"] == pytest.approx(min(r["ray_epoch_s"]) / min(r["plain_epoch_s"]) - 1)
    assert r["wait_images"] == 8 and len(r["data_wait_frac_per_epoch"]) == 2
    # the figure is the epochs after the first, whose wait holds the pipeline's start
    assert r["data_wait_frac"] == r["data_wait_frac_per_epoch"][1]
    assert r["first_epoch_data_wait_frac"] == r["data_wait_frac_per_epoch"][0]
    assert 0.0 <= r["data_wait_frac"] <= 1.0
    assert r["wait_cached"] is True  # cache auto, as a run takes it: 8 small images fit


@pytest.mark.slow
def test_gpu_runs_tiny_on_cpu(ray_cluster, tmp_path):
    r = _run(tmp_path, "gpu", *TINY, "--image-size", "32", "--model", "resnet18", "--steps", "2",
             "--warmup", "1", "--device", "cpu")
    assert r["device"] == "cpu" and r["pipeline_steps"] == 2
    _positive(r, "synthetic_images_per_s", "pipeline_images_per_s")
    assert 0.0 <= r["pipeline_data_wait_frac"] <= 1.0
    cpu = r["pipeline_ray_cpu"]  # the data stage's CPUs over the loop: its tasks were seen working
    assert cpu["lane_busy"] > 0 and cpu["lane_cpu_wait"] >= 0 and cpu["driver_cores"] > 0


def test_benchmark_scratch_folders_go_when_the_benchmark_exits():
    """Synthetic images and a benchmark's run storage are temporary."""
    code = ("import os; from raypipe.benchmarks.common import scratch_dir, synthetic_folder as s; "
            "a = s('photo', 1); assert s('photo', 1) == a; b = scratch_dir('raypipe-bench-'); "
            "open(os.path.join(b, 'x'), 'w').close(); print(a); print(b); "
            "print(sum(len(f) for _, _, f in os.walk(a)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    assert out[2] == "2"  # one JPEG per class was there while it ran
    for path in out[:2]:
        assert not os.path.exists(path), path


def test_ingest_rounds_must_be_at_least_one(capsys):
    with pytest.raises(SystemExit):
        _job().main(["ingest", "--rounds", "0"])
    err = capsys.readouterr().err
    assert "--rounds" in err and "'0': expected a whole number of at least 1" in err


def test_files_are_cycled_with_a_key_each_and_every_class_early():
    from raypipe.benchmarks.common import cycled
    from raypipe.data.sources import Record

    files = [Record(f"a{i}", 0, f"a{i}") for i in range(3)] + [Record("b0", 1, "b0")]
    out = cycled(files, 7)
    assert [r.path for r in out] == ["a0", "b0", "a1", "b0", "a2", "b0", "a0"]
    assert len({r.key for r in out}) == 7  # each copy its own augmentation draw


@pytest.mark.ray
def test_warming_imports_the_stage_in_a_process_per_worker(ray_cluster):
    """Before the clock each data worker's process has what the DataLoader's fork server has."""
    from raypipe.benchmarks.ingest import warm_cluster

    pids = warm_cluster(2, 1.0)
    assert len(pids) == len(set(pids)) == 2, pids  # each its own process
    assert warm_cluster() == []


def _tiny_feed_config(tmp_path):
    from conftest import make_image_folder

    from raypipe.config import load_config

    root = make_image_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    return load_config(None, [f"data.root={root}", "preprocess.image_size=16",
                              "preprocess.channels=3", "pipeline.workers=1",
                              "pipeline.files_per_batch=4", "pipeline.cache=false"])


@pytest.mark.ray
def test_the_training_feed_runs_each_epoch_as_training_does_and_ends_its_actors(ray_cluster,
                                                                                 tmp_path):
    """Each epoch is the one the clock says: the same epoch twice gives the same batches (file
    order and augmentation are seeded by the epoch), the next epoch other ones, every file once
    in each. On exit the pipeline's bad-file ledger and epoch clock end, as a training run ends
    them (the data tasks' processes keep handles to them)."""
    import ray
    import torch

    from raypipe.benchmarks.common import TrainingFeed, split_of

    cfg = _tiny_feed_config(tmp_path)
    split = split_of(cfg, 8)

    def images(feed: TrainingFeed, epoch: int) -> torch.Tensor:
        return torch.cat([b["image"] for b in feed.epoch(epoch, 4)])

    with TrainingFeed(cfg, split) as feed:
        first, again, second = images(feed, 0), images(feed, 0), images(feed, 1)
        actors = (feed.data.ledger, feed.data.clock)
        assert ray.get(feed.data.clock.get.remote()) == 1
    assert first.shape == second.shape == (8, 3, 16, 16)
    assert torch.equal(first, again) and not torch.equal(first, second)
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)


# ---------------------------------------------------------------- scale


def _nih_like_manifest(path, rows: int) -> str:
    """A manifest in NIH's form: four films per patient, findings joined with '|'."""
    findings = ["No Finding", "Effusion", "Infiltration", "Effusion|Infiltration", "Atelectasis"]
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    lines += [f"{i // 4 + 1:08d}_{i % 4:03d}.png,{findings[i % 5]},{i % 4},{i // 4 + 1}"
              for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_standins_are_the_same_for_a_name_and_differ_between_names(tmp_path):
    import io

    from PIL import Image

    from raypipe.benchmarks.scale import standin_png, write_standins

    a = standin_png("00000001_000.png")
    assert a == standin_png("00000001_000.png") != standin_png("00000001_001.png")
    img = Image.open(io.BytesIO(a))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (64, 64))
    assert Image.open(io.BytesIO(standin_png("x.png", 32))).size == (32, 32)

    names = [f"{i:08d}_000.png" for i in range(5)] + ["sub/00000009_000.png"]
    folder = tmp_path / "standins"
    folder.mkdir()
    (folder / names[0]).write_bytes(b"kept")  # a file already there is left as it is
    r = write_standins(names, str(folder), processes=1)
    assert (r["written"], r["already_there"]) == (5, 1)
    assert (folder / names[0]).read_bytes() == b"kept"
    assert all((folder / n).read_bytes() == standin_png(n) for n in names[1:])
    assert not [p for p in folder.rglob("*.tmp")]  # nothing half-written left
    again = write_standins(names, str(folder), processes=2)  # through the process pool
    assert (again["written"], again["already_there"]) == (0, 6)
    with pytest.raises(ValueError, match="without '..'"):
        write_standins(["../escape.png"], str(folder), processes=1)


@pytest.mark.slow
def test_scale_lists_and_streams_every_row_at_each_size(ray_cluster, tmp_path):
    manifest = _nih_like_manifest(tmp_path / "m.csv", 200)
    r = _run(tmp_path, "scale", "--manifest", manifest, "--write-standins", str(tmp_path / "s"),
             "--rows", "100", "200", "--image-size", "16", "--batch-size", "8", "--cpus", "1",
             "--files-per-batch", "16", "--interval", "0.1", "--standin-processes", "1")
    assert r["manifest_rows"] == 200 and r["standins"]["written"] == 200
    ingest = r["ingest"]
    assert ingest["root_files"] == 200
    assert [s["rows"] for s in ingest["sizes"]] == [100, 200]
    for size in ingest["sizes"]:  # every row listed and streamed once, training and validation side
        assert size["listed"] == size["images"] == size["rows"] and size["all_rows_listed"]
        _positive(size, "listing_s", "epoch_s", "images_per_s", "peak_mib", "driver_peak_mib")
        assert size["peak_mib"] == max(size["listing_peak_mib"], size["epoch_peak_mib"])
    assert ingest["peak_ratio"] == pytest.approx(ingest["sizes"][1]["peak_mib"]
                                                 / ingest["sizes"][0]["peak_mib"])


def test_scale_needs_a_folder(tmp_path):
    manifest = _nih_like_manifest(tmp_path / "m.csv", 8)
    with pytest.raises(SystemExit, match="--write-standins DIR or --root DIR"):
        _job().main(["scale", "--manifest", manifest, "--json", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_scale_trains_on_the_multilabel_task_with_patients_on_one_side(ray_cluster, tmp_path):
    manifest = _nih_like_manifest(tmp_path / "m.csv", 120)
    r = _run(tmp_path, "scale", "--manifest", manifest, "--write-standins", str(tmp_path / "s"),
             "--no-ingest", "--train-files", "64", "--image-size", "16", "--batch-size", "8",
             "--standin-processes", "1", "--set", "train.cpus_per_worker=1")
    train = r["train"]
    assert (train["status"], train["task"], train["groups_on_both_sides"]) == ("finished", "multilabel", 0)
    assert "Patient ID" in train["group_by"] and train["train_steps"] >= 1
    assert set(train["val_auc_per_finding"]) == {"Effusion", "Infiltration", "Atelectasis"}
    assert all(0.0 <= v <= 1.0 for v in train["val_auc_per_finding"].values())


@pytest.mark.slow
def test_scale_from_s3_lists_past_one_page(tmp_path):
    """More than 1,000 objects: the listing takes two pages of S3's answer."""
    pytest.importorskip("moto")
    manifest = _nih_like_manifest(tmp_path / "m.csv", 1010)
    r = _run(tmp_path, "scale", "--manifest", manifest, "--s3-objects", "1010", "--s3-rows", "24",
             "--image-size", "16", "--batch-size", "8", "--num-cpus", "2", "--cpus", "1",
             "--files-per-batch", "8", "--interval", "0.1")
    s3 = r["s3"]
    assert s3["objects"] == s3["root_files"] == 1010
    assert [s["rows"] for s in s3["sizes"]] == [24]
    assert s3["sizes"][0]["images"] == 24 and s3["sizes"][0]["all_rows_listed"]


def test_suite_benchmark_reads_pytests_counts():
    from raypipe.benchmarks.suite import TIERS, counts

    assert counts("612 passed, 80 deselected, 1 warning in 107.84s (0:01:47)") == {
        "passed": 612, "deselected": 80}
    assert counts("2 failed, 691 passed, 8 warnings in 1435.60s") == {"failed": 2, "passed": 691}
    assert TIERS["fast"] == ("fast", 120.0) and TIERS["all"][1] == 1200.0
