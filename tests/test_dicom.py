"""DICOM films through ``decode_image``: stored values at 8/12/16 bits and the range handed to the
normalisation, the modality LUT, VOI windows and LUTs, MONOCHROME1, the errors, detection without
preamble (extension-less files in a manifest), and the writer. Files are written here with pydicom
(``raypipe.data.dicom``) from synthetic arrays and, when ``../shared/data`` is there, from real
chest films."""

from __future__ import annotations

import io
import pickle
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from raypipe.config import DataConfig, PreprocessConfig
from raypipe.data.decode import DecodeError, RangedArray, decode_image, value_range
from raypipe.data.dicom import apply_window, convert_folder, dicom_bytes, to_stored, write_dicom
from raypipe.data.sources import list_folder_per_class, list_manifest
from raypipe.data.transforms import Preprocessor


def _film(h: int = 23, w: int = 31, seed: int = 0) -> np.ndarray:
    """An 8-bit 'film' holding 0 and 255: a gradient with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.clip(xx * 255 // (w - 1) + rng.integers(-20, 21, (h, w)), 0, 255).astype(np.uint8)
    arr[0, 0], arr[0, 1] = 0, 255
    return arr


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _reference_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) with output range [0, 1], written out piece by piece."""
    x = x.astype(np.float64)
    below = x <= center - 0.5 - (width - 1) / 2
    above = x > center - 0.5 + (width - 1) / 2
    mid = ((x - (center - 0.5)) / (width - 1) + 0.5)
    return np.where(below, 0.0, np.where(above, 1.0, mid))


def _edit(data: bytes, **elements) -> bytes:
    """``data`` with some elements set (keyword=value) or removed (keyword=None)."""
    ds = dcmread(io.BytesIO(data))
    for k, v in elements.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _lut_item(first: int, bits: int, table: np.ndarray, vr: str) -> Dataset:
    """A LUT Sequence item whose LUTData is US (a list of values) or OW (little-endian words)."""
    item = Dataset()
    item.LUTDescriptor = [len(table) % 65536, first, bits]
    value = [int(v) for v in table] if vr == "US" else table.astype("<u2").tobytes()
    item.add_new("LUTData", vr, value)
    return item


# ---------------------------------------------------------------- stored values and range


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_stored_values_come_back_at_their_depth(bits, photometric):
    film = _film()
    stored = to_stored(film, bits, photometric)
    out = decode_image(dicom_bytes(stored, photometric=photometric, bits_stored=bits))
    expected = (film.astype(np.uint16) << (bits - 8)).astype(np.uint8 if bits == 8 else np.uint16)
    if photometric == "MONOCHROME1":  # the file really holds the inverted film
        assert not np.array_equal(stored, expected)
    assert out.dtype == expected.dtype and out.shape == film.shape
    np.testing.assert_array_equal(out, expected)
    assert value_range(out) == 2**bits - 1
    # plain arrays wherever the dtype says the range, so 8/16-bit films are PNG-like
    assert isinstance(out, RangedArray) == (bits == 12)


def test_twelve_bit_film_is_normalised_by_4095_not_65535():
    stored = np.array([[0, 4095], [2048, 4095]], np.uint16)
    out = decode_image(dicom_bytes(stored, bits_stored=12))
    x = Preprocessor(PreprocessConfig(image_size=8, channels=1))(out, value_range(out))
    assert x.max() == pytest.approx(1.0) and x.min() == 0.0
    film = _film()
    out = decode_image(dicom_bytes(to_stored(film, 12), bits_stored=12))
    pre = Preprocessor(PreprocessConfig(image_size=16, channels=1, normalize="divide255"))
    plain = film.astype(np.uint16) << 4
    np.testing.assert_array_equal(pre(out, value_range(out)), pre(plain, 4095.0))
    assert not np.allclose(pre(out, value_range(out)), pre(plain, 65535.0))


@pytest.mark.parametrize("normalize", ["percentile", "minmax"])
@pytest.mark.parametrize("bits", [12, 16])
def test_deeper_film_normalises_to_the_same_input_as_its_8_bit_png(normalize, bits):
    # x << k scales by a power of two, which float arithmetic keeps exactly: same output
    film = _film(40, 52)
    cfg = PreprocessConfig(image_size=24, channels=1, normalize=normalize)
    png = decode_image(_png(film))
    dcm = decode_image(dicom_bytes(to_stored(film, bits, "MONOCHROME1"), photometric="MONOCHROME1",
                                   bits_stored=bits))
    np.testing.assert_array_equal(Preprocessor(cfg)(dcm, value_range(dcm)),
                                  Preprocessor(cfg)(png, value_range(png)))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalize", ["divide255", "percentile"])
def test_8_bit_dicom_preprocesses_exactly_like_the_same_film_as_png(channels, normalize):
    film = _film(50, 37, seed=3)
    cfg = PreprocessConfig(image_size=32, channels=channels, normalize=normalize, mean=[0.5], std=[0.25])
    png = decode_image(_png(film), gray=channels == 1)
    dcm = decode_image(dicom_bytes(film), gray=channels == 1)
    assert type(dcm) is np.ndarray and dcm.dtype == np.uint8
    np.testing.assert_array_equal(Preprocessor(cfg)(dcm, value_range(dcm)),
                                  Preprocessor(cfg)(png, value_range(png)))


def test_png_and_jpeg_decode_to_plain_arrays_as_before():
    out = decode_image(_png(_film()))
    assert type(out) is np.ndarray and value_range(out) == 255.0
    arr16 = (_film().astype(np.uint16) << 4)
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, "PNG")
    out = decode_image(buf.getvalue())
    assert type(out) is np.ndarray and value_range(out) == 65535.0


def test_ranged_array_keeps_its_range_through_views_and_pickling_not_arithmetic():
    r = RangedArray(np.arange(12, dtype=np.uint16).reshape(3, 4), 4095)
    assert value_range(r[1:, ::2]) == 4095 and value_range(r.T) == 4095
    assert value_range(r.astype(np.float32)) == 4095  # same values, same range
    assert type(r * 2) is np.ndarray and type(np.subtract(r, 1.0, dtype=np.float32)) is np.ndarray
    back = pickle.loads(pickle.dumps(r))
    assert isinstance(back, RangedArray) and back.vmax == 4095
    np.testing.assert_array_equal(back, r)


# ---------------------------------------------------------------- modality LUT


def test_rescale_slope_and_intercept_are_applied_then_shifted_to_zero():
    stored = to_stored(_film(), 12)
    out = decode_image(dicom_bytes(stored, bits_stored=12, slope=2.0, intercept=-1024.0))
    # modality values 2s - 1024 over the nominal [-1024, 7166]: shifted by -(-1024)
    assert out.dtype == np.float32 and value_range(out) == 2 * 4095
    np.testing.assert_array_equal(out, 2.0 * stored)
    out = decode_image(dicom_bytes(stored, bits_stored=12, slope=-1.0, intercept=4095.0))
    np.testing.assert_array_equal(out, 4095.0 - stored)  # a negative slope turns the film over
    assert value_range(out) == 4095
    # identity rescale tags: the stored values, their dtype and range untouched
    out = decode_image(dicom_bytes(stored, bits_stored=12, slope=1.0, intercept=0.0))
    assert out.dtype == np.uint16 and value_range(out) == 4095
    np.testing.assert_array_equal(out, stored)


def test_signed_ct_values_with_intercept():
    rng = np.random.default_rng(1)
    stored = rng.integers(-2048, 2048, (9, 11)).astype(np.int16)
    out = decode_image(dicom_bytes(stored, bits_stored=12, slope=1.0, intercept=-1024.0, modality="CT"))
    # Hounsfield units stored - 1024 over [-3072, 1023]; dark = -3072
    np.testing.assert_array_equal(out, stored.astype(np.float32) + 2048)
    assert value_range(out) == 4095
    out = decode_image(dicom_bytes(stored, bits_stored=12))  # no rescale: integers stay integers
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, stored.astype(np.int32) + 2048)


def test_modality_lut_sequence():
    stored = to_stored(_film(), 12)
    table = (np.sqrt(np.arange(4096)) * 1000).astype(np.uint16)  # 16-bit output, nonlinear
    data = _edit(dicom_bytes(stored, bits_stored=12),
                 ModalityLUTSequence=Sequence([_lut_item(0, 16, table, "OW")]))
    out = decode_image(data, window="none")
    np.testing.assert_array_equal(out, table[stored])
    assert out.dtype == np.uint16 and value_range(out) == 65535


# ---------------------------------------------------------------- VOI


def test_file_window_is_applied_in_auto_only():
    stored = to_stored(_film(), 12)
    data = dicom_bytes(stored, bits_stored=12, window=(2000.0, 1500.0))
    out = decode_image(data)
    assert out.dtype == np.float32 and value_range(out) == 1.0
    np.testing.assert_allclose(out, _reference_window(stored, 2000.0, 1500.0), atol=1e-6)
    assert 0 < (out == 0).sum() and 0 < (out == 1).sum()  # the window really clips both ends
    np.testing.assert_array_equal(decode_image(data, window="none"), stored)
    # a configured window replaces the file's
    out = decode_image(data, window=(1000.0, 800.0))
    np.testing.assert_allclose(out, _reference_window(stored, 1000.0, 800.0), atol=1e-6)


def test_window_acts_on_modality_values_and_monochrome1_inverts_after_it():
    stored = to_stored(_film(), 12, "MONOCHROME1")
    data = dicom_bytes(stored, photometric="MONOCHROME1", bits_stored=12, slope=0.5,
                       intercept=-100.0, window=(700.0, 900.0))
    out = decode_image(data)
    np.testing.assert_allclose(out, 1.0 - _reference_window(stored * 0.5 - 100.0, 700.0, 900.0),
                               atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_from_the_file(function):
    stored = to_stored(_film(), 12)
    out = decode_image(dicom_bytes(stored, bits_stored=12, window=(2048.0, 1000.0),
                                   window_function=function))
    x = stored.astype(np.float64)
    if function == "SIGMOID":
        ref = 1.0 / (1.0 + np.exp(-4.0 * (x - 2048.0) / 1000.0))
    else:
        ref = np.where(x <= 1548.0, 0.0, np.where(x > 2548.0, 1.0, (x - 2048.0) / 1000.0 + 0.5))
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_width_one_linear_window_is_a_step_at_center_minus_half():
    x = np.array([[99.0, 99.5, 99.6, 100.0]], np.float32)
    np.testing.assert_array_equal(apply_window(x, 100.0, 1.0), [[0.0, 0.0, 1.0, 1.0]])


def test_voi_lut_sequence_wins_over_the_window_in_auto():
    stored = to_stored(_film(), 12)
    table = (np.arange(3000) // 12).astype(np.uint8)  # 8-bit output; inputs >= 3100 take the last
    data = _edit(dicom_bytes(stored, bits_stored=12, window=(2000.0, 1500.0)),
                 VOILUTSequence=Sequence([_lut_item(100, 8, table, "US")]))
    out = decode_image(data)
    expected = table[np.clip(stored.astype(np.int64) - 100, 0, len(table) - 1)]
    assert type(out) is np.ndarray and out.dtype == np.uint8  # an 8-bit LUT: the PNG-like range
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(decode_image(data, window="none"), stored)


# ---------------------------------------------------------------- other encodings


def test_rle_lossless_decodes_natively():
    stored = to_stored(_film(), 16)
    data = dicom_bytes(stored, transfer_syntax=RLELossless)
    assert dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(decode_image(data), stored)


def test_rgb_dicom_decodes_like_the_rgb_png():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    data = dicom_bytes(rgb, photometric="RGB")
    np.testing.assert_array_equal(decode_image(data), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(data, gray=True), decode_image(buf.getvalue(), gray=True))


def test_dicom_without_preamble_decodes():
    stored = to_stored(_film(), 12, "MONOCHROME1")
    data = dicom_bytes(stored, photometric="MONOCHROME1", bits_stored=12, part10=False)
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    np.testing.assert_array_equal(decode_image(data), _film().astype(np.uint16) << 4)


def test_raw_dicom_lookalikes_go_to_pil_or_fail_as_unreadable():
    # a TGA with an 8-byte id field starts like an implicit-VR group 0008 element
    buf = io.BytesIO()
    Image.fromarray(_film(), "L").save(buf, "TGA", id_section=b"abcdefgh")
    assert buf.getvalue()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(decode_image(buf.getvalue()), _film())
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"\x08\x00" + bytes(200))


# ---------------------------------------------------------------- errors


def test_multi_frame_is_rejected():
    frames = np.stack([_film(), _film(seed=1)])
    with pytest.raises(DecodeError, match=r"multi-frame \(2 frames.*single-frame"):
        decode_image(dicom_bytes(frames))


def test_structured_report_without_pixel_data_is_rejected():
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DecodeError, match=r"no PixelData \(Basic Text SR Storage, modality SR\).*remove it"):
        decode_image(buf.getvalue())


def test_truncated_file_says_so():
    data = dicom_bytes(to_stored(_film(), 12), bits_stored=12)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[:400])
    with pytest.raises(DecodeError, match="less than expected.*damaged or truncated"):
        decode_image(data[:-10])


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEGLosslessSV1])
def test_compression_without_its_plugin_names_the_plugin(syntax):
    if get_decoder(syntax).is_available:
        pytest.skip(f"a {syntax.name} decoder is installed here")
    ds = dcmread(io.BytesIO(dicom_bytes(to_stored(_film(), 12), bits_stored=12)))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(32)])  # never decoded
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DecodeError, match=re.escape(syntax.name) + r".*no decoder plugin.*"
                                          r"pip install 'pylibjpeg>=2.0' 'pylibjpeg-libjpeg>=2.1'"):
        decode_image(buf.getvalue())


def test_max_pixels_applies_before_decoding():
    with pytest.raises(DecodeError, match=r"31x23 = 713 pixels, above data.max_pixels=700"):
        decode_image(dicom_bytes(_film()), max_pixels=700)


def test_invalid_window_width_in_the_file_names_the_fix():
    data = dicom_bytes(to_stored(_film(), 12), bits_stored=12, window=(2000.0, 0.0))
    with pytest.raises(DecodeError, match=r"WindowWidth is 0.*preprocess.window: none"):
        decode_image(data)
    assert decode_image(data, window="none").dtype == np.uint16


def test_a_bad_window_argument_is_a_caller_error_not_a_bad_file():
    data = dicom_bytes(to_stored(_film(), 12), bits_stored=12)
    for window in ("lung", (100.0, 0.5), (1.0, 2.0, 3.0)):
        with pytest.raises(ValueError, match="expected 'auto', 'none' or") as info:
            decode_image(data, window=window)
        assert not isinstance(info.value, DecodeError)


def test_palette_colour_is_rejected_with_the_conversion_to_make():
    data = _edit(dicom_bytes(_film()), PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(DecodeError, match="PALETTE COLOR.*expected MONOCHROME1, MONOCHROME2, RGB"):
        decode_image(data)


# ---------------------------------------------------------------- folders and manifests


def test_extension_less_dicom_in_a_manifest_decodes(tmp_path):
    films = {"a": _film(seed=1), "b": _film(seed=2)}
    write_dicom(tmp_path / "films" / "a", to_stored(films["a"], 12), bits_stored=12)
    write_dicom(tmp_path / "films" / "b", to_stored(films["b"], 16, "MONOCHROME1"),
                photometric="MONOCHROME1", part10=False)
    (tmp_path / "labels.csv").write_text("path,label\nfilms/a,normal\nfilms/b,effusion\n")
    fs, classes, records, skipped = list_manifest(str(tmp_path / "labels.csv"), DataConfig())
    assert not skipped and [r.key for r in records] == ["films/a", "films/b"]
    for r in records:
        with fs.open_input_file(r.path) as f:
            out = decode_image(f.read())
        name = r.key.split("/")[-1]
        np.testing.assert_array_equal(out, films[name].astype(np.uint16) << (12 if name == "a" else 16) - 8)


def test_convert_folder_gives_a_folder_the_default_listing_takes(tmp_path):
    src = tmp_path / "png"
    for cls, seed in (("normal", 0), ("effusion", 1)):
        (src / cls).mkdir(parents=True)
        Image.fromarray(_film(seed=seed)).save(src / cls / "x.png")
    written = convert_folder(src, tmp_path / "dcm", bits_stored=12, photometric="MONOCHROME1")
    written[1].rename(written[1].with_suffix(".dicom"))
    assert DataConfig().extensions[-2:] == [".dcm", ".dicom"]
    fs, classes, records, skipped = list_folder_per_class(str(tmp_path / "dcm"), DataConfig())
    assert classes == ["effusion", "normal"] and not skipped
    assert [r.key for r in records] == ["effusion/x.dcm", "normal/x.dicom"]
    for r, seed in zip(records, (1, 0), strict=True):
        with fs.open_input_file(r.path) as f:
            np.testing.assert_array_equal(decode_image(f.read()), _film(seed=seed).astype(np.uint16) << 4)


# ---------------------------------------------------------------- real films


def _real_films(shared_data, tmp_path, n_per_class: int = 2):
    """A few real chest films (one full-size 'native_' one among them) copied to a folder."""
    root = shared_data / "chest-xray-sample"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    src = tmp_path / "src"
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((root / cls).glob("*.jpeg"))
        picks = files[:n_per_class - 1] + [f for f in files if f.name.startswith("native_")][:1]
        (src / cls).mkdir(parents=True)
        for f in picks:
            shutil.copy(f, src / cls / f.name)
    return src


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_real_films_round_trip(shared_data, tmp_path, bits, photometric):
    src = _real_films(shared_data, tmp_path)
    written = convert_folder(src, tmp_path / "dcm", bits_stored=bits, photometric=photometric)
    sources = sorted(p for p in src.rglob("*.jpeg"))
    assert len(written) == len(sources) >= 2
    for path, dcm in zip(sources, written, strict=True):
        film = decode_image(path.read_bytes(), gray=True)
        out = decode_image(dcm.read_bytes())
        np.testing.assert_array_equal(out, film.astype(np.uint16) << (bits - 8))
        assert value_range(out) == 2**bits - 1


def test_real_films_with_rescale_and_window_tags(shared_data, tmp_path):
    src = _real_films(shared_data, tmp_path, n_per_class=1)
    # modality values 0.5 * stored - 200; a window on them around the films' middle grey
    written = convert_folder(src, tmp_path / "dcm", bits_stored=12, slope=0.5, intercept=-200.0,
                             window=(700.0, 1200.0))
    for path, dcm in zip(sorted(src.rglob("*.jpeg")), written, strict=True):
        stored = (decode_image(path.read_bytes(), gray=True).astype(np.uint16) << 4)
        ref = _reference_window(stored * 0.5 - 200.0, 700.0, 1200.0)
        np.testing.assert_allclose(decode_image(dcm.read_bytes()), ref, atol=1e-6)
        np.testing.assert_array_equal(decode_image(dcm.read_bytes(), window="none"), stored * 0.5)


def test_real_film_as_8_bit_dicom_preprocesses_like_the_film_as_png(shared_data, tmp_path):
    src = _real_films(shared_data, tmp_path, n_per_class=1)
    cfg = PreprocessConfig(image_size=64, channels=1, normalize="percentile")
    for path in sorted(src.rglob("*.jpeg")):
        film = decode_image(path.read_bytes(), gray=True)
        png, dcm = decode_image(_png(film)), decode_image(dicom_bytes(film, modality="DX"))
        np.testing.assert_array_equal(Preprocessor(cfg)(dcm, value_range(dcm)),
                                      Preprocessor(cfg)(png, value_range(png)))


# ---------------------------------------------------------------- the data stage


def test_the_data_stage_decodes_dicom_with_the_configured_window(tmp_path):
    """ImageProcessor (called directly, no Ray) passes ``preprocess.window`` to the decode."""
    import pyarrow.fs as pafs

    from raypipe.config import Config
    from raypipe.data.pipeline import ImageProcessor, records_table
    from raypipe.data.sources import Record

    stored = to_stored(_film(), 12)
    path = write_dicom(tmp_path / "film", stored, bits_stored=12, window=(2000.0, 1500.0))
    table = records_table([Record(str(path), 0, "film")])
    batch = {"id": np.array([0])}
    outputs = {}
    for window in ("auto", "none", (1000.0, 800.0)):
        cfg = Config.model_validate({"preprocess": {"image_size": 16, "channels": 1,
                                                    "normalize": "divide255", "window": window}})
        proc = ImageProcessor(pafs.LocalFileSystem(), cfg.to_dict(), ledger=None, records=table)
        out = proc(batch)
        assert out["image"].shape == (1, 1, 16, 16)
        img = decode_image(path.read_bytes(), window=window)
        expected = Preprocessor(cfg.preprocess)(img, value_range(img))
        np.testing.assert_array_equal(out["image"][0], expected.transpose(2, 0, 1))
        outputs[str(window)] = out["image"][0]
    assert not np.allclose(outputs["auto"], outputs["none"])
    assert not np.allclose(outputs["auto"], outputs[str((1000.0, 800.0))])
