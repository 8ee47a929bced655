"""Caller-side preprocessing of an exported raypipe model: what the model file does not do itself.

This file is copied, unchanged, beside every exported model as ``preprocess.py``. It needs numpy
and Pillow (scikit-image only for threshold, morphology and CLAHE configs), never raypipe, so a
server runs the exact steps training ran without installing raypipe or depending on a later
version of its kernels. ``preprocess.json`` beside it holds the settings; its ``caller_steps``
and ``model_steps`` say in words what happens where.

    spec = load_spec("export_dir")
    x = np.stack([prepare(decode(open(p, "rb").read(), spec), spec) for p in paths])
    logits, scores = session.run(None, {"image": x})     # onnxruntime, or the TorchScript file

``prepare`` returns one ``(H, W, C)`` float32 array in the model's input layout (the batch is NHWC).
Run this file with image paths to print their scores with onnxruntime.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps

SPEC_FILE = "preprocess.json"
EPS = 1e-6
PERCENTILE_SAMPLES = 1 << 15


def load_spec(folder: str) -> dict:
    """The export's ``preprocess.json``."""
    with open(os.path.join(folder, SPEC_FILE), encoding="utf-8") as f:
        return json.load(f)


def plan(pre: dict, input_size: list[int] | None) -> dict:
    """Where each stage runs, from the preprocessing config ``pre`` and the model's fixed input size
    (None: the model takes ``image_size`` squares and the resize runs here).

    The model can only resize when nothing between the resize and the normalisation needs
    scikit-image (no threshold, morphology or CLAHE): then training samples the decoded image once
    and normalises with the range of the whole decoded image, which a fixed-size input carries
    exactly. Otherwise the caller resizes, and the model normalises the ``image_size`` square.
    With the resize here and a per-image range (minmax, percentile), training's range comes from
    the decoded image before the resize, which the model never sees: the caller normalises too.
    """
    pointwise = pre["threshold"] == "none" and not pre["morphology"] and pre["equalize"] == "none"
    resize_in_model = bool(pointwise and input_size)
    normalize_in_model = (resize_in_model or not pointwise
                          or pre["normalize"] in ("divide255", "none"))
    gray_input = pre["channels"] == 1 or pre["threshold"] != "none"
    size = pre["image_size"]
    return {
        "pointwise": pointwise,
        "resize_in_model": resize_in_model,
        "normalize_in_model": normalize_in_model,
        "input_size": list(input_size) if resize_in_model else [size, size],
        "input_channels": 1 if gray_input else 3,
        # 1.0 once a threshold or CLAHE has turned the values into [0, 1]
        "value_max_after_caller": 1.0 if (pre["threshold"] != "none" or pre["equalize"] != "none")
        else None,
    }


# ---------------------------------------------------------------- decode


def decode(data: bytes, spec: dict) -> np.ndarray:
    """Image file bytes -> ``(H, W)`` or ``(H, W, 3)`` array, dtype uint8, uint16 (16-bit files)
    or float32 (float TIFFs): Pillow, with JPEG drafting, EXIF orientation, alpha composited on
    black, and gray decoding as the export's ``decode`` entry says."""
    d = spec["decode"]
    gray, draft = bool(d["gray"]), d.get("draft_size")
    if not data:
        raise ValueError("image file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > d["max_pixels"]:
            raise ValueError(f"image is {w}x{h} pixels, above max_pixels={d['max_pixels']}")
        if draft and img.format == "JPEG":
            img.draft("L" if gray else "RGB", (draft, draft))
        img.load()
        img = ImageOps.exif_transpose(img)
    return _to_array(img, gray)


def _to_array(img: Image.Image, gray: bool) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(img)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            arr = arr.astype(np.uint16)
        else:
            arr = arr.astype(np.float32)
            lo_f, hi_f = float(arr.min()), float(arr.max())
            arr = (arr - lo_f) / (hi_f - lo_f) if hi_f > lo_f else np.zeros_like(arr)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    elif mode in ("L", "1"):
        arr = np.asarray(img.convert("L"))
    elif mode in ("LA", "La"):
        arr = _over_black(np.asarray(img.convert("LA")))
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        arr = _over_black(np.asarray(img.convert("RGBA")))
    else:
        arr = np.asarray(img.convert("RGB"))
    if gray and arr.ndim == 3:
        y = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        if arr.dtype.kind in "ui":
            y = np.clip(np.rint(y), 0, np.iinfo(arr.dtype).max)
        arr = y.astype(arr.dtype)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(arr)


def _over_black(arr: np.ndarray) -> np.ndarray:
    alpha = arr[..., -1:].astype(np.uint16)
    out = ((arr[..., :-1] * alpha + 127) // 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def value_max(arr: np.ndarray) -> float:
    """The format's maximum: 255 for uint8, 65535 for uint16, 1.0 for float images."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)


# ---------------------------------------------------------------- resize
#
# raypipe's one-pass resample, restricted to the resize: bilinear with pixel-centre coordinates
# (x_in = (x_out + 0.5) / scale - 0.5, clamped at the border), after a box filter by the integer
# factor when shrinking 2x or more; points outside the image take ``cval``. Its float32
# arithmetic is the training kernel's, operation for operation, so that a threshold after it
# flips exactly the pixels training flipped.


def resize_matrix(shape: tuple[int, int], size: int, mode: str) -> np.ndarray:
    """3x3 forward map (x=col, y=row) from an ``(h, w)`` image to ``size x size``: ``stretch``
    each axis, ``pad`` (fit the long side, centred) or ``crop`` (fill, centred)."""
    h, w = shape
    if mode == "stretch":
        sx, sy = size / w, size / h
    elif mode in ("pad", "crop"):
        sx = sy = size / max(h, w) if mode == "pad" else size / min(h, w)
    else:
        raise ValueError(f"unknown resize mode '{mode}', expected stretch, pad or crop")
    ox, oy = (size - w * sx) / 2.0, (size - h * sy) / 2.0
    return np.array([[sx, 0, 0.5 * sx + ox - 0.5], [0, sy, 0.5 * sy + oy - 0.5], [0, 0, 1]], np.float64)


def _sampling(matrix: np.ndarray, shape: tuple[int, int]):
    """(kx, ky, inverse map on the box-reduced grid as float32, extent of the image there)."""
    h, w = shape
    inv = np.linalg.inv(matrix)
    kx = max(1, min(int(math.hypot(inv[0, 0], inv[0, 1])), w))
    ky = max(1, min(int(math.hypot(inv[1, 0], inv[1, 1])), h))
    if kx > 1 or ky > 1:
        up = np.array([[kx, 0, (kx - 1) / 2.0], [0, ky, (ky - 1) / 2.0], [0, 0, 1]])
        matrix = matrix @ up
        extent = np.linalg.solve(up, [w - 0.5, h - 0.5, 1.0])[:2]
    else:
        extent = (w - 0.5, h - 0.5)
    return kx, ky, np.linalg.inv(matrix).astype(np.float32), (float(extent[0]), float(extent[1]))


def resize(img: np.ndarray, size: int, mode: str, cval: float = 0.0) -> np.ndarray:
    """HW / HWC (any real dtype) -> ``(size, size[, C])`` float32 in the input's value range."""
    if img.dtype == bool:
        img = img.view(np.uint8)
    kx, ky, a, (xmax, ymax) = _sampling(resize_matrix(img.shape[:2], size, mode), img.shape[:2])
    chw = img[None] if img.ndim == 2 else np.moveaxis(img, 2, 0)
    if kx > 1 or ky > 1:
        c, h, w = chw.shape
        hh, ww = h // ky, w // kx
        cols = np.zeros((c, hh * ky, ww), np.float32)
        for j in range(kx):
            cols += chw[:, : hh * ky, j : ww * kx : kx]
        chw = np.zeros((c, hh, ww), np.float32)
        for i in range(ky):
            chw += cols[:, i::ky]
        chw *= np.float32(1.0 / (kx * ky))
    h, w = chw.shape[1:]
    rows = np.arange(size, dtype=np.float32)[:, None]
    cols_ = np.arange(size, dtype=np.float32)[None, :]
    x = (a[0, 0] * cols_ + a[0, 2]) + a[0, 1] * rows
    y = (a[1, 0] * cols_ + a[1, 2]) + a[1, 1] * rows
    inside = ((x >= -0.5) & (x <= xmax) & (y >= -0.5) & (y <= ymax)).ravel().astype(np.float32)
    fx, x0 = _split(x, w)
    fy, y0 = _split(y, h)
    fy *= inside
    gy, gx = inside - fy, np.float32(1.0) - fx
    i00 = y0 * w + x0
    dx, dy = (1 if w > 1 else 0), (w if h > 1 else 0)
    taps = (i00, i00 + dx, i00 + dy, i00 + (dx + dy))
    weights = (gx * gy, fx * gy, gx * fy, fx * fy)
    planes = np.ascontiguousarray(chw).reshape(chw.shape[0], -1)
    out = np.empty((planes.shape[0], size * size), np.float32)
    tmp = np.empty(size * size, np.float32)
    for flat, o in zip(planes, out, strict=True):
        np.multiply(flat.take(taps[0]), weights[0], out=o)
        for idx, wt in zip(taps[1:], weights[1:], strict=True):
            o += np.multiply(flat.take(idx), wt, out=tmp)
    if cval != 0.0:
        out += np.float32(cval) * (np.float32(1.0) - inside)
    out = out.reshape(-1, size, size)
    return out[0] if img.ndim == 2 else out.transpose(1, 2, 0)


def _split(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.clip(x, 0, n - 1).ravel()
    x0 = np.minimum(np.floor(x), max(n - 2, 0), dtype=np.float32)
    x -= x0
    return x, x0.astype(np.intp)


def resize_weights(shape: tuple[int, int], size: int, mode: str) -> tuple[np.ndarray, ...]:
    """The same resize from a fixed ``(h, w)`` as the linear map it is, for the exported model:
    ``(wy (size, h), wx (size, w), iy (size,), ix (size,))`` float32 with ``out = wy @ img @ wx.T``
    and the masks of output rows/columns inside the image (outside ones are 0 in the matrices).
    Same sample coordinates as :func:`resize`; only the float32 summation order differs."""
    h, w = shape
    kx, ky, a, (xmax, ymax) = _sampling(resize_matrix(shape, size, mode), shape)
    grid = np.arange(size, dtype=np.float32)
    wx, ix = _axis(a[0, 0] * grid + a[0, 2], w, kx, xmax)
    wy, iy = _axis(a[1, 1] * grid + a[1, 2], h, ky, ymax)
    return wy, wx, iy, ix


def _axis(coord: np.ndarray, n: int, k: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """(len(coord), n) weights of sample points ``coord`` (in box-reduced pixels of ``k``
    input pixels each) and their inside mask."""
    inside = ((coord >= -0.5) & (coord <= extent)).astype(np.float32)
    m = n // k  # the reduced axis: the last partial block is sampled from its neighbour
    f, x0 = _split(coord, m)
    step = 1 if m > 1 else 0
    reduced = np.zeros((coord.size, m), np.float32)
    rows = np.arange(coord.size)
    np.add.at(reduced, (rows, x0), (np.float32(1.0) - f) * inside)
    np.add.at(reduced, (rows, x0 + step), f * inside)
    out = np.zeros((coord.size, n), np.float32)
    for t in range(k):  # box filter: reduced pixel j is the mean of input pixels j*k .. j*k+k-1
        out[:, t : m * k : k] = reduced / np.float32(k)
    return out, inside


# ---------------------------------------------------------------- intensity and binary steps


def to_gray(img: np.ndarray) -> np.ndarray:
    """HW / HWC -> HW float32 luma (ITU-R 601)."""
    if img.ndim == 2:
        return img.astype(np.float32, copy=False)
    if img.shape[2] == 1:
        return img[..., 0].astype(np.float32, copy=False)
    return img[..., :3].astype(np.float32, copy=False) @ np.array([0.299, 0.587, 0.114], np.float32)


def percentile_range(img: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The ``low``/``high`` percentiles (linear), read on a regular pixel grid of about
    ``PERCENTILE_SAMPLES`` values for large images."""
    if img.size > PERCENTILE_SAMPLES:
        step = math.ceil(math.sqrt(img.size / PERCENTILE_SAMPLES))
        img = img[::step, ::step]
    flat = np.sort(img.ravel())
    out = []
    for q in (low, high):
        p = q / 100.0 * (flat.size - 1)
        i = int(math.floor(p))
        a, b = float(flat[i]), float(flat[min(i + 1, flat.size - 1)])
        out.append(a + (b - a) * (p - i))
    return out[0], out[1]


def intensity_range(img: np.ndarray, pre: dict, vmax: float) -> tuple[float, float]:
    """(lo, hi) that the configured normalisation maps to (0, 1)."""
    mode = pre["normalize"]
    if mode == "divide255":
        return 0.0, vmax
    if mode == "minmax":
        return float(img.min()), float(img.max())
    if mode == "percentile":
        lo, hi = percentile_range(img, *pre["percentiles"])
        if hi - lo <= EPS * max(1.0, abs(hi)):
            return float(img.min()), float(img.max())
        return lo, hi
    return 0.0, 1.0


def _scale(span: float, hi: float) -> np.float32:
    return np.float32(1.0 / span) if span > EPS * max(1.0, abs(hi)) else np.float32(0.0)


def _binary_steps(x: np.ndarray, pre: dict, vmax: float) -> tuple[np.ndarray, float]:
    """gray -> threshold -> morphology -> CLAHE on the resized image (scikit-image)."""
    from skimage import exposure, filters, morphology

    if (pre["threshold"] != "none" or pre["channels"] == 1) and x.ndim == 3:
        x = to_gray(x)
    if pre["threshold"] == "fixed":
        x = x > (pre["threshold_value"] / 255.0) * vmax
    elif pre["threshold"] == "otsu":
        lo, hi = float(x.min()), float(x.max())
        x = np.zeros(x.shape, bool) if hi - lo <= EPS * max(1.0, abs(hi)) else x > filters.threshold_otsu(x)
    disk = morphology.disk(pre["disk_radius"])
    for op in pre["morphology"]:
        fn = getattr(morphology, op)
        if x.ndim == 2:
            x = fn(x, footprint=disk)
        else:
            x = np.stack([fn(x[..., i], footprint=disk) for i in range(x.shape[2])], axis=2)
        if x.dtype != bool:
            x = x.astype(np.float32, copy=False)
    if x.dtype == bool:
        x, vmax = x.astype(np.float32), 1.0
    if pre["equalize"] == "adapthist":
        x = np.subtract(x, np.float32(0.0), dtype=np.float32) * _scale(vmax, vmax)
        x = exposure.equalize_adapthist(np.clip(x, 0.0, 1.0)).astype(np.float32, copy=False)
        vmax = 1.0
    return x, vmax


# ---------------------------------------------------------------- the whole caller side


def prepare(img: np.ndarray, spec: dict) -> np.ndarray:
    """A decoded image -> the model's input for it: ``input.shape[1:]`` float32 (HWC)."""
    pre, where = spec["preprocess"], spec["plan"]
    vmax = value_max(img)
    if where["pointwise"] and pre["channels"] == 1 and img.ndim == 3:
        img = to_gray(img)  # (the decode entry's gray decoding normally did this already)
    if where["resize_in_model"]:
        want = tuple(where["input_size"])
        if img.shape[:2] != want:
            raise ValueError(
                f"image is {img.shape[1]}x{img.shape[0]} (width x height) after decoding, but this "
                f"model was exported for {want[1]}x{want[0]} inputs (the resize is inside the "
                "model). Re-export with --input-size none to accept any size.")
        x = img.astype(np.float32)
    elif where["pointwise"]:
        if where["normalize_in_model"]:
            x = resize(img, pre["image_size"], pre["resize_mode"])
        else:  # normalised with the range of the image before the resize; outside it: 0
            lo, hi = intensity_range(img, pre, vmax)
            x = resize(img, pre["image_size"], pre["resize_mode"], cval=lo)
            x -= np.float32(lo)
            x *= _scale(hi - lo, hi)
            vmax = 1.0
    else:
        x = resize(img, pre["image_size"], pre["resize_mode"])
        x, vmax = _binary_steps(x, pre, vmax)
    # the model divides by one fixed maximum: bring other bit depths to it
    want_max = spec["input"]["value_max"]
    if pre["normalize"] == "divide255" and where["normalize_in_model"] and vmax != want_max:
        x = x * np.float32(want_max / vmax)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[2] != where["input_channels"]:
        x = np.repeat(x, where["input_channels"], axis=2)  # a gray source for a colour model
    return np.ascontiguousarray(x, dtype=np.float32)


def main(argv: list[str]) -> int:
    """``python preprocess.py IMAGE...``: print each image's scores (needs onnxruntime)."""
    import onnxruntime as ort

    folder = os.path.dirname(os.path.abspath(__file__))
    spec = load_spec(folder)
    session = ort.InferenceSession(os.path.join(folder, spec["model_file"]),
                                   providers=["CPUExecutionProvider"])
    names, failed = spec["class_names"], 0
    for path in argv:
        try:
            with open(path, "rb") as f:
                x = prepare(decode(f.read(), spec), spec)[None]
        except (OSError, ValueError) as exc:  # this file is unusable; the others still count
            print(f"{path}: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        _, scores = session.run(None, {spec["input"]["name"]: x})
        print(path, " ".join(f"{n}={s:.4f}" for n, s in zip(names, scores[0], strict=True)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
