"""Bad datasets and configs fail before training starts, with one message saying what is wrong and
how to fix it. Most cases need no Ray: they call the checks the job runs first."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import make_image_folder, run_job

from raypipe.config import load_config
from raypipe.data.sources import DatasetSplit, DataSourceError, Record, discover
from raypipe.training.trainer import ResourceError, RunError, resolve_layout, validate_split


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _discover(*overrides: str) -> DatasetSplit:
    return discover(_cfg(*overrides).data)


# ---------------------------------------------------------------- data roots and class folders


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"does not exist or is not a folder.*Set data.root"):
        _discover(f"data.root={tmp_path / 'nope'}")


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataSourceError, match="is not a folder"):
        _discover(f"data.root={tmp_path / 'file.png'}")


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match=r"0 class\(es\).*at least two.*root/<class>"):
        _discover(f"data.root={tmp_path / 'empty'}")


def test_images_directly_in_root_are_not_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 3})
    for p in (root / "a").iterdir():
        p.rename(root / p.name)
    with pytest.raises(DataSourceError, match="classification needs at least two"):
        _discover(f"data.root={root}")


def test_class_folder_with_no_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"cats": 4, "dogs": 4})
    (root / "birds").mkdir()
    (root / "birds" / "notes.txt").write_text("to do: photograph birds")
    with pytest.raises(DataSourceError, match=r"class folder\(s\) \['birds'\].*hold no images.*"
                                              r"data.class_names"):
        _discover(f"data.root={root}")
    # naming the classes to use is the documented way out
    split = _discover(f"data.root={root}", "data.class_names=[cats, dogs]")
    assert split.class_names == ["cats", "dogs"]


def test_only_one_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"cats": 5})
    with pytest.raises(DataSourceError, match=r"1 class\(es\) \['cats'\].*at least two"):
        _discover(f"data.root={root}")


def test_class_names_not_found(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"cats": 3, "dogs": 3})
    with pytest.raises(DataSourceError, match=r"lists \['horses'\], not found.*found: \['cats', 'dogs'\]"):
        _discover(f"data.root={root}", "data.class_names=[cats, horses]")


# ---------------------------------------------------------------- manifests


def _manifest(tmp_path: Path, rows: list[str], header: str = "path,label") -> Path:
    root = make_image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    m = tmp_path / "m.csv"
    m.write_text("\n".join([header, *rows]) + "\n")
    return root, m


def _rows(n: int = 6) -> list[str]:
    return [f"{c}/{i:03d}.png,{c}" for c in "ab" for i in range(n)]


def test_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"manifest '.*nope.csv' not found"):
        _discover(f"data.manifest={tmp_path / 'nope.csv'}")


def test_manifest_missing_files_over_the_limit(tmp_path: Path) -> None:
    root, m = _manifest(tmp_path, _rows() + ["a/ghost1.png,a", "b/ghost2.png,b"])
    with pytest.raises(DataSourceError, match=r"lists 2 of 14 files that do not exist.*"
                                              r"max_bad_fraction=0.05.*'a/ghost1.png'"):
        _discover(f"data.manifest={m}", f"data.root={root}")


def test_manifest_missing_files_with_fail_policy(tmp_path: Path) -> None:
    root, m = _manifest(tmp_path, _rows() + ["a/ghost1.png,a"])
    with pytest.raises(DataSourceError, match="data.on_bad_file=fail"):
        _discover(f"data.manifest={m}", f"data.root={root}", "data.on_bad_file=fail",
                  "data.max_bad_fraction=1")


def test_manifest_missing_files_within_the_limit_are_listed(tmp_path: Path) -> None:
    root, m = _manifest(tmp_path, _rows() + ["a/ghost1.png,a"])
    split = _discover(f"data.manifest={m}", f"data.root={root}", "data.max_bad_fraction=0.2")
    assert [k for k, _ in split.skipped] == ["a/ghost1.png"]
    assert "not found" in split.skipped[0][1]
    assert len(split.train) + len(split.val) == 12


def test_manifest_unknown_labels(tmp_path: Path) -> None:
    root, m = _manifest(tmp_path, _rows() + ["a/000.png,c", "a/001.png,c"])
    with pytest.raises(DataSourceError, match=r"not in data.class_names \['a', 'b'\]: 'c' \(2 rows\)"):
        _discover(f"data.manifest={m}", f"data.root={root}", "data.class_names=[a, b]")


def test_manifest_wrong_columns(tmp_path: Path) -> None:
    root, m = _manifest(tmp_path, _rows(), header="file,klass")
    with pytest.raises(DataSourceError, match=r"no column 'path'.*Set data.path_column"):
        _discover(f"data.manifest={m}", f"data.root={root}")


# ---------------------------------------------------------------- splits and batch sizes


def _split(train_labels: list[int], val_labels: list[int]) -> DatasetSplit:
    def recs(labels, side):
        return [Record(f"/x/{side}{i}.png", lab, f"{side}{i}.png") for i, lab in enumerate(labels)]

    return DatasetSplit(pafs.LocalFileSystem(), ["neg", "pos"], recs(train_labels, "t"),
                        recs(val_labels, "v"), "test")


def test_validation_split_with_one_class() -> None:
    with pytest.raises(RunError, match=r"validation split has 3 images of 1 class.*AUC needs both"):
        validate_split(_split([0, 1] * 10, [0, 0, 0]), _cfg("train.batch_size=4"))


def test_class_without_training_images() -> None:
    with pytest.raises(RunError, match=r"classes \['pos'\] have no training images"):
        validate_split(_split([0] * 10, [0, 1]), _cfg("train.batch_size=4"))


def test_batch_size_larger_than_dataset() -> None:
    with pytest.raises(RunError, match=r"train.batch_size=64 is larger than the training set \(20 "
                                       r"images\). Lower train.batch_size"):
        validate_split(_split([0, 1] * 10, [0, 1]), _cfg("train.batch_size=64"))
    validate_split(_split([0, 1] * 10, [0, 1]), _cfg("train.batch_size=20"))  # fits: no error


def test_tiny_class_gets_no_validation_image(tmp_path: Path) -> None:
    """A class with a single image cannot be split: the job says so before training."""
    root = make_image_folder(tmp_path / "r", {"a": 8, "b": 1})
    split = _discover(f"data.root={root}")
    with pytest.raises(RunError, match="validation split"):
        validate_split(split, _cfg("train.batch_size=2"))


# ---------------------------------------------------------------- cluster size


def test_more_workers_than_the_cluster_holds() -> None:
    cfg = _cfg("train.num_workers=8", "train.cpus_per_worker=1")
    with pytest.raises(ResourceError, match=r"needs 8 CPUs for training.*cluster has 2 CPUs.*"
                                            r"Lower train.num_workers"):
        resolve_layout(cfg, {"CPU": 2.0})


def test_no_cpu_left_for_a_data_worker() -> None:
    cfg = _cfg("train.num_workers=2", "train.cpus_per_worker=1", "pipeline.cpus_per_worker=1.5")
    with pytest.raises(ResourceError, match=r"plus at least 1.5 for a data worker.*cluster has 3 CPUs"):
        resolve_layout(cfg, {"CPU": 3.0})


def test_more_gpu_workers_than_gpus() -> None:
    cfg = _cfg("train.num_workers=4", "train.use_gpu=true")
    with pytest.raises(ResourceError, match=r"the cluster has 1 GPUs.*train.use_gpu=false"):
        resolve_layout(cfg, {"CPU": 64.0, "GPU": 1.0})


def test_layout_that_fits() -> None:
    layout = resolve_layout(_cfg(), {"CPU": 2.0})
    assert not layout.use_gpu and layout.train_cpus == 1.0 and layout.data_workers == 1
    assert resolve_layout(_cfg("pipeline.cpus_per_worker=0.25"), {"CPU": 8.0}).data_workers == 28


def test_a_cluster_of_unknown_size_is_warned_about_not_refused(caplog, monkeypatch) -> None:
    """An autoscaling cluster that starts small may grow: without RAYPIPE_MAX_CPUS the run goes
    on and Ray's autoscaler is left to try."""
    import logging

    from raypipe.training.trainer import cluster_capacity

    cfg = _cfg("train.num_workers=8", "train.cpus_per_worker=1")
    with caplog.at_level(logging.WARNING, logger="raypipe"):
        layout = resolve_layout(cfg, {"CPU": 1.0}, known_max=False)
    assert layout.train_cpus == 8 and "may scale up" in caplog.text and "RAYPIPE_MAX_CPUS" in caplog.text
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 1.0, "memory": 1e9})
    assert cluster_capacity() == ({"CPU": 1.0}, False)
    monkeypatch.setenv("RAYPIPE_MAX_CPUS", "64")
    monkeypatch.setenv("RAYPIPE_MAX_GPUS", "8")
    assert cluster_capacity() == ({"CPU": 64.0, "GPU": 8.0}, True)
    monkeypatch.setenv("RAYPIPE_MAX_GPUS", "eight")
    with pytest.raises(ResourceError, match="RAYPIPE_MAX_GPUS='eight' is not a number"):
        cluster_capacity()


def test_rays_worker_start_failures_are_said_in_raypipes_words() -> None:
    from raypipe.training.trainer import root_cause

    class WorkerGroupStartupTimeoutError(Exception):
        pass

    text = root_cause(WorkerGroupStartupTimeoutError("The worker group startup timed out after 60 s"))
    assert text.startswith("ResourceError: the cluster did not provide the training workers")
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in text and "train.num_workers" in text


# ---------------------------------------------------------------- through the job


@pytest.mark.slow
def test_job_with_missing_root_exits_with_one_message(ray_cluster, tmp_path: Path) -> None:
    proc = run_job("train.py", f"data.root={tmp_path / 'nowhere'}",
                   f"run.storage_path={tmp_path / 'runs'}", env={"RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data root ") and "does not exist" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint*"))


@pytest.mark.slow
def test_job_with_too_many_workers_exits_before_training(ray_cluster, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"cats": 6, "dogs": 6})
    proc = run_job("train.py", f"data.root={root}", "train.num_workers=6", "train.batch_size=4",
                   f"run.storage_path={tmp_path / 'runs'}", "run.name=big",
                   env={"RAY_ADDRESS": ray_cluster, "RAYPIPE_MAX_CPUS": "2"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run needs 3 CPUs for training"), last
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").rglob("checkpoint*"))
