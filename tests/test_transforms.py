"""Preprocessor, Augmenter and TrainTransform: outputs and seeding."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe.config import AugmentConfig, PreprocessConfig
from raypipe.data import functional as F
from raypipe.data.transforms import Augmenter, Preprocessor, TrainTransform, sample_rng

ALL_ON = AugmentConfig(hflip=0.5, vflip=0.5, rotation=30, zoom=(0.8, 1.2), translate=0.1, shear=10,
                       crop_scale=0.7, brightness=0.2, contrast=0.2, gamma=0.3, noise_std=0.05)


def photo(h=30, w=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 60 * np.sin(xx / 4.0)], -1)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- Preprocessor


@pytest.mark.parametrize("cfg", [
    {},
    {"channels": 1, "normalize": "minmax"},
    {"normalize": "percentile", "percentiles": (2.0, 98.0), "resize_mode": "pad"},
    {"threshold": "fixed", "morphology": ["erosion", "dilation", "opening", "closing"], "disk_radius": 1},
    {"threshold": "otsu", "morphology": ["opening"], "channels": 1},
    {"morphology": ["closing"], "normalize": "minmax"},
    {"equalize": "adapthist", "resize_mode": "crop"},
    {"normalize": "none"},
    {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
])
def test_preprocessor_outputs_configured_shape_and_finite_values(cfg):
    pre = Preprocessor(PreprocessConfig(image_size=16, **cfg))
    x = pre(photo(), 255.0)
    assert x.shape == (16, 16, pre.cfg.channels) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_preprocessor_steps_are_named_in_order_and_end_at_the_output():
    cfg = PreprocessConfig(image_size=16, threshold="fixed", morphology=["erosion", "closing"],
                           normalize="minmax", mean=[0.5], std=[0.25])
    pre = Preprocessor(cfg)
    steps = pre.steps(photo(), 255.0)
    names = [n for n, _ in steps]
    assert names == ["resize 16 (stretch)", "gray", "threshold > 125/255", "erosion disk(3)",
                     "closing disk(3)", "normalise minmax", "standardise", "output"]
    np.testing.assert_allclose(steps[-1][1], pre(photo(), 255.0))
    assert steps[2][1].dtype == bool


def test_pointwise_preprocessing_matches_its_step_by_step_definition():
    img = photo(60, 80)
    pre = Preprocessor(PreprocessConfig(image_size=24, normalize="divide255"))
    ref = F.normalize_divide(F.resize(img, 24), 255.0)
    np.testing.assert_allclose(pre(img, 255.0), ref, atol=1e-5)
    mm = Preprocessor(PreprocessConfig(image_size=24, normalize="minmax", channels=1))
    gray = F.to_gray(img)
    ref = (F.resize(gray, 24) - gray.min()) / (gray.max() - gray.min())
    np.testing.assert_allclose(mm(img, 255.0)[..., 0], ref, atol=1e-5)


def test_sixteen_bit_input_uses_its_own_range():
    film = (photo()[..., 0].astype(np.uint16) * 200).astype(np.uint16)
    x = Preprocessor(PreprocessConfig(image_size=16, channels=1))(film, 65535.0)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.3


def test_prepare_with_warp_equals_preprocess_then_warp():
    img = photo(64, 64)
    pre = Preprocessor(PreprocessConfig(image_size=32, normalize="divide255"))
    m = F.affine_matrix((32, 32), rotation=15, scale=1.1, shear=5, translate=(2, -2), hflip=True)
    fused = pre.prepare(img, 255.0, warp=m)
    sequential = F.warp_affine(pre.prepare(img, 255.0), m)
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(fused[inner] - sequential[inner]).mean() < 0.02


# ---------------------------------------------------------------- Augmenter


def test_same_seed_epoch_key_gives_the_same_sample_and_any_change_gives_another():
    aug = Augmenter(ALL_ON, seed=7)
    x = Preprocessor(PreprocessConfig(image_size=24))(photo(), 255.0)
    a = aug(x, "roses/1.jpg", 3)
    np.testing.assert_array_equal(a, Augmenter(ALL_ON, seed=7)(x, "roses/1.jpg", 3))
    reseeded = Augmenter(ALL_ON, seed=8)(x, "roses/1.jpg", 3)
    others = (aug(x, "roses/1.jpg", 4), aug(x, "roses/2.jpg", 3), reseeded)
    for other in others:
        assert not np.allclose(a, other)


def test_params_stay_in_their_configured_ranges():
    aug = Augmenter(ALL_ON)
    ps = [aug.get_params(sample_rng(0, 0, str(i)), 32) for i in range(300)]
    assert all(abs(p.rotation) <= 30 and abs(p.shear) <= 10 for p in ps)
    assert all(0.8 <= p.scale <= 1.2 / np.sqrt(0.7) + 1e-9 for p in ps)
    assert all(0.8 <= p.contrast <= 1.2 and abs(p.brightness) <= 0.2 for p in ps)
    rotations = np.array([p.rotation for p in ps])
    assert rotations.min() < -20 and rotations.max() > 20  # both clockwise and anti-clockwise
    flips = np.mean([p.hflip for p in ps])
    assert 0.4 < flips < 0.6


def test_turning_one_augmentation_off_does_not_change_the_others():
    on = Augmenter(ALL_ON).get_params(sample_rng(0, 1, "k"), 32)
    off = Augmenter(ALL_ON.model_copy(update={"noise_std": 0.0, "hflip": 0.0})).get_params(
        sample_rng(0, 1, "k"), 32)
    assert (on.rotation, on.scale, on.shear, on.tx, on.brightness) == (
        off.rotation, off.scale, off.shear, off.tx, off.brightness)
    assert off.noise_seed is None and not off.hflip


def test_flip_only_augmentation_is_an_exact_mirror():
    cfg = AugmentConfig(hflip=1.0, rotation=0, zoom=(1, 1), translate=0, brightness=0, contrast=0)
    x = Preprocessor(PreprocessConfig(image_size=16))(photo(), 255.0)
    np.testing.assert_array_equal(Augmenter(cfg)(x, "a", 0), x[:, ::-1])


def test_train_transform_is_deterministic_and_varies_by_epoch():
    pre = Preprocessor(PreprocessConfig(image_size=24, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    tt = TrainTransform(pre, Augmenter(ALL_ON, seed=1))
    img = photo()
    a = tt(img, 255.0, "k", 0)
    assert a.shape == (24, 24, 3) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, tt(img, 255.0, "k", 0))
    assert not np.allclose(a, tt(img, 255.0, "k", 1))


def test_train_transform_with_morphology_takes_the_step_by_step_path():
    pre = Preprocessor(PreprocessConfig(image_size=16, threshold="otsu", morphology=["opening"], channels=1))
    assert not pre.pointwise
    out = TrainTransform(pre, Augmenter(ALL_ON))(photo(), 255.0, "k", 2)
    assert out.shape == (16, 16, 1) and np.isfinite(out).all()
