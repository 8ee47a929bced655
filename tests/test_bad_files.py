"""Bad image files: each is refused with a reason, counted once, listed in the run directory, and
the counts add up (files found = used + skipped); ``fail`` stops at the first, too many stops the run
naming the worst offenders; byte-identical train/val copies are reported as leakage."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
from badfiles import (
    MIXED_MODES,
    bad_files,
    exif_rotated_jpeg,
    image_bytes,
    png_bomb,
    write_mixed_modes,
)
from conftest import TAME, make_image_folder, run_job

from raypipe.config import load_config
from raypipe.data import pipeline
from raypipe.data.decode import DecodeError, decode_image
from raypipe.data.sources import discover

# ---------------------------------------------------------------- decoder, one case each


@pytest.mark.parametrize("name", list(bad_files()))
def test_each_bad_file_is_refused_with_its_reason(name: str) -> None:
    data, reason = bad_files()[name]
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_decompression_bomb_refused_before_decoding() -> None:
    """A 10-gigapixel header is refused from the header alone (decoding it would need 10 GB)."""
    bomb = png_bomb(100_000, 100_000)
    assert len(bomb) < 1000
    with pytest.raises(DecodeError, match=r"100000x100000 = 10000000000 pixels.*data.max_pixels"):
        decode_image(bomb, max_pixels=100_000_000)
    # the limit is configurable and inclusive: a genuine image at the limit decodes
    ok = image_bytes("L", size=(40, 25))
    assert decode_image(ok, max_pixels=1000).shape == (25, 40)
    with pytest.raises(DecodeError, match="max_pixels=999"):
        decode_image(ok, max_pixels=999)


def test_mixed_modes_and_bit_depths_decode_to_the_contract(tmp_path: Path) -> None:
    names = write_mixed_modes(tmp_path)
    for name in names:
        for gray in (False, True):
            arr = decode_image((tmp_path / name).read_bytes(), gray=gray)
            assert arr.dtype in (np.uint8, np.uint16), name
            assert arr.ndim == 2 if gray else arr.ndim in (2, 3), name
            if arr.ndim == 3:
                assert arr.shape[2] == 3, name
    deep = decode_image((tmp_path / "deep16.png").read_bytes())
    assert deep.dtype == np.uint16 and deep.max() > 255  # 16-bit depth is kept, not clipped
    assert decode_image((tmp_path / "alpha.png").read_bytes()).shape == (16, 20, 3)
    assert decode_image((tmp_path / "cmyk.jpg").read_bytes()).shape == (16, 20, 3)


def test_exif_rotation_is_applied() -> None:
    # stored 24 wide x 12 high; orientation 6 means "display rotated 90 degrees": 24 high x 12 wide
    assert decode_image(exif_rotated_jpeg((24, 12), 6)).shape == (24, 12, 3)
    assert decode_image(exif_rotated_jpeg((24, 12), 1)).shape == (12, 24, 3)


# ---------------------------------------------------------------- listing and leakage


def _hostile_folder(root: Path) -> dict:
    """Training folder with good, mixed-mode and bad files, plus a validation folder holding two
    byte-identical copies of training images. Returns the expected accounting."""
    train = make_image_folder(root / "train", {"cats": 8, "dogs": 8}, size=(20, 16))
    write_mixed_modes(train / "cats", seed=10)
    bad = bad_files()
    for i, (name, (data, _)) in enumerate(bad.items()):
        (train / ("cats" if i % 2 else "dogs") / name).write_bytes(data)
    (train / "dogs" / "drawing.svg").write_text("<svg/>")  # not an image extension: listing skip
    val = make_image_folder(root / "val", {"cats": 3, "dogs": 3}, size=(20, 16), seed=7)
    shutil.copy(train / "cats" / "000.png", val / "cats" / "copy_of_cat.png")
    shutil.copy(train / "dogs" / "001.png", val / "dogs" / "copy_of_dog.png")
    n_mixed = len(MIXED_MODES) + 1
    n_train = 16 + n_mixed + len(bad)
    return {
        "train": str(train), "val": str(val), "bad": {f"{'cats' if i % 2 else 'dogs'}/{n}": r
                                                      for i, (n, (_, r)) in enumerate(bad.items())},
        "listing_skipped": ["dogs/drawing.svg"], "found": n_train + 8 + 1,
        "used": n_train + 8 - len(bad), "duplicates": 2,
    }


def test_train_val_duplicates_are_counted_and_warned(tmp_path: Path, caplog) -> None:
    exp = _hostile_folder(tmp_path)
    cfg = load_config(None, [f"data.root={exp['train']}", f"data.val_root={exp['val']}"])
    with caplog.at_level(logging.WARNING, logger="raypipe.data.sources"):
        split = discover(cfg.data)
    assert sorted(split.duplicates) == [("cats/copy_of_cat.png", "cats/000.png"),
                                        ("dogs/copy_of_dog.png", "dogs/001.png")]
    assert split.counts()["train_val_duplicates"] == 2
    assert "2 validation image(s) have the same bytes as a training image" in caplog.text
    assert [k for k, _ in split.skipped] == exp["listing_skipped"]


def test_duplicates_with_same_size_but_different_bytes_are_not_leaks(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 6, "b": 6}, fmt="bmp")  # BMPs: every file same size
    cfg = load_config(None, [f"data.root={tmp_path / 'd'}", "data.val_fraction=0.3"])
    split = discover(cfg.data)
    assert len({r.size for r in split.train + split.val}) == 1
    assert split.duplicates == []
    # a real copy inside one class folder is found whichever side of the split it lands on
    (tmp_path / "d" / "a" / "999.bmp").write_bytes((tmp_path / "d" / "a" / "000.bmp").read_bytes())
    split = discover(cfg.data)
    keys = {r.key for r in split.val}
    crossing = ("a/000.bmp" in keys) != ("a/999.bmp" in keys)
    assert len(split.duplicates) == int(crossing)


# ---------------------------------------------------------------- policy inside the Ray Data actors


def _val_rows(cfg, split) -> tuple[int, dict]:
    data = pipeline.build_datasets(cfg, split)
    try:
        n = sum(len(b["label"]) for b in data.val.iter_batches(batch_size=64, batch_format="numpy"))
        return n, ray.get(data.ledger.items.remote())
    finally:
        pipeline.release(data.ledger, data.clock)  # as a run ends them: no idle actors left


def _val_only_split(tmp_path: Path, n_bad: int, overrides: list[str]):
    root = make_image_folder(tmp_path / "v", {"cats": 5, "dogs": 5})
    for i in range(n_bad):
        (root / "cats" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken" if i % 2 else b"")
    cfg = load_config(None, [f"data.root={root}", f"data.val_root={root}",
                             "preprocess.image_size=16", "pipeline.files_per_batch=4", *overrides])
    return cfg, discover(cfg.data)


@pytest.mark.parametrize("cache", ["false", "true"], ids=["streamed", "preprocessed-once"])
def test_skip_policy_counts_each_bad_file_once(ray_cluster, tmp_path: Path, cache) -> None:
    cfg, split = _val_only_split(tmp_path, 2, ["data.max_bad_fraction=0.5", f"pipeline.cache={cache}"])
    n, bad = _val_rows(cfg, split)
    assert n == 10
    assert sorted(bad) == ["cats/bad0.png", "cats/bad1.png"]
    assert "empty" in bad["cats/bad0.png"] and "not a readable image" in bad["cats/bad1.png"]


def test_small_validation_set_is_preprocessed_once_with_the_same_rows(ray_cluster,
                                                                       tmp_path: Path) -> None:
    from ray.data.dataset import MaterializedDataset

    cfg, split = _val_only_split(tmp_path, 0, [])

    def rows(cache: bool):
        data = pipeline.build_datasets(cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(
            update={"cache": cache})}), split)
        batches = list(data.val.iter_batches(batch_size=64, batch_format="numpy"))
        pipeline.release(data.ledger, data.clock)
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        order = np.lexsort((images.reshape(len(images), -1).sum(1), labels))
        return data.val, images[order], labels[order]

    cached, images, labels = rows(True)
    streamed, images0, labels0 = rows(False)
    assert isinstance(cached, MaterializedDataset)
    assert not isinstance(streamed, MaterializedDataset)
    assert len(labels) == 10
    np.testing.assert_array_equal(labels, labels0)
    np.testing.assert_array_equal(images, images0)


def test_too_many_bad_files_fails_naming_the_worst_offenders(ray_cluster, tmp_path: Path) -> None:
    cfg, split = _val_only_split(tmp_path, 4, ["data.max_bad_fraction=0.05"])
    with pytest.raises(Exception) as info:  # noqa: PT011 - Ray wraps the actor's exception
        _val_rows(cfg, split)
    text = str(info.value)
    assert "BadFileError" in text or "unreadable" in text
    assert "above data.max_bad_fraction=0.05" in text
    assert "cats/bad0.png" in text and "raise data.max_bad_fraction" in text


def test_fail_policy_stops_at_the_first_bad_file(ray_cluster, tmp_path: Path) -> None:
    cfg, split = _val_only_split(tmp_path, 1, ["data.on_bad_file=fail", "data.max_bad_fraction=1"])
    with pytest.raises(Exception, match=r"unreadable image 'cats/bad0.png': file is empty"):  # noqa: PT011
        _val_rows(cfg, split)


# ---------------------------------------------------------------- end to end through the job


def _job_args(root: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [f"data.root={root}", f"run.storage_path={storage}", f"run.name={name}",
            "train.epochs=1", "train.batch_size=8", "preprocess.image_size=32",
            "pipeline.files_per_batch=4", "augment.enabled=false", "run.tensorboard=false", *TAME,
            *extra]


@pytest.mark.slow
def test_job_skips_bad_files_and_the_counts_add_up(ray_cluster, tmp_path: Path) -> None:
    exp = _hostile_folder(tmp_path / "data")
    proc = run_job("train.py", *_job_args(exp["train"], tmp_path / "runs", "hostile",
                                          f"data.val_root={exp['val']}", "data.max_bad_fraction=0.3",
                                          "train.epochs=3", "pipeline.cache=false"),
                   env={"RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "hostile"
    summary = json.loads((run_dir / "summary.json").read_text())
    data = summary["data"]
    assert data["files_found"] == exp["found"]
    assert data["files_used"] == exp["used"]
    assert data["files_found"] == data["files_used"] + data["files_skipped"]
    assert data["train_val_duplicates"] == exp["duplicates"]
    skipped = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == set(exp["bad"]) | set(exp["listing_skipped"])
    for key, reason in exp["bad"].items():
        assert reason in skipped[key], (key, skipped[key])
    with open(run_dir / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"]: r["reason"] for r in rows} == skipped
    assert summary["status"] == "finished"
    # streamed from storage every epoch: each epoch trains on the readable training files (the
    # two workers' equal shares, less at most one file between them)
    readable = data["files_used"] - data["val_total"]
    samples = [h["train_samples"] * 2 for h in summary["history"]]
    assert len(samples) == 3 and all(readable - 2 <= n <= readable for n in samples), (samples, readable)


@pytest.mark.slow
def test_job_with_fail_policy_prints_one_clean_message(ray_cluster, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"cats": 8, "dogs": 8})
    (root / "dogs" / "zero.jpg").write_bytes(b"")
    proc = run_job("train.py", *_job_args(root, tmp_path / "runs", "strict", "data.on_bad_file=fail"),
                   env={"RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: BadFileError: unreadable image 'dogs/zero.jpg': file is empty"), last
    assert "data.on_bad_file=skip" in last
    summary = json.loads((tmp_path / "runs" / "strict" / "summary.json").read_text())
    assert summary["status"] == "failed" and "dogs/zero.jpg" in summary["error"]
    assert [s["file"] for s in summary["skipped"]] == ["dogs/zero.jpg"]


def test_root_cause_digs_our_message_out_of_ray_train_wrapping() -> None:
    """Ray Train reports worker failures as truncated snippets; the worker's full traceback text
    still holds the BadFileError raised in the Ray Data actor, and that line is what users see."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from raypipe.training.trainer import root_cause

    tb = (
        "Traceback (most recent call last):\n  File \"worker.py\", line 1, in train_func\n"
        "ray.exceptions.RayTaskError(UserCodeException): ray::MapWorker() (pid=1)\n"
        "  File \"pipeline.py\", line 9, in __call__\n"
        "raypipe.data.pipeline.BadFileError: unreadable image 'dogs/zero.jpg': file is empty "
        "(0 bytes). Fix or remove the file.\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
    )
    err = WorkerGroupError("[Rank 0 Error Snippet]: ... (Output truncated) ...", {
        0: UserExceptionWithTraceback(RuntimeError("wrapped"), tb),
        1: UserExceptionWithTraceback(RuntimeError("wrapped"), tb),
    })
    assert root_cause(err) == ("BadFileError: unreadable image 'dogs/zero.jpg': file is empty "
                                "(0 bytes). Fix or remove the file.")
    assert root_cause(ValueError("plain")) == "ValueError: plain"
