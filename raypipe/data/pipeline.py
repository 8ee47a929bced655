"""The only Ray Data glue: file records -> streaming Datasets of model-ready batches.

Every dataset here is a range of row ids followed by one ``map_batches`` stage: a pool of data
actors (:class:`BlockWorker`) per execution, or tasks for short ones. For each block of
``pipeline.files_per_batch`` ids, a data worker looks up which file each id stands for (a table
of paths, labels and keys put once in the object store), reads, decodes, preprocesses and
(training) augments it, and returns one block of model-ready images. Full-resolution pixels
never pass through the object store; only model-sized arrays do.

Training ids are positions in the epoch's order of the files (:func:`epoch_order`), a new
seeded permutation every epoch, read from the run's :class:`EpochClock`. Where the training
set's decoded, resized images fit (``pipeline.cache``), they are made once, kept in the object
store, and each epoch only augments them (:func:`build_train_cache`).

Bad files are never dropped silently: each one is recorded (key, reason) in a
:class:`BadFileLedger` actor, and with ``data.on_bad_file=fail`` (or past
``data.max_bad_fraction``) the stage raises :class:`BadFileError` naming the files.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from raypipe.config import Config
from raypipe.data.decode import DecodeError, decode_image, value_range
from raypipe.data.sources import DatasetSplit, Record, unreachable
from raypipe.data.transforms import Augmenter, Preprocessor, TrainTransform

log = logging.getLogger(__name__)

# auto-caching takes at most this share of the smallest node's object store, leaving the rest
# for the blocks in flight and for the user's other work
CACHE_SHARE = 0.25


class BadFileError(RuntimeError):
    """Too many (or, with ``on_bad_file=fail``, any) unreadable image files."""


@ray.remote(num_cpus=0)
class BadFileLedger:
    """Counts unreadable files once each (by key) and says when the limit is passed."""

    def __init__(self, total_files: int, max_fraction: float, policy: str):
        self.total = max(1, total_files)
        self.max_fraction = max_fraction
        self.policy = policy
        self.bad: dict[str, str] = {}

    def record(self, key: str, reason: str) -> str | None:
        """Record a bad file; returns an error message when the run must stop, else None."""
        self.bad.setdefault(key, reason)
        if self.policy == "fail":
            return (f"unreadable image '{key}': {reason}. Fix or remove the file, or set "
                    "data.on_bad_file=skip to skip (and list) unreadable files.")
        if len(self.bad) / self.total > self.max_fraction:
            return self._too_many()
        return None

    def _too_many(self) -> str:
        # the most common failure first: one broken export usually explains most of the files
        kinds = Counter(r.split(" (")[0] for r in self.bad.values())
        reasons = "; ".join(f"{n} x {kind}" for kind, n in kinds.most_common(3))
        ranked = sorted(self.bad.items(), key=lambda kr: (-kinds[kr[1].split(" (")[0]], kr[0]))
        files = "; ".join(f"{k}: {r}" for k, r in ranked[:5])
        more = f" (and {len(ranked) - 5} more)" if len(ranked) > 5 else ""
        return (
            f"{len(self.bad)} of {self.total} files are unreadable "
            f"({len(self.bad) / self.total:.1%}), above data.max_bad_fraction={self.max_fraction}. "
            f"Reasons: {reasons}. Files: {files}{more}. Fix or remove them, or raise "
            "data.max_bad_fraction."
        )

    def items(self) -> dict[str, str]:
        return dict(self.bad)


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch the training workers are in: the training stage reads it to pick the epoch's
    file order and to seed its augmentation draws. Rank 0 also leaves each finished epoch's
    metrics here, for the driver's progress display."""

    def __init__(self) -> None:
        self.epoch = 0
        self.finished: list[dict] = []

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch

    def record(self, metrics: dict) -> None:
        self.finished.append(metrics)

    def since(self, n: int) -> list[dict]:
        """The metrics of the finished epochs after the first ``n``."""
        return self.finished[n:]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training files' order in ``epoch``: a fresh permutation each epoch, the same in every
    process and on every resume (``train.seed``, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def records_table(records: list[Record]) -> pa.Table:
    """path, label, key of each record (labels: class indices, or multi-hot vectors)."""
    return pa.table({"path": [r.path for r in records], "label": [r.label for r in records],
                     "key": [r.key for r in records]})


def _label_array(table: pa.Table) -> np.ndarray:
    """``(n,)`` int64 class indices, or ``(n, K)`` float32 multi-hot vectors."""
    col = table.column("label")
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
        values = col.to_pylist()
        return np.asarray(values, np.float32).reshape(len(values), -1)
    return col.to_numpy().astype(np.int64)


@dataclass
class TrainCache:
    """The training set made once (decoded, resized, normalised, not augmented), in the object
    store: ``parts[i]`` holds images of the files at positions ``positions[i]``."""

    parts: list[Any]  # ObjectRefs of (m, H, W[, C]) float32 arrays
    positions: list[np.ndarray]

    @property
    def files(self) -> int:
        return sum(len(p) for p in self.positions)


class ImageProcessor:
    """What a data task does with a block of row ids: ``{"id"}`` -> ``{"image" (N, C, H, W)
    float32, "label"}`` (and ``path``, ``key`` with ``inference``; ``pos`` instead of the label,
    and images not yet finished, with ``prepare_only``).

    Ids are positions in ``records`` (a table or its ObjectRef); with ``shuffle`` they are
    positions in the epoch's order (:func:`epoch_order`) of ``records`` (or, with ``cache``, of
    the cached files). ``augment`` draws each image's augmentation from (seed, epoch, key).
    """

    def __init__(self, filesystem: pafs.FileSystem, cfg: dict, ledger: Any, records: Any,
                 clock: Any = None, augment: bool = False, shuffle: bool = False,
                 cache: TrainCache | None = None, inference: bool = False,
                 prepare_only: bool = False):
        conf = Config.model_validate(cfg)
        table = ray.get(records) if isinstance(records, ray.ObjectRef) else records
        self.paths = table.column("path").to_pylist()
        self.keys = table.column("key").to_pylist()
        self.labels = _label_array(table)
        self.fs = filesystem
        self.ledger = ledger
        self.clock = clock
        self.seed = conf.train.seed
        self.shuffle = shuffle
        self.inference = inference
        self.prepare_only = prepare_only
        self.pre = Preprocessor(conf.preprocess)
        self.aug = Augmenter(conf.augment, conf.train.seed) if augment else None
        # streamed training images: the resize and the augmentation warp are one resample
        self.train_tf = TrainTransform(self.pre, self.aug) if self.aug is not None else None
        self.gray = conf.preprocess.channels == 1 and conf.preprocess.threshold == "none"
        self.draft = conf.preprocess.image_size
        self.max_pixels = conf.data.max_pixels
        self.window = conf.preprocess.window  # DICOM films' VOI; other formats ignore it
        self.cache = cache
        if cache is not None:
            self.cached_pos = np.concatenate(cache.positions) if cache.positions else np.zeros(0, int)
            self.cached_part = np.repeat(np.arange(len(cache.positions)),
                                         [len(p) for p in cache.positions])
            self.cached_row = np.concatenate([np.arange(len(p)) for p in cache.positions]) \
                if cache.positions else np.zeros(0, int)
            self._parts: dict[int, np.ndarray] = {}
        self._orders: dict[int, np.ndarray] = {}
        self.fixed_epoch: int | None = None  # set by a data actor, which lives one epoch

    def _order(self, n: int, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(n, self.seed, epoch)}  # one epoch at a time
        return self._orders[epoch]

    def _epoch(self) -> int:
        if self.fixed_epoch is not None:
            return self.fixed_epoch
        return ray.get(self.clock.get.remote()) if self.clock is not None else 0

    def _load(self, path: str) -> np.ndarray:
        try:
            with self.fs.open_input_file(path) as f:
                data = f.read()
        except OSError as exc:  # the store gone mid-run stops the run; a bad object is a bad file
            gone = unreachable(exc, self.fs, path)
            if gone is None:
                raise
            raise gone from None
        return decode_image(data, max_pixels=self.max_pixels, gray=self.gray, draft_size=self.draft,
                            window=self.window)

    def _cached(self, j: int) -> np.ndarray:
        part = int(self.cached_part[j])
        if part not in self._parts:  # zero-copy on the node that holds it
            self._parts[part] = ray.get(self.cache.parts[part])
        return self._parts[part][self.cached_row[j]]

    def _image(self, pos: int, j: int, epoch: int) -> np.ndarray:
        """The model input (HWC float32) for file ``pos`` (``j``: its index in the cache)."""
        if self.cache is not None:
            x = self._cached(j)
            if self.aug is not None:
                x = self.aug(x, self.keys[pos], epoch)
            return self.pre.finish(x)
        img = self._load(self.paths[pos])
        if self.prepare_only:
            return self.pre.prepare(img, value_range(img))
        if self.train_tf is not None:
            return self.train_tf(img, value_range(img), self.keys[pos], epoch)
        return self.pre(img, value_range(img))

    def _bad(self, pos: int, reason: str) -> None:
        stop = ray.get(self.ledger.record.remote(str(self.keys[pos]), reason))
        if stop:
            raise BadFileError(stop)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], np.int64)
        epoch = self._epoch() if (self.shuffle or self.aug is not None) else 0
        if self.cache is not None:
            index = self._order(len(self.cached_pos), epoch)[ids] if self.shuffle else ids
            positions = self.cached_pos[index]
        else:
            index = None
            positions = self._order(len(self.paths), epoch)[ids] if self.shuffle else ids
        images, kept = None, []
        for i, pos in enumerate(positions):
            try:
                x = self._image(int(pos), int(index[i]) if index is not None else -1, epoch)
            except (DecodeError, OSError) as exc:
                self._bad(int(pos), str(exc))
                continue
            except ValueError as exc:  # an image the kernels cannot take: name it, like a bad file
                self._bad(int(pos), f"preprocessing failed: {exc}")
                continue
            if images is None:  # filled as each image is made, while it is in the CPU's cache
                images = np.empty((len(positions), *self._layout(x.shape)), np.float32)
            images[len(kept)] = x if self.prepare_only else x.transpose(2, 0, 1)
            kept.append(int(pos))
        kept_pos = np.asarray(kept, np.int64)
        images = images[:len(kept)] if images is not None else self._empty()
        if self.prepare_only:
            return {"pos": kept_pos, "image": images}
        out = {"image": images, "label": self.labels[kept_pos]}
        if self.inference:
            out["path"] = np.asarray([str(self.paths[p]) for p in kept_pos], dtype=object)
            out["key"] = np.asarray([str(self.keys[p]) for p in kept_pos], dtype=object)
        return out

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if self.prepare_only else (shape[2], shape[0], shape[1])

    def _empty(self) -> np.ndarray:
        c, s = self.pre.cfg.channels, self.pre.cfg.image_size
        return np.zeros((0, c, s, s) if not self.prepare_only else (0, s, s), np.float32)


_PROCESSORS: dict[str, ImageProcessor] = {}


def process_block(batch: dict[str, np.ndarray], *, token: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """A data task: ``ImageProcessor(**kwargs)(batch)``. The processor (its file table, its
    transforms) is built once per worker process and pipeline (``token``) and reused by every
    later task of that pipeline, epoch after epoch: Ray keeps its task workers' processes."""
    proc = _PROCESSORS.get(token)
    if proc is None:
        while len(_PROCESSORS) >= 4:  # a process serves few pipelines at a time; drop the oldest
            _PROCESSORS.pop(next(iter(_PROCESSORS)))
        proc = _PROCESSORS[token] = ImageProcessor(**kwargs)
    return proc(batch)


def data_workers(cfg: Config, cpus_left: float) -> int:
    """``pipeline.workers``, with ``auto`` resolved to the data workers that ``cpus_left`` CPUs
    (what the training workers leave) hold, at least 1."""
    p = cfg.pipeline
    if p.workers != "auto":
        return int(p.workers)
    return max(1, math.floor(cpus_left / p.cpus_per_worker + 1e-9))


class RowIds(ray.data.Datasource):
    """Row ids ``0..n-1`` in blocks, read by tasks of the map stage's CPUs. ``ray.data.range``
    reads with 1 CPU a task; a read that asks for other resources than the map after it is not
    fused with it, and where less than one CPU is left to the data stage (``pipeline.
    cpus_per_worker`` below 1 beside the training workers) it is never scheduled."""

    def __init__(self, n: int):
        self.n = n

    def get_name(self) -> str:
        return "Range"  # the tasks' title: ReadRange->MapBatches(...), as with ray.data.range

    def estimate_inmemory_data_size(self) -> int:
        return 8 * self.n

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       **kwargs: Any) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = []
        for ids in np.array_split(np.arange(self.n, dtype=np.int64), max(1, min(parallelism, self.n))):
            meta = BlockMetadata(num_rows=len(ids), size_bytes=8 * len(ids), exec_stats=None,
                                 input_files=None)
            tasks.append(ReadTask(lambda ids=ids: [pa.table({"id": ids})], meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


# blocks queued at each data actor besides the one it works on: the next block is there the
# moment one is done, instead of after a round trip through Ray Data's scheduler (which, with
# one task per CPU, left the data CPUs idle ~40 % of the time on 224-px JPEGs)
BLOCKS_QUEUED_PER_WORKER = 4
# an actor pool starts new processes every epoch (~3 s on 2 CPUs, imports included); tasks run on
# processes Ray keeps. From this many blocks an epoch on, the pool's start-up is the smaller cost
ACTOR_POOL_MIN_BLOCKS = 64


def _stage(n: int, cfg: Config, kwargs: dict, start: int = 1) -> ray.data.Dataset:
    """Row ids ``0..n-1`` in blocks of ``files_per_batch`` -> the map stage of
    ``pipeline.cpus_per_worker`` CPUs per data worker, ``pipeline.workers`` of them (``auto``:
    from ``start``, growing with the work queued and the CPUs free). An epoch of at
    least :data:`ACTOR_POOL_MIN_BLOCKS` blocks runs on a pool of data actors that each hold a
    few blocks queued; a shorter one (a small dataset, a validation set) on tasks, which start
    at once. Both run the same :class:`ImageProcessor` on the same blocks."""
    assert n > 0, "a dataset of no files"
    p = cfg.pipeline
    blocks = math.ceil(n / p.files_per_batch)
    ds = ray.data.read_datasource(RowIds(n), override_num_blocks=blocks, num_cpus=p.cpus_per_worker)
    common = {"batch_size": None, "batch_format": "numpy", "num_cpus": p.cpus_per_worker}
    if blocks < ACTOR_POOL_MIN_BLOCKS:
        size = None if p.workers == "auto" else min(p.workers, blocks)
        return ds.map_batches(process_block, compute=ray.data.TaskPoolStrategy(size=size),
                              fn_kwargs={"token": uuid.uuid4().hex, **kwargs}, **common)
    sizes = ({"min_size": 1, "max_size": None, "initial_size": max(1, min(start, blocks))}
             if p.workers == "auto" else {"size": p.workers})
    pool = ray.data.ActorPoolStrategy(**sizes, max_tasks_in_flight_per_actor=BLOCKS_QUEUED_PER_WORKER)
    return ds.map_batches(BlockWorker, compute=pool, fn_constructor_kwargs=kwargs, **common)


class BlockWorker:
    """A data actor of the map stage: one :class:`ImageProcessor` (its file table, its
    transforms), built once, for every block of the execution."""

    def __init__(self, **kwargs: Any) -> None:
        self.proc = ImageProcessor(**kwargs)
        # its pool is one execution, one epoch, started after the clock was set: read it once,
        # not once per block
        self.proc.fixed_epoch = self.proc._epoch()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.proc(batch)


@dataclass
class Datasets:
    """A run's datasets and the helper actors their tasks talk to."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    ledger: Any
    clock: Any
    train_files: int  # what one epoch streams: training files (minus any found unreadable)
    cached: bool


def preprocessed_mib(cfg: Config, n: int) -> float:
    """Size of ``n`` preprocessed images (float32, channels x image_size x image_size)."""
    p = cfg.preprocess
    return n * p.channels * p.image_size ** 2 * 4 / 2 ** 20


def object_store_mib() -> float:
    """The smallest object store of the cluster's live nodes, in MiB (0 if none is known)."""
    stores = [n["Resources"].get("object_store_memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    return min(stores, default=0.0) / 2 ** 20


def cache_choice(cfg: Config, n_train: int, n_val: int) -> tuple[bool, str]:
    """Whether to cache the training and validation images (``pipeline.cache``), and why, for
    the log."""
    need = preprocessed_mib(cfg, n_train + n_val)
    if cfg.pipeline.cache is not True and cfg.pipeline.cache is not False:  # auto
        budget = CACHE_SHARE * object_store_mib()
        if need <= budget:
            return True, (f"pipeline.cache=auto: the preprocessed images ({need:.0f} MiB) fit a "
                          f"quarter of the smallest node's object store ({budget:.0f} MiB); they "
                          "are made once and augmented each epoch (pipeline.cache=false streams "
                          "them from storage instead)")
        return False, (f"pipeline.cache=auto: the preprocessed images ({need:.0f} MiB) exceed a "
                       f"quarter of the smallest node's object store ({budget:.0f} MiB); every "
                       "epoch reads and decodes them from storage")
    if cfg.pipeline.cache:
        return True, f"pipeline.cache=true: {need:.0f} MiB of preprocessed images kept in the object store"
    return False, "pipeline.cache=false: every epoch reads and decodes the files from storage"


def build_train_cache(cfg: Config, records_ref: Any, n: int, filesystem: pafs.FileSystem,
                      ledger: Any, workers: int) -> TrainCache:
    """Decode and resize the ``n`` training files once, with ``workers`` data tasks at a time,
    into the object store. Files found unreadable are recorded in ``ledger`` and left out."""
    p = cfg.pipeline
    # "DEFAULT": outside the caller's placement group; a search trial's group (see
    # raypipe.tune.driver.TRIAL_RESOURCES) captures its child tasks and has no CPU to give them
    task = ray.remote(_prepare_part).options(num_cpus=p.cpus_per_worker, num_returns=2,
                                             scheduling_strategy="DEFAULT")
    kwargs = {"token": uuid.uuid4().hex, "filesystem": filesystem, "cfg": cfg.to_dict(),
              "ledger": ledger, "records": records_ref, "prepare_only": True}
    spans = [(a, min(n, a + p.files_per_batch * 8)) for a in range(0, n, p.files_per_batch * 8)]
    pending: dict[Any, int] = {}
    parts: list[Any] = [None] * len(spans)
    positions: list[np.ndarray] = [np.zeros(0, np.int64)] * len(spans)
    for i, (a, b) in enumerate(spans):
        while len(pending) >= 2 * workers:  # a bounded window: memory stays a few parts
            done, _ = ray.wait(list(pending), num_returns=1)
            positions[pending.pop(done[0])] = ray.get(done[0])
        pos_ref, parts[i] = task.remote(np.arange(a, b), **kwargs)
        pending[pos_ref] = i
    for ref, i in pending.items():
        positions[i] = ray.get(ref)
    keep = [i for i, pos in enumerate(positions) if len(pos)]
    return TrainCache([parts[i] for i in keep], [positions[i] for i in keep])


def _prepare_part(ids: np.ndarray, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    out = process_block({"id": ids}, **kwargs)
    return out["pos"], out["image"]


def build_datasets(cfg: Config, split: DatasetSplit, train_records: list[Record] | None = None,
                   workers: int | None = None) -> Datasets:
    """The run's training and validation datasets. ``train_records`` overrides the split's
    training set (the overfit check's small subset, which trains in a fixed order without
    augmentation). ``workers``: data workers at a time while the cache is made, and the data
    actors each epoch starts with (default: :func:`data_workers` of all the cluster's CPUs)."""
    records = split.train if train_records is None else train_records
    if workers is None:
        workers = data_workers(cfg, float(ray.cluster_resources().get("CPU", 1.0)))
    ledger = BadFileLedger.remote(len(records) + len(split.val), cfg.data.max_bad_fraction,
                                  cfg.data.on_bad_file)
    clock = EpochClock.remote()
    overfit = cfg.train.overfit_subset is not None
    base = {"filesystem": split.filesystem, "cfg": cfg.to_dict(), "ledger": ledger}
    train_ref = ray.put(records_table(records))
    cached, why = cache_choice(cfg, len(records), len(split.val))
    log.info("%s", why)
    try:
        cache = build_train_cache(cfg, train_ref, len(records), split.filesystem, ledger,
                                  workers) if cached else None
        n_train = cache.files if cache is not None else len(records)
        train = _stage(n_train, cfg, {**base, "records": train_ref, "clock": clock,
                                      "augment": cfg.augment.enabled and not overfit,
                                      "shuffle": not overfit, "cache": cache}, workers)
        val = _stage(len(split.val), cfg, {**base, "records": ray.put(records_table(split.val))},
                     workers)
        if cached:  # validation is deterministic: made once, read each epoch
            val = val.materialize()
    except Exception as exc:
        release(clock)
        raise DataStageFailed(exc, ledger) from exc
    return Datasets(train, val, ledger, clock, n_train, cached)


class DataStageFailed(RuntimeError):
    """Making the cache or the validation set failed before training started; ``ledger`` holds
    the bad files found so far, for the run's summary."""

    def __init__(self, error: BaseException, ledger: Any):
        super().__init__(str(error))
        self.error, self.ledger = error, ledger


def build_inference_dataset(
    cfg: Config, records: list[Record], filesystem: pafs.FileSystem, predictor: type,
    predictor_kwargs: dict, use_gpu: bool = False,
) -> tuple[ray.data.Dataset, Any]:
    """(dataset, bad-file ledger) for batch inference: files -> preprocessing tasks (``cfg``'s
    settings, no augmentation) -> one ``predictor`` actor holding the model (on a GPU when
    ``use_gpu``). ``predictor(**predictor_kwargs)`` is called on ``{image, label, path, key}``
    batches and returns the output rows. Labels of unlabeled files are -1."""
    ledger = BadFileLedger.remote(len(records), cfg.data.max_bad_fraction, cfg.data.on_bad_file)
    ds = _stage(len(records), cfg,
                {"filesystem": filesystem, "cfg": cfg.to_dict(), "ledger": ledger,
                 "records": ray.put(records_table(records)), "inference": True})
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cfg.train.cpus_per_worker}
    ds = ds.map_batches(predictor, fn_constructor_kwargs=predictor_kwargs,
                        batch_size=cfg.train.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), **resources)
    return ds, ledger


def release(*actors: Any) -> None:
    """End a finished pipeline's helper actors (ledger, clock) now: the task processes that ran
    its batches keep handles to them in their processor cache, which would keep them alive."""
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # already gone with its cluster
            pass


def dataset_config(deterministic: bool = True):
    """Split ``train`` into equal shards (every DDP worker takes the same number of steps) and
    ``val`` into uneven ones, so that no validation image is dropped before the metrics.
    ``deterministic``: blocks reach the workers in file-list order (Ray Data's
    ``preserve_order``), so which images share a worker's batches (and its BatchNorm
    statistics) does not depend on which task finished first."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    class _Config(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = None if deterministic else worker_node_ids
            for name, ds in datasets.items():
                ds.context.execution_options = ExecutionOptions(preserve_order=deterministic)
                if world_size == 1:  # nothing to split: no coordinator actor between stage and worker
                    out[0][name] = ds.iterator()
                    continue
                for i, part in enumerate(ds.streaming_split(world_size, equal=(name != "val"),
                                                            locality_hints=hints)):
                    out[i][name] = part
            return out

    return _Config()
