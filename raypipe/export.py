"""Export a checkpoint as one ONNX or TorchScript file that preprocesses like validation, then check it.

The exported model takes a batch of decoded images, ``(N, H, W, C)`` float32 pixel values at one
fixed size, and returns ``(logits, scores)``. Inside it: the resize from that fixed size when it
can be folded (see :func:`raypipe.export_reference.plan`), the normalisation (divide255 / minmax /
percentile / none), the channel handling, the dataset mean/std, the network with its test-time
augmentation, and the score activation. Everything else (decoding, gray decoding, threshold,
morphology, CLAHE, and a resize that cannot be folded) is the caller's, done by the reference
``preprocess.py`` written beside the model and described step by step in ``preprocess.json``.

Why the resize is a pair of matrices and not ``torch.nn.functional.interpolate``: raypipe's
resample is plain bilinear when it shrinks by less than 2x, where torch's bilinear matches it
(chest films 224 -> 128: 2e-7 of the range), but it box-filters first when it shrinks by 2x or
more, and there torch's does not: on the flowers sample (decoded photos shrunk up to 2.6x to 96)
a trained model's scores moved by up to 0.12 (0.17 with ``antialias=True``). From a fixed input
size the resample is a fixed linear map, ``wy @ img @ wx.T``, whose matrices are built with
raypipe's own sample coordinates: it matches to 4e-7 of the range whatever the factor. Images of
another size cannot take that path, so by default the resize is folded only when every checked
validation image decodes to one size; otherwise ``preprocess.py`` resizes with the same matrices.

The check: the exported file (run by onnxruntime, or ``torch.jit.load``) on real images of the
checkpoint's validation split, fed through the shipped ``preprocess.py``, against the checkpoint
model on raypipe's own decode and :class:`~raypipe.data.transforms.Preprocessor`. Above
``tolerance`` (1e-4) in scores or logits, the export fails.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter

import numpy as np

from raypipe import export_reference
from raypipe.config import Config
from raypipe.data.sources import DataSourceError, Record
from raypipe.evaluate import EvaluationError, load_checkpoint, score_activation, upload_dir
from raypipe.inference import build_model, decode_options, load_image, preprocess, score_batch

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
SPEC_FILE = export_reference.SPEC_FILE
REFERENCE_FILE = "preprocess.py"
TOLERANCE = 1e-4
INPUT_NAME = "image"


class ExportError(EvaluationError):
    """The checkpoint, the options or the data cannot give a faithful export; the message says why."""


class ExportCheckError(ExportError):
    """The exported model's outputs differ from the checkpoint model's by more than the tolerance."""


# ---------------------------------------------------------------- what goes where


def parse_input_size(text: str) -> str | tuple[int, int]:
    """``auto``, ``none`` or ``HxW`` (height x width, as decoded)."""
    t = text.strip().lower()
    if t in ("auto", "none"):
        return t
    try:
        h, w = (int(v) for v in t.split("x"))
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise ExportError(
            f"--input-size '{text}': expected auto, none, or HEIGHTxWIDTH in pixels (e.g. 224x224)."
        ) from None
    return h, w


def build_spec(meta: dict, fmt: str, input_size: tuple[int, int] | None, value_max: float) -> dict:
    """The ``preprocess.json`` content: settings for ``preprocess.py`` and the steps in words."""
    cfg = Config.model_validate(meta["config"])
    pre = cfg.preprocess.model_dump(mode="json")
    where = export_reference.plan(pre, input_size)
    if where["value_max_after_caller"] is not None:
        value_max = where["value_max_after_caller"]
    h, w = where["input_size"]
    spec = {
        "format_version": 1,
        "format": fmt,
        "model_file": FORMATS[fmt],
        "checkpoint": meta["checkpoint"],
        "class_names": list(meta["class_names"]),
        "input": {
            "name": INPUT_NAME, "shape": ["batch", h, w, where["input_channels"]], "layout": "NHWC",
            "dtype": "float32", "value_max": float(value_max),
            "values": "what caller_steps leave, unscaled unless a step scales them",
        },
        "outputs": {"logits": ["batch", len(meta["class_names"])],
                    "scores": ["batch", len(meta["class_names"])],
                    "activation": score_activation(meta)},
        "decode": decode_options(cfg),
        "preprocess": pre,
        "tta": cfg.augment.tta,
        "plan": where,
    }
    spec["caller_steps"], spec["model_steps"] = describe_steps(spec)
    return spec


def describe_steps(spec: dict) -> tuple[list[str], list[str]]:
    """(caller's steps, model's steps), in order, in words precise enough to re-implement them."""
    pre, where, dec, inp = spec["preprocess"], spec["plan"], spec["decode"], spec["input"]
    size, mode = pre["image_size"], pre["resize_mode"]
    caller = [
        "decode with Pillow: Image.open; for JPEG, img.draft('L' if gray else 'RGB', "
        f"({dec['draft_size']}, {dec['draft_size']})) (the decoder may downscale by 2, 4 or 8 while "
        "both sides stay >= that size); load; ImageOps.exif_transpose; 16-bit modes as uint16, "
        "'F' as float32, alpha composited on black, everything else converted to RGB uint8"
        + ("; gray: a JPEG decodes straight to 'L' through the draft (the file's own luma), other "
           "colour files take 0.299 R + 0.587 G + 0.114 B rounded to their integer type"
           if dec["gray"] else ""),
    ]
    resize = (f"resize to {size}x{size} ({mode}): one bilinear pass with pixel-centre coordinates "
              "(x_in = (x_out + 0.5) / scale - 0.5, clamped at the border), after a box filter by "
              "the integer factor when shrinking 2x or more"
              + (", the uncovered border left 0" if mode == "pad" else "")
              + " (preprocess.py: resize; resize_weights gives the same map as two matrices)")
    model: list[str] = []
    if where["resize_in_model"]:
        caller.append(f"the decoded image must be {inp['shape'][1]}x{inp['shape'][2]} (height x "
                      "width); give its pixel values unscaled, as float32, HWC")
        model.append(_range_words(pre, inp, "the whole input image"))
        model.append(resize.replace("resize", "resize from the fixed input size", 1)
                     + "; normalised as (x - lo) / (hi - lo), and 0 where the resize leaves no image")
    elif where["pointwise"]:
        caller.append(resize)
        if where["normalize_in_model"]:
            model.append(_range_words(pre, inp, "the input") + "; x = (x - lo) / (hi - lo)")
        else:
            caller.append(_range_words(pre, inp, "the decoded image before the resize")
                          + "; x = (resized - lo) / (hi - lo), and 0 where the resize leaves no "
                          "image (the range comes from the full image, which the model never sees)")
    else:
        caller.append(resize)
        if pre["threshold"] != "none" or pre["channels"] == 1:
            caller.append("gray: luma 0.299 R + 0.587 G + 0.114 B (float32)")
        if pre["threshold"] == "fixed":
            caller.append(f"threshold: x > {pre['threshold_value']} / 255 * the format maximum")
        elif pre["threshold"] == "otsu":
            caller.append("threshold: x > skimage.filters.threshold_otsu(x) (a constant image: all False)")
        for op in pre["morphology"]:
            caller.append(f"skimage.morphology.{op} with disk({pre['disk_radius']})")
        if pre["threshold"] != "none":
            caller.append("binary -> float32 0/1 (the format maximum becomes 1)")
        if pre["equalize"] == "adapthist":
            caller.append("CLAHE: skimage.exposure.equalize_adapthist(clip(x / maximum, 0, 1))")
        model.append(_range_words(pre, inp, "the input") + "; x = (x - lo) / (hi - lo)")
    if pre["normalize"] == "divide255" and where["normalize_in_model"]:
        caller.append(f"the model divides by {inp['value_max']:g}: multiply images of another format "
                      f"maximum (65535 for 16-bit, 1.0 for float files) by {inp['value_max']:g} / theirs")
    if inp["shape"][3] == 3:
        caller.append("a gray image (H, W) for this 3-channel input: repeat it on 3 channels"
                      + (" (not exact here: the model's percentiles are then taken over the repeated "
                         "values, training's over the one channel; the check measures it only if the "
                         "validation split has gray files)"
                         if pre["normalize"] == "percentile" and where["normalize_in_model"] else ""))
    if inp["shape"][3] == 1 and pre["channels"] == 3:
        model.append("repeat the channel 3 times")
    if pre["mean"] is not None and pre["std"] is not None:
        model.append(f"standardise per channel: (x - {pre['mean']}) / {pre['std']}")
    model.append(f"ResNet ({spec['checkpoint']})"
                 + ("; logits averaged with those of the left-right mirror image (tta: hflip)"
                    if spec["tta"] == "hflip" else ""))
    model.append(f"scores = {spec['outputs']['activation']}(logits)")
    return caller, model


def _range_words(pre: dict, inp: dict, of: str) -> str:
    mode = pre["normalize"]
    if mode == "divide255":
        return f"normalise: lo = 0, hi = {inp['value_max']:g} (the input's format maximum)"
    if mode == "minmax":
        return f"normalise: lo, hi = min and max of {of}"
    if mode == "percentile":
        lo, hi = pre["percentiles"]
        n = export_reference.PERCENTILE_SAMPLES
        return (f"normalise: lo, hi = the {lo:g}th and {hi:g}th percentiles (linear) of {of}, read "
                f"on every k-th row and column, k = ceil(sqrt(values / {n})) when it holds more "
                f"than {n} values; min and max when the two coincide; all 0 for a constant image")
    return "normalise: none (lo = 0, hi = 1)"


# ---------------------------------------------------------------- the module that is exported


def serving_module(meta: dict, state: dict, spec: dict):
    """The checkpoint's network wrapped with the model-side steps of ``spec``."""
    import torch
    from torch import nn

    pre, where, inp = spec["preprocess"], spec["plan"], spec["input"]

    class ServingModel(nn.Module):
        """(N, H, W, C) float32 decoded pixels -> (logits, scores), each (N, classes)."""

        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net.eval()
            self.normalize = pre["normalize"] if where["normalize_in_model"] else "none"
            self.resize = bool(where["resize_in_model"])
            if self.resize:
                wy, wx, iy, ix = export_reference.resize_weights(
                    tuple(where["input_size"]), pre["image_size"], pre["resize_mode"])
                self.register_buffer("wy", torch.from_numpy(wy))
                self.register_buffer("wxt", torch.from_numpy(np.ascontiguousarray(wx.T)))
                self.register_buffer("inside", torch.from_numpy(np.multiply.outer(iy, ix)))
            self.standardise = pre["mean"] is not None and pre["std"] is not None
            if self.standardise:
                c = pre["channels"]
                mean = np.broadcast_to(np.asarray(pre["mean"], np.float32), (c,))
                inv_std = np.float32(1.0) / np.broadcast_to(np.asarray(pre["std"], np.float32), (c,))
                self.register_buffer("mean", torch.from_numpy(mean.copy()).view(1, c, 1, 1))
                self.register_buffer("inv_std", torch.from_numpy(inv_std.copy()).view(1, c, 1, 1))
            self.repeat = inp["shape"][3] == 1 and pre["channels"] == 3
            self.tta = spec["tta"] == "hflip"
            self.sigmoid = spec["outputs"]["activation"] == "sigmoid"

        def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(lo, hi), each (N, 1, 1, 1) float64: training takes them as Python floats."""
            n = x.shape[0]
            zero = torch.zeros_like(x[:, :1, :1, :1], dtype=torch.float64)
            if self.normalize == "divide255":
                return zero, zero + inp["value_max"]
            if self.normalize == "none":
                return zero, zero + 1.0
            flat = x.reshape(n, -1)
            mn = flat.amin(dim=1).to(torch.float64).view(n, 1, 1, 1)
            mx = flat.amax(dim=1).to(torch.float64).view(n, 1, 1, 1)
            if self.normalize == "minmax":
                return mn, mx
            lo, hi = self._percentiles(x)
            lo, hi = lo.view(n, 1, 1, 1), hi.view(n, 1, 1, 1)
            same = hi - lo <= export_reference.EPS * torch.clamp(hi.abs(), min=1.0)
            return torch.where(same, mn, lo), torch.where(same, mx, hi)

        def _percentiles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # sizes from the spec, not the tensor: plain ints keep the traced graph exact
            h, w, c = inp["shape"][1:]
            step = 1
            if h * w * c > export_reference.PERCENTILE_SAMPLES:  # the same pixel grid as training's
                step = math.ceil(math.sqrt(h * w * c / export_reference.PERCENTILE_SAMPLES))
                x = x[:, :, ::step, ::step]
            m = -(-h // step) * -(-w // step) * c
            flat = torch.sort(x.reshape(-1, m), dim=1).values
            out = []
            for q in pre["percentiles"]:
                p = q / 100.0 * (m - 1)
                i = int(math.floor(p))
                a = flat[:, i].to(torch.float64)
                b = flat[:, min(i + 1, m - 1)].to(torch.float64)
                out.append(a + (b - a) * (p - i))
            return out[0], out[1]

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = image.permute(0, 3, 1, 2)
            lo64, hi64 = self._range(x)
            span = hi64 - lo64
            ok = span > export_reference.EPS * torch.clamp(hi64.abs(), min=1.0)
            safe = torch.where(ok, span, torch.ones_like(span))  # no inf even in the unused branch
            scale = torch.where(ok, 1.0 / safe, torch.zeros_like(span)).to(torch.float32)
            lo = lo64.to(torch.float32)
            if self.resize:
                x = (self.wy @ x @ self.wxt - lo * self.inside) * scale
            else:
                x = (x - lo) * scale
            if self.repeat:
                x = x.expand(-1, 3, -1, -1)
            if self.standardise:
                x = (x - self.mean) * self.inv_std
            # standard NCHW strides, as the data pipeline's batches have: a one-channel tensor
            # permuted from NHWC counts as contiguous yet runs other (channels-last) conv kernels
            x = x.clone(memory_format=torch.contiguous_format)
            logits = self.net(x)
            if self.tta:
                logits = (logits + self.net(torch.flip(x, dims=[-1]))) / 2
            scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=1)
            return logits, scores

    return ServingModel(build_model(meta, state)).eval()


def _require(*modules: str) -> None:
    """Fail early, naming the extra to install, when an optional package is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, which is not installed. Install the export "
            "extra: pip install 'raypipe[export]' (or use --format torchscript).")


def write_model(module, spec: dict, folder: str) -> str:
    """Save ``module`` in ``spec['format']`` into ``folder``; the file's path."""
    import torch

    if spec["format"] == "onnx":
        _require("onnx", "onnxscript", "onnxruntime")
    path = os.path.join(folder, spec["model_file"])
    example = torch.zeros([2] + spec["input"]["shape"][1:], dtype=torch.float32)
    with torch.no_grad():
        if spec["format"] == "onnx":
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[INPUT_NAME],
                output_names=["logits", "scores"], dynamic_shapes={"image": {0: batch}}, verbose=False)
            program.save(path, external_data=False)
        else:
            with warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.export, yet it is what TorchScript is
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(module, example, check_trace=False)
                torch.jit.save(traced, path)
    return path


def load_runner(folder: str, spec: dict):
    """``run(batch) -> (logits, scores)`` for the model file in ``folder``."""
    path = os.path.join(folder, spec["model_file"])
    if spec["format"] == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda x: tuple(session.run(None, {spec["input"]["name"]: x}))
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # see write_model
        model = torch.jit.load(path, map_location="cpu").eval()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits, scores = model(torch.from_numpy(x))
        return logits.numpy(), scores.numpy()

    return run


def import_reference(folder: str):
    """The ``preprocess.py`` written in ``folder``, imported from that file."""
    path = os.path.join(folder, REFERENCE_FILE)
    mod_spec = importlib.util.spec_from_file_location(f"_raypipe_export_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the check


def check_records(cfg: Config, n: int) -> tuple[object, list[Record], str]:
    """(filesystem, ``n`` validation images spread evenly over the split in key order, their
    source): every class and, in a folder of mixed originals, more than one kind of file."""
    from raypipe.data.sources import discover

    try:
        split = discover(cfg.data)
    except DataSourceError as exc:
        raise ExportError(
            f"cannot rebuild the checkpoint's validation split to check the export against: {exc} "
            "The check needs the training data where the checkpoint's config says it is.") from exc
    if not split.val:
        raise ExportError(f"the validation split of {split.source} is empty: nothing to check the export on.")
    records = sorted(split.val, key=lambda r: r.key)
    picks = np.unique(np.linspace(0, len(records) - 1, min(n, len(records))).round().astype(int))
    return split.filesystem, [records[i] for i in picks], split.source


def read_records(fs, records: list[Record]) -> list[tuple[str, bytes]]:
    out = []
    for r in records:
        with fs.open_input_file(r.path) as f:
            out.append((r.key, f.read()))
    return out


def checkpoint_outputs(meta: dict, state: dict, files: list[tuple[str, bytes]]) -> dict[str, tuple]:
    """key -> (logits, scores) of the checkpoint model on raypipe's decode + Preprocessor; files
    that do not decode are left out (as the data pipeline skips them)."""
    cfg = Config.model_validate(meta["config"])
    model = build_model(meta, state)
    out = {}
    for key, data in files:
        try:
            img, vmax = load_image(data, cfg, key)
        except EvaluationError:
            continue
        logits, scores = score_batch(model, preprocess(img, vmax, cfg)[None], cfg.augment.tta,
                                     score_activation(meta))
        out[key] = (logits[0], scores[0])
    return out


def exported_outputs(folder: str, spec: dict, files: list[tuple[str, bytes]],
                     keys: set[str]) -> tuple[dict[str, tuple], dict[str, tuple[int, int]]]:
    """key -> (logits, scores) of the exported file on the shipped ``preprocess.py``'s input;
    and key -> decoded size of the images the model does not take (a folded resize)."""
    ref = import_reference(folder)
    run = load_runner(folder, spec)
    out, other_size = {}, {}
    for key, data in files:
        if key not in keys:
            continue
        img = ref.decode(data, spec)
        if spec["plan"]["resize_in_model"] and img.shape[:2] != tuple(spec["plan"]["input_size"]):
            other_size[key] = img.shape[:2]
            continue
        logits, scores = run(ref.prepare(img, spec)[None])
        out[key] = (logits[0], scores[0])
    return out, other_size


def verify(folder: str, spec: dict, expected: dict[str, tuple], files: list[tuple[str, bytes]],
           tolerance: float = TOLERANCE) -> dict:
    """Compare the export in ``folder`` with the checkpoint's ``expected`` outputs; raise
    :class:`ExportCheckError` above ``tolerance``. Returns the figures."""
    got, other_size = exported_outputs(folder, spec, files, set(expected))
    if not got:
        h, w = spec["plan"]["input_size"]
        sizes = Counter(other_size.values())
        seen = ", ".join(f"{hh}x{ww} ({n})" for (hh, ww), n in sizes.most_common(3))
        seen += ", ..." if len(sizes) > 3 else ""
        raise ExportCheckError(
            f"none of the {len(expected)} checked validation images is {h}x{w} (height x width) "
            f"after decoding, the size this model takes (they are {seen}): nothing to check "
            "it on. Export with --input-size none (the resize stays in preprocess.py) or with the "
            "size your images decode to.")
    keys = sorted(got)
    d_scores = np.array([np.abs(got[k][1] - expected[k][1]).max() for k in keys])
    d_logits = np.array([np.abs(got[k][0] - expected[k][0]).max() for k in keys])
    worst = keys[int(np.argmax(d_scores))]
    figures = {"images": len(keys), "other_size_skipped": len(other_size),
               "max_abs_diff_scores": float(d_scores.max()),
               "max_abs_diff_logits": float(d_logits.max()),
               "worst_image": worst, "tolerance": tolerance}
    if figures["max_abs_diff_scores"] > tolerance or figures["max_abs_diff_logits"] > tolerance:
        raise ExportCheckError(
            f"the exported {spec['format']} model differs from the checkpoint model by "
            f"{figures['max_abs_diff_scores']:.3g} in scores and {figures['max_abs_diff_logits']:.3g} "
            f"in logits (tolerance {tolerance:g}) on {len(keys)} validation images (worst: {worst}). "
            "The file does not reproduce the checkpoint: re-export it, and if it persists, report it "
            "with preprocess.json.")
    return figures


# ---------------------------------------------------------------- entry point


def export(checkpoint: str, fmt: str, out: str, input_size: str = "auto", check_images: int = 64,
           tolerance: float = TOLERANCE) -> dict:
    """Export ``checkpoint`` as ``fmt`` (onnx | torchscript) into ``out`` with ``preprocess.json``
    and ``preprocess.py``, after checking it on up to ``check_images`` validation images.
    Returns the written spec (with the check's figures under ``check``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format '{fmt}': expected one of {sorted(FORMATS)}.")
    size = parse_input_size(input_size)
    if check_images < 1:
        raise ExportError(f"--check-images {check_images}: the check needs at least 1 image.")
    meta, state = load_checkpoint(checkpoint)
    cfg = Config.model_validate(meta["config"])
    fs, records, source = check_records(cfg, check_images)
    files = read_records(fs, records)
    expected = checkpoint_outputs(meta, state, files)
    if not expected:
        raise ExportError(f"none of the {len(files)} validation images from {source} could be decoded.")
    folded, value_max = _input_choice(size, cfg, files, set(expected))
    spec = build_spec(meta, fmt, folded, value_max)
    if size not in ("auto", "none") and not spec["plan"]["resize_in_model"]:
        raise ExportError(
            f"--input-size {input_size}: this checkpoint's preprocessing (threshold "
            f"{cfg.preprocess.threshold}, morphology {cfg.preprocess.morphology}, equalize "
            f"{cfg.preprocess.equalize}) runs scikit-image steps after the resize, so the resize "
            "cannot move into the model. Use --input-size none.")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_model(serving_module(meta, state, spec), spec, tmp)
        export_s = time.perf_counter() - t0
        shutil.copyfile(export_reference.__file__, os.path.join(tmp, REFERENCE_FILE))
        _write_spec(spec, tmp)
        t0 = time.perf_counter()
        spec["check"] = verify(tmp, spec, expected, files, tolerance)
        spec["check"].update(source=f"{source} (validation split)", export_s=round(export_s, 2),
                             check_s=round(time.perf_counter() - t0, 2))
        _write_spec(spec, tmp)
        upload_dir(tmp, out)
    spec["out"] = out
    return spec


def _input_choice(size, cfg: Config, files: list[tuple[str, bytes]],
                  keys: set[str]) -> tuple[tuple[int, int] | None, float]:
    """(the fixed input size to fold the resize from, or None; the model's value maximum)."""
    spec = {"decode": decode_options(cfg)}
    shapes, maxima = Counter(), Counter()
    for key, data in files:
        if key in keys:
            img = export_reference.decode(data, spec)
            shapes[img.shape[:2]] += 1
            maxima[export_reference.value_max(img)] += 1
    value_max = maxima.most_common(1)[0][0] if len(maxima) == 1 else 255.0
    if size == "none":
        return None, value_max
    if size == "auto":
        if len(shapes) == 1:
            return tuple(next(iter(shapes))), value_max
        log.info("validation images decode to %d different sizes (e.g. %s): the resize stays in "
                 "preprocess.py", len(shapes), ", ".join(f"{h}x{w}" for h, w in list(shapes)[:3]))
        return None, value_max
    return size, value_max


def _write_spec(spec: dict, folder: str) -> None:
    with open(os.path.join(folder, SPEC_FILE), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
