"""Generators of hostile image files for the bad-input tests (each test writes its own)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(mode: str = "RGB", size=(20, 16), fmt: str = "PNG", seed: int = 0, **save) -> bytes:
    """A small real image in ``mode``/``fmt`` (``size`` is width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("I;16", "I"):
        img = Image.fromarray(rng.integers(0, 60000, (h, w)).astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` 8-bit gray pixels (10 GB for the default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(size=(24, 12), orientation: int = 6) -> bytes:
    """A JPEG stored ``size`` (width, height) whose EXIF says: display rotated (6 = 90 degrees CW)."""
    img = Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


# name -> (bytes, substring expected in the reason it is skipped)
def bad_files() -> dict[str, tuple[bytes, str]]:
    jpeg = image_bytes(fmt="JPEG", size=(64, 64), quality=90)
    png = image_bytes(fmt="PNG", size=(64, 64))
    return {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "not a readable image"),
        "notes.jpg": (b"this is a text file, not a photo\n" * 4, "not a readable image"),
        "bomb.png": (png_bomb(), "max_pixels"),
    }


MIXED_MODES = {
    "gray.png": ("L", "PNG"), "alpha.png": ("RGBA", "PNG"), "palette.png": ("P", "PNG"),
    "bilevel.png": ("1", "PNG"), "deep16.png": ("I;16", "PNG"), "cmyk.jpg": ("CMYK", "JPEG"),
    "graya.png": ("LA", "PNG"), "rgb.bmp": ("RGB", "BMP"), "rgb.tif": ("RGB", "TIFF"),
}


def write_mixed_modes(folder: Path, seed: int = 0) -> list[str]:
    """Valid images of many modes and bit depths, plus an EXIF-rotated photo, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (mode, fmt)) in enumerate(MIXED_MODES.items()):
        (folder / name).write_bytes(image_bytes(mode, fmt=fmt, seed=seed + i))
    (folder / "rotated.jpg").write_bytes(exif_rotated_jpeg())
    return [*MIXED_MODES, "rotated.jpg"]
