"""Pure image kernels on numpy arrays: no Ray, no torch.

Conventions: ``HW`` is a single-channel image, ``HWC`` a multi-channel one, ``CHW`` the layout the
model takes. Kernels return ``float32`` unless they say otherwise and never produce NaN or inf from
finite input (constant images included). Values stay in the image's own range (0..255 for 8-bit,
0..65535 for 16-bit) until a normalisation maps them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from skimage import exposure, filters, morphology, transform

EPS = 1e-6


# ---------------------------------------------------------------- geometry


def resize(img: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """HW[C] any dtype -> ``(size, size[, C])`` float32, values in the input's range.

    ``stretch`` ignores aspect ratio (the course's "make every image the same size"); ``pad``
    fits the long side and pads the short one with zeros; ``crop`` fills the square and crops
    the centre. Anti-aliasing is applied when shrinking.
    """
    h, w = img.shape[:2]
    if mode == "stretch":
        out_hw = (size, size)
    else:
        scale = size / max(h, w) if mode == "pad" else size / min(h, w)
        out_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = img.astype(np.float32, copy=False)
    if out_hw != (h, w):
        shrinking = out_hw[0] < h or out_hw[1] < w
        img = transform.resize(
            img,
            out_hw + img.shape[2:],
            order=1,
            mode="edge",
            anti_aliasing=shrinking,
            preserve_range=True,
        ).astype(np.float32, copy=False)
    if mode == "pad":
        return _pad_to(img, size)
    if mode == "crop":
        return _center_crop(img, size)
    return img


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size) + img.shape[2:], np.float32)
    out[top : top + h, left : left + w] = img
    return out


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right. Works on HW, HWC (axis 1) -- for CHW use :func:`hflip_chw`."""
    return img[:, ::-1]


def vflip(img: np.ndarray) -> np.ndarray:
    """Mirror top-bottom. Works on HW and HWC."""
    return img[::-1]


def affine_matrix(
    shape: tuple[int, int],
    rotation: float = 0.0,
    scale: float = 1.0,
    shear: float = 0.0,
    translate: tuple[float, float] = (0.0, 0.0),
    hflip: bool = False,
    vflip: bool = False,
) -> np.ndarray:
    """3x3 forward map (output (x, y) <- input) about the image centre, in (x=col, y=row) order.

    ``rotation`` and ``shear`` in degrees (positive rotation = anti-clockwise on screen);
    ``scale`` > 1 zooms in; ``translate`` in pixels (dx, dy). The course's affine transform:
    translate the centre to the origin, apply the linear part, translate back (plus the shift).
    """
    h, w = shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, cx + translate[0]], [0, 1, cy + translate[1]], [0, 0, 1]], np.float64)
    t = math.radians(rotation)
    # y points down in image coordinates, so anti-clockwise on screen is a negative angle here
    rot = np.array(
        [[math.cos(t), math.sin(t), 0], [-math.sin(t), math.cos(t), 0], [0, 0, 1]], np.float64
    )
    sh = np.array([[1, math.tan(math.radians(shear)), 0], [0, 1, 0], [0, 0, 1]], np.float64)
    sc = np.diag([scale * (-1 if hflip else 1), scale * (-1 if vflip else 1), 1.0])
    return back @ rot @ sh @ sc @ to_origin


def warp_affine(img: np.ndarray, matrix: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Apply a forward 3x3 ``matrix`` (from :func:`affine_matrix`) to HW / HWC float32 with one
    bilinear resample per channel. Output: same shape, float32."""
    img = img.astype(np.float32, copy=False)
    inv = np.linalg.inv(matrix)
    out = transform.warp(
        img,
        transform.AffineTransform(matrix=inv),
        order=1,
        mode="constant",
        cval=cval,
        preserve_range=True,
    )
    return out.astype(np.float32, copy=False)


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Reference single-op rotation about the centre (skimage), float32 out."""
    return transform.rotate(
        img.astype(np.float32, copy=False), degrees, order=1, mode="constant", preserve_range=True
    ).astype(np.float32, copy=False)


# ---------------------------------------------------------------- channels


def to_gray(img: np.ndarray) -> np.ndarray:
    """HW or HWC (RGB/RGBA) -> HW float32 luma, same value range (ITU-R 601 weights)."""
    if img.ndim == 2:
        return img.astype(np.float32, copy=False)
    if img.shape[2] == 1:
        return img[..., 0].astype(np.float32, copy=False)
    rgb = img[..., :3].astype(np.float32, copy=False)
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def to_channels(img: np.ndarray, n: int) -> np.ndarray:
    """HW or HWC -> HWC with ``n`` channels (gray is replicated; RGB -> 1 channel uses luma)."""
    if n == 1:
        return to_gray(img)[..., None]
    if img.ndim == 2:
        img = img[..., None]
    c = img.shape[2]
    if c == n:
        return img.astype(np.float32, copy=False)
    if c == 1:
        return np.repeat(img.astype(np.float32, copy=False), n, axis=2)
    if c >= n:
        return img[..., :n].astype(np.float32, copy=False)
    raise ValueError(f"cannot turn a {c}-channel image into {n} channels")


# ---------------------------------------------------------------- threshold and morphology


def threshold_fixed(img: np.ndarray, value: float, vmax: float = 255.0) -> np.ndarray:
    """HW -> HW bool: ``img > value`` with ``value`` given on a 0-255 scale and rescaled to the
    image's range ``vmax`` (so 125 means the same mid-grey on 8- and 16-bit images)."""
    return img > (value / 255.0) * vmax


def threshold_otsu(img: np.ndarray) -> np.ndarray:
    """HW -> HW bool with Otsu's threshold; a constant image gives all False."""
    if float(img.max()) == float(img.min()):
        return np.zeros(img.shape, bool)
    return img > filters.threshold_otsu(img)


@functools.lru_cache(maxsize=32)
def disk(radius: int) -> np.ndarray:
    """The course's structuring element: ``skimage.morphology.disk(radius)``."""
    return morphology.disk(radius)


_MORPH = {
    "erosion": morphology.erosion,
    "dilation": morphology.dilation,
    "opening": morphology.opening,
    "closing": morphology.closing,
}


def morph(img: np.ndarray, op: str, radius: int = 3) -> np.ndarray:
    """Erosion / dilation / opening / closing with ``disk(radius)`` on a binary (bool) or
    grayscale HW image. Binary in -> bool out; grayscale in -> float32 out."""
    try:
        fn = _MORPH[op]
    except KeyError:
        raise ValueError(f"unknown morphology '{op}', expected one of {list(_MORPH)}") from None
    out = fn(img, footprint=disk(radius))
    return out if img.dtype == bool else out.astype(np.float32, copy=False)


# ---------------------------------------------------------------- intensity


def normalize_divide(img: np.ndarray, vmax: float = 255.0) -> np.ndarray:
    """The course's ``image / 255``, bit-depth aware: divide by the format's maximum ``vmax``
    (255 for 8-bit, 65535 for 16-bit films). Output float32 in [0, 1]."""
    return img.astype(np.float32, copy=False) * np.float32(1.0 / vmax)


def normalize_minmax(img: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)`` per image -> float32 in [0, 1]; constant image -> zeros."""
    img = img.astype(np.float32, copy=False)
    lo, hi = float(img.min()), float(img.max())
    if hi - lo < EPS:
        return np.zeros_like(img)
    return (img - np.float32(lo)) * np.float32(1.0 / (hi - lo))


def normalize_percentile(img: np.ndarray, low: float = 5.0, high: float = 95.0) -> np.ndarray:
    """``(x - p_low) / (p_high - p_low)`` per image (robust to outliers; values may fall a
    little outside [0, 1], as the course notes). Constant image -> zeros."""
    img = img.astype(np.float32, copy=False)
    lo, hi = np.percentile(img, [low, high])
    if hi - lo < EPS:
        return normalize_minmax(img)
    return (img - np.float32(lo)) * np.float32(1.0 / (hi - lo))


def standardize(img: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """HWC float32: ``(x - mean) / std`` per channel (dataset statistics)."""
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    return (img - m) / s


def equalize_adapthist(img: np.ndarray) -> np.ndarray:
    """CLAHE (``skimage.exposure.equalize_adapthist``) on a [0, 1] HW/HWC float image."""
    return exposure.equalize_adapthist(np.clip(img, 0.0, 1.0)).astype(np.float32, copy=False)


def adjust_brightness_contrast(
    img: np.ndarray, brightness: float = 0.0, contrast: float = 1.0
) -> np.ndarray:
    """``(x - mean) * contrast + mean + brightness`` (illumination change), float32."""
    mean = np.float32(img.mean())
    return (img - mean) * np.float32(contrast) + mean + np.float32(brightness)


def adjust_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """``x ** gamma`` on the non-negative part (values below 0 are kept as they are)."""
    pos = np.maximum(img, 0.0)
    return np.where(img > 0, pos ** np.float32(gamma), img).astype(np.float32, copy=False)


def add_noise(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Add a pre-drawn noise array (randomness stays outside the kernel)."""
    return img + noise.astype(np.float32, copy=False)


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = img[..., None]
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
