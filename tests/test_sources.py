"""Listing, labelling and splitting: folder-per-class and CSV manifests (NIH ChestX-ray14 form),
a seeded stratified split that stays put when files are added."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_image_folder

from raypipe.config import load_config
from raypipe.data.sources import Record, discover, stratified_split


def _discover(*overrides: str):
    return discover(load_config(None, list(overrides)).data)


def test_folder_per_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"dogs": 10, "cats": 5})
    (root / "cats" / "nested").mkdir()
    (root / "cats" / "nested" / "x.png").write_bytes((root / "cats" / "000.png").read_bytes())
    (root / "dogs" / ".hidden.png").write_bytes(b"")
    split = _discover(f"data.root={root}", "data.val_fraction=0.2")
    assert split.class_names == ["cats", "dogs"]  # sorted: labels do not depend on listing order
    everything = split.train + split.val
    assert len(everything) == 16 and len({r.key for r in everything}) == 16
    assert "cats/nested/x.png" in {r.key for r in everything}
    for r in everything:
        assert r.label == split.class_names.index(r.key.split("/")[0])
        assert Path(r.path).is_file() and r.size == Path(r.path).stat().st_size
    assert split.counts()["val"] == {"cats": 1, "dogs": 2}
    val_keys = {r.key for r in split.val}
    crossing = ("cats/000.png" in val_keys) != ("cats/nested/x.png" in val_keys)
    assert split.counts()["train_val_duplicates"] == int(crossing)  # the nested byte-copy
    dup = "; 1 validation image(s) duplicate a training image" if crossing else ""
    assert split.describe() == f"2 classes; train 13 (cats 5, dogs 8), val 3 (cats 1, dogs 2){dup}"


def test_the_log_names_the_split_once_in_words(tmp_path: Path, caplog) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 8, "b": 2})
    with caplog.at_level("INFO", logger="raypipe"):
        _discover(f"data.root={root}", "data.val_fraction=0.5")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "raypipe.data.sources"]
    assert line == f"dataset {root}: 2 classes; train 5 (a 4, b 1), val 5 (a 4, b 1)"


def test_class_names_fix_the_label_order(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 4, "b": 4})
    split = _discover(f"data.root={root}", "data.class_names=[b, a]")
    assert split.class_names == ["b", "a"]
    assert all(r.label == (0 if r.key.startswith("b/") else 1) for r in split.train + split.val)


def test_split_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", {"a": 40, "b": 10})
    one = _discover(f"data.root={root}", "data.val_fraction=0.2")
    two = _discover(f"data.root={root}", "data.val_fraction=0.2")
    assert [r.key for r in one.val] == [r.key for r in two.val]
    assert one.counts()["val"] == {"a": 8, "b": 2}
    assert not {r.key for r in one.train} & {r.key for r in one.val}
    other = _discover(f"data.root={root}", "data.val_fraction=0.2", "data.split_seed=1")
    assert [r.key for r in other.val] != [r.key for r in one.val]


def test_split_stable_when_files_are_added(tmp_path: Path) -> None:
    def recs(n: int) -> list[Record]:
        return [Record(f"/d/{c}/{i}.png", k, f"{c}/{i}.png") for k, c in enumerate("ab")
                for i in range(n)]

    _, val_before = stratified_split(recs(100), 0.2, seed=3)
    train_after, val_after = stratified_split(recs(110), 0.2, seed=3)
    assert stratified_split(recs(100), 0.2, seed=3)[1] == val_before  # deterministic
    before, after = {r.key for r in val_before}, {r.key for r in val_after}
    old = {r.key for r in recs(100)}
    new_in_val = after - old
    moved_out = before - after  # only new files with lower hashes can push old ones out
    moved_in = (after & old) - before  # only the growth of the validation share pulls files in
    assert len(moved_out) <= len(new_in_val)
    assert len(moved_in) <= 2 * (round(110 * 0.2) - round(100 * 0.2))
    assert len(before & after) >= len(before) - len(new_in_val)
    assert len(after) == 44 and {r.key for r in train_after}.isdisjoint(after)


def test_manifest_layout(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"neg": 6, "pos": 6})
    rows = [f"{c}/{i:03d}.png,{c}" for c in ("neg", "pos") for i in range(6)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    split = _discover(f"data.manifest={tmp_path / 'm.csv'}", f"data.root={root}")
    assert split.class_names == ["neg", "pos"]
    assert len(split.train) + len(split.val) == 12 and not split.skipped
    # paths relative to the CSV's own folder when data.root is not given
    (root / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert len(_discover(f"data.manifest={root / 'm.csv'}").train) == len(split.train)


def test_nih_manifest_made_binary(tmp_path: Path) -> None:
    """``Image Index`` / ``Finding Labels`` with ``|``-separated findings; images in sub-folders
    (images_001/images/...) found by file name, as in the NIH download."""
    findings = ["No Finding", "Effusion", "Atelectasis|Effusion", "Infiltration",
                "Effusion|Mass", "Cardiomegaly", "No Finding", "Pleural_Thickening",
                "Effusion", "Nodule", "No Finding", "Atelectasis"]
    tmp = make_image_folder(tmp_path / "tmp", {"x": len(findings)})
    images = tmp_path / "nih" / "images_001" / "images"
    images.mkdir(parents=True)
    rows = []
    for i, f in enumerate(findings):
        name = f"{i:08d}_000.png"
        (tmp / "x" / f"{i:03d}.png").rename(images / name)
        rows.append(f"{name},{f},0,{i},50,M,PA")
    csv = tmp_path / "nih" / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                   "Patient Gender,View Position\n" + "\n".join(rows) + "\n")
    split = _discover(f"data.manifest={csv}", "data.positive_finding=Effusion",
                      "data.val_fraction=0.25")
    assert split.class_names == ["no_Effusion", "Effusion"]
    labels = {r.key: r.label for r in split.train + split.val}
    expected = {f"{i:08d}_000.png": int("Effusion" in f.split("|")) for i, f in enumerate(findings)}
    assert labels == expected
    assert sum(expected.values()) == 4
    assert {r.label for r in split.val} == {0, 1}


def test_shared_flowers_sample(shared_data: Path) -> None:
    root = shared_data / "flowers-sample"
    if not root.is_dir():
        return
    split = _discover(f"data.root={root}", "data.class_names=[daisy, roses]")
    assert split.class_names == ["daisy", "roses"]
    assert min(split.counts()["val"].values()) >= 1


@pytest.mark.parametrize("n, blocks, block_rows, lanes, want", [
    # each lane starts with one map batch (32 rows), then sizes double up to the largest block
    (1000, 8, 100, 2, [32, 32, 64, 64] + [100] * 8 + [8]),
    (1000, 8, 512, 1, [32, 64] + [125] * 7 + [29]),   # largest: ceil(1000 / 8 blocks)
    (100, 8, 128, 2, [13] * 7 + [9]),                  # at least `blocks` blocks
    (5, 8, 128, 2, [1] * 5),                           # never an empty block
    (0, 8, 128, 2, []),
])
def test_file_list_is_cut_into_small_first_blocks_then_blocks_of_at_most_block_rows(
        n, blocks, block_rows, lanes, want):
    from raypipe.config import ActorPool
    from raypipe.data.pipeline import block_spans

    cfg = load_config(None, [f"pipeline.blocks={blocks}", f"pipeline.block_rows={block_rows}"])
    spans = block_spans(n, cfg, ActorPool(min_actors=1, max_actors=lanes, batch_size=32))
    assert [b - a for a, b in spans] == want
    assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:], strict=False))  # contiguous
    assert (spans[0][0], spans[-1][1]) == (0, n) if spans else n == 0


@pytest.mark.parametrize("n, world, lanes", [(100, 1, 2), (100, 2, 1), (101, 2, 3), (7, 3, 2),
                                             (1, 2, 1)])
def test_blocks_come_in_rounds_that_give_every_training_worker_the_same_rows(n, world, lanes):
    from raypipe.config import ActorPool
    from raypipe.data.pipeline import block_spans

    cfg = load_config(None, ["pipeline.blocks=4", "pipeline.block_rows=16"])
    spans = block_spans(n, cfg, ActorPool(min_actors=1, max_actors=lanes, batch_size=4), world)
    assert (spans[0][0], spans[-1][1]) == (0, n)
    assert all(a == b for (_, a), (b, _) in zip(spans, spans[1:], strict=False))  # contiguous
    rows = [0] * world  # an equal streaming split: each block to the worker with the fewest rows
    for a, b in spans:
        rows[rows.index(min(rows))] += b - a
    assert max(rows) - min(rows) <= 1  # the last round's blocks differ by one row at most
    if n % world == 0:
        assert len(set(rows)) == 1


@pytest.mark.parametrize("n, epochs, world", [(100, 3, 1), (101, 3, 2), (7, 4, 3), (1, 2, 1),
                                             (1000, 8, 2)])
def test_the_slots_of_several_epochs_are_cut_into_blocks_of_one_epoch_each(n, epochs, world):
    from raypipe.config import ActorPool
    from raypipe.data.pipeline import block_spans, slot_spans

    cfg = load_config(None, ["pipeline.blocks=4", "pipeline.block_rows=64"])
    pool = ActorPool(min_actors=1, max_actors=2, batch_size=8)
    m = n - n % world  # the slots each epoch holds: the rest would be dropped by an equal split
    spans, first = slot_spans(n, cfg, pool, epochs, world), block_spans(m, cfg, pool, world)
    assert slot_spans(n, cfg, pool, 1, world) == first  # what one epoch's own execution reads
    assert spans[:len(first)] == first
    assert all(a // n == (b - 1) // n for a, b in spans)  # none spans two epochs
    for e in range(1, epochs):
        inside = [(a - e * n, b - e * n) for a, b in spans if a // n == e]
        assert inside[0][0] == 0 and inside[-1][1] == m
        assert all(x == y for (_, x), (y, _) in zip(inside, inside[1:], strict=False))
        rows = [0] * world  # an equal split gives each worker the same rows of the epoch
        for a, b in inside:
            rows[rows.index(min(rows))] += b - a
        assert rows == [m // world] * world
        # later epochs in fewer, bigger blocks: the whole run's rows cut by pipeline.blocks
        big = min(64, -(-m * epochs // 4))
        assert all(b - a <= big for a, b in inside) and len(inside) <= len(first)
    # and the run ends as it starts, with small blocks: no lane left alone with a big one
    k = min(pool.max_actors, len(first))
    ends = [b - a for a, b in spans[-k:]]
    assert ends == [b - a for a, b in first[:k]][::-1]
    assert max(ends) <= pool.batch_size


@pytest.mark.ray
def test_datasets_are_made_of_those_blocks_in_order(ray_cluster):
    from raypipe.data.pipeline import _records_dataset, _slots_dataset, block_spans

    cfg = load_config(None, ["pipeline.blocks=8", "pipeline.block_rows=100"])
    pool = cfg.pipeline.train
    records = [Record(f"/x/{i}.png", i % 2, f"k{i}") for i in range(300)]
    spans = block_spans(len(records), cfg, pool)
    files = _records_dataset(records, cfg, pool)
    assert files.num_blocks() == len(spans)
    assert list(files.to_pandas()["key"]) == [r.key for r in records]
    slots = _slots_dataset(len(records), cfg, pool)
    assert slots.num_blocks() == len(spans)
    assert list(slots.to_pandas()["slot"]) == list(range(300))


@pytest.mark.ray
def test_datasets_are_built_without_a_cpu(ray_cluster):
    """The file and slot lists are built in the driver without running a task: ``from_arrow``
    ran one 1-CPU task per block to read their metadata, so with every CPU taken (a search's
    trials, a training run's workers) building them waited for a free CPU; at a run's start
    its few dozen tasks took the CPUs and made Ray Data warn that the cluster had none."""
    import threading

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raypipe.data.pipeline import _records_dataset, _slots_dataset

    cfg = load_config(None, ["pipeline.blocks=8", "pipeline.block_rows=100"])
    pool = cfg.pipeline.train
    records = [Record(f"/x/{i}.png", i % 2, f"k{i}") for i in range(300)]
    cpus = ray.cluster_resources()["CPU"]
    every_cpu = placement_group([{"CPU": cpus}])
    ray.get(every_cpu.ready(), timeout=60)
    built: list = []
    thread = threading.Thread(target=lambda: built.extend(
        [_records_dataset(records, cfg, pool), _slots_dataset(len(records), cfg, pool)]), daemon=True)
    try:
        thread.start()
        thread.join(timeout=30)
        assert len(built) == 2, "building the datasets waited for a CPU"
    finally:
        remove_placement_group(every_cpu)
        thread.join(timeout=60)
    assert [ds.count() for ds in built] == [300, 300]


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


@pytest.mark.ray
def test_a_deterministic_pipeline_gives_each_worker_the_same_rows_whichever_task_ends_first(
        ray_cluster, tmp_path):
    """Without order, Ray Data's splitter hands each block to the worker with the fewest rows
    as the blocks arrive, so which images share a worker's batches follows the tasks' finishing
    order: four identical search trials gave val AUC 0.86-0.94. ``deterministic`` (the
    default) sends blocks out in file-list order."""
    # blocks of 4 rows, handed out alternately: worker 0 gets blocks 0, 2, 4, 6 in that order,
    # although block 0 comes out of its task after block 1
    in_order = [[r for b in (0, 2, 4, 6) for r in range(4 * b, 4 * b + 4)],
                [r for b in (1, 3, 5, 7) for r in range(4 * b, 4 * b + 4)]]
    assert _rows_per_worker(True, first_block_last=True, flags=tmp_path / "a") == in_order
    # the setting is what does it: unordered, worker 0 starts with whichever block came first
    unordered = _rows_per_worker(False, first_block_last=True, flags=tmp_path / "b")
    assert unordered[0][:4] != [0, 1, 2, 3] and unordered != in_order


@pytest.mark.ray
def test_the_map_stage_emits_blocks_of_at_most_max_block_mib(ray_cluster, tmp_path):
    """Memory is bounded by the block size, not by how many files a block of the file list
    holds: one input block of 24 files comes out as blocks of about max_block_mib each."""
    from raypipe.data.pipeline import build_datasets, release

    root = make_image_folder(tmp_path / "imgs", {"cats": 12, "dogs": 12})
    row = 16 * 16 * 4  # one grayscale 16x16 float32 image (the label adds 8 bytes)

    def blocks(max_block_mib: float) -> list[tuple[int, int]]:
        cfg = load_config(None, [f"data.root={root}", "data.val_fraction=0.25",
                                 "preprocess.image_size=16", "pipeline.blocks=1",
                                 "train.num_workers=1", f"pipeline.max_block_mib={max_block_mib}"])
        train, _, ledger, clock = build_datasets(cfg, discover(cfg.data))
        out = [(m.num_rows, m.size_bytes) for bundle in train.materialize().iter_internal_ref_bundles()
               for m in bundle.metadata]
        release(ledger, clock)
        return out

    whole = blocks(16)
    assert [rows for rows, _ in whole] == [18]  # 24 files, 6 for validation: one block
    cut = blocks(4 * row / 2**20)
    assert sum(rows for rows, _ in cut) == 18 and len(cut) >= 4
    assert all(size <= 4 * row + row + 64 for _, size in cut), cut


@pytest.mark.ray
def test_each_block_of_the_map_stage_is_one_calls_output_in_one_chunk(ray_cluster, tmp_path):
    """A block built from several map calls' outputs is several Arrow chunks, which the training
    side's batcher copied into one before cutting a batch. Calls grow to fill a block instead:
    with 2-file calls and 5-image blocks, parts of up to 6 files, each its own one-chunk block."""
    import ray

    from raypipe.data.pipeline import build_datasets, call_rows, release

    root = make_image_folder(tmp_path / "imgs", {"cats": 12, "dogs": 12})
    row = 16 * 16 * 4  # one grayscale 16x16 float32 image
    cfg = load_config(None, [f"data.root={root}", "data.val_fraction=0.25", "preprocess.image_size=16",
                             "pipeline.blocks=1", f"pipeline.max_block_mib={5 * row / 2**20}",
                             "pipeline.train.batch_size=2", "pipeline.train.compute=tasks",
                             "train.num_workers=1"])
    assert call_rows(cfg, cfg.pipeline.train) == 6
    train, _, ledger, clock = build_datasets(cfg, discover(cfg.data))
    blocks = [ray.get(ref) for bundle in train.materialize().iter_internal_ref_bundles()
              for ref in bundle.block_refs]
    release(ledger, clock)
    # 18 training files in input blocks of 2, 2, 4, 4 and 6 (block_spans): 2-file calls made
    # the blocks of 4 and 6 files two and three chunks
    assert sum(b.num_rows for b in blocks) == 18 and max(b.num_rows for b in blocks) == 6
    assert {b.column("image").num_chunks for b in blocks} == {1}
    # a pool's batch_size above that is kept
    assert call_rows(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
        update={"max_block_mib": 1e-6})}), cfg.pipeline.train) == 2


def test_epoch_order_is_a_new_permutation_each_epoch_and_reproducible():
    from raypipe.data.pipeline import epoch_order

    a0, a1 = epoch_order(50, 0, 0), epoch_order(50, 0, 1)
    assert sorted(a0) == sorted(a1) == list(range(50))
    assert list(a0) != list(a1)
    assert list(epoch_order(50, 0, 1)) == list(a1)            # same in every process, on resume
    assert list(epoch_order(50, 1, 1)) != list(a1)            # train.seed moves it
