"""The Ray Data stage: which file each row is, in which epoch, with which augmentation; the
training cache; how blocks reach the training workers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import make_image_folder

from raypipe.config import AugmentConfig, Config, load_config
from raypipe.data import pipeline
from raypipe.data.sources import Record, discover

ALL_ON = AugmentConfig(hflip=0.5, vflip=0.5, rotation=30, zoom=(0.8, 1.2), translate=0.1, shear=10,
                       crop_scale=0.7, brightness=0.2, contrast=0.2, gamma=0.3, noise_std=0.05)


class Stage:
    """The training stage over a folder whose labels are the file indexes, so that the rows it
    gives say which file came in which order."""

    def __init__(self, tmp_path, classes: dict[str, int], cfg: dict, size=(20, 16)):
        import ray

        folder = make_image_folder(tmp_path / "imgs", classes, size=size)
        self.cfg = Config.model_validate({"data": {"root": str(folder)},
                                          "preprocess": {"image_size": 8}, **cfg})
        self.split = discover(self.cfg.data)
        self.records = [Record(r.path, i, r.key) for i, r in enumerate(self.split.train + self.split.val)]
        self.n, self.table = len(self.records), ray.put(pipeline.records_table(self.records))
        self.ledger = pipeline.BadFileLedger.remote(self.n, 0.0, "fail")
        self.clock = pipeline.EpochClock.remote()

    def cfg_with(self, **pipe) -> Config:
        return self.cfg.model_copy(update={"pipeline": self.cfg.pipeline.model_copy(update=pipe)})

    def dataset(self, workers: int = 2, files_per_batch: int = 3, cache: bool = False, **kwargs):
        cfg = self.cfg_with(files_per_batch=files_per_batch, workers=workers)
        built = pipeline.build_train_cache(cfg, self.table, self.n, self.split.filesystem,
                                           self.ledger, workers) if cache else None
        n = built.files if built is not None else self.n
        return pipeline._stage(n, cfg, {
            "filesystem": self.split.filesystem, "cfg": cfg.to_dict(), "ledger": self.ledger,
            "records": self.table, "clock": self.clock, "cache": built, **kwargs})

    def rows(self, ds, epoch: int) -> list[dict]:
        """``ds``'s rows in order (the sequence, not just the set), the clock at ``epoch``."""
        import ray

        ray.get(self.clock.set.remote(epoch))
        ds.context.execution_options.preserve_order = True
        return ds.take_all()


@pytest.mark.parametrize("cache", [False, True])
def test_training_rows_read_every_file_once_per_epoch_in_that_epochs_order(ray_cluster, tmp_path,
                                                                          cache):
    stage = Stage(tmp_path, {"a": 4, "b": 3}, {"train": {"seed": 5}})
    for shuffle in (True, False):
        ds = stage.dataset(cache=cache, shuffle=shuffle, files_per_batch=2)
        seen = [[int(r["label"]) for r in stage.rows(ds, epoch)] for epoch in (0, 1)]
        for epoch, labels in enumerate(seen):  # without shuffling (the overfit check): as listed
            assert labels == (list(pipeline.epoch_order(stage.n, 5, epoch)) if shuffle
                              else list(range(stage.n)))
        assert (seen[0] != seen[1]) == shuffle


def test_long_epochs_run_on_data_actors_and_give_what_tasks_give(ray_cluster, tmp_path):
    """An epoch of ACTOR_POOL_MIN_BLOCKS blocks or more runs on a pool of data actors, a shorter
    one on tasks: the same rows, in the same order, with the same augmented pixels."""
    stage = Stage(tmp_path, {"a": 40, "b": 30}, {"augment": ALL_ON.model_dump(), "train": {"seed": 2}})
    assert stage.n >= pipeline.ACTOR_POOL_MIN_BLOCKS
    actors = stage.dataset(files_per_batch=1, augment=True, shuffle=True)
    tasks = stage.dataset(files_per_batch=8, augment=True, shuffle=True)
    assert "BlockWorker" in repr(actors) and "process_block" in repr(tasks)
    a, t = stage.rows(actors, 1), stage.rows(tasks, 1)
    assert [int(r["label"]) for r in a] == [int(r["label"]) for r in t] == list(
        pipeline.epoch_order(stage.n, 2, 1))
    for x, y in zip(a, t, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_augmented_samples_depend_on_seed_epoch_and_file_not_on_workers_or_batches(ray_cluster,
                                                                                   tmp_path):
    stage = Stage(tmp_path, {"a": 5, "b": 5}, {"augment": ALL_ON.model_dump(), "train": {"seed": 3}},
                  size=(30, 22))

    def images(epoch: int, **kwargs) -> dict[int, np.ndarray]:
        rows = stage.rows(stage.dataset(augment=True, shuffle=True, **kwargs), epoch)
        return {int(r["label"]): np.asarray(r["image"]) for r in rows}

    one = images(1, workers=1, files_per_batch=3)
    two = images(1, workers=2, files_per_batch=4)
    assert sorted(one) == sorted(two) == list(range(10))
    for k in one:
        assert one[k].shape == (3, 8, 8)
        np.testing.assert_array_equal(one[k], two[k])
    later = images(2, workers=2, files_per_batch=4)
    assert all(not np.allclose(one[k], later[k]) for k in one)
    # from the cache: the same draws, applied to the resized image (a second resample)
    cached = images(1, workers=1, files_per_batch=3, cache=True)
    assert sorted(cached) == sorted(one)
    assert np.mean([np.abs(cached[k] - one[k]).mean() for k in one]) < 0.1


def test_the_cache_gives_exactly_the_streamed_images_without_augmentation(ray_cluster, tmp_path):
    stage = Stage(tmp_path, {"a": 4, "b": 4}, {"preprocess": {"image_size": 8, "normalize": "minmax"}})
    streamed = stage.rows(stage.dataset(shuffle=True), 0)
    cached = stage.rows(stage.dataset(shuffle=True, cache=True), 0)
    assert [int(r["label"]) for r in streamed] == [int(r["label"]) for r in cached]
    for a, b in zip(streamed, cached, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_the_cache_leaves_out_and_records_unreadable_files(ray_cluster, tmp_path):
    import ray

    stage = Stage(tmp_path, {"a": 4, "b": 4}, {})
    bad = stage.records[2]
    open(bad.path, "wb").write(b"not an image")
    stage.ledger = pipeline.BadFileLedger.remote(stage.n, 0.5, "skip")
    built = pipeline.build_train_cache(stage.cfg_with(files_per_batch=2), stage.table, stage.n,
                                       stage.split.filesystem, stage.ledger, 2)
    assert built.files == stage.n - 1
    assert sorted(np.concatenate(built.positions).tolist()) == [i for i in range(stage.n) if i != 2]
    assert list(ray.get(stage.ledger.items.remote())) == [bad.key]
    rows = stage.rows(stage.dataset(shuffle=True, cache=True), 0)
    assert sorted(int(r["label"]) for r in rows) == [i for i in range(stage.n) if i != 2]


def test_a_half_cpu_stage_runs_where_training_leaves_half_a_cpu(ray_cluster, tmp_path):
    """One training worker of 1.5 CPUs beside data tasks of 0.5 on 2 CPUs: the ids are read by
    half-CPU tasks too (a read of 1 CPU, ``ray.data.range``'s, would wait forever)."""
    import ray

    @ray.remote(num_cpus=1.5)
    class Trainer:
        def ready(self) -> bool:
            return True

    trainer = Trainer.remote()
    try:
        ray.get(trainer.ready.remote())
        stage = Stage(tmp_path, {"a": 3, "b": 3}, {"train": {"seed": 1}})
        cfg = stage.cfg_with(cpus_per_worker=0.5, files_per_batch=2, workers=1)
        ds = pipeline._stage(stage.n, cfg, {
            "filesystem": stage.split.filesystem, "cfg": cfg.to_dict(), "ledger": stage.ledger,
            "records": stage.table})
        got: list[int] = []
        drain = threading.Thread(target=lambda: got.extend(int(r["label"]) for r in ds.iter_rows()),
                                 daemon=True)
        drain.start()
        drain.join(timeout=120)
        assert not drain.is_alive(), "the data stage waited for a CPU it can never have"
        assert sorted(got) == list(range(stage.n))
    finally:
        ray.kill(trainer)


def test_cache_choice_follows_the_setting_and_the_object_store(monkeypatch):
    cfg = load_config(None, ["preprocess.image_size=64", "preprocess.channels=1"])  # 16 KiB an image
    monkeypatch.setattr(pipeline, "object_store_mib", lambda: 400.0)  # a quarter: 100 MiB
    assert pipeline.cache_choice(cfg, 5000, 1000)[0]                  # 94 MiB
    cached, why = pipeline.cache_choice(cfg, 6000, 1000)              # 109 MiB
    assert not cached and "exceed" in why and "109 MiB" in why
    on = load_config(None, ["preprocess.image_size=64", "preprocess.channels=1", "pipeline.cache=true"])
    off = load_config(None, ["pipeline.cache=false"])
    assert pipeline.cache_choice(on, 60000, 1000)[0] and not pipeline.cache_choice(off, 10, 10)[0]


def test_data_workers_auto_take_the_cpus_the_training_workers_leave():
    cfg = load_config(None, ["pipeline.cpus_per_worker=0.5"])
    assert pipeline.data_workers(cfg, 7.0) == 14
    assert pipeline.data_workers(cfg, 0.2) == 1                       # at least one
    assert pipeline.data_workers(load_config(None, ["pipeline.workers=3"]), 64.0) == 3


def test_a_run_builds_its_datasets_and_caches_what_fits(ray_cluster, tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"cats": 12, "dogs": 12})
    cfg = load_config(None, [f"data.root={root}", "preprocess.image_size=16", "pipeline.files_per_batch=4"])
    data = pipeline.build_datasets(cfg, discover(cfg.data), workers=2)
    try:
        assert data.cached and data.train_files == 20
        assert data.train.count() == 20 and data.val.count() == 4
        batch = next(iter(data.val.iter_batches(batch_size=4)))
        assert batch["image"].shape == (4, 1, 16, 16) and batch["label"].dtype == np.int64
    finally:
        pipeline.release(data.ledger, data.clock)
    off = pipeline.build_datasets(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
        update={"cache": False})}), discover(cfg.data), workers=2)
    assert not off.cached and off.train.count() == 20
    pipeline.release(off.ledger, off.clock)


def test_multi_hot_labels_travel_as_float_vectors(ray_cluster, tmp_path):
    import ray

    stage = Stage(tmp_path, {"a": 3, "b": 3}, {})
    records = [Record(r.path, (1, 0, 1) if i % 2 else (0, 1, 0), r.key) for i, r in enumerate(stage.records)]
    stage.table = ray.put(pipeline.records_table(records))
    rows = stage.rows(stage.dataset(), 0)
    assert [tuple(r["label"]) for r in rows] == [tuple(map(float, r.label)) for r in records]
    assert rows[0]["label"].dtype == np.float32


def _rows_per_worker(deterministic: bool, first_block_last: bool, flags) -> list[list[int]]:
    """Split a mapped dataset of 8 blocks between two consumers as a training run does; with
    ``first_block_last`` the first block's task waits until block 1's task has finished (a flag
    file in ``flags``), so it is not the first to come out of the map stage. Returns each
    consumer's rows."""
    import threading
    import time

    import ray

    from raypipe.data.pipeline import dataset_config

    flags.mkdir(parents=True, exist_ok=True)

    def work(batch):
        block = int(batch["id"][0]) // 4
        if first_block_last and block == 0:
            deadline = time.monotonic() + 60
            while not (flags / "1").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # block 1's output reaches the splitter first
        if block == 1:
            (flags / "1").touch()
        return batch

    ds = ray.data.range(32, override_num_blocks=8).map_batches(work, batch_size=None, num_cpus=0.25)
    splits = dataset_config(deterministic).configure({"train": ds}, world_size=2,
                                                     worker_handles=None, worker_node_ids=None)
    got: list[list[int]] = [[], []]

    def drain(i: int) -> None:
        for batch in splits[i]["train"].iter_batches(batch_size=None):
            got[i].extend(int(v) for v in batch["id"])

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got[0] + got[1]) == list(range(32))
    return got


def test_a_deterministic_pipeline_gives_each_worker_the_same_rows_whichever_task_ends_first(
        ray_cluster, tmp_path):
    """Without order, Ray Data's splitter hands each block to the worker with the fewest rows
    as the blocks arrive, so which images share a worker's batches follows the tasks' finishing
    order. ``deterministic`` (the default) sends blocks out in file-list order."""
    # blocks of 4 rows, handed out alternately: worker 0 gets blocks 0, 2, 4, 6 in that order,
    # although block 0 comes out of its task after block 1
    in_order = [[r for b in (0, 2, 4, 6) for r in range(4 * b, 4 * b + 4)],
                [r for b in (1, 3, 5, 7) for r in range(4 * b, 4 * b + 4)]]
    assert _rows_per_worker(True, first_block_last=True, flags=tmp_path / "a") == in_order
    # the setting is what does it: unordered, worker 0 starts with whichever block came first
    unordered = _rows_per_worker(False, first_block_last=True, flags=tmp_path / "b")
    assert unordered[0][:4] != [0, 1, 2, 3] and unordered != in_order


def test_epoch_order_is_a_new_permutation_each_epoch_and_reproducible():
    from raypipe.data.pipeline import epoch_order

    a0, a1 = epoch_order(50, 0, 0), epoch_order(50, 0, 1)
    assert sorted(a0) == sorted(a1) == list(range(50))
    assert list(a0) != list(a1)
    assert list(epoch_order(50, 0, 1)) == list(a1)            # same in every process, on resume
    assert list(epoch_order(50, 1, 1)) != list(a1)            # train.seed moves it

