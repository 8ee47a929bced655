"""Pure image kernels on numpy arrays: no Ray, no torch.

Conventions: ``HW`` is a single-channel image, ``HWC`` a multi-channel one, ``CHW`` the layout the
model takes. Kernels return ``float32`` unless they say otherwise and never produce NaN or inf from
finite input (constant images included). Values stay in the image's own range (0..255 for 8-bit,
0..65535 for 16-bit) until a normalisation maps them.
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np

EPS = 1e-6


def _skimage(name: str):
    """A scikit-image submodule, imported on first use: the fused resize/augment path needs none,
    and importing them (with SciPy) takes about half a second in every fresh data actor."""
    return importlib.import_module(f"skimage.{name}")


# ---------------------------------------------------------------- geometry
#
# Every geometric change (resize, pad, crop, rotation, zoom, shear, translation, flips) is a 3x3
# forward matrix in (x=col, y=row) pixel-centre coordinates; :func:`warp_affine` resamples once
# for any product of them. Sampling model: input pixel (i, j) covers [i-0.5, i+0.5] x [j-0.5, j+0.5];
# output points inside that area interpolate bilinearly (clamped at the border), points outside it
# take ``cval``.


def resize_matrix(shape: tuple[int, int], size: int, mode: str = "stretch") -> np.ndarray:
    """3x3 forward map taking an ``shape=(h, w)`` image to a ``size x size`` one.

    ``stretch`` scales each axis to ``size`` (aspect ratio not kept: the course's "make every
    image the same size"); ``pad`` fits the long side and leaves the short one padded (letterbox);
    ``crop`` fills the square and cuts the centre. Pixel-centre convention of
    ``skimage.transform.resize``: ``x_out = (x_in + 0.5) * s - 0.5``.
    """
    h, w = shape
    if mode == "stretch":
        sx, sy = size / w, size / h
    elif mode in ("pad", "crop"):
        s = size / max(h, w) if mode == "pad" else size / min(h, w)
        sx = sy = s
    else:
        raise ValueError(f"unknown resize mode '{mode}', expected stretch, pad or crop")
    # centre the scaled image: offset = (size - scaled extent) / 2, then the half-pixel shift
    ox, oy = (size - w * sx) / 2.0, (size - h * sy) / 2.0
    return np.array([[sx, 0, 0.5 * sx + ox - 0.5], [0, sy, 0.5 * sy + oy - 0.5], [0, 0, 1]], np.float64)


def resize(img: np.ndarray, size: int, mode: str = "stretch") -> np.ndarray:
    """HW[C] any dtype -> ``(size, size[, C])`` float32, values in the input's range.

    Bilinear, with a box pre-filter when shrinking by 2x or more (anti-aliasing); ``pad`` fills
    with zeros. See :func:`resize_matrix` for the modes.
    """
    return warp_affine(img, resize_matrix(img.shape[:2], size, mode), (size, size))


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right. Works on HW and HWC (axis 1)."""
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

    ``rotation`` and ``shear`` in degrees (positive rotation = anti-clockwise on screen, as
    ``skimage.transform.rotate``); ``scale`` > 1 zooms in; ``translate`` in pixels (dx, dy);
    flips mirror about the centre before everything else. The course's affine transform:
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
    sc = np.diag([scale, scale, 1.0])
    flip = np.diag([-1.0 if hflip else 1.0, -1.0 if vflip else 1.0, 1.0])
    return back @ rot @ sh @ sc @ flip @ to_origin


def warp_affine(
    img: np.ndarray,
    matrix: np.ndarray,
    out_shape: tuple[int, int] | None = None,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample HW / HWC (any real dtype) through the forward 3x3 ``matrix`` in one bilinear pass.

    Output: ``out_shape + (C,)`` float32 (``out_shape`` defaults to the input's), values in the
    input's range; points that fall outside the input take ``cval``. When the map shrinks the
    image by 2x or more along an axis, the input is first box-filtered by that integer factor so
    that the result does not alias (the exact remainder is left to the bilinear step). HWC output
    is a channel-last view of channel-first memory (what the model wants next).
    """
    if img.dtype == bool:
        img = img.view(np.uint8)
    out_shape = tuple(out_shape or img.shape[:2])
    matrix = np.asarray(matrix, np.float64)
    chw = img[None] if img.ndim == 2 else np.moveaxis(img, 2, 0)  # a view, no copy yet
    h, w = img.shape[:2]
    kx, ky = _shrink_factors(matrix, (h, w))
    reduced = kx > 1 or ky > 1
    if reduced:
        chw = _box_reduce(chw, ky, kx)
        # reduced pixel i covers original pixels [i*k, (i+1)*k): its centre is i*k + (k-1)/2
        up = np.array([[kx, 0, (kx - 1) / 2.0], [0, ky, (ky - 1) / 2.0], [0, 0, 1]])
        matrix = matrix @ up
        # the input's own edge (w - 0.5) in reduced coordinates: the last partial block of
        # pixels still counts as inside, sampled from the nearest full block
        extent = np.linalg.solve(up, [w - 0.5, h - 0.5, 1.0])[:2]
    else:
        extent = (w - 0.5, h - 0.5)
    taps, weights, inside = _bilinear_taps(chw.shape[1:], np.linalg.inv(matrix), out_shape, extent)
    if not reduced and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] in (3, 4):
        out = _gather_packed(img, taps, weights)
    else:
        out = _gather_planes(np.ascontiguousarray(chw).reshape(chw.shape[0], -1), taps, weights)
    if cval != 0.0 and inside is not None:
        out += np.float32(cval) * (np.float32(1.0) - inside)
    out = out.reshape((out.shape[0],) + out_shape)
    return out[0] if img.ndim == 2 else out.transpose(1, 2, 0)


def _gather_planes(planes: np.ndarray, taps, weights) -> np.ndarray:
    """(C, H*W) contiguous planes -> (C, N) float32 bilinear samples. np.take on a flat plane is
    the cheapest gather numpy has."""
    out = np.empty((planes.shape[0], taps[0].size), np.float32)
    tmp = np.empty(taps[0].size, np.float32)
    for flat, o in zip(planes, out, strict=True):
        np.multiply(flat.take(taps[0]), weights[0], out=o)
        for idx, wt in zip(taps[1:], weights[1:], strict=True):
            o += np.multiply(flat.take(idx), wt, out=tmp)
    return out


def _gather_packed(img: np.ndarray, taps, weights) -> np.ndarray:
    """HWC uint8 with 3 or 4 channels -> (C, N) float32: one 4-byte gather fetches every channel
    of a pixel at once (a third of the gathers of :func:`_gather_planes`)."""
    c = img.shape[2]
    words = _packed_rgb(img)
    out = np.empty((c, taps[0].size), np.float32)
    tmp = np.empty_like(out)
    np.multiply(_unpack(words.take(taps[0]), c), weights[0], out=out)
    for idx, wt in zip(taps[1:], weights[1:], strict=True):
        out += np.multiply(_unpack(words.take(idx), c), wt, out=tmp)
    return out


def _packed_rgb(img: np.ndarray) -> np.ndarray:
    """HWC uint8 (3 or 4 channels) -> flat uint32 view whose element i holds pixel i's channels
    in its first bytes (overlapping 4-byte windows with a stride of C bytes, no copy but one
    padding byte)."""
    h, w, c = img.shape
    buf = np.empty(h * w * c + 1, np.uint8)
    buf[:-1] = img.ravel()
    return np.ndarray((h * w,), np.uint32, buf, 0, (c,))


def _unpack(words: np.ndarray, c: int) -> np.ndarray:
    """uint32 pixels from :func:`_packed_rgb` -> (C, N) uint8 view (channel-first, strided)."""
    return words.view(np.uint8).reshape(-1, 4)[:, :c].T


def _shrink_factors(matrix: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    """Integer box-filter factors (kx, ky) for a map that shrinks by 2x or more along an input
    axis; 1 where it does not."""
    inv = np.linalg.inv(matrix)
    # input pixels stepped per output pixel along each input axis
    kx = int(math.hypot(inv[0, 0], inv[0, 1]))
    ky = int(math.hypot(inv[1, 0], inv[1, 1]))
    h, w = shape
    return max(1, min(kx, w)), max(1, min(ky, h))


def _box_reduce(chw: np.ndarray, ky: int, kx: int) -> np.ndarray:
    """(C, H, W) any dtype -> (C, H//ky, W//kx) contiguous float32 block means. Strided slices
    added one by one: several times faster than ``reshape(...).mean(axes)``."""
    c, h, w = chw.shape
    hh, ww = h // ky, w // kx
    cols = np.zeros((c, hh * ky, ww), np.float32)  # separable: kx + ky adds, not kx * ky
    for j in range(kx):
        cols += chw[:, : hh * ky, j : ww * kx : kx]
    acc = np.zeros((c, hh, ww), np.float32)
    for i in range(ky):
        acc += cols[:, i::ky]
    acc *= np.float32(1.0 / (kx * ky))
    return acc


@functools.lru_cache(maxsize=8)
def _grid(out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(out_shape[0], dtype=np.float32)[:, None]
    cols = np.arange(out_shape[1], dtype=np.float32)[None, :]
    return rows, cols


def _bilinear_taps(shape: tuple[int, int], inv: np.ndarray, out_shape: tuple[int, int], extent):
    """Flat indices of the four neighbours of each output point, their bilinear weights (zeroed
    outside ``[-0.5, extent]``) and the inside mask (None when every point is inside). float32
    throughout: float64 intermediates would double the memory traffic for no visible gain."""
    h, w = shape
    xmax, ymax = float(extent[0]), float(extent[1])
    rows, cols = _grid(out_shape)
    a = inv.astype(np.float32)
    corners = np.array([[0, 0, 1], [out_shape[1] - 1, 0, 1], [0, out_shape[0] - 1, 1],
                        [out_shape[1] - 1, out_shape[0] - 1, 1]], np.float64) @ inv.T
    # an affine map sends the output's corners to the hull of its footprint: check them first
    all_inside = bool(np.all((corners[:, 0] >= -0.5) & (corners[:, 0] <= xmax)
                             & (corners[:, 1] >= -0.5) & (corners[:, 1] <= ymax)))
    x = (a[0, 0] * cols + a[0, 2]) + a[0, 1] * rows
    y = (a[1, 0] * cols + a[1, 2]) + a[1, 1] * rows
    inside = None
    if not all_inside:
        inside = (x >= -0.5) & (x <= xmax)
        inside &= y >= -0.5
        inside &= y <= ymax
        inside = inside.ravel().astype(np.float32)
    fx, x0 = _split(x, w)
    fy, y0 = _split(y, h)
    if inside is not None:
        fy *= inside
    gy = (inside if inside is not None else np.float32(1.0)) - fy
    gx = np.float32(1.0) - fx
    i00 = y0
    i00 *= w
    i00 += x0
    dx, dy = (1 if w > 1 else 0), (w if h > 1 else 0)
    taps = (i00, i00 + dx, i00 + dy, i00 + (dx + dy))
    return taps, (gx * gy, fx * gy, gx * fy, fx * fy), inside


def _split(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamp coordinates to [0, n-1]; return (fraction float32, integer part intp), both flat,
    with the integer part at most n-2 so that its right/lower neighbour exists."""
    x = np.clip(x, 0, n - 1).ravel()
    x0 = np.minimum(np.floor(x), max(n - 2, 0), dtype=np.float32)
    x -= x0
    return x, x0.astype(np.intp)


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Reference single-op rotation about the centre (skimage), float32 out."""
    return _skimage("transform").rotate(
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
    """HW -> HW bool with Otsu's threshold; a constant image gives all False (also one whose
    values differ only by float rounding, on which the 256-bin histogram cannot be built)."""
    lo, hi = float(img.min()), float(img.max())
    if hi - lo <= EPS * max(1.0, abs(hi)):
        return np.zeros(img.shape, bool)
    return img > _skimage("filters").threshold_otsu(img)


@functools.lru_cache(maxsize=32)
def disk(radius: int) -> np.ndarray:
    """The course's structuring element: ``skimage.morphology.disk(radius)``."""
    return _skimage("morphology").disk(radius)


_MORPH = ("erosion", "dilation", "opening", "closing")


def morph(img: np.ndarray, op: str, radius: int = 3) -> np.ndarray:
    """Erosion / dilation / opening / closing with ``disk(radius)`` on a binary (bool) or
    grayscale HW image. Binary in -> bool out; grayscale in -> float32 out."""
    if op not in _MORPH:
        raise ValueError(f"unknown morphology '{op}', expected one of {list(_MORPH)}")
    fn = getattr(_skimage("morphology"), op)
    out = fn(img, footprint=disk(radius))
    return out if img.dtype == bool else out.astype(np.float32, copy=False)


# ---------------------------------------------------------------- intensity


def rescale(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(x - lo) / (hi - lo)`` as a new float32 array; all zeros when ``hi - lo`` is (almost) 0,
    so that a constant image never gives NaN or inf."""
    out = np.subtract(img, np.float32(lo), dtype=np.float32)
    span = float(hi) - float(lo)
    out *= np.float32(1.0 / span) if span > EPS * max(1.0, abs(float(hi))) else np.float32(0.0)
    return out


def normalize_divide(img: np.ndarray, vmax: float = 255.0) -> np.ndarray:
    """The course's ``image / 255``, bit-depth aware: divide by the format's maximum ``vmax``
    (255 for 8-bit, 65535 for 16-bit films). Output float32 in [0, 1]."""
    return rescale(img, 0.0, vmax)


def normalize_minmax(img: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)`` per image -> float32 in [0, 1]; constant image -> zeros."""
    return rescale(img, float(img.min()), float(img.max()))


def percentile_range(
    img: np.ndarray, low: float = 5.0, high: float = 95.0, max_samples: int = 1 << 15
) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of ``img`` (``np.percentile``'s linear method).

    Images with more than ``max_samples`` values are read on a regular pixel grid holding about
    that many values (every channel of each chosen pixel), and the order statistics come from
    ``np.partition`` instead of a full sort: the estimate moves by far less than one grey level.
    """
    if img.size > max_samples:
        step = math.ceil(math.sqrt(img.size / max_samples))
        img = img[::step, ::step]
    flat = img.ravel()
    pos = [q / 100.0 * (flat.size - 1) for q in (low, high)]
    kth = sorted({min(int(math.floor(p)) + d, flat.size - 1) for p in pos for d in (0, 1)})
    part = np.partition(flat, kth)

    def at(p: float) -> float:
        i = int(math.floor(p))
        a, b = float(part[i]), float(part[min(i + 1, flat.size - 1)])
        return a + (b - a) * (p - i)

    return at(pos[0]), at(pos[1])


def normalize_percentile(img: np.ndarray, low: float = 5.0, high: float = 95.0) -> np.ndarray:
    """``(x - p_low) / (p_high - p_low)`` per image (robust to outliers; values may fall a
    little outside [0, 1], as the course notes). Falls back to min-max when the two percentiles
    coincide; a constant image gives zeros."""
    lo, hi = percentile_range(img, low, high)
    if hi - lo <= EPS * max(1.0, abs(hi)):
        return normalize_minmax(img)
    return rescale(img, lo, hi)


def standardize(img: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """HWC float32: ``(x - mean) / std`` per channel (dataset statistics), as a new array."""
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    return (img - m) * (np.float32(1.0) / s)


def equalize_adapthist(img: np.ndarray) -> np.ndarray:
    """CLAHE (``skimage.exposure.equalize_adapthist``) on a [0, 1] HW/HWC float image."""
    return _skimage("exposure").equalize_adapthist(np.clip(img, 0.0, 1.0)).astype(np.float32, copy=False)


def adjust_brightness_contrast(
    img: np.ndarray, brightness: float = 0.0, contrast: float = 1.0
) -> np.ndarray:
    """``(x - mean) * contrast + mean + brightness`` (illumination change), new float32 array."""
    mean = float(img.mean(dtype=np.float64))
    out = np.multiply(img, np.float32(contrast), dtype=np.float32)
    out += np.float32(mean * (1.0 - contrast) + brightness)
    return out


def adjust_gamma(img: np.ndarray, gamma: float) -> np.ndarray:
    """``x ** gamma`` on the positive part of a [0, 1]-scaled image (values <= 0 are kept as they
    are, so standardised or percentile-scaled values never turn into NaN)."""
    out = np.array(img, np.float32, copy=True)
    np.power(out, np.float32(gamma), out=out, where=out > 0)
    return out


def add_noise(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Add a pre-drawn noise array (randomness stays outside the kernel)."""
    return np.add(img, noise, dtype=np.float32)


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """HW or HWC -> contiguous CHW float32 (the model's layout)."""
    if img.ndim == 2:
        img = img[..., None]
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
