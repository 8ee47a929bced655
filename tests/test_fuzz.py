"""Fuzzing the two places that read untrusted input: the config loader and the image decoder.

Whatever arrives, the only exceptions that may escape are the documented ones: ``ConfigError`` for
configs and overrides, ``DecodeError`` for image bytes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import RLELossless

from raypipe.config import Config, ConfigError, build_config, load_config
from raypipe.data.decode import DecodeError, decode_image
from raypipe.data.dicom import dicom_bytes

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- config

SECTIONS = list(Config.model_fields)
KEYS = [f"{s}.{k}" for s in SECTIONS
        for k in getattr(Config.model_fields[s].annotation, "model_fields", {})]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
key_text = st.one_of(st.sampled_from(KEYS), st.text(max_size=25))
override_value_text = st.one_of(
    st.text(max_size=30),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)


def _only_config_error(fn) -> None:
    try:
        fn()
    except ConfigError as exc:
        assert str(exc).strip(), "ConfigError without a message"


@FUZZ
@given(st.lists(st.tuples(key_text, override_value_text), max_size=4))
def test_overrides_raise_only_config_error(pairs) -> None:
    overrides = [f"{k}={v}" for k, v in pairs]
    _only_config_error(lambda: load_config(None, overrides))


@FUZZ
@given(st.lists(st.text(max_size=40), max_size=3))
def test_arbitrary_override_strings_raise_only_config_error(overrides) -> None:
    _only_config_error(lambda: load_config(None, overrides))


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=8)),
                       st.one_of(values, st.dictionaries(
                           st.one_of(key_text.map(lambda k: k.split(".")[-1]), st.text(max_size=8)),
                           values, max_size=5)),
                       max_size=4))
def test_config_trees_raise_only_config_error(tree) -> None:
    _only_config_error(lambda: build_config(tree, "fuzz"))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 values.map(lambda v: yaml.safe_dump(v).encode())))
def test_config_files_raise_only_config_error(tmp_path_factory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "fuzz.yaml"
    path.write_bytes(raw)
    _only_config_error(lambda: load_config(path, []))


def test_yaml_with_python_tags_is_refused(tmp_path) -> None:
    """The safe loader never constructs arbitrary Python objects from a config file."""
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, [])
    with pytest.raises(ConfigError):
        load_config(None, ["train.lr=!!python/object/apply:os.getcwd []"])


# ---------------------------------------------------------------- decoder

MAX_PIXELS = 2_000_000  # keeps mutated headers from asking for gigabytes while fuzzing


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8), "RGB")
    out = []
    for img, fmt, kw in (
        (rgb, "PNG", {}), (rgb, "JPEG", {"quality": 80}), (rgb, "GIF", {}), (rgb, "BMP", {}),
        (rgb, "TIFF", {}), (rgb, "WEBP", {}), (rgb.convert("RGBA"), "PNG", {}),
        (rgb.convert("L"), "PNG", {}), (rgb.convert("I;16"), "PNG", {}),
        (rgb.convert("CMYK"), "JPEG", {}), (rgb.convert("F"), "TIFF", {}),
    ):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    film = rng.integers(0, 4096, (12, 10), dtype=np.uint16)
    out += [  # DICOM: 12-bit MONOCHROME1 with rescale and window, RLE, without preamble, RGB
        dicom_bytes(film, photometric="MONOCHROME1", bits_stored=12, slope=2.0, intercept=-1024.0,
                    window=(2000.0, 3000.0)),
        dicom_bytes(film, bits_stored=12, transfer_syntax=RLELossless),
        dicom_bytes(film, bits_stored=12, part10=False),
        dicom_bytes(np.asarray(rgb), photometric="RGB"),
    ]
    return out


SEEDS = _seed_images()


def _decode_or_decode_error(data: bytes, gray: bool) -> None:
    try:
        arr = decode_image(data, max_pixels=MAX_PIXELS, gray=gray, draft_size=8)
    except DecodeError as exc:
        assert str(exc).strip()
        return
    # anything that decodes honours the documented contract
    assert arr.ndim in (2, 3) and (arr.ndim == 2 or arr.shape[2] == 3)
    assert arr.dtype in (np.uint8, np.uint16, np.float32)
    assert arr.shape[0] * arr.shape[1] <= MAX_PIXELS
    if gray:
        assert arr.ndim == 2
    if arr.dtype == np.float32:
        assert np.all(np.isfinite(arr))


@FUZZ
@given(st.binary(max_size=512), st.booleans())
def test_random_bytes_raise_only_decode_error(data: bytes, gray: bool) -> None:
    _decode_or_decode_error(data, gray)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       st.one_of(st.none(), st.integers(0, 10**6)), st.booleans())
def test_mutated_images_raise_only_decode_error(which, flips, cut, gray) -> None:
    data = bytearray(SEEDS[which])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_decode_error(bytes(data), gray)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.integers(0, 10**6))
def test_truncated_images_raise_only_decode_error(which, cut) -> None:
    data = SEEDS[which]
    _decode_or_decode_error(data[: cut % len(data)], False)
