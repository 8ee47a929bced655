"""Preprocessor, Augmenter and TrainTransform: outputs, seeding, and independence from the number
of Ray Data actors and the batch size."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_image_folder

from raypipe.config import AugmentConfig, Config, PreprocessConfig
from raypipe.data import functional as F
from raypipe.data.transforms import Augmenter, Preprocessor, TrainTransform, sample_rng

ALL_ON = AugmentConfig(hflip=0.5, vflip=0.5, rotation=30, zoom=(0.8, 1.2), translate=0.1, shear=10,
                       crop_scale=0.7, brightness=0.2, contrast=0.2, gamma=0.3, noise_std=0.05)


def photo(h=30, w=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 60 * np.sin(xx / 4.0)], -1)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- Preprocessor


@pytest.mark.parametrize("cfg", [
    {},
    {"channels": 1, "normalize": "minmax"},
    {"normalize": "percentile", "percentiles": (2.0, 98.0), "resize_mode": "pad"},
    {"threshold": "fixed", "morphology": ["erosion", "dilation", "opening", "closing"], "disk_radius": 1},
    {"threshold": "otsu", "morphology": ["opening"], "channels": 1},
    {"morphology": ["closing"], "normalize": "minmax"},
    {"equalize": "adapthist", "resize_mode": "crop"},
    {"normalize": "none"},
    {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
])
def test_preprocessor_outputs_configured_shape_and_finite_values(cfg):
    pre = Preprocessor(PreprocessConfig(image_size=16, **cfg))
    x = pre(photo(), 255.0)
    assert x.shape == (16, 16, pre.cfg.channels) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_preprocessor_steps_are_named_in_order_and_end_at_the_output():
    cfg = PreprocessConfig(image_size=16, threshold="fixed", morphology=["erosion", "closing"],
                           normalize="minmax", mean=[0.5], std=[0.25])
    pre = Preprocessor(cfg)
    steps = pre.steps(photo(), 255.0)
    names = [n for n, _ in steps]
    assert names == ["resize 16 (stretch)", "gray", "threshold > 125/255", "erosion disk(3)",
                     "closing disk(3)", "normalise minmax", "standardise", "output"]
    np.testing.assert_allclose(steps[-1][1], pre(photo(), 255.0))
    assert steps[2][1].dtype == bool


def test_pointwise_preprocessing_matches_its_step_by_step_definition():
    img = photo(60, 80)
    pre = Preprocessor(PreprocessConfig(image_size=24, normalize="divide255"))
    ref = F.normalize_divide(F.resize(img, 24), 255.0)
    np.testing.assert_allclose(pre(img, 255.0), ref, atol=1e-5)
    mm = Preprocessor(PreprocessConfig(image_size=24, normalize="minmax", channels=1))
    gray = F.to_gray(img)
    ref = (F.resize(gray, 24) - gray.min()) / (gray.max() - gray.min())
    np.testing.assert_allclose(mm(img, 255.0)[..., 0], ref, atol=1e-5)


def test_sixteen_bit_input_uses_its_own_range():
    film = (photo()[..., 0].astype(np.uint16) * 200).astype(np.uint16)
    x = Preprocessor(PreprocessConfig(image_size=16, channels=1))(film, 65535.0)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.3


def test_prepare_with_warp_equals_preprocess_then_warp():
    img = photo(64, 64)
    pre = Preprocessor(PreprocessConfig(image_size=32, normalize="divide255"))
    m = F.affine_matrix((32, 32), rotation=15, scale=1.1, shear=5, translate=(2, -2), hflip=True)
    fused = pre.prepare(img, 255.0, warp=m)
    sequential = F.warp_affine(pre.prepare(img, 255.0), m)
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(fused[inner] - sequential[inner]).mean() < 0.02


# ---------------------------------------------------------------- Augmenter


def test_same_seed_epoch_key_gives_the_same_sample_and_any_change_gives_another():
    aug = Augmenter(ALL_ON, seed=7)
    x = Preprocessor(PreprocessConfig(image_size=24))(photo(), 255.0)
    a = aug(x, "roses/1.jpg", 3)
    np.testing.assert_array_equal(a, Augmenter(ALL_ON, seed=7)(x, "roses/1.jpg", 3))
    reseeded = Augmenter(ALL_ON, seed=8)(x, "roses/1.jpg", 3)
    others = (aug(x, "roses/1.jpg", 4), aug(x, "roses/2.jpg", 3), reseeded)
    for other in others:
        assert not np.allclose(a, other)


def test_params_stay_in_their_configured_ranges():
    aug = Augmenter(ALL_ON)
    ps = [aug.get_params(sample_rng(0, 0, str(i)), 32) for i in range(300)]
    assert all(abs(p.rotation) <= 30 and abs(p.shear) <= 10 for p in ps)
    assert all(0.8 <= p.scale <= 1.2 / np.sqrt(0.7) + 1e-9 for p in ps)
    assert all(0.8 <= p.contrast <= 1.2 and abs(p.brightness) <= 0.2 for p in ps)
    rotations = np.array([p.rotation for p in ps])
    assert rotations.min() < -20 and rotations.max() > 20  # both clockwise and anti-clockwise
    flips = np.mean([p.hflip for p in ps])
    assert 0.4 < flips < 0.6


def test_turning_one_augmentation_off_does_not_change_the_others():
    on = Augmenter(ALL_ON).get_params(sample_rng(0, 1, "k"), 32)
    off = Augmenter(ALL_ON.model_copy(update={"noise_std": 0.0, "hflip": 0.0})).get_params(
        sample_rng(0, 1, "k"), 32)
    assert (on.rotation, on.scale, on.shear, on.tx, on.brightness) == (
        off.rotation, off.scale, off.shear, off.tx, off.brightness)
    assert off.noise_seed is None and not off.hflip


def test_flip_only_augmentation_is_an_exact_mirror():
    cfg = AugmentConfig(hflip=1.0, rotation=0, zoom=(1, 1), translate=0, brightness=0, contrast=0)
    x = Preprocessor(PreprocessConfig(image_size=16))(photo(), 255.0)
    np.testing.assert_array_equal(Augmenter(cfg)(x, "a", 0), x[:, ::-1])


def test_train_transform_is_deterministic_and_varies_by_epoch():
    pre = Preprocessor(PreprocessConfig(image_size=24, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    tt = TrainTransform(pre, Augmenter(ALL_ON, seed=1))
    img = photo()
    a = tt(img, 255.0, "k", 0)
    assert a.shape == (24, 24, 3) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, tt(img, 255.0, "k", 0))
    assert not np.allclose(a, tt(img, 255.0, "k", 1))


def test_train_transform_with_morphology_takes_the_step_by_step_path():
    pre = Preprocessor(PreprocessConfig(image_size=16, threshold="otsu", morphology=["opening"], channels=1))
    assert not pre.pointwise
    out = TrainTransform(pre, Augmenter(ALL_ON))(photo(), 255.0, "k", 2)
    assert out.shape == (16, 16, 1) and np.isfinite(out).all()


# ---------------------------------------------------------------- Ray Data: independence from actors


def _run_pipeline(folder, cfg: Config, actors: int, batch_size: int, epoch: int,
                  compute: str = "actors") -> dict[int, np.ndarray]:
    import ray

    from raypipe.config import ActorPool
    from raypipe.data.pipeline import BadFileLedger, EpochClock, _map
    from raypipe.data.sources import discover

    split = discover(cfg.data)
    records = split.train + split.val
    rows = [{"path": r.path, "label": i, "key": r.key} for i, r in enumerate(records)]
    ledger = BadFileLedger.remote(len(rows), 0.0, "fail")
    clock = EpochClock.remote()
    ray.get(clock.set.remote(epoch))
    pool = ActorPool(min_actors=actors, max_actors=actors, cpus_per_actor=0.5, batch_size=batch_size,
                     compute=compute)
    # calls of exactly batch_size files (call_rows grows them to fill a max_block_mib block)
    tiny = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"max_block_mib": 1e-6})})
    ds = _map(ray.data.from_items(rows, override_num_blocks=4), tiny, pool,
              {"filesystem": split.filesystem, "cfg": cfg.to_dict(), "ledger": ledger, "clock": clock,
               "augment": True})
    return {int(r["label"]): np.asarray(r["image"]) for r in ds.take_all()}


@pytest.mark.ray
@pytest.mark.slow
def test_augmented_samples_do_not_depend_on_actor_count_batch_size_or_compute(ray_cluster, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", {"a": 5, "b": 5}, size=(30, 22))
    cfg = Config.model_validate({
        "data": {"root": str(folder)},
        "preprocess": {"image_size": 16},
        "augment": ALL_ON.model_dump(),
        "train": {"seed": 3},
    })
    one = _run_pipeline(folder, cfg, actors=1, batch_size=3, epoch=1)
    two = _run_pipeline(folder, cfg, actors=2, batch_size=4, epoch=1)
    tasks = _run_pipeline(folder, cfg, actors=2, batch_size=5, epoch=1, compute="tasks")
    assert sorted(one) == sorted(two) == sorted(tasks) == list(range(10))
    for k in one:
        assert one[k].shape == (3, 16, 16)
        np.testing.assert_array_equal(one[k], two[k])
        np.testing.assert_array_equal(one[k], tasks[k])
    later = _run_pipeline(folder, cfg, actors=2, batch_size=4, epoch=2)
    assert all(not np.allclose(one[k], later[k]) for k in one)


class SlotStage:
    """A training stage over a folder whose labels are the file indexes, so that the rows it
    gives say which file came in which order."""

    def __init__(self, tmp_path, classes: dict[str, int], cfg: dict, pool):
        import ray

        from raypipe.data.pipeline import _records_table
        from raypipe.data.sources import Record, discover

        folder = make_image_folder(tmp_path / "imgs", classes, size=(20, 16))
        self.cfg = Config.model_validate({"data": {"root": str(folder)},
                                          "preprocess": {"image_size": 8}, **cfg})
        self.split = discover(self.cfg.data)
        records = [Record(r.path, i, r.key) for i, r in enumerate(self.split.train + self.split.val)]
        self.n, self.pool, self.table = len(records), pool, ray.put(_records_table(records))

    def dataset(self, clock, epochs: int = 1, world: int = 1, **kwargs):
        from raypipe.data.pipeline import BadFileLedger, _map, _slots_dataset

        return _map(_slots_dataset(self.n, self.cfg, self.pool, epochs, world), self.cfg, self.pool,
                    {"filesystem": self.split.filesystem, "cfg": self.cfg.to_dict(),
                     "ledger": BadFileLedger.remote(self.n, 0.0, "fail"), "clock": clock,
                     "augment": True, "records": self.table, **kwargs})

    @staticmethod
    def rows(ds, clock, epoch: int) -> list[dict]:
        """``ds``'s rows in order (compare the sequence, not just the set), the clock at ``epoch``."""
        import ray

        ray.get(clock.set.remote(epoch))
        # on the dataset's own context: a dataset copies the current one when it is made, so
        # setting the current one now would leave the order to task timing
        ds.context.execution_options.preserve_order = True
        return ds.take_all()


@pytest.mark.ray
@pytest.mark.parametrize("compute, reshuffle", [("actors", True), ("tasks", True), ("tasks", False)])
def test_training_slots_read_every_file_once_per_epoch_in_that_epochs_order(ray_cluster, tmp_path,
                                                                            compute, reshuffle):
    from raypipe.config import ActorPool
    from raypipe.data.pipeline import EpochClock, epoch_order

    pool = ActorPool(min_actors=1, max_actors=2, cpus_per_actor=0.5, batch_size=2, compute=compute)
    stage = SlotStage(tmp_path, {"a": 4, "b": 3}, {"train": {"seed": 5}}, pool)
    clock = EpochClock.remote()
    ds = stage.dataset(clock, reshuffle=reshuffle)
    seen = [[int(r["label"]) for r in stage.rows(ds, clock, epoch)] for epoch in (0, 1)]
    for epoch, labels in enumerate(seen):  # without reshuffling (the overfit check): epoch 0's
        assert labels == list(epoch_order(stage.n, 5, epoch if reshuffle else 0))
    assert (seen[0] != seen[1]) == reshuffle


@pytest.mark.ray
def test_a_task_reads_the_epoch_clock_once_for_all_its_batches(ray_cluster, tmp_path):
    import ray

    from raypipe.data.pipeline import BadFileLedger, ImageBatchProcessor
    from raypipe.data.sources import discover

    @ray.remote(num_cpus=0)
    class CountingClock:  # EpochClock, counting its reads
        def __init__(self) -> None:
            self.epoch, self.reads = 0, 0

        def set(self, epoch: int) -> None:
            self.epoch = epoch

        def get(self) -> int:
            self.reads += 1
            return self.epoch

        def count(self) -> int:
            return self.reads

    folder = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=(20, 16))
    cfg = Config.model_validate({"data": {"root": str(folder)}, "preprocess": {"image_size": 8},
                                 "augment": ALL_ON.model_dump(), "train": {"seed": 2}})
    split = discover(cfg.data)
    batch = {"path": np.array([r.path for r in split.train + split.val]),
             "label": np.arange(len(split.train + split.val)),
             "key": np.array([r.key for r in split.train + split.val])}
    clock = CountingClock.remote()
    proc = ImageBatchProcessor(split.filesystem, cfg.to_dict(),
                               BadFileLedger.remote(6, 0.0, "fail"), clock, augment=True)

    @ray.remote(num_cpus=0)
    def one_task(proc, batches: int) -> list[np.ndarray]:
        return [proc(batch)["image"] for _ in range(batches)]

    # (a processor kept across tasks in one worker process, as process_batch keeps it, must
    # read again in a new task: the slots test above checks that through each epoch's order)
    first = ray.get(one_task.remote(proc, 3))
    assert ray.get(clock.count.remote()) == 1  # three batches, one read
    ray.get(clock.set.remote(1))  # between executions, as the training workers move it
    later = ray.get(one_task.remote(proc, 1))
    assert ray.get(clock.count.remote()) == 2  # a new task reads it again
    np.testing.assert_array_equal(first[0], first[2])
    assert not np.allclose(first[0], later[0])  # and draws with the new epoch


@pytest.mark.ray
def test_one_execution_streams_every_epoch_as_per_epoch_runs_do(ray_cluster, tmp_path):
    """``pipeline.one_execution``: slots ``e * n + i`` in one execution give epoch ``first + e``
    (the clock holds ``first``) the same files, order and augmentation as that epoch's own
    execution; slots past the run's last epoch give nothing."""
    from raypipe.config import ActorPool
    from raypipe.data.pipeline import EpochClock, epoch_order

    pool = ActorPool(min_actors=1, max_actors=2, cpus_per_actor=0.5, batch_size=3, compute="tasks")
    stage = SlotStage(tmp_path, {"a": 3, "b": 2},
                      {"augment": ALL_ON.model_dump(), "train": {"seed": 3, "epochs": 3}}, pool)
    n, clock = stage.n, EpochClock.remote()
    # an execution from epoch 1 (a resumed run, or the second): epochs 1, 2 and (past
    # train.epochs=3) none
    whole = stage.rows(stage.dataset(clock, 3, whole_run=True), clock, 1)
    per_epoch = sum((stage.rows(stage.dataset(clock), clock, e) for e in (1, 2)), [])
    labels = [int(r["label"]) for r in whole]
    assert labels == list(epoch_order(n, 3, 1)) + list(epoch_order(n, 3, 2))  # and no epoch 3
    assert labels == [int(r["label"]) for r in per_epoch]
    for a, b in zip(whole, per_epoch, strict=True):  # the same augmentation draw, epoch by epoch
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.allclose(whole[0]["image"], whole[n + labels[n:].index(labels[0])]["image"])


def _split_rows(ds, world: int, consume) -> list:
    """What each of ``world`` training workers gets: ``consume(w, shard)`` run on every equal
    shard of ``ds`` at once (a streaming split moves only while every shard is read)."""
    import threading

    shards, out, errors = ds.streaming_split(world, equal=True), [None] * world, []

    def run(w: int) -> None:
        try:
            out[w] = consume(w, shards[w])
        except Exception as exc:  # noqa: BLE001 - reraised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


@pytest.mark.ray
def test_one_execution_gives_every_epoch_of_every_worker_that_epochs_files(ray_cluster, tmp_path):
    """Split between two training workers and cut into epochs by row count, one execution for
    the run gives each worker, in each epoch, its share of that epoch's files and no other
    epoch's, and the first epoch exactly as its own execution would. (Blocks sized by the whole
    run held two epochs each and went whole to one worker, which then trained on epochs the
    other reached only later; a local shuffle buffer carried rows over every cut.)"""

    import ray

    from raypipe.config import ActorPool
    from raypipe.data.pipeline import EpochClock, epoch_order
    from raypipe.training.worker import EpochStream

    world, epochs = 2, 4
    # 13 files: each epoch leaves out the one its random order puts last, as an equal split of
    # that epoch alone drops it. Blocks of 2, 2, 4 and 4 rows in the first epoch, 6 and 6 after
    pool = ActorPool(min_actors=1, max_actors=1, cpus_per_actor=0.5, batch_size=2, compute="tasks")
    stage = SlotStage(tmp_path, {"a": 7, "b": 6},
                      {"pipeline": {"blocks": 2}, "train": {"seed": 4, "epochs": epochs}}, pool)
    n, clock = stage.n, EpochClock.remote()
    rows = lambda batches: sum((b["label"].tolist() for b in batches), [])  # noqa: E731

    def one_execution(w: int, shard) -> list:
        stream = EpochStream(shard.iter_batches(batch_size=2, batch_format="numpy"),
                             n // world, epochs)
        return [rows(stream.epoch()) for _ in range(epochs)]

    def first_epoch(w: int, shard) -> list:
        return rows(shard.iter_batches(batch_size=2, batch_format="numpy"))

    ray.get(clock.set.remote(0))
    whole = _split_rows(stage.dataset(clock, epochs, world, whole_run=True), world,
                        one_execution)
    own = _split_rows(stage.dataset(clock, 1, world), world, first_epoch)
    assert [whole[w][0] for w in range(world)] == own
    for epoch in range(epochs):
        assert [len(whole[w][epoch]) for w in range(world)] == [n // world] * world
        files = sum((whole[w][epoch] for w in range(world)), [])
        assert sorted(files) == sorted(epoch_order(n, 4, epoch)[:n - 1])


def test_epoch_stream_cuts_one_stream_into_epochs_by_row_count():
    from raypipe.training.worker import EpochStream

    def batches(rows: int, size: int = 4):
        ids = list(range(rows))
        return [{"label": np.array(ids[i:i + size])} for i in range(0, rows, size)]

    stream = EpochStream(batches(30), rows_per_epoch=10, epochs=3)
    epochs = [[b["label"].tolist() for b in stream.epoch()] for _ in range(3)]
    # a batch across a cut is split there: each epoch gets exactly its rows, the last the rest
    assert [[len(b) for b in e] for e in epochs] == [[4, 4, 2], [2, 4, 4], [4, 4, 2]]
    assert sum((sum(e, []) for e in epochs), []) == list(range(30))  # every row once, in order
    # a shorter stream (files skipped as unreadable): the epochs end where the rows run out
    short = EpochStream(batches(14), rows_per_epoch=10, epochs=3)
    assert [sum(len(b["label"]) for b in short.epoch()) for _ in range(3)] == [10, 4, 0]

    # 1 of 10 files per epoch unreadable, found while the first epoch streams: the count is
    # asked again near each epoch's end (within ``slack`` rows), so every epoch gets 9 rows
    asked = []

    def rows() -> int:
        asked.append(1)
        return 10 if len(asked) == 1 else 9

    def sizes(stream) -> list[int]:
        return [sum(len(b["label"]) for b in stream.epoch()) for _ in range(3)]

    assert sizes(EpochStream(batches(27, 4), rows, epochs=3, slack=2)) == [9, 9, 9]
    asked.clear()
    assert sizes(EpochStream(batches(27, 4), rows, epochs=3)) == [10, 9, 8]  # asked at the start only
