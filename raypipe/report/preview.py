"""Preview grid: what preprocessing and augmentation do to a few real images of the dataset.

Top block, one row per image: the original, then every preprocessing step of the toolbox in
order (resize, gray, both thresholds, each morphology op on the thresholded image, all three
normalisations, the model's input); steps the config uses are marked ``[in config]``. Bottom block:
``n`` augmented versions of each image (the training draw of epochs 0..n-1), shown in [0, 1]
before dataset standardisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypipe.config import Config
from raypipe.data import functional as F
from raypipe.data.decode import decode_image, value_range
from raypipe.data.sources import DatasetSplit, Record, discover
from raypipe.data.transforms import Augmenter, AugmentParams, Preprocessor

MORPH_OPS = ("erosion", "dilation", "opening", "closing")
AUG_COLUMNS = 8


@dataclass
class Tile:
    """One panel: an image, its title, and the value that shows as white."""

    image: np.ndarray
    title: str
    vmax: float = 1.0


def pick_records(split: DatasetSplit, n: int) -> list[Record]:
    """``n`` training records taking the classes in turn (first files of each class, sorted)."""
    by_class: dict[int, list[Record]] = {}
    for r in sorted(split.train or split.val, key=lambda r: r.key):
        by_class.setdefault(r.label, []).append(r)
    picks: list[Record] = []
    depth = 0
    while len(picks) < n and any(depth < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(picks) < n:
                picks.append(by_class[label][depth])
        depth += 1
    return picks


def step_tiles(img: np.ndarray, cfg: Config, name: str) -> list[Tile]:
    """The original and every preprocessing step of the toolbox on one decoded image."""
    c = cfg.preprocess
    vmax = value_range(img)
    used = "\n[in config]"
    h, w = img.shape[:2]
    tiles = [Tile(img, f"{name}\n{w}x{h} {img.dtype}", vmax)]
    resized = F.resize(img, c.image_size, c.resize_mode)
    tiles.append(Tile(resized, f"resize {c.image_size} {c.resize_mode}{used}", vmax))
    gray = F.to_gray(resized)
    tiles.append(Tile(gray, "gray" + (used if c.channels == 1 or c.threshold != "none" else ""), vmax))
    fixed = F.threshold_fixed(gray, c.threshold_value, vmax)
    otsu = F.threshold_otsu(gray)
    fixed_title = f"threshold > {c.threshold_value:g}/255"
    tiles.append(Tile(fixed, fixed_title + (used if c.threshold == "fixed" else "")))
    tiles.append(Tile(otsu, "threshold Otsu" + (used if c.threshold == "otsu" else "")))
    binary = otsu if c.threshold == "otsu" else fixed
    for op in MORPH_OPS:
        mark = used if op in c.morphology else ""
        tiles.append(Tile(F.morph(binary, op, c.disk_radius), f"{op} disk({c.disk_radius}){mark}"))
    src = gray if c.channels == 1 else resized
    lo, hi = c.percentiles
    for method, out in (("divide255", F.normalize_divide(src, vmax)),
                        ("minmax", F.normalize_minmax(src)),
                        ("percentile", F.normalize_percentile(src, lo, hi))):
        label = f"/ {vmax:g}" if method == "divide255" else method
        if method == "percentile":
            label = f"percentile {lo:g}-{hi:g}"
        mark = used if c.normalize == method else ""
        tiles.append(Tile(out, f"normalise {label}{mark}\n[{out.min():.2f}, {out.max():.2f}]"))
    model_in = Preprocessor(c).prepare(img, vmax)
    tiles.append(Tile(F.to_channels(model_in, c.channels), "model input\n(before standardise)"))
    return tiles


def _short_name(class_name: str, key: str, limit: int = 16) -> str:
    base = key.rsplit("/", 1)[-1]
    base = base if len(base) <= limit else base[: limit - 3] + "..."
    return f"{class_name}: {base}"


def _describe(p: AugmentParams) -> str:
    bits = [f"rot {round(p.rotation):+d}°", f"zoom {p.scale:.2f}"]
    if round(p.shear):
        bits.append(f"shear {round(p.shear):+d}°")
    if p.hflip or p.vflip:
        bits.append("flip " + ("h" if p.hflip else "") + ("v" if p.vflip else ""))
    return " ".join(bits)


def augmented_tiles(img: np.ndarray, key: str, cfg: Config, n: int) -> list[Tile]:
    """``n`` training draws of one image (epochs 0..n-1), in [0, 1] before standardisation."""
    pre = Preprocessor(cfg.preprocess)
    aug = Augmenter(cfg.augment, cfg.train.seed)
    size = cfg.preprocess.image_size
    vmax = value_range(img)
    tiles = []
    for epoch in range(n):
        p = aug.params_for(key, epoch, size)
        x = pre.prepare(img, vmax, warp=aug.matrix(p, (size, size)))
        x = F.to_channels(aug.photometric(x, p), cfg.preprocess.channels)
        tiles.append(Tile(x, f"epoch {epoch}: {_describe(p)}"))
    return tiles


def _show(ax, tile: Tile) -> None:
    img = tile.image
    if img.dtype == bool:
        img = img.astype(np.float32)
    img = img.astype(np.float32) / np.float32(tile.vmax)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3:
        ax.imshow(np.clip(img[..., :3], 0.0, 1.0), interpolation="nearest")
    else:
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(tile.title, fontsize=6.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(fig, rows: list[list[Tile]], columns: int, title: str) -> None:
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for r, row in enumerate(rows):
        for col in range(columns):
            ax = axes[r, col]
            if col < len(row):
                _show(ax, row[col])
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")


def render_preview(cfg: Config, out: str | Path, n: int = 16, images: int = 3) -> Path:
    """Write the preview PNG for ``cfg``'s dataset to ``out`` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = discover(cfg.data)
    records = pick_records(split, images)
    decoded = []
    for r in records:
        with split.filesystem.open_input_file(r.path) as f:
            decoded.append(decode_image(f.read(), max_pixels=cfg.data.max_pixels,
                                        window=cfg.preprocess.window))
    step_rows = [step_tiles(img, cfg, _short_name(split.class_names[r.label], r.key))
                 for img, r in zip(decoded, records, strict=True)]
    aug_rows: list[list[Tile]] = []
    for img, r in zip(decoded, records, strict=True):
        tiles = augmented_tiles(img, r.key, cfg, n) if cfg.augment.enabled else []
        aug_rows += [tiles[i : i + AUG_COLUMNS] for i in range(0, len(tiles), AUG_COLUMNS)]

    step_cols = max(len(r) for r in step_rows)
    tile_in = 1.45
    height = tile_in * (len(step_rows) + len(aug_rows)) + 1.2
    fig = plt.figure(figsize=(tile_in * step_cols, height), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[len(step_rows) + 0.4, max(len(aug_rows), 1) + 0.4])
    c = cfg.preprocess
    _grid(top, step_rows, step_cols,
          f"Preprocessing steps, in order ({split.source}; image_size={c.image_size}, "
          f"channels={c.channels}, normalize={c.normalize})")
    if aug_rows:
        a = cfg.augment
        _grid(bottom, aug_rows, AUG_COLUMNS,
              f"{n} augmented versions per image (seed {cfg.train.seed}, epochs 0..{n - 1}): rotation "
              f"±{a.rotation:g}°, zoom {a.zoom[0]:g}-{a.zoom[1]:g}, translate ±{a.translate:g}, shear "
              f"±{a.shear:g}°, crop {a.crop_scale:g}, hflip {a.hflip:g}, vflip {a.vflip:g}, brightness "
              f"±{a.brightness:g}, contrast ±{a.contrast:g}, gamma {a.gamma:g}, noise {a.noise_std:g}")
    else:
        bottom.suptitle("augmentation disabled (augment.enabled=false)", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

