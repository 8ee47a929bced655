"""Kernels of raypipe.data.functional against direct numpy / scikit-image references."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import filters, morphology, transform

from raypipe.data import functional as F


def smooth(shape=(40, 48), channels: int | None = 3, seed: int = 0) -> np.ndarray:
    """A smooth float32 image in [0, 255] (bilinear resampling of it is accurate)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    chans = [
        127.5 + 100 * np.sin(xx / rng.uniform(6, 12) + rng.uniform(0, 3)) * np.cos(yy / rng.uniform(6, 12))
        for _ in range(channels or 1)
    ]
    img = np.stack(chans, -1).astype(np.float32)
    return img if channels else img[..., 0]


def noise_u8(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("size", [64, 50, 31])
def test_resize_matches_skimage_without_antialiasing(size):
    img = noise_u8((40, 48, 3)).astype(np.float32)
    ref = transform.resize(img, (size, size, 3), order=1, mode="edge", anti_aliasing=False,
                           preserve_range=True)
    out = F.resize(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=5e-3)  # float32 arithmetic on a 0..255 range


def test_resize_integer_shrink_is_the_block_mean():
    img = noise_u8((64, 96))
    out = F.resize(img, 16)  # 4x along rows, 6x along columns
    ref = img.reshape(16, 4, 16, 6).mean(axis=(1, 3))
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_resize_large_shrink_is_antialiased_like_skimage():
    img = noise_u8((300, 300)).astype(np.float32)
    out = F.resize(img, 32)
    ref = transform.resize(img, (32, 32), order=1, anti_aliasing=True, preserve_range=True)
    naive = transform.resize(img, (32, 32), order=1, anti_aliasing=False, preserve_range=True)
    # random noise averages out when filtered; without a filter it stays at full contrast
    assert out.std() < 0.3 * naive.std()
    assert abs(float(out.mean()) - float(ref.mean())) < 2.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, bool])
@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
def test_resize_shapes_dtypes_ranges(dtype, mode):
    img = noise_u8((23, 37, 3)).astype(dtype)
    out = F.resize(img, 16, mode)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= float(np.max(img.astype(np.float32))) + 1e-3


def test_resize_pad_letterboxes_and_crop_takes_the_centre():
    img = np.full((10, 20), 100, np.uint8)
    pad = F.resize(img, 20, "pad")
    assert np.all(pad[:5] == 0) and np.all(pad[-5:] == 0) and np.allclose(pad[5:15], 100)
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 200
    np.testing.assert_allclose(F.resize(wide, 10, "crop"), 200)


def test_resize_one_pixel_and_constant_images():
    one = np.array([[[3, 4, 5]]], np.uint8)
    out = F.resize(one, 8)
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out, np.broadcast_to([3, 4, 5], (8, 8, 3)))
    np.testing.assert_allclose(F.resize(np.full((5, 9), 7, np.uint16), 12), 7)


# ---------------------------------------------------------------- warp


def test_zero_rotation_and_identity_matrix_are_identity():
    img = noise_u8((20, 30, 3))
    np.testing.assert_allclose(F.warp_affine(img, np.eye(3)), img, atol=1e-4)
    np.testing.assert_allclose(F.warp_affine(img, F.affine_matrix((20, 30), rotation=0.0)), img, atol=1e-4)


def test_rotation_matches_skimage_rotate_inside_the_image():
    img = smooth()
    out = F.warp_affine(img, F.affine_matrix(img.shape[:2], rotation=25))
    ref = F.rotate(img, 25)
    np.testing.assert_allclose(out[10:-10, 10:-10], ref[10:-10, 10:-10], atol=1e-3)


def test_positive_rotation_is_anticlockwise_on_screen():
    img = np.zeros((21, 21), np.float32)
    img[10, 18] = 1.0  # right of the centre
    out = F.warp_affine(img, F.affine_matrix((21, 21), rotation=90))
    r, c = np.unravel_index(np.argmax(out), out.shape)
    assert (r, c) == (2, 10)  # now above the centre


def test_flips_double_flip_and_flip_matrices():
    img = noise_u8((7, 9, 3))
    np.testing.assert_array_equal(F.hflip(F.hflip(img)), img)
    np.testing.assert_array_equal(F.vflip(F.vflip(img)), img)
    np.testing.assert_array_equal(F.hflip(img), img[:, ::-1])
    h_m, v_m = F.affine_matrix((7, 9), hflip=True), F.affine_matrix((7, 9), vflip=True)
    np.testing.assert_allclose(F.warp_affine(img, h_m), img[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(F.warp_affine(img, v_m), img[::-1], atol=1e-4)
    both = F.affine_matrix((7, 9), hflip=True) @ F.affine_matrix((7, 9), hflip=True)
    np.testing.assert_allclose(both, np.eye(3), atol=1e-12)


def test_zoom_and_translation_move_content_as_documented():
    img = np.zeros((21, 21), np.float32)
    img[10, 14] = 1.0
    zoomed = F.warp_affine(img, F.affine_matrix((21, 21), scale=2.0))
    assert np.unravel_index(np.argmax(zoomed), zoomed.shape) == (10, 18)  # 4 px from centre -> 8
    moved = F.warp_affine(img, F.affine_matrix((21, 21), translate=(-3, 2)))
    assert np.unravel_index(np.argmax(moved), moved.shape) == (12, 11)


def test_fused_warp_equals_sequential_composition():
    img = smooth((48, 48))
    a = F.affine_matrix((48, 48), rotation=12, scale=1.1, shear=6, translate=(2, -1))
    b = F.affine_matrix((48, 48), rotation=-7, scale=0.95, hflip=True)
    fused = F.warp_affine(img, a @ b)
    sequential = F.warp_affine(F.warp_affine(img, b), a)
    inner = (slice(12, -12), slice(12, -12))
    assert np.abs(fused[inner] - sequential[inner]).mean() < 1.0  # of a 0..255 range
    assert np.abs(fused[inner] - sequential[inner]).max() < 6.0


def test_resize_fused_with_affine_equals_resize_then_affine():
    img = smooth((60, 80))
    aug = F.affine_matrix((32, 32), rotation=10, scale=1.05)
    fused = F.warp_affine(img, aug @ F.resize_matrix((60, 80), 32), (32, 32))
    sequential = F.warp_affine(F.resize(img, 32), aug)
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(fused[inner] - sequential[inner]).mean() < 1.5


def test_warp_fills_outside_with_cval_and_packed_path_matches_float_path():
    img = noise_u8((20, 30, 3))
    m = F.affine_matrix((20, 30), rotation=30, scale=0.7)
    out8 = F.warp_affine(img, m, cval=9.0)
    out32 = F.warp_affine(img.astype(np.float32), m, cval=9.0)
    np.testing.assert_allclose(out8, out32, atol=1e-3)
    assert np.allclose(out8[0, 0], 9.0)  # a corner falls outside once shrunk and turned
    gray = F.warp_affine(img[..., 0], m)
    np.testing.assert_allclose(gray, out32[..., 0] * (out32[..., 0] != 9.0), atol=1e-3)


# ---------------------------------------------------------------- channels


def test_to_gray_is_itu601_luma_and_to_channels():
    rgb = noise_u8((5, 6, 3))
    ref = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(F.to_gray(rgb), ref, atol=1e-3)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], -1)
    np.testing.assert_allclose(F.to_gray(rgba), ref, atol=1e-3)
    gray = F.to_gray(rgb)
    assert F.to_channels(gray, 3).shape == (5, 6, 3)
    np.testing.assert_array_equal(F.to_channels(gray, 3)[..., 2], gray)
    assert F.to_channels(rgb, 1).shape == (5, 6, 1)


# ---------------------------------------------------------------- threshold and morphology


def test_thresholds():
    img = noise_u8((16, 16)).astype(np.float32)
    np.testing.assert_array_equal(F.threshold_fixed(img, 125), img > 125)
    img16 = img * 257.0  # same picture on a 16-bit scale
    np.testing.assert_array_equal(F.threshold_fixed(img16, 125, vmax=65535.0), img > 125)
    np.testing.assert_array_equal(F.threshold_otsu(img), img > filters.threshold_otsu(img))
    assert not F.threshold_otsu(np.full((4, 4), 3.0)).any()
    nearly = np.full((4, 4), 200.0, np.float32)
    nearly[0, 0] = np.nextafter(np.float32(200.0), np.float32(300.0))  # float rounding only
    assert not F.threshold_otsu(nearly).any()


@pytest.mark.parametrize("op", ["erosion", "dilation", "opening", "closing"])
def test_morphology_matches_skimage_on_binary_and_gray(op):
    binary = noise_u8((24, 24)) > 150
    ref_fn = getattr(morphology, op)
    out = F.morph(binary, op, 2)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, ref_fn(binary, footprint=morphology.disk(2)))
    gray = noise_u8((24, 24)).astype(np.float32)
    np.testing.assert_allclose(F.morph(gray, op, 3), ref_fn(gray, footprint=morphology.disk(3)))


def test_opening_removes_small_specks_and_closing_fills_small_holes():
    img = np.zeros((40, 40), bool)
    img[5:20, 5:20] = True  # a square larger than disk(3)
    img[30, 30] = img[31, 31] = True  # specks smaller than the disk
    opened = F.morph(img, "opening", 3)
    assert not opened[28:34, 28:34].any()
    assert opened[8:17, 8:17].all()
    holed = np.ones((30, 30), bool)
    holed[14:16, 14:16] = False
    assert F.morph(holed, "closing", 3).all()
    gray = noise_u8((20, 20)).astype(np.float32)
    assert np.all(F.morph(gray, "erosion") <= gray) and np.all(F.morph(gray, "dilation") >= gray)


def test_disk_is_skimage_disk():
    np.testing.assert_array_equal(F.disk(3), morphology.disk(3))
    with pytest.raises(ValueError, match="unknown morphology"):
        F.morph(np.zeros((3, 3), bool), "tophat")


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("dtype,vmax", [(np.uint8, 255.0), (np.uint16, 65535.0)])
def test_three_normalisations_on_8_and_16_bit(dtype, vmax):
    rng = np.random.default_rng(1)
    img = rng.integers(0, int(vmax) + 1, (30, 20), dtype=dtype if dtype != np.uint16 else np.uint32)
    img = img.astype(dtype)
    x = img.astype(np.float64)
    np.testing.assert_allclose(F.normalize_divide(img, vmax), x / vmax, atol=1e-6)
    np.testing.assert_allclose(F.normalize_minmax(img), (x - x.min()) / (x.max() - x.min()), atol=1e-6)
    p5, p95 = np.percentile(x, [5, 95])
    np.testing.assert_allclose(F.normalize_percentile(img), (x - p5) / (p95 - p5), atol=1e-5)
    for out in (F.normalize_divide(img, vmax), F.normalize_minmax(img), F.normalize_percentile(img)):
        assert out.dtype == np.float32


def test_sixteen_bit_film_is_not_divided_by_255():
    film = np.full((4, 4), 40000, np.uint16)
    assert F.normalize_divide(film, 65535.0).max() <= 1.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_constant_image_normalises_to_finite_zeros(dtype):
    img = np.full((9, 7), 42, dtype)
    for out in (F.normalize_minmax(img), F.normalize_percentile(img), F.normalize_divide(img, 255.0)):
        assert np.isfinite(out).all()
    assert not F.normalize_minmax(img).any() and not F.normalize_percentile(img).any()


def test_percentile_of_large_image_is_close_to_numpy():
    img = np.random.default_rng(2).normal(1000, 200, (600, 500)).astype(np.float32)
    lo, hi = F.percentile_range(img, 5, 95)
    ref_lo, ref_hi = np.percentile(img, [5, 95])
    assert abs(lo - ref_lo) < 5 and abs(hi - ref_hi) < 5  # 0.025 standard deviations
    small = img[:50, :50]
    np.testing.assert_allclose(F.percentile_range(small, 2, 98), np.percentile(small, [2, 98]), rtol=1e-6)


def test_percentile_falls_back_to_minmax_when_percentiles_coincide():
    img = np.zeros((10, 10), np.uint8)
    img[0, 0] = 200  # 99 % of the image is 0: p5 == p95
    out = F.normalize_percentile(img)
    np.testing.assert_allclose(out, img / 200.0)


# ---------------------------------------------------------------- intensity augmentation


def test_standardize_and_illumination_kernels():
    img = np.random.default_rng(3).random((6, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(F.standardize(img, [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]),
                               (img - [0.5, 0.4, 0.3]) / [0.2, 0.25, 0.5], rtol=1e-5)
    m = img.mean()
    ref = (img - m) * 1.3 + m + 0.1
    np.testing.assert_allclose(F.adjust_brightness_contrast(img, 0.1, 1.3), ref, atol=1e-6)
    signed = img - 0.5
    out = F.adjust_gamma(signed, 2.0)
    np.testing.assert_allclose(out, np.where(signed > 0, signed**2, signed), atol=1e-6)
    assert np.isfinite(out).all()
    noise = np.full(img.shape, 0.25, np.float32)
    np.testing.assert_allclose(F.add_noise(img, noise), img + 0.25)
    np.testing.assert_array_equal(F.hwc_to_chw(img), img.transpose(2, 0, 1))
