"""Score new images with a checkpoint: ``predict(checkpoint, source, out)``.

One image is scored in this process, without starting Ray: decode, the checkpoint's validation
preprocessing (:class:`raypipe.data.transforms.Preprocessor`), the model (with the checkpoint's
test-time augmentation). A folder, a bucket prefix (``s3://...``) or a CSV manifest goes through
Ray Data on the evaluate job's batch path (:func:`raypipe.evaluate.predict`: preprocessing
actors, then one model actor). Both give the same scores for the same file.

The table has one row per image: ``path``, ``score_<class>`` for each of the checkpoint's
``class_names`` and ``predicted_label``; written as CSV or Parquet by ``out``'s extension.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile

import numpy as np
import pyarrow.fs as pafs

from raypipe.config import Config
from raypipe.data.decode import DecodeError, decode_image, value_range
from raypipe.data.sources import DataSourceError, get_filesystem
from raypipe.evaluate import (
    EvaluationError,
    list_eval_data,
    load_checkpoint,
    predicted_labels,
    score_activation,
    scores_from_logits,
)

log = logging.getLogger(__name__)

TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class PredictionError(EvaluationError):
    """The image, the source or the output asked for is unusable; the message says how to fix it."""


# ---------------------------------------------------------------- one image, no Ray


def decode_options(cfg: Config) -> dict:
    """The flags the data pipeline decodes with for ``cfg``: gray decoding when the model takes
    one channel and no threshold needs colour, JPEG drafting down to ``image_size``."""
    p = cfg.preprocess
    return {"gray": p.channels == 1 and p.threshold == "none", "draft_size": p.image_size,
            "max_pixels": cfg.data.max_pixels}


def read_file(uri: str) -> bytes:
    """The bytes of one file, local or in object storage."""
    fs, path = get_filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as exc:
        raise PredictionError(f"cannot read '{uri}': {exc}. Check the path and your access to it.") from exc


def load_image(data: bytes, cfg: Config, name: str) -> tuple[np.ndarray, float]:
    """(decoded array, its format maximum) as the data pipeline decodes ``name``'s bytes."""
    try:
        img = decode_image(data, **decode_options(cfg))
    except DecodeError as exc:
        raise PredictionError(
            f"cannot decode '{name}': {exc}. Pass an image file ({', '.join(cfg.data.extensions)})."
        ) from None
    return img, value_range(img)


def preprocess(img: np.ndarray, vmax: float, cfg: Config) -> np.ndarray:
    """Decoded image -> ``(C, H, W)`` float32 model input (validation preprocessing)."""
    from raypipe.data.transforms import Preprocessor

    try:
        x = Preprocessor(cfg.preprocess)(img, vmax)
    except ValueError as exc:
        raise PredictionError(f"preprocessing failed: {exc}") from None
    # a fresh array: standard strides, like the data pipeline's batches (a one-channel transpose
    # can count as contiguous with strides that send torch down its channels-last conv kernels)
    return np.array(x.transpose(2, 0, 1), dtype=np.float32, order="C")


def build_model(meta: dict, state: dict):
    """The checkpoint's network, weights loaded, in eval mode, on the CPU."""
    from raypipe.models.resnet import create_model

    spec = meta["model"]
    model = create_model(spec["name"], in_channels=spec["in_channels"], num_classes=spec["num_classes"])
    model.load_state_dict(state)
    return model.eval()


def score_batch(model, x: np.ndarray, tta: str, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, scores), each (N, K) float32, of ``(N, C, H, W)`` inputs: the evaluation forward
    pass (``tta``) and the checkpoint's ``activation``."""
    import torch

    from raypipe.training.loop import forward_eval

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(x, np.float32)).clone(memory_format=torch.contiguous_format)
        logits = forward_eval(model, x, tta)
        scores = scores_from_logits(logits, activation)
    return logits.float().numpy(), scores.numpy()


def predict_one(meta: dict, state: dict, uri: str) -> np.ndarray:
    """Scores ``(K,)`` of the image file at ``uri``, in this process."""
    cfg = Config.model_validate(meta["config"])
    img, vmax = load_image(read_file(uri), cfg, uri)
    x = preprocess(img, vmax, cfg)[None]
    _, scores = score_batch(build_model(meta, state), x, cfg.augment.tta, score_activation(meta))
    return scores[0]


# ---------------------------------------------------------------- tables


def table_format(out: str) -> str:
    """``csv`` or ``parquet`` from ``out``'s extension."""
    ext = posixpath.splitext(out.rstrip("/"))[1].lower()
    if ext not in TABLE_FORMATS:
        raise PredictionError(
            f"output '{out}' has extension '{ext or '(none)'}', expected one of "
            f"{sorted(TABLE_FORMATS)}. Name the output file predictions.csv or predictions.parquet.")
    return TABLE_FORMATS[ext]


def predicted_names(scores: np.ndarray, class_names: list[str], threshold: float,
                    activation: str) -> list[str]:
    """Each row's predicted class (softmax: the evaluate job's rule), or its findings at or above
    ``threshold`` joined by ``|`` (sigmoid: independent per-finding scores)."""
    if activation == "sigmoid":
        return ["|".join(n for n, s in zip(class_names, row, strict=True) if s >= threshold)
                for row in scores]
    return [class_names[i] for i in predicted_labels(scores, threshold)]


def scores_table(paths: list[str], scores: np.ndarray, class_names: list[str], threshold: float,
                 activation: str):
    """DataFrame: ``path``, ``score_<class>`` per class (in ``class_names`` order), ``predicted_label``."""
    import pandas as pd

    table = pd.DataFrame({"path": [str(p) for p in paths]})
    for i, name in enumerate(class_names):
        table[f"score_{name}"] = scores[:, i].astype(np.float64)
    table["predicted_label"] = predicted_names(scores, class_names, threshold, activation)
    return table


def write_table(table, out: str) -> None:
    """Write ``table`` to ``out`` (local path or URI) as CSV or Parquet by its extension."""
    fmt = table_format(out)
    fs, path = get_filesystem(out)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "table")
        if fmt == "csv":
            table.to_csv(local, index=False)
        else:
            table.to_parquet(local, index=False)
        try:
            parent = posixpath.dirname(path) if "://" in out else os.path.dirname(path)
            if parent:
                fs.create_dir(parent, recursive=True)
            pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except OSError as exc:
            raise PredictionError(f"cannot write '{out}': {exc}. Check the folder and your access.") from exc


# ---------------------------------------------------------------- entry point


def _source_kind(source: str, cfg: Config) -> str:
    """``image`` (one file), ``batch`` (folder, prefix or CSV manifest)."""
    fs, path = get_filesystem(source)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise PredictionError(f"cannot reach '{source}': {exc}. Check the path and credentials.") from exc
    if info.type == pafs.FileType.Directory:
        return "batch"
    if info.type == pafs.FileType.File:
        return "batch" if path.lower().endswith(".csv") else "image"
    if "://" in source:  # object stores list prefixes, which are not objects themselves
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        try:
            if fs.get_file_info(selector):
                return "batch"
        except OSError:
            pass
    raise PredictionError(
        f"'{source}' does not exist. Give an image file, a folder of images, an s3:// prefix or a "
        "CSV manifest.")


def predict(checkpoint: str, source: str, out: str | None = None, *, use_gpu: bool | None = None,
            threshold: float | None = None):
    """Score ``source`` with ``checkpoint`` (a checkpoint folder or a run directory: its best).

    ``source``: one image file (scored here, Ray is not started), or a folder, a bucket prefix or
    a CSV manifest (scored through Ray Data on the current cluster, or a local one started for
    it). Preprocessing is the checkpoint's validation preprocessing, with its test-time
    augmentation. ``out``: a ``.csv`` or ``.parquet`` file (local or URI) to write the table to.
    ``threshold``: the binary decision threshold (default: the checkpoint's ``train.threshold``).

    Returns the table (pandas); files that could not be read are listed in
    ``table.attrs["skipped"]`` as (file, reason) pairs.
    """
    if out is not None:
        table_format(out)  # a wrong extension fails before any work
    meta, state = load_checkpoint(checkpoint)
    cfg = Config.model_validate(meta["config"])
    class_names = list(meta["class_names"])
    threshold = float(cfg.train.threshold if threshold is None else threshold)
    activation = score_activation(meta)
    skipped: list[tuple[str, str]] = []
    if _source_kind(source, cfg) == "image":
        paths, scores = [source], predict_one(meta, state, source)[None]
    else:
        paths, scores, skipped = _predict_batch(meta, state, source, cfg, use_gpu)
    table = scores_table(paths, scores, class_names, threshold, activation)
    table.attrs["skipped"] = skipped
    if out is not None:
        write_table(table, out)
    return table


def _predict_batch(meta: dict, state: dict, source: str, cfg: Config, use_gpu: bool | None):
    import ray

    from raypipe import evaluate
    from raypipe.cli import init_ray

    try:
        data = list_eval_data(source, list(meta["class_names"]), cfg)
    except DataSourceError as exc:
        raise PredictionError(str(exc)) from exc
    if not ray.is_initialized():
        init_ray()
    log.info("scoring %d images from %s", len(data.records), source)
    pred = evaluate.predict(meta, state, data, use_gpu)
    paths = [_display_path(source, str(p)) for p in pred["path"]]
    return paths, pred["probs"], data.skipped + pred["bad"]


def _display_path(source: str, path: str) -> str:
    """A file's path on its filesystem as a location the user can pass back: with the source's
    scheme for object storage (``s3://bucket/...``)."""
    return f"{source.split('://', 1)[0]}://{path}" if "://" in source else path
