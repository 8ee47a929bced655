"""The preview job writes a valid PNG grid of preprocessing steps and augmented samples."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_job
from PIL import Image

from raypipe.config import Config
from raypipe.report.preview import augmented_tiles, pick_records, render_preview, step_tiles


def _config(root) -> Config:
    return Config.model_validate({"data": {"root": str(root)}, "preprocess": {"image_size": 24}})


def test_step_tiles_cover_every_preprocessing_step_in_order():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    titles = [t.title.split("\n")[0] for t in step_tiles(img, Config(), "x")]
    assert titles[1:] == ["resize 64 stretch", "gray", "threshold > 125/255", "threshold Otsu",
                          "erosion disk(3)", "dilation disk(3)", "opening disk(3)", "closing disk(3)",
                          "normalise / 255", "normalise minmax", "normalise percentile 5-95", "model input"]


def test_augmented_tiles_differ_by_epoch():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tiles = augmented_tiles(img, "k", Config(), 3)
    assert len(tiles) == 3 and all(t.image.shape == (64, 64, 3) for t in tiles)
    assert not np.allclose(tiles[0].image, tiles[1].image)


def test_render_preview_writes_a_png(image_folder, tmp_path):
    cfg = _config(image_folder)
    from raypipe.data.sources import discover

    picks = pick_records(discover(cfg.data), 2)
    assert len({r.label for r in picks}) == 2  # one image of each class
    out = render_preview(cfg, tmp_path / "sub" / "p.png", n=4, images=2)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 300
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # not a blank canvas


@pytest.mark.slow  # a job in a subprocess, or several processes
def test_preview_job_writes_a_png(image_folder, tmp_path):
    out = tmp_path / "preview.png"
    proc = run_job("preview.py", "--n", "3", "--images", "2", "--out", str(out),
                   f"data.root={image_folder}", "preprocess.image_size=16", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout
    with Image.open(out) as im:
        im.verify()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_preview_job_reports_a_bad_data_root(tmp_path):
    proc = run_job("preview.py", "--out", str(tmp_path / "p.png"), f"data.root={tmp_path / 'missing'}",
                   timeout=300)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
