"""Preprocessing kernels: scikit-image/numpy chain per image vs torchvision.transforms.v2.

Times, single-threaded and on the same decoded images, each kernel of ``raypipe.data.functional``,
the validation chain (:class:`Preprocessor`), the training chain (:class:`TrainTransform`: resize,
affine with rotation/translate/scale/shear, flip, to float, one resample), a straightforward
scikit-image chain (``transform.resize`` then ``transform.warp``, one resample each) and the
equivalent ``torchvision.transforms.v2`` chain on uint8 tensors. Images: JPEGs from ``--data``
(folder-per-class) when it exists, else synthetic 320x240 JPEGs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_DATA = "/work/shared/data/flowers-sample"
# the augmentation both chains apply: rotation, translation, zoom, shear, horizontal flip
ROTATION, TRANSLATE, ZOOM, SHEAR, HFLIP = 15.0, 0.1, (0.9, 1.1), 10.0, 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``jobs/benchmark.py preprocess``."""
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="folder of JPEGs (searched recursively); synthetic images when absent")
    parser.add_argument("--n", type=int, default=80, help="number of images")
    parser.add_argument("--size", type=int, default=224, help="output side in pixels")
    parser.add_argument("--repeats", type=int, default=5,
                        help="passes over the images per measurement (the fastest pass counts)")
    parser.add_argument("--synthetic", action="store_true", help="use synthetic images even if --data exists")


def _jpeg_bytes(data: str, n: int, synthetic: bool) -> tuple[list[bytes], str]:
    files = [] if synthetic or not Path(data).is_dir() else sorted(
        p for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")
    )
    if files:
        # spread the picks over the sorted list so that every class folder is represented
        picks = [files[int(i * len(files) / min(n, len(files)))] for i in range(min(n, len(files)))]
        return [p.read_bytes() for p in picks], f"{data} ({len(picks)} JPEGs)"
    return [_synthetic_jpeg(i) for i in range(n)], f"synthetic 320x240 JPEGs ({n})"


def _synthetic_jpeg(i: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    chans = [np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(8, 40))
             for _ in range(3)]
    arr = (np.stack(chans, -1) * 100 + 128 + rng.normal(0, 10, (240, 320, 3))).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _time(fns: dict[str, Callable[[int], object]], n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Wall and CPU milliseconds per item of each function, the fastest of ``repeats`` passes
    over items 0..n-1. Passes of the different functions are interleaved so that all of them
    see the same load on a shared machine; everything runs on one thread, so CPU time is the
    per-core cost, where wall time also counts the waits for a core."""
    best = {name: [float("inf"), float("inf")] for name in fns}
    for fn in fns.values():
        fn(0)  # warm caches and lazy imports
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n):
                fn(i)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    return {name: {"ms_per_image": cpu / n * 1e3, "wall_ms_per_image": wall / n * 1e3}
            for name, (wall, cpu) in best.items()}


def _single_thread():
    """Limit BLAS/OpenMP pools to one thread (the comparison is per core)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _naive_chain(size: int):
    """resize (skimage, anti-aliased) -> warp (skimage) -> percentile normalise, float64: the
    straightforward way, one resample per operation."""
    from skimage import transform

    from raypipe.data import functional as F

    def run(img: np.ndarray, m: np.ndarray) -> np.ndarray:
        x = transform.resize(img, (size, size), order=1, anti_aliasing=True, preserve_range=True)
        x = transform.warp(x, transform.AffineTransform(matrix=np.linalg.inv(m)), order=1,
                           preserve_range=True)
        lo, hi = np.percentile(x, [5, 95])
        return (x - lo) / max(hi - lo, F.EPS)

    return run


def _torchvision_chain(size: int, interpolation: str):
    import torch
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.NEAREST
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.RandomAffine(ROTATION, (TRANSLATE, TRANSLATE), ZOOM, SHEAR, interpolation=mode),
        v2.RandomHorizontalFlip(HFLIP),
        v2.ToDtype(torch.float32, scale=True),
    ])


def _kernel_ops(imgs: list[np.ndarray], size: int) -> dict[str, Callable[[int], object]]:
    """Each kernel of ``functional`` on its natural input (the resized image, its gray, ...)."""
    from raypipe.data import functional as F

    n = len(imgs)
    rng = np.random.default_rng(0)
    resized = [F.resize(im, size) for im in imgs]
    gray = [F.to_gray(x) for x in resized]
    binary = [F.threshold_fixed(g, 125.0) for g in gray]
    unit = [F.normalize_divide(x) for x in resized]
    mats = [F.affine_matrix((size, size), rotation=rng.uniform(-ROTATION, ROTATION),
                            scale=rng.uniform(*ZOOM), shear=rng.uniform(-SHEAR, SHEAR),
                            translate=tuple(rng.uniform(-TRANSLATE, TRANSLATE, 2) * size))
            for _ in range(n)]
    noise = rng.standard_normal((size, size, 3)).astype(np.float32) * 0.05
    ops: dict[str, Callable[[int], object]] = {
        "resize (stretch)": lambda i: F.resize(imgs[i], size),
        "resize (pad)": lambda i: F.resize(imgs[i], size, "pad"),
        "gray": lambda i: F.to_gray(resized[i]),
        "threshold fixed 125": lambda i: F.threshold_fixed(gray[i], 125.0),
        "threshold otsu": lambda i: F.threshold_otsu(gray[i]),
        **{f"{op} disk(3) binary": (lambda i, op=op: F.morph(binary[i], op, 3))
           for op in ("erosion", "dilation", "opening", "closing")},
        "dilation disk(3) gray": lambda i: F.morph(gray[i], "dilation", 3),
        "normalise divide255": lambda i: F.normalize_divide(resized[i]),
        "normalise minmax": lambda i: F.normalize_minmax(resized[i]),
        "normalise percentile": lambda i: F.normalize_percentile(resized[i]),
        "standardise": lambda i: F.standardize(unit[i], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        "warp affine (one resample)": lambda i: F.warp_affine(unit[i], mats[i]),
        "hflip": lambda i: np.ascontiguousarray(F.hflip(unit[i])),
        "brightness/contrast": lambda i: F.adjust_brightness_contrast(unit[i], 0.1, 1.1),
        "gamma": lambda i: F.adjust_gamma(unit[i], 1.2),
        "noise": lambda i: F.add_noise(unit[i], noise),
    }
    return ops


def run(args: argparse.Namespace) -> dict:
    """Measure and return ``{table, train_chain_ms, torchvision_ms, ratio, ...}``."""
    import torch

    from raypipe.config import AugmentConfig, PreprocessConfig
    from raypipe.data.decode import decode_image, value_range
    from raypipe.data.transforms import Augmenter, Preprocessor, TrainTransform

    torch.set_num_threads(1)
    size, repeats = args.size, max(1, args.repeats)
    blobs, source = _jpeg_bytes(args.data, max(1, args.n), args.synthetic)
    n = len(blobs)
    imgs = [decode_image(b, draft_size=size) for b in blobs]
    pre = Preprocessor(PreprocessConfig(image_size=size, channels=3, normalize="divide255"))
    aug = Augmenter(AugmentConfig(hflip=HFLIP, rotation=ROTATION, zoom=ZOOM, translate=TRANSLATE,
                                  shear=SHEAR, brightness=0.0, contrast=0.0), seed=0)
    train = TrainTransform(pre, aug)
    naive = _naive_chain(size)
    mats = [aug.matrix(aug.params_for(str(i), 0, size), (size, size)) for i in range(n)]
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in imgs]
    tv_bilinear = _torchvision_chain(size, "bilinear")
    tv_nearest = _torchvision_chain(size, "nearest")
    torch.manual_seed(0)

    with _single_thread():
        ops = {"decode JPEG (PIL, draft)": lambda i: decode_image(blobs[i], draft_size=size)}
        ops.update(_kernel_ops(imgs, size))
        chains = {
            "skimage straightforward chain (resize, warp, percentile; float64)":
                lambda i: naive(imgs[i], mats[i]),
            "raypipe validation chain (Preprocessor)": lambda i: pre(imgs[i], value_range(imgs[i])),
            "raypipe training chain (TrainTransform, one fused float32 warp)":
                lambda i: train(imgs[i], 255.0, str(i), 1),
            "torchvision v2 chain (bilinear affine)": lambda i: tv_bilinear(tensors[i]),
            "torchvision v2 chain (nearest affine, its default)": lambda i: tv_nearest(tensors[i]),
        }
        timed = _time({**ops, **chains}, n, repeats)
    rows = [{"op": name, **ms} for name, ms in timed.items()]
    chain_ms = {name: timed[name] for name in chains}
    names = list(chain_ms)
    ours, naive_ms, tv, tv_nearest_ms = (chain_ms[names[k]]["ms_per_image"] for k in (2, 0, 3, 4))
    result = {
        "source": source,
        "images": n,
        "size": size,
        "threads": 1,
        "table": rows,
        "train_chain_ms": ours,
        "naive_skimage_chain_ms": naive_ms,
        "torchvision_ms": tv,
        "torchvision_nearest_ms": tv_nearest_ms,
        "ratio": ours / tv,
        "ratio_vs_nearest": ours / tv_nearest_ms,
        "target_ratio": 2.0,
        "meets_target": ours / tv <= 2.0,
    }
    print(f"{source}, {size}x{size}, single thread, CPU ms per image")
    print(f"  training chain: raypipe (skimage/numpy) {ours:.2f} ms/image, torchvision v2 {tv:.2f} "
          f"ms/image (nearest {tv_nearest_ms:.2f}); ratio {ours / tv:.2f} (target <= 2), "
          f"straightforward skimage {naive_ms:.2f} ms/image")
    return result
