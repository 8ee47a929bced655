"""Transforms built from config: one class per stage, randomness drawn separately and seeded.

:class:`Preprocessor` (train and validation alike): decoded array -> model-ready HWC float32.
:class:`Augmenter` (training only): draws parameters from a generator derived from
(seed, epoch, sample key) with :meth:`Augmenter.get_params`, then applies them deterministically
with :meth:`Augmenter.apply` -- one fused affine warp for every geometric change.
:class:`TrainTransform` chains them for training, folding the resize into that same warp.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

from raypipe.config import AugmentConfig, PreprocessConfig
from raypipe.data import functional as F


class Preprocessor:
    """resize -> [gray] -> [threshold -> morphology] -> [CLAHE] -> normalise -> channels -> [standardise].

    ``__call__(img, vmax)``: decoded HW/HWC array whose format maximum is ``vmax`` (255 for 8-bit,
    65535 for 16-bit) -> ``(size, size, channels)`` float32, finite. It is :meth:`prepare` (up to
    the normalisation) followed by :meth:`finish` (channels and dataset standardisation), so that
    augmentation can run in between on [0, 1]-scaled images.
    """

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    @property
    def pointwise(self) -> bool:
        """True when everything after the resize acts pixel by pixel, so the resize (and any
        augmentation warp) can be one resample of the decoded image."""
        c = self.cfg
        return c.threshold == "none" and not c.morphology and c.equalize == "none"

    def steps(self, img: np.ndarray, vmax: float) -> list[tuple[str, np.ndarray]]:
        """Every intermediate image, named, in order (for the preview job and tests)."""
        out, x = self._stepwise(img, vmax)
        y = self.finish(x)
        if self.cfg.mean is not None and self.cfg.std is not None:
            out.append(("standardise", y))
        return out + [("output", y)]

    def _stepwise(self, img: np.ndarray, vmax: float) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
        """One resample for the resize, then each step on its own: (named steps, normalised)."""
        c = self.cfg
        out: list[tuple[str, np.ndarray]] = []
        x = F.resize(img, c.image_size, c.resize_mode)
        out.append((f"resize {c.image_size} ({c.resize_mode})", x))
        binary_path = c.threshold != "none"
        if (c.channels == 1 or binary_path) and x.ndim == 3:
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
        x = self.normalize(x, vmax)
        if c.normalize != "none":
            out.append((f"normalise {c.normalize}", x))
        return out, x

    def _morph(self, x: np.ndarray, op: str) -> np.ndarray:
        if x.ndim == 2:
            return F.morph(x, op, self.cfg.disk_radius)
        # colour without thresholding: grayscale morphology on each channel
        return np.stack([F.morph(x[..., i], op, self.cfg.disk_radius) for i in range(x.shape[2])], axis=2)

    def intensity_range(self, img: np.ndarray, vmax: float) -> tuple[float, float]:
        """``(lo, hi)`` that the configured normalisation maps to (0, 1) for this image."""
        c = self.cfg
        if c.normalize == "divide255":
            return 0.0, vmax
        if c.normalize == "minmax":
            return float(img.min()), float(img.max())
        if c.normalize == "percentile":
            lo, hi = F.percentile_range(img, *c.percentiles)
            if hi - lo <= F.EPS * max(1.0, abs(hi)):
                return float(img.min()), float(img.max())
            return lo, hi
        return 0.0, 1.0

    def normalize(self, x: np.ndarray, vmax: float) -> np.ndarray:
        """The configured per-image normalisation, as a new float32 array."""
        return F.rescale(x, *self.intensity_range(x, vmax))

    def prepare(self, img: np.ndarray, vmax: float, warp: np.ndarray | None = None) -> np.ndarray:
        """Decoded image -> ``(size, size[, C])`` float32, normalised, before :meth:`finish`.

        ``warp``: an extra 3x3 map on the ``size x size`` result (augmentation), folded into the
        resize so that pointwise configs resample the image once.
        """
        c = self.cfg
        if not self.pointwise:
            x = self._stepwise(img, vmax)[1]
            return x if warp is None else F.warp_affine(x, warp)
        if c.channels == 1 and img.ndim == 3:
            img = F.to_gray(img)
        m = F.resize_matrix(img.shape[:2], c.image_size, c.resize_mode)
        if warp is not None:
            m = warp @ m
        lo, hi = self.intensity_range(img, vmax)
        # fill with lo so that what falls outside the image becomes 0 once normalised
        x = F.warp_affine(img, m, (c.image_size, c.image_size), cval=lo)
        span = hi - lo
        x -= np.float32(lo)
        x *= np.float32(1.0 / span) if span > F.EPS * max(1.0, abs(hi)) else np.float32(0.0)
        return x

    def finish(self, x: np.ndarray) -> np.ndarray:
        """Normalised HW/HWC -> ``(size, size, channels)`` float32, standardised when the config
        gives dataset ``mean``/``std``."""
        c = self.cfg
        x = F.to_channels(x, c.channels)
        if c.mean is not None and c.std is not None:
            x = F.standardize(x, c.mean, c.std)
        # may be a channel-last view of channel-first memory: the model's CHW is then one transpose
        return np.asarray(x, dtype=np.float32)

    def __call__(self, img: np.ndarray, vmax: float) -> np.ndarray:
        return self.finish(self.prepare(img, vmax))


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
        """Draw one sample's parameters for a ``size x size`` image from ``rng``."""
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

    def matrix(self, p: AugmentParams, shape: tuple[int, int]) -> np.ndarray:
        """The 3x3 forward map of every geometric parameter (flips included) on an ``shape``
        image: one matrix, one resample."""
        return F.affine_matrix(shape, p.rotation, p.scale, p.shear, (p.tx, p.ty), p.hflip, p.vflip)

    def apply(self, img: np.ndarray, p: AugmentParams) -> np.ndarray:
        """HW[C] float32 -> same shape float32 with the given parameters (deterministic)."""
        if not p.is_geometric_identity():
            img = F.warp_affine(img, self.matrix(p, img.shape[:2]))
        else:  # flips alone need no resample
            if p.hflip:
                img = F.hflip(img)
            if p.vflip:
                img = F.vflip(img)
        return self.photometric(img, p)

    def photometric(self, img: np.ndarray, p: AugmentParams) -> np.ndarray:
        """Illumination (brightness, contrast, gamma) and additive noise on a [0, 1]-scaled image."""
        if p.brightness != 0.0 or p.contrast != 1.0:
            img = F.adjust_brightness_contrast(img, p.brightness, p.contrast)
        if p.gamma != 1.0:
            img = F.adjust_gamma(img, p.gamma)
        if p.noise_seed is not None and p.noise_std > 0:
            noise = np.random.default_rng(p.noise_seed).standard_normal(img.shape, np.float32)
            noise *= np.float32(p.noise_std)
            img = F.add_noise(img, noise)
        return np.asarray(img, dtype=np.float32)

    def params_for(self, key: str, epoch: int, size: int) -> AugmentParams:
        """The parameters of sample ``key`` in ``epoch`` (the same wherever it runs)."""
        return self.get_params(sample_rng(self.seed, epoch, key), size)

    def __call__(self, img: np.ndarray, key: str, epoch: int) -> np.ndarray:
        return self.apply(img, self.params_for(key, epoch, img.shape[0]))


class TrainTransform:
    """Decoded image -> augmented training input: preprocessing, then augmentation, then
    standardisation, with the resize and the augmentation warp fused into one resample whenever
    the preprocessing is pointwise (no threshold, morphology or CLAHE).
    """

    def __init__(self, pre: Preprocessor, aug: Augmenter):
        self.pre = pre
        self.aug = aug

    def __call__(self, img: np.ndarray, vmax: float, key: str, epoch: int) -> np.ndarray:
        """HW/HWC any dtype -> ``(size, size, channels)`` float32."""
        size = self.pre.cfg.image_size
        p = self.aug.params_for(key, epoch, size)
        x = self.pre.prepare(img, vmax, warp=self.aug.matrix(p, (size, size)))
        return self.pre.finish(self.aug.photometric(x, p))


def params_dict(p: AugmentParams) -> dict:
    """The parameters as a plain dict (for logs and the preview's titles)."""
    return asdict(p)
