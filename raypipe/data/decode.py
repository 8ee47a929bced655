"""Bytes -> numpy image. Every mode and bit depth PIL reads, EXIF orientation, size limits.

Contract: :func:`decode_image` returns ``(H, W)`` or ``(H, W, 3)``, dtype ``uint8`` or ``uint16``
(16-bit films keep their depth) or ``float32`` (floating-point TIFFs), or raises :class:`DecodeError`
whose message says why the file is unusable.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit below


class DecodeError(ValueError):
    """An image file cannot be decoded into a usable array."""


def _check_size(img: Image.Image, max_pixels: int) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise DecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise DecodeError(
            f"image is {w}x{h} = {w * h} pixels, above data.max_pixels={max_pixels} "
            "(decompression-bomb guard); raise the limit if the file is genuine"
        )


def decode_image(
    data: bytes, *, max_pixels: int = 100_000_000, gray: bool = False, draft_size: int | None = None
) -> np.ndarray:
    """Decode image bytes.

    ``gray``: return ``(H, W)`` (colour converted with ITU-R 601 luma); else RGB ``(H, W, 3)``
    for colour sources and ``(H, W)`` for grayscale ones (the caller decides channel handling).
    ``draft_size``: for JPEG, let the decoder downscale by a power of two while keeping both
    sides >= ``draft_size`` (much faster for large photos; the exact resize happens later).
    """
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            _check_size(img, max_pixels)
            if draft_size and img.format == "JPEG":
                img.draft("L" if gray else "RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(
            f"not a readable image: no image format recognised (file starts with {data[:12]!r})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise DecodeError("image needs more memory to decode than is available") from None
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise struct.error, IndexError, ... on corrupt data
        raise DecodeError(f"corrupt image data ({type(exc).__name__}: {exc})") from None
    try:
        return _to_array(img, gray)
    except (ValueError, TypeError, OSError, KeyError) as exc:  # exotic modes PIL cannot convert
        raise DecodeError(f"unsupported image mode {img.mode!r} ({type(exc).__name__}: {exc})") from None


def _to_array(img: Image.Image, gray: bool) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(img)
        lo, hi = int(arr.min()), int(arr.max())
        arr = arr.astype(np.uint16) if lo >= 0 and hi <= 65535 else _float01(arr)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    elif mode in ("L", "1"):
        arr = np.asarray(img.convert("L"))
    elif mode in ("LA", "La"):
        arr = _over_black(np.asarray(img.convert("LA")))
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        arr = _over_black(np.asarray(img.convert("RGBA")))
    else:  # RGB, P, CMYK, YCbCr, LAB, HSV ...
        arr = np.asarray(img.convert("RGB"))
    if gray and arr.ndim == 3:
        arr = _luma(arr)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(arr)


def _over_black(arr: np.ndarray) -> np.ndarray:
    """(H, W, C+alpha) uint8 -> (H, W, C) uint8 composited on black: transparent pixels carry
    arbitrary colour values that must not reach the model."""
    alpha = arr[..., -1:].astype(np.uint16)
    out = (arr[..., :-1] * alpha + 127) // 255
    out = out.astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _float01(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, keeping the input dtype (same weights as PIL's ``convert("L")``)."""
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if rgb.dtype.kind in "ui":
        return np.clip(np.rint(y), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return y.astype(rgb.dtype)


def value_range(arr: np.ndarray) -> float:
    """The nominal maximum of the array's dtype: 255 for uint8, 65535 for uint16, 1.0 for float."""
    if arr.dtype == np.uint8:
        return 255.0
    if arr.dtype == np.uint16:
        return 65535.0
    return 1.0
