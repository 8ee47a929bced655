"""Bytes -> numpy image. Every mode and bit depth PIL reads, DICOM films (through pydicom),
EXIF orientation, size limits.

Contract: :func:`decode_image` returns ``(H, W)`` or ``(H, W, 3)``, dtype ``uint8`` or ``uint16``
(16-bit films keep their depth) or ``float32`` (floating-point TIFFs, rescaled or windowed DICOM),
or raises :class:`DecodeError` whose message says why the file is unusable. Its values lie in
``[0, value_range(result)]``: the dtype's maximum for every PIL format, and a DICOM film's own
range (4095 for a 12-bit film) carried by a :class:`RangedArray`.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, configurable limit below


# ``preprocess.window``: the file's VOI LUT or window (auto), none, or (center, width)
Window = Literal["auto", "none"] | tuple[float, float]


class DecodeError(ValueError):
    """An image file cannot be decoded into a usable array."""


class RangedArray(np.ndarray):
    """An image whose values span ``[0, vmax]`` where ``vmax`` is not its dtype's maximum: a
    12-bit film held in ``uint16`` (``vmax`` 4095), or rescaled DICOM values in ``float32``.

    Views, copies and ``astype`` keep ``vmax`` (the values are the same); arithmetic returns
    plain arrays, because its values no longer have a known range.
    """

    vmax: float

    def __new__(cls, arr: np.ndarray, vmax: float) -> RangedArray:
        obj = np.asarray(arr).view(cls)
        obj.vmax = float(vmax)
        return obj

    def __array_finalize__(self, obj) -> None:
        self.vmax = getattr(obj, "vmax", 1.0)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        inputs = tuple(x.view(np.ndarray) if isinstance(x, RangedArray) else x for x in inputs)
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, RangedArray) else o for o in out)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __reduce__(self):  # keep vmax through pickling (Ray's object store)
        fn, args, state = super().__reduce__()
        return fn, args, (state, self.vmax)

    def __setstate__(self, state) -> None:
        base, self.vmax = state
        super().__setstate__(base)


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
    data: bytes,
    *,
    max_pixels: int = 100_000_000,
    gray: bool = False,
    draft_size: int | None = None,
    window: Window = "auto",
) -> np.ndarray:
    """Decode image bytes.

    ``gray``: return ``(H, W)`` (colour converted with ITU-R 601 luma); else RGB ``(H, W, 3)``
    for colour sources and ``(H, W)`` for grayscale ones (the caller decides channel handling).
    ``draft_size``: for JPEG, let the decoder downscale by a power of two while keeping both
    sides >= ``draft_size`` (much faster for large photos; the exact resize happens later).
    ``window``: for DICOM, ``preprocess.window`` (see :func:`raypipe.data.dicom.decode_dicom`);
    other formats ignore it. Pass the result's :func:`value_range` to the preprocessing.
    """
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    if is_dicom(data) or looks_like_raw_dicom(data):
        from raypipe.data import dicom  # pydicom is imported only where DICOM files arrive

        arr = dicom.decode_dicom(data, max_pixels=max_pixels, gray=gray, window=window)
        if arr is not None:
            return arr
        # a raw-dataset lookalike pydicom cannot make sense of: let PIL try it (TGA has no magic)
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
    """The nominal maximum of a decoded image's values: its own for a :class:`RangedArray` (4095
    for a 12-bit film), else its dtype's: 255 for uint8, 65535 for uint16, 1.0 for float."""
    if isinstance(arr, RangedArray):
        return arr.vmax
    if arr.dtype == np.uint8:
        return 255.0
    if arr.dtype == np.uint16:
        return 65535.0
    return 1.0


# ---------------------------------------------------------------- DICOM detection (no pydicom)

DICM_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"

# value representations an explicit-VR element header may carry (PS3.5 6.2)
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: ``DICM`` right after the 128-byte preamble."""
    return data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def looks_like_raw_dicom(data: bytes) -> bool:
    """Whether ``data`` may be a DICOM data set written without preamble and file meta (old
    ACR-NEMA style exports): its first element is a little-endian group 0002 or 0008 tag with
    an explicit VR, or an implicit-VR length that fits the file. Only a first filter: PNG, JPEG,
    TIFF, BMP, GIF and WebP never pass it, and :func:`raypipe.data.dicom.decode_dicom` confirms
    the rest by parsing, falling back to PIL when the parse finds no DICOM image."""
    if len(data) < 8:
        return False
    group, _ = struct.unpack_from("<HH", data)
    if group not in (0x0002, 0x0008):
        return False
    if data[4:6] in _VRS:
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return length % 2 == 0 and 8 + length <= len(data)
