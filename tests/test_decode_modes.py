"""Every image mode a dataset can hold comes out of decode + Preprocessor at the configured shape
and dtype with finite values (the files are written here with PIL)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raypipe.config import PreprocessConfig
from raypipe.data.decode import decode_image, value_range
from raypipe.data.transforms import Preprocessor


def _bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(h=20, w=30) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _exif_rotated() -> bytes:
    """A 30x20 landscape JPEG tagged 'rotate 90 CW to display' (orientation 6), bright on its left."""
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :10] = 250
    img = Image.fromarray(arr, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6
    return _bytes(img, "JPEG", exif=exif, quality=95)


def _sixteen_bit() -> bytes:
    arr = (np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) * 100).astype(np.uint16)
    return _bytes(Image.fromarray(arr), "PNG")


FILES = {
    "gray": lambda: _bytes(_rgb().convert("L"), "PNG"),
    "rgb": lambda: _bytes(_rgb(), "JPEG"),
    "rgba": lambda: _bytes(_rgb().convert("RGBA"), "PNG"),
    "gray+alpha": lambda: _bytes(_rgb().convert("LA"), "PNG"),
    "palette": lambda: _bytes(_rgb().convert("P"), "PNG"),
    "palette+transparency": lambda: _bytes(_rgb().convert("P"), "PNG", transparency=0),
    "bilevel": lambda: _bytes(_rgb().convert("1"), "PNG"),
    "cmyk jpeg": lambda: _bytes(_rgb().convert("CMYK"), "JPEG", quality=95),
    "16-bit png": _sixteen_bit,
    "exif rotated": _exif_rotated,
    "1x1": lambda: _bytes(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "constant": lambda: _bytes(Image.new("L", (9, 7), 200), "PNG"),
    "constant 16-bit": lambda: _bytes(Image.fromarray(np.full((5, 5), 4000, np.uint16)), "PNG"),
    "float tiff": lambda: _bytes(Image.fromarray(np.linspace(0, 3, 30, dtype=np.float32).reshape(5, 6)),
                                 "TIFF"),
}


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalize", ["divide255", "minmax", "percentile"])
def test_every_mode_comes_out_at_the_configured_shape(name, channels, normalize):
    cfg = PreprocessConfig(image_size=16, channels=channels, normalize=normalize)
    arr = decode_image(FILES[name](), gray=channels == 1, draft_size=16)
    assert arr.ndim in (2, 3) and arr.dtype in (np.uint8, np.uint16, np.float32)
    x = Preprocessor(cfg)(arr, value_range(arr))
    assert x.shape == (16, 16, channels) and x.dtype == np.float32
    assert np.isfinite(x).all()


def test_sixteen_bit_keeps_its_depth_and_range():
    arr = decode_image(_sixteen_bit())
    assert arr.dtype == np.uint16 and int(arr.max()) == 599 * 100
    x = Preprocessor(PreprocessConfig(image_size=8, channels=1))(arr, value_range(arr))
    assert 0 <= x.min() and x.max() <= 60000 / 65535 + 1e-6  # divided by 65535, not 255


def test_exif_orientation_is_applied():
    arr = decode_image(_exif_rotated())
    assert arr.shape == (30, 20, 3)  # portrait once turned
    # the bright left band of the stored image is on top after a 90 degree clockwise turn
    assert arr[:8].mean() > 200 and arr[-15:].mean() < 30


def test_cmyk_jpeg_colours_survive():
    arr = decode_image(FILES["cmyk jpeg"]())
    ref = np.asarray(_rgb(), dtype=np.float32)
    assert arr.shape == (20, 30, 3)
    assert np.abs(arr.astype(np.float32) - ref).mean() < 12


def test_transparent_pixels_become_black_not_their_hidden_colour():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., :3] = 200
    arr[0, 0, 3], arr[0, 1, 3], arr[1, :, 3] = 255, 0, 128
    out = decode_image(_bytes(Image.fromarray(arr, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[..., 0], [[200, 0], [100, 100]])
    gray = decode_image(_bytes(Image.fromarray(arr, "RGBA").convert("LA"), "PNG"))
    np.testing.assert_array_equal(gray, [[200, 0], [100, 100]])


@pytest.mark.parametrize("threshold", ["fixed", "otsu"])
def test_binary_path_takes_every_mode(threshold):
    cfg = PreprocessConfig(image_size=12, threshold=threshold, morphology=["opening", "closing"],
                           disk_radius=1)
    for name, make in FILES.items():
        arr = decode_image(make())
        x = Preprocessor(cfg)(arr, value_range(arr))
        assert x.shape == (12, 12, 3) and np.isfinite(x).all(), name
        assert set(np.unique(x)) <= {0.0, 1.0}, name
