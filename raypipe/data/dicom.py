"""DICOM films: decode them into the values the data stage normalises, and write DICOM files.

Decoding follows the DICOM greyscale pipeline (PS3.4 N.2): stored values -> modality LUT
(``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence) -> VOI (a VOI LUT Sequence or
``WindowCenter``/``WindowWidth``, as ``preprocess.window`` says) -> ``MONOCHROME1`` inverted, so
that low values are dark as in every other format. The result is shifted so that its nominal
range is ``[0, vmax]``: ``vmax`` is ``2**BitsStored - 1`` for plain stored values (4095 for a
12-bit film, not 65535), the rescaled range, the LUT's depth, or 1.0 after a window, and the
array carries it (:class:`~raypipe.data.decode.RangedArray`) wherever it is not the dtype's own
maximum, so that ``value_range`` hands it to the normalisation. Plain 8- and 16-bit films come
out as plain ``uint8`` / ``uint16`` arrays, exactly like the same film as PNG.

The numeric steps are pure numpy kernels (:func:`apply_lut`, :func:`apply_window`,
:func:`to_display`); pydicom parses the file and decompresses the pixel data (imported on first
use, so that workers reading PNG or JPEG never pay for it).

Writing (:func:`dicom_bytes`, :func:`write_dicom`, :func:`convert_folder`) makes DICOM files from
arrays or from an image folder, for tests and for users who want to try a DICOM data set.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypipe.data.decode import (
    DecodeError,
    RangedArray,
    Window,
    _luma,
    decode_image,
    is_dicom,
)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom's pixel_array turns every YBR form into RGB
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # SOP class of the files :func:`dicom_bytes` writes


# ---------------------------------------------------------------- pure kernels


@dataclass(frozen=True)
class Lut:
    """A DICOM lookup table (Modality or VOI LUT Sequence item): input ``first_map`` maps to
    ``table[0]``; outputs are ``bits``-bit unsigned values."""

    first_map: int
    bits: int
    table: np.ndarray


def apply_lut(x: np.ndarray, lut: Lut) -> np.ndarray:
    """HW any real dtype -> HW of ``lut.table``'s dtype: ``table[x - first_map]``, inputs below
    the table taking its first entry and above it its last (PS3.3 C.11.1.1, C.11.2.1.1)."""
    idx = np.rint(x).astype(np.int64) if x.dtype.kind == "f" else x.astype(np.int64)
    idx -= lut.first_map
    np.clip(idx, 0, len(lut.table) - 1, out=idx)
    return lut.table[idx]


def apply_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """HW any real dtype -> HW float32 in [0, 1]: the VOI window of PS3.3 C.11.2.1.2 with output
    range [0, 1]. ``LINEAR``: 0 at and below ``center - 0.5 - (width - 1) / 2``, 1 above
    ``center - 0.5 + (width - 1) / 2``, a straight line between (``width`` >= 1);
    ``LINEAR_EXACT``: the same with ``center`` and ``width`` as they are (``width`` > 0);
    ``SIGMOID``: ``1 / (1 + exp(-4 (x - center) / width))``."""
    xf = x.astype(np.float64, copy=False)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (xf - center) / width))
    elif function in ("LINEAR", "LINEAR_EXACT"):
        c, w = (center - 0.5, width - 1.0) if function == "LINEAR" else (center, width)
        # (x - c) / w + 0.5 is 0 at the window's lower edge and 1 at its upper one; clipping it
        # gives the standard's piecewise definition. width 1 (LINEAR): a step at c
        y = (xf > c).astype(np.float64) if w == 0 else np.clip((xf - c) / w + 0.5, 0.0, 1.0)
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}, expected one of {WINDOW_FUNCTIONS}")
    return y.astype(np.float32)


def to_display(x: np.ndarray, lo: float, hi: float, invert: bool) -> np.ndarray:
    """HW values of nominal range ``[lo, hi]`` -> HW in ``[0, hi - lo]``, dark = 0: ``x - lo``, or
    ``hi - x`` when ``invert`` (``MONOCHROME1``); values outside the range are clipped to it.
    Integer input with an integer range stays integer (``uint8`` when the span fits and the input
    was 8-bit, else ``uint16`` up to 65535), anything else becomes ``float32``."""
    span = hi - lo
    integral = x.dtype.kind in "ui" and float(lo).is_integer() and float(hi).is_integer()
    if integral and span <= 65535:
        out_dtype = np.uint8 if span <= 255 and x.dtype.itemsize == 1 else np.uint16
        if lo == 0 and x.dtype == out_dtype:  # the usual film: stored values kept, no widening
            y = np.minimum(x, out_dtype(hi))
            return np.subtract(out_dtype(hi), y, out=y) if invert else y
        y = x.astype(np.int64)
        y = (int(hi) - y) if invert else (y - int(lo))
        return np.clip(y, 0, int(span)).astype(out_dtype)
    xf = x.astype(np.float64, copy=False)
    y = (hi - xf) if invert else (xf - lo)
    return np.clip(y, 0.0, span).astype(np.float32)


def with_range(x: np.ndarray, vmax: float) -> np.ndarray:
    """``x`` as a plain array when ``vmax`` is its dtype's nominal maximum (what ``value_range``
    assumes for plain arrays), else as a :class:`RangedArray` carrying ``vmax``."""
    nominal = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(x.dtype, 1.0)
    x = np.ascontiguousarray(x)
    return x if float(vmax) == nominal else RangedArray(x, vmax)


def to_stored(img: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Display image (HW ``uint8`` or ``uint16``, dark = 0) -> stored DICOM values at
    ``bits_stored`` bits: shifted left (8-bit source) or right (16-bit source) by the difference
    in depth, then inverted for ``MONOCHROME1`` (``2**bits_stored - 1 - x``), so that a reader
    that applies ``MONOCHROME1`` shows the same film. ``uint8`` out for up to 8 bits, else
    ``uint16``. Decoding the result gives ``img << (bits_stored - 8)`` for an 8-bit source."""
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a uint8 or uint16 image, got {img.dtype}")
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 1..16, got {bits_stored}")
    depth = 8 * img.dtype.itemsize
    x = img.astype(np.uint16)
    x = x << (bits_stored - depth) if bits_stored >= depth else x >> (depth - bits_stored)
    if photometric == "MONOCHROME1":
        x = (2**bits_stored - 1) - x
    return x.astype(np.uint8 if bits_stored <= 8 else np.uint16)


# ---------------------------------------------------------------- decoding


def decode_dicom(
    data: bytes, *, max_pixels: int = 100_000_000, gray: bool = False, window: Window = "auto"
) -> np.ndarray | None:
    """DICOM bytes -> HW film in ``[0, value_range(result)]`` (see the module docstring), or HWC
    RGB for colour DICOMs (``gray``: HW luma). ``window``: ``"auto"`` applies the file's VOI LUT
    Sequence, else its first ``WindowCenter``/``WindowWidth`` (with its ``VOILUTFunction``), else
    nothing; ``"none"`` applies no VOI; ``(center, width)`` applies that LINEAR window to the
    modality values whatever the file holds. Colour DICOMs take no window.

    Raises :class:`DecodeError` naming the reason: no pixel data, several frames, a compression
    whose decoder plugin is not installed, an unsupported photometric interpretation.
    Returns None for bytes without the ``DICM`` preamble in which pydicom finds no DICOM data
    set (the caller tries the other formats).
    """
    _check_window_argument(window)
    ds = _read(data)
    if ds is None:
        return None
    try:
        with warnings.catch_warnings():  # pydicom warns about each odd value it converts
            warnings.simplefilter("ignore")
            photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
            arr = _pixels(ds, max_pixels, photometric)
            if photometric in MONOCHROME:
                x, lo, hi = greyscale(arr, header(ds, voi=window == "auto"), window)
                return with_range(to_display(x, lo, hi, photometric == "MONOCHROME1"), hi - lo)
            return _colour(arr, ds, gray)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("image needs more memory to decode than is available") from None
    except Exception as exc:  # noqa: BLE001 - pydicom converts values lazily: damage shows up here
        raise DecodeError(f"corrupt DICOM data ({type(exc).__name__}: {exc})") from None


def _check_window_argument(window: Window) -> None:
    """A caller's mistake (the config validates ``preprocess.window``), not a bad file."""
    if window in ("auto", "none"):
        return
    if isinstance(window, str) or len(window) != 2 or not float(window[1]) >= 1:
        raise ValueError(f"window: expected 'auto', 'none' or (center, width >= 1), got {window!r}")


@dataclass(frozen=True)
class Header:
    """What the greyscale pipeline needs from a monochrome DICOM's header."""

    bits_stored: int
    signed: bool
    slope: float = 1.0
    intercept: float = 0.0
    modality_lut: Lut | None = None
    voi_lut: Lut | None = None
    window: tuple[float, float, str] | None = None  # the file's first (center, width, function)


def greyscale(stored: np.ndarray, h: Header, window: Window) -> tuple[np.ndarray, float, float]:
    """Stored values -> (modality then VOI values, their nominal low, their nominal high)."""
    b = h.bits_stored
    lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if h.signed else (0, 2**b - 1)
    x = stored
    if h.modality_lut is not None:
        x, lo, hi = apply_lut(x, h.modality_lut), 0, 2**h.modality_lut.bits - 1
    elif (h.slope, h.intercept) != (1.0, 0.0):
        x = x.astype(np.float64) * h.slope + h.intercept
        lo, hi = sorted((lo * h.slope + h.intercept, hi * h.slope + h.intercept))
    if window == "none":
        return x, lo, hi
    if window != "auto":
        center, width = window
        return apply_window(x, float(center), float(width)), 0.0, 1.0
    if h.voi_lut is not None:
        return apply_lut(x, h.voi_lut), 0, 2**h.voi_lut.bits - 1
    if h.window is not None:
        return apply_window(x, *h.window), 0.0, 1.0
    return x, lo, hi


def header(ds, voi: bool = True) -> Header:
    """The greyscale pipeline's parameters from a pydicom Dataset (DecodeError when invalid).
    ``voi``: read the file's VOI LUT and window too (only ``window: auto`` uses them, so that a
    broken window never stops a run that set its own or none)."""
    try:
        bits = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        # DICOM requires both or neither; a file with one alone gets the other's identity value
        slope = _first(ds.get("RescaleSlope"), 1.0)
        intercept = _first(ds.get("RescaleIntercept"), 0.0)
        modality_lut = _lut(ds, "ModalityLUTSequence", signed)
        voi_lut = _lut(ds, "VOILUTSequence", signed) if voi else None
        window = _file_window(ds) if voi else None
    except DecodeError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DecodeError(f"DICOM greyscale attributes are invalid ({type(exc).__name__}: {exc})") from None
    if not 1 <= bits <= 32:
        raise DecodeError(f"DICOM BitsStored is {bits}, expected 1..32: the header is damaged")
    if not all(math.isfinite(v) for v in (slope, intercept, *(window or (0.0, 0.0))[:2])):
        raise DecodeError(
            f"DICOM rescale or window is not finite (RescaleSlope={slope}, RescaleIntercept="
            f"{intercept}, window={window}): fix the file, or set preprocess.window")
    if slope == 0:
        raise DecodeError(
            "DICOM RescaleSlope is 0, which maps every pixel to one value: fix the file's "
            "RescaleSlope (usually 1)")
    return Header(bits, signed, slope, intercept, modality_lut, voi_lut, window)


def _lut(ds, keyword: str, signed_input: bool) -> Lut | None:
    seq = ds.get(keyword)
    if not seq:
        return None
    item = seq[0]
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    if signed_input and first >= 32768:  # stored as US, meant as a signed first input value
        first -= 65536
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW: little-endian words (big-endian syntaxes are retired)
        table = np.frombuffer(raw, "<u2")
    else:  # US: one int or a list of them
        table = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    if bits > 16 or bits < 1 or len(table) < n:
        raise DecodeError(
            f"DICOM {keyword} is invalid: descriptor says {n} entries of {bits} bits, the table "
            f"holds {len(table)}. Fix the LUT or set preprocess.window: none")
    dtype = np.uint8 if bits <= 8 else np.uint16
    return Lut(first, bits, np.minimum(table[:n].astype(np.int64), 2**bits - 1).astype(dtype))


def _file_window(ds) -> tuple[float, float, str] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = (_first(ds[k].value, None) for k in ("WindowCenter", "WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        raise DecodeError(
            f"DICOM VOILUTFunction is {function!r}, expected one of {WINDOW_FUNCTIONS}: fix the "
            "file, or set preprocess.window: none (or [center, width])")
    valid = width >= 1 if function == "LINEAR" else width > 0
    if not valid:
        raise DecodeError(
            f"DICOM WindowWidth is {width:g}, expected {'>= 1' if function == 'LINEAR' else '> 0'} for "
            f"{function}: fix the file's window, or set preprocess.window: none (or [center, width])")
    return center, width, function


def _first(value, default: float | None) -> float | None:
    """A DS value, or the first of several (files may list several windows); ``default`` when
    absent or empty."""
    if value is not None and not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    return default if value in (None, "") else float(value)


def _read(data: bytes):
    """pydicom Dataset of ``data``; None when it has no preamble and is no DICOM image."""
    import pydicom
    from pydicom.datadict import dictionary_has_tag

    part10 = is_dicom(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=not part10)
            keys = list(ds.keys())
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged data
        if not part10:
            return None
        raise DecodeError(
            f"DICOM file cannot be parsed ({type(exc).__name__}: {exc}): it is damaged or "
            "truncated; export it again") from None
    if not part10:
        # force=True makes a data set out of nearly any bytes: accept it only when its first
        # element is a real DICOM attribute and it is an image or at least names its SOP class
        if not keys or not dictionary_has_tag(keys[0]):
            return None
        if "PixelData" not in ds and "SOPClassUID" not in ds:
            return None
        _set_transfer_syntax(ds)
    return ds


def _set_transfer_syntax(ds) -> None:
    """A data set without file meta: its transfer syntax is the encoding pydicom parsed it with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = meta


def _describe(ds) -> str:
    sop = ds.get("SOPClassUID")
    name = getattr(sop, "name", None) or (str(sop) if sop else "unknown SOP class")
    return f"{name}, modality {ds.get('Modality') or 'unknown'}"


def _pixels(ds, max_pixels: int, photometric: str) -> np.ndarray:
    """The decoded pixel array of a single-frame image DICOM, checked before decompressing."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DecodeError(
                f"DICOM file holds float pixel data ({_describe(ds)}), expected an integer "
                "PixelData image (a film); convert it to an integer image or leave it out")
        sop = ds.get("SOPClassUID")
        if sop is None or "Rows" in ds or "Image" in getattr(sop, "name", ""):
            # pydicom stops quietly at the end of a cut file: an image header without pixels
            raise DecodeError(
                f"DICOM file ends before its PixelData ({_describe(ds)}): it is truncated or "
                "damaged; copy or export it again")
        raise DecodeError(
            f"DICOM file holds no image: it has no PixelData ({_describe(ds)}). Only image "
            "DICOMs (films) can be trained on: remove it from the folder or the manifest")
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise DecodeError(
            f"DICOM file is multi-frame ({frames} frames, {_describe(ds)}), expected one image "
            "per file: export the frame to train on as a single-frame file")
    if photometric not in MONOCHROME + COLOUR:
        raise DecodeError(
            f"DICOM PhotometricInterpretation is {photometric or 'missing'!r}, expected "
            f"MONOCHROME1, MONOCHROME2, RGB or YBR_*: convert the image (e.g. PALETTE COLOR to RGB)")
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if rows < 1 or cols < 1:
        raise DecodeError(f"DICOM image has no pixels (Rows={rows}, Columns={cols})")
    if rows * cols > max_pixels:
        raise DecodeError(
            f"image is {cols}x{rows} = {rows * cols} pixels, above data.max_pixels={max_pixels} "
            "(decompression-bomb guard); raise the limit if the file is genuine")
    _check_decoder(ds)
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise DecodeError("image needs more memory to decode than is available") from None
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise anything on corrupt data
        ts = ds.file_meta.TransferSyntaxUID
        raise DecodeError(
            f"DICOM pixel data cannot be decoded ({ts.name}; {type(exc).__name__}: {exc}): the "
            "file is damaged or truncated, or its compression needs another decoder plugin "
            f"({_plugins(ts)})") from None
    want = 2 if photometric in MONOCHROME else 3
    if arr.ndim != want:
        raise DecodeError(
            f"DICOM {photometric} pixel data decoded to shape {arr.shape}, expected "
            f"{'(rows, columns)' if want == 2 else '(rows, columns, 3)'}: the header is inconsistent")
    return arr


def _int(value, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _check_decoder(ds) -> None:
    """A clear error, before any decoding, when the transfer syntax needs a missing plugin."""
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None:
        raise DecodeError("DICOM file meta has no TransferSyntaxUID: the file is damaged; export it again")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DecodeError(
            f"DICOM pixel data uses transfer syntax {ts.name} ({ts}), which pydicom cannot decode "
            "(not an image compression it knows): convert the file to an uncompressed DICOM "
            "(e.g. dcmdjpeg / gdcmconv --raw)") from None
    if not decoder.is_available:
        raise DecodeError(
            f"DICOM pixel data is compressed as {ts.name} ({ts}), and no decoder plugin for it is "
            f"installed: {_plugins(ts)}; or convert the file to an uncompressed DICOM")


def _plugins(ts) -> str:
    """'pip install ...' for the plugins pydicom lists for ``ts`` (pylibjpeg / pyjpegls first:
    their pip names are the ones pydicom gives; gdcm's wheel is python-gdcm)."""
    from pydicom.pixels import get_decoder

    try:
        missing = list(get_decoder(ts).missing_dependencies)
    except NotImplementedError:
        return "none known to pydicom"
    if not missing:
        return "pydicom reports its decoders as installed"
    options = []
    for text in sorted(missing, key=lambda t: t.startswith("gdcm")):
        plugin, _, needs = text.partition(" - requires ")
        pkgs = [p.strip() for p in re.split(r"\band\b", needs) if p.strip() and p.strip() != "numpy"]
        pkgs = ["python-gdcm" + p[len("gdcm"):] if p.startswith("gdcm") else p for p in pkgs]
        options.append(f"pip install {' '.join(repr(p) if '>' in p else p for p in pkgs)} ({plugin})")
    return "install one of: " + "; ".join(options)


def _colour(arr: np.ndarray, ds, gray: bool) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    if arr.dtype.kind != "u":
        raise DecodeError(f"DICOM colour pixel data is {arr.dtype}, expected unsigned integers")
    vmax = float(2 ** min(bits, 8 * arr.dtype.itemsize) - 1)
    x = np.minimum(arr, arr.dtype.type(vmax))
    if gray:
        x = _luma(x)
    return with_range(x, vmax)


# ---------------------------------------------------------------- writing


def dicom_bytes(
    array: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    window_function: str | None = None,
    modality: str = "OT",
    transfer_syntax: str | None = None,
    part10: bool = True,
) -> bytes:
    """An array as the bytes of a Secondary Capture DICOM file, pixels stored as given.

    ``array``: HW (one frame), FHW (``MONOCHROME*`` multi-frame) or HW3 (``RGB``) of ``uint8``,
    ``uint16``, ``int8`` or ``int16`` (signed = ``PixelRepresentation`` 1). ``bits_stored``:
    defaults to the dtype's bits; every value must fit it. ``slope``/``intercept``: write
    ``RescaleSlope``/``RescaleIntercept`` (either one given writes both). ``window``: write
    ``WindowCenter``/``WindowWidth`` (and ``VOILUTFunction`` when ``window_function`` is given).
    ``transfer_syntax``: Explicit VR Little Endian by default; RLE Lossless is encoded by pydicom
    itself. ``part10=False``: no preamble and no file meta, implicit VR (old ACR-NEMA style
    exports). UIDs derive from the content, so the same input gives the same bytes.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import set_pixel_data
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    array = np.asarray(array)
    bits_stored = bits_stored or 8 * array.dtype.itemsize
    seed = hashlib.sha256(array.tobytes() + repr(
        (array.shape, str(array.dtype), photometric, bits_stored, slope, intercept, window,
         window_function, modality, transfer_syntax, part10)).encode()).hexdigest()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.Modality = modality
    ds.ConversionType = "WSD"  # workstation: Secondary Capture's required attribute
    ds.PatientID = ""
    ds.PatientName = ""
    set_pixel_data(ds, array, photometric, bits_stored, generate_instance_uid=False)
    if slope is not None or intercept is not None:
        ds.RescaleSlope = _ds(1.0 if slope is None else slope)
        ds.RescaleIntercept = _ds(0.0 if intercept is None else intercept)
        ds.RescaleType = "US"  # unspecified units
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = _ds(window[0]), _ds(window[1])
        if window_function is not None:
            ds.VOILUTFunction = window_function
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif transfer_syntax not in (None, ExplicitVRLittleEndian):
        raise ValueError(f"transfer_syntax: expected None, {ExplicitVRLittleEndian} or {RLELossless}, "
                         f"got {transfer_syntax}")
    buf = io.BytesIO()
    if part10:
        ds.save_as(buf, enforce_file_format=True)
    else:  # implicit VR little endian, the encoding of data sets without file meta
        del ds.file_meta
        ds.preamble = None
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def _ds(value: float) -> str:
    """A decimal string value (max 16 characters) that reads back exactly for usual values."""
    text = repr(float(value))
    text = text[:-2] if text.endswith(".0") else text
    if len(text) > 16:
        text = f"{float(value):.10g}"
    return text


def write_dicom(path: str | os.PathLike, array: np.ndarray, **options) -> Path:
    """Write ``array`` as a DICOM file at ``path`` (parent folders made); ``options`` are
    :func:`dicom_bytes`'s. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(array, **options))
    return path


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def convert_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    bits_stored: int = 8,
    photometric: str = "MONOCHROME2",
    suffix: str = ".dcm",
    extensions: tuple[str, ...] = IMAGE_SUFFIXES,
    **options,
) -> list[Path]:
    """Every image under ``src`` (any depth, e.g. one folder per class) as a grayscale DICOM file
    at the same relative path under ``dst`` with ``suffix`` (``""``: no extension, as PACS exports
    often are). Pixels: the image's luma (:func:`decode_image` with ``gray=True``) turned into
    stored values by :func:`to_stored` (so decoding gives ``image << (bits_stored - 8)`` for an
    8-bit image, whatever ``photometric``). ``options`` go to :func:`dicom_bytes` (rescale,
    window, ``part10``...). Returns the written paths, sorted."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"convert_folder: source '{src}' is not a folder")
    out = []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in extensions):
        img = decode_image(path.read_bytes(), gray=True)
        if img.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"convert_folder: '{path}' decodes to {img.dtype}, expected 8 or 16 bits")
        rel = path.relative_to(src)
        target = dst / rel.parent / (rel.stem + suffix)
        out.append(write_dicom(target, to_stored(np.asarray(img), bits_stored, photometric),
                               photometric=photometric, bits_stored=bits_stored, **options))
    return out
