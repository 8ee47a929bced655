"""Transforms built from config: one class per stage, randomness drawn separately and seeded.

:class:`Preprocessor` (train and validation alike): decoded array -> model-ready HWC float32.
:class:`Augmenter` (training only): draws parameters from a generator derived from
(seed, epoch, sample key) with :meth:`Augmenter.get_params`, then applies them deterministically
with :meth:`Augmenter.apply` -- one fused affine warp for every geometric change.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

from raypipe.config import AugmentConfig, PreprocessConfig
from raypipe.data import functional as F


class Preprocessor:
    """resize -> [gray] -> [threshold -> morphology] -> [CLAHE] -> normalise -> [standardise].

    ``__call__(img, vmax)``: decoded HW/HWC array whose format maximum is ``vmax`` (255 for 8-bit,
    65535 for 16-bit) -> ``(size, size, channels)`` float32, finite.
    """

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def steps(self, img: np.ndarray, vmax: float) -> list[tuple[str, np.ndarray]]:
        """Every intermediate image, named, in order (for the preview job and tests)."""
        c = self.cfg
        out: list[tuple[str, np.ndarray]] = []
        x = F.resize(img, c.image_size, c.resize_mode)
        out.append((f"resize {c.image_size} ({c.resize_mode})", x))
        binary_path = c.threshold != "none"
        if c.channels == 1 or binary_path or (c.morphology and x.ndim == 2):
            x = F.to_gray(x)
            out.append(("gray", x))
        if binary_path:
            if c.threshold == "fixed":
                x = F.threshold_fixed(x, c.threshold_value, vmax)
                out.append((f"threshold > {c.threshold_value:g}/255", x))
            else:
                x = F.threshold_otsu(x)
                out.append(("threshold otsu", x))
        for op in c.morphology:
            x = self._morph(x, op)
            out.append((f"{op} disk({c.disk_radius})", x))
        if x.dtype == bool:
            x, vmax = x.astype(np.float32), 1.0
        if c.equalize == "adapthist":
            x, vmax = F.equalize_adapthist(F.normalize_divide(x, vmax)), 1.0
            out.append(("CLAHE", x))
        x = self._normalize(x, vmax)
        if c.normalize != "none":
            out.append((f"normalise {c.normalize}", x))
        x = F.to_channels(x, c.channels)
        if c.mean is not None and c.std is not None:
            x = F.standardize(x, c.mean, c.std)
            out.append(("standardise", x))
        return out + [("output", x)]

    def _morph(self, x: np.ndarray, op: str) -> np.ndarray:
        if x.ndim == 2:
            return F.morph(x, op, self.cfg.disk_radius)
        chans = [F.morph(x[..., i], op, self.cfg.disk_radius) for i in range(x.shape[2])]
        return np.stack(chans, axis=2)

    def _normalize(self, x: np.ndarray, vmax: float) -> np.ndarray:
        c = self.cfg
        if c.normalize == "divide255":
            return F.normalize_divide(x, vmax)
        if c.normalize == "minmax":
            return F.normalize_minmax(x)
        if c.normalize == "percentile":
            return F.normalize_percentile(x, *c.percentiles)
        return x.astype(np.float32, copy=False)

    def __call__(self, img: np.ndarray, vmax: float) -> np.ndarray:
        c = self.cfg
        if c.threshold == "none" and not c.morphology and c.equalize == "none":
            # fast path: no intermediate list, gray conversion before resizing when it can't matter
            if c.channels == 1 and img.ndim == 3:
                img = F.to_gray(img)
            x = self._normalize(F.resize(img, c.image_size, c.resize_mode), vmax)
            x = F.to_channels(x, c.channels)
            if c.mean is not None and c.std is not None:
                x = F.standardize(x, c.mean, c.std)
            return x
        return self.steps(img, vmax)[-1][1]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Generator for one sample in one epoch: same (seed, epoch, key) -> same draws, wherever it
    runs."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, h & 0xFFFFFFFF, h >> 32])


@dataclass(frozen=True)
class AugmentParams:
    rotation: float = 0.0
    scale: float = 1.0
    shear: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    hflip: bool = False
    vflip: bool = False
    brightness: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    noise_seed: int | None = None
    noise_std: float = 0.0

    def is_geometric_identity(self) -> bool:
        return (
            self.rotation == 0.0
            and self.scale == 1.0
            and self.shear == 0.0
            and self.tx == 0.0
            and self.ty == 0.0
        )


class Augmenter:
    """Random flips, rotation, zoom, translation, shear, crop, illumination and noise."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def get_params(self, rng: np.random.Generator, size: int) -> AugmentParams:
        c = self.cfg
        u = rng.uniform  # always draw every value so a toggle doesn't shift the others
        rot, zoom, shear = u(-1, 1), u(*c.zoom), u(-1, 1)
        tx, ty, crop_area, crop_x, crop_y = u(-1, 1), u(-1, 1), u(c.crop_scale, 1), u(-1, 1), u(-1, 1)
        hf, vf, b, k, g, ns = u(), u(), u(-1, 1), u(-1, 1), u(-1, 1), int(rng.integers(2**31))
        # random crop of a fraction of the area, resized back = zoom in + shift, folded in the warp
        side = math.sqrt(crop_area)
        crop_dx = crop_x * (1 - side) / 2 * size / side
        crop_dy = crop_y * (1 - side) / 2 * size / side
        return AugmentParams(
            rotation=rot * c.rotation,
            scale=zoom / side,
            shear=shear * c.shear,
            tx=tx * c.translate * size + crop_dx,
            ty=ty * c.translate * size + crop_dy,
            hflip=bool(hf < c.hflip),
            vflip=bool(vf < c.vflip),
            brightness=b * c.brightness,
            contrast=1.0 + k * c.contrast,
            gamma=math.exp(g * c.gamma),
            noise_seed=ns if c.noise_std > 0 else None,
            noise_std=c.noise_std,
        )

    def apply(self, img: np.ndarray, p: AugmentParams) -> np.ndarray:
        """HWC float32 -> HWC float32 with the given parameters (deterministic)."""
        h, w = img.shape[:2]
        if not p.is_geometric_identity():
            m = F.affine_matrix((h, w), p.rotation, p.scale, p.shear, (p.tx, p.ty))
            m = m @ _flip_matrix((h, w), p.hflip, p.vflip)
            img = F.warp_affine(img, m)
        else:  # flips alone need no resample
            if p.hflip:
                img = F.hflip(img)
            if p.vflip:
                img = F.vflip(img)
        if p.brightness != 0.0 or p.contrast != 1.0:
            img = F.adjust_brightness_contrast(img, p.brightness, p.contrast)
        if p.gamma != 1.0:
            img = F.adjust_gamma(img, p.gamma)
        if p.noise_seed is not None and p.noise_std > 0:
            noise = np.random.default_rng(p.noise_seed).standard_normal(img.shape, np.float32)
            img = F.add_noise(img, noise * np.float32(p.noise_std))
        return np.ascontiguousarray(img, dtype=np.float32)

    def __call__(self, img: np.ndarray, key: str, epoch: int) -> np.ndarray:
        params = self.get_params(sample_rng(self.seed, epoch, key), img.shape[0])
        return self.apply(img, params)


def _flip_matrix(shape: tuple[int, int], hflip: bool, vflip: bool) -> np.ndarray:
    h, w = shape
    m = np.eye(3)
    if hflip:
        m = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]], float) @ m
    if vflip:
        m = np.array([[1, 0, 0], [0, -1, h - 1], [0, 0, 1]], float) @ m
    return m


def params_dict(p: AugmentParams) -> dict:
    return asdict(p)
