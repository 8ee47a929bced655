"""Batch evaluation of a checkpoint: Ray Data preprocessing actors -> one model actor -> predictions,
metrics and pictures.

Inputs are preprocessed with the settings stored in the checkpoint (never augmented), so they match
what the model saw in training. Without a data location, the validation split recorded in the
checkpoint's config is rebuilt with :func:`raypipe.data.sources.discover` (the split is
deterministic). A folder-per-class location gives labels by class-folder name; a flat folder (or
images in folders that are not classes) gives predictions only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from raypipe.config import Config
from raypipe.data.sources import (
    DataSourceError,
    Record,
    _is_image,
    _list_tree,
    discover,
    get_filesystem,
    join_uri,
    list_manifest,
)
from raypipe.training import checkpoints as ckpts
from raypipe.training.metrics import classification_metrics

log = logging.getLogger(__name__)

class EvaluationError(DataSourceError):
    """The checkpoint or the data to evaluate is unusable; the message says how to fix it.
    (A :class:`DataSourceError`, so the jobs report it as a user error without a traceback.)"""


# ---------------------------------------------------------------- checkpoint


def resolve_checkpoint(uri: str) -> str:
    """The complete checkpoint named by ``uri``: a ``checkpoint_epochNNNN`` folder, or a run
    directory (its best complete checkpoint by the run's own metric)."""
    fs, path = get_filesystem(uri)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise EvaluationError(
                f"checkpoint '{uri}' does not exist. Pass a checkpoint folder "
                "(<run dir>/checkpoint_epochNNNN) or a run directory (its best checkpoint is used).")
        is_folder = fs.get_file_info(posixpath.join(path, ckpts.META_FILE)).type == pafs.FileType.File
        summary_file = posixpath.join(path, "summary.json")
        has_summary = fs.get_file_info(summary_file).type == pafs.FileType.File
    except OSError as exc:
        raise EvaluationError(f"cannot reach '{uri}': {exc}. Check the path and the credentials.") from exc
    if is_folder:
        reason = ckpts.incomplete_reason(uri)
        if reason is not None:
            raise EvaluationError(
                f"checkpoint '{uri}' is not complete: {reason}. Its run stopped while it was "
                "being written; pass another checkpoint folder, or the run directory to use its "
                "best complete checkpoint.")
        return uri
    if has_summary or ckpts.list_checkpoints(uri):
        metric, mode = "val_auc", "max"
        if has_summary:
            with fs.open_input_stream(summary_file) as f:
                summary = json.loads(f.read().decode())
            metric, mode = summary.get("metric", metric), summary.get("mode", mode)
        best, _ = ckpts.best_complete(uri, metric, mode)
        if best:
            return best
    raise EvaluationError(
        f"'{uri}' is neither a complete checkpoint folder (holding {ckpts.META_FILE}, "
        f"{ckpts.MODEL_FILE} and {ckpts.MARKER_FILE}) nor a run directory with one. Pass "
        "--checkpoint <run dir>/checkpoint_epochNNNN or the run directory."
    )


def load_checkpoint(uri: str) -> tuple[dict, dict]:
    """(meta, model state dict) of the complete checkpoint at ``uri`` (local or object storage)."""
    uri = resolve_checkpoint(uri)
    try:
        state, meta = ckpts.read_checkpoint(uri)
    except (OSError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise EvaluationError(f"cannot read checkpoint '{uri}': {exc}") from exc
    for key in ("config", "class_names", "model"):
        if key not in meta:
            raise EvaluationError(
                f"checkpoint '{uri}': {ckpts.META_FILE} has no '{key}' entry (keys: {sorted(meta)}). "
                "It was not written by this version of raypipe's training job."
            )
    meta["checkpoint"] = uri
    return meta, state["model"]


ACTIVATIONS = ("softmax", "sigmoid")


def score_activation(meta: dict) -> str:
    """How a checkpoint's logits become its per-class scores: ``softmax`` for single-label
    classifiers, ``sigmoid`` (independent per-finding scores) for a multi-label one (its meta's
    ``task``, or an explicit ``activation``). Every scoring path (batch evaluation,
    :mod:`raypipe.inference`, the exported model) asks here."""
    activation = meta.get("activation") or ("sigmoid" if meta.get("task") == "multilabel" else "softmax")
    if activation not in ACTIVATIONS:
        raise EvaluationError(
            f"checkpoint '{meta.get('checkpoint', '?')}': meta activation {activation!r} is not one "
            f"of {list(ACTIVATIONS)}. It was written by another version of raypipe.")
    return activation


def scores_from_logits(logits, activation: str = "softmax"):
    """(N, K) logits tensor -> (N, K) float32 scores with ``activation``."""
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)


class Predictor:
    """``map_batches`` callable holding the model: {image, label, path, key} -> {path, key, label,
    probs (N, K) float32}."""

    def __init__(self, model_spec: dict, state: dict, use_gpu: bool = False, amp: str = "none",
                 threads: int = 1, tta: str = "none", activation: str = "softmax"):
        import torch

        from raypipe.models.resnet import create_model

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = create_model(model_spec["name"], in_channels=model_spec["in_channels"],
                                  num_classes=model_spec["num_classes"])
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.amp = amp
        self.tta = tta
        self.activation = activation
        self.num_classes = int(model_spec["num_classes"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from raypipe.training.loop import autocast_context, forward_eval

        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        probs = np.zeros((0, self.num_classes), np.float32)
        if len(x):
            with torch.no_grad(), autocast_context(self.device, self.amp):
                logits = forward_eval(self.model, x, self.tta)
                probs = scores_from_logits(logits, self.activation).cpu().numpy()
        return {"path": batch["path"], "key": batch["key"], "label": batch["label"],
                "probs": probs.astype(np.float32)}


# ---------------------------------------------------------------- data


@dataclass
class EvalData:
    filesystem: pafs.FileSystem
    records: list[Record]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_eval_data(uri: str, class_names: list[str], cfg: Config, multilabel: bool = False) -> EvalData:
    """Images under ``uri``: a folder (``<class>/`` sub-folders give labels, other images get
    label -1) or a CSV manifest (labels must be among ``class_names``; multi-label: findings
    scored against the model's ``class_names``, files without labels get -1 for each)."""
    fs, root = get_filesystem(uri)
    info = fs.get_file_info(root)
    data_cfg = cfg.data.model_copy(update={"class_names": None, "limit": None, "where": []})
    if multilabel:
        if info.type == pafs.FileType.File and root.lower().endswith(".csv"):
            fs, _, records, skipped = list_manifest(uri, data_cfg.model_copy(update={
                "findings": None, "task": "multilabel"}), findings=class_names)
            return EvalData(fs, records, uri, skipped)
        unlabeled = tuple([-1] * len(class_names))
        found = list_eval_data(uri, [], cfg)
        for r in found.records:
            r.label = unlabeled
        return found
    if info.type == pafs.FileType.File and root.lower().endswith(".csv"):
        fs, names, records, skipped = list_manifest(uri, data_cfg)
        index = {n: class_names.index(n) for n in names if n in class_names}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise EvaluationError(
                f"manifest '{uri}' has labels {unknown} the model does not know (its classes: "
                f"{class_names}). Remove those rows or evaluate a model trained on them."
            )
        for r in records:
            r.label = index[names[r.label]]
        return EvalData(fs, records, uri, skipped)
    if info.type != pafs.FileType.Directory:
        raise EvaluationError(
            f"--data '{uri}' is neither a folder nor a CSV manifest. Give a folder of images "
            "(optionally one sub-folder per class) or a .csv file."
        )
    index = {n: i for i, n in enumerate(class_names)}
    records, skipped = [], []
    for f in _list_tree(fs, root, uri):
        rel = (posixpath.relpath(f.path, root) if "://" in uri else os.path.relpath(f.path, root))
        rel = rel.replace(os.sep, "/")
        if not _is_image(rel, cfg.data.extensions):
            if not posixpath.basename(rel).startswith("."):
                skipped.append((rel, f"extension not in data.extensions {cfg.data.extensions}"))
            continue
        parts = rel.split("/")
        label = index.get(parts[0], -1) if len(parts) > 1 else -1
        records.append(Record(path=f.path.replace(os.sep, "/"), label=label, key=rel))
    if not records:
        raise EvaluationError(f"no images with extensions {cfg.data.extensions} under '{uri}'.")
    return EvalData(fs, sorted(records, key=lambda r: r.key), uri, skipped)


def validation_data(cfg: Config) -> EvalData:
    """The validation split of the dataset the checkpoint was trained on."""
    try:
        split = discover(cfg.data)
    except DataSourceError as exc:
        raise EvaluationError(
            f"cannot rebuild the validation split recorded in the checkpoint: {exc} Pass --data "
            "to evaluate other images."
        ) from exc
    return EvalData(split.filesystem, split.val, f"{split.source} (validation split)", split.skipped)


# ---------------------------------------------------------------- inference


def predict(meta: dict, state: dict, data: EvalData, use_gpu: bool | None = None) -> dict:
    """Run batch inference with Ray Data; {path, key, label, probs} arrays in file-key order and
    the files that could not be read."""
    import ray

    from raypipe.data.pipeline import build_inference_dataset, release

    cfg = Config.model_validate(meta["config"])
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    kwargs = {"model_spec": meta["model"], "state": state, "use_gpu": use_gpu,
              "amp": cfg.train.amp, "threads": max(1, int(cfg.train.cpus_per_worker)),
              "tta": cfg.augment.tta, "activation": score_activation(meta)}
    ds, ledger = build_inference_dataset(cfg, data.records, data.filesystem, Predictor, kwargs,
                                         use_gpu=use_gpu)
    try:
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        bad = ray.get(ledger.items.remote())
    except Exception as exc:  # Ray wraps the actor's error; a bad-file verdict is the user's to fix
        cause = _bad_file_cause(exc)
        if cause is None:
            raise
        raise cause from exc
    finally:
        release(ledger)
    k = meta["model"]["num_classes"]
    out = {
        "path": np.concatenate([p["path"] for p in parts]) if parts else np.zeros(0, object),
        "key": np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, object),
        "label": np.concatenate([p["label"] for p in parts]) if parts else np.zeros(0, np.int64),
        "probs": np.concatenate([p["probs"].reshape(-1, k) for p in parts]) if parts
        else np.zeros((0, k), np.float32),
    }
    order = np.argsort(out["key"].astype(str), kind="stable")
    out = {name: v[order] for name, v in out.items()}
    out["bad"] = sorted(bad.items())
    return out


def _bad_file_cause(exc: BaseException) -> Exception | None:
    from raypipe.data.pipeline import BadFileError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BadFileError):
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            return BadFileError(message.strip().splitlines()[-1])
        exc = exc.__cause__ or exc.__context__
    return None


def predicted_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Binary: positive (second) class when its score >= threshold; else the arg-max."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def predictions_table(pred: dict, class_names: list[str], threshold: float, multilabel: bool = False):
    """DataFrame: path, key, true_label ('' when unknown), score_<class>..., predicted_label.
    Multi-label: per finding ``score_<f>``, ``true_<f>`` (0/1, -1 when unknown) and
    ``predicted_<f>`` (score >= threshold)."""
    import pandas as pd

    labels = pred["label"]
    table = pd.DataFrame({"path": pred["path"].astype(str), "key": pred["key"].astype(str)})
    if multilabel:
        for i, name in enumerate(class_names):
            table[f"score_{name}"] = pred["probs"][:, i].astype(np.float64)
            table[f"true_{name}"] = np.asarray(labels)[:, i].astype(np.int64)
            table[f"predicted_{name}"] = (pred["probs"][:, i] >= threshold).astype(np.int64)
        return table
    table["true_label"] = [class_names[i] if i >= 0 else "" for i in labels]
    for i, name in enumerate(class_names):
        table[f"score_{name}"] = pred["probs"][:, i].astype(np.float64)
    table["predicted_label"] = [class_names[i] for i in predicted_labels(pred["probs"], threshold)]
    return table


def labeled_rows(labels: np.ndarray) -> np.ndarray:
    """Which rows have a known label (multi-label: every finding known)."""
    labels = np.asarray(labels)
    return (labels >= 0).all(axis=1) if labels.ndim == 2 else labels >= 0


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                    threshold: float, multilabel: bool = False) -> dict:
    """The training metric set plus the loss of the written scores and the operating points:
    binary, the chosen and the Youden point and a 95 % bootstrap interval of the AUC;
    multi-label, a per-finding table (AUC, AP, prevalence, sensitivity and specificity at the
    chosen and at the Youden threshold)."""
    from sklearn import metrics as skm

    from raypipe.report.plots import operating_point, youden_point
    from raypipe.training.metrics import bootstrap_auc_interval, finding_table, multilabel_metrics

    if multilabel:
        m = multilabel_metrics(labels, probs, class_names, threshold)
        clipped = np.clip(probs, 1e-7, 1 - 1e-7)
        m["loss"] = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))) \
            if len(labels) else math.nan
        m["threshold"] = threshold
        m["findings"] = finding_table(labels, probs, class_names, threshold)
        return m
    m = classification_metrics(labels, probs, class_names, threshold)
    # cross-entropy of the written scores (scikit-learn's clipping of saturated probabilities)
    m["loss"] = float(skm.log_loss(labels, probs, labels=list(range(probs.shape[1])))) if len(
        labels) else math.nan
    m["threshold"] = threshold
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        m["chosen_point"] = operating_point(labels, probs[:, 1], threshold)
        m["youden_point"] = youden_point(labels, probs[:, 1])
        m["auc_ci95"] = list(bootstrap_auc_interval(labels == 1, probs[:, 1]))
    return m


def write_pictures(labels, probs, class_names, confusion, threshold: float, out: str,
                   multilabel: bool = False) -> list[str]:
    """ROC, PR and confusion-matrix PNGs in ``out`` (a local folder); their file names.
    Multi-label: the ROC curves of every finding in one figure."""
    from raypipe.report import plots

    if multilabel:
        plots.roc_findings_png(labels, probs, class_names, os.path.join(out, "roc.png"))
        return ["roc.png"]
    names = []
    if len(np.unique(labels)) >= 2:
        plots.roc_png(labels, probs, class_names, os.path.join(out, "roc.png"), threshold)
        plots.pr_png(labels, probs, class_names, os.path.join(out, "pr.png"))
        names += ["roc.png", "pr.png"]
    plots.confusion_png(confusion, class_names, os.path.join(out, "confusion.png"),
                        threshold if probs.shape[1] == 2 else None)
    return names + ["confusion.png"]


def default_out_dir(checkpoint: str, data: str | None) -> str:
    """``<run dir>/eval-<checkpoint name>[-<data folder name>]``."""
    ckpt = checkpoint.rstrip("/")
    parent, name = posixpath.split(ckpt) if "://" in ckpt else os.path.split(ckpt)
    tag = f"eval-{name}" + (f"-{posixpath.basename(data.rstrip('/'))}" if data else "")
    return join_uri(parent, tag.replace(".", "_"))


def upload_dir(local: str, uri: str) -> None:
    """Copy the files of local folder ``local`` into ``uri`` (local path or object storage)."""
    from raypipe.report.run_report import publish_dir

    try:
        publish_dir(local, uri)
    except OSError as exc:
        raise EvaluationError(f"cannot write results to '{uri}': {exc}. Check --out.") from exc


def require_saliency() -> None:
    """Fail before any work when Grad-CAM's package is missing."""
    import importlib.util

    if importlib.util.find_spec("captum") is None:
        raise EvaluationError(
            "--saliency needs captum (Grad-CAM), which is not installed. Install the explain extra: "
            "pip install 'raypipe[explain]', or leave --saliency out.")


def decision_threshold(meta: dict, cfg: Config, threshold: str | float | None) -> tuple[float, str]:
    """(threshold, where it comes from): ``None`` or ``config``, ``train.threshold``; ``validation``,
    the Youden threshold on the validation set at the checkpoint's epoch (binary); or a number."""
    if threshold is None or threshold == "config":
        return float(cfg.train.threshold), "train.threshold"
    if threshold == "validation":
        value = (meta.get("metrics") or {}).get("val_youden_threshold")
        if not isinstance(value, int | float) or math.isnan(value):
            raise EvaluationError(
                f"checkpoint '{meta['checkpoint']}' records no validation threshold (binary tasks "
                "only, checkpoints written by this version). Use --threshold config or a number.")
        return float(value), "the validation set's Youden threshold"
    try:
        value = float(threshold)
    except ValueError:
        raise EvaluationError(f"--threshold {threshold!r}: give config, validation or a number "
                              "between 0 and 1.") from None
    if not 0.0 <= value <= 1.0:
        raise EvaluationError(f"--threshold {value}: a score threshold is between 0 and 1.")
    return value, "--threshold"


def evaluate(checkpoint: str, data: str | None = None, out: str | None = None,
             use_gpu: bool | None = None, saliency: int = 0,
             threshold: str | float | None = None) -> dict:
    """Evaluate ``checkpoint`` on ``data`` (default: its validation split) and write predictions
    (Parquet, CSV), ``metrics.json`` and pictures to ``out``. Returns the metrics summary.
    ``threshold``: the decision threshold (:func:`decision_threshold`).

    ``saliency``: also write Grad-CAM grids of the ``saliency`` most confident true positives,
    false positives and false negatives (:mod:`raypipe.report.saliency`; labelled images only)."""
    if saliency < 0:
        raise EvaluationError(f"--saliency {saliency}: give a number of images per group, 0 for none.")
    if saliency:
        require_saliency()
    meta, state = load_checkpoint(checkpoint)
    checkpoint = meta["checkpoint"]
    cfg = Config.model_validate(meta["config"])
    class_names = list(meta["class_names"])
    multilabel = meta.get("task") == "multilabel"
    threshold, threshold_from = decision_threshold(meta, cfg, threshold)
    if saliency and multilabel:
        raise EvaluationError("--saliency is for single-label checkpoints; this one is multi-label.")
    source = list_eval_data(data, class_names, cfg, multilabel) if data else validation_data(cfg)
    log.info("evaluating %s on %d images from %s", checkpoint, len(source.records), source.source)
    pred = predict(meta, state, source, use_gpu)
    out = out or default_out_dir(checkpoint, data)
    labeled = labeled_rows(pred["label"])
    summary: dict = {
        "checkpoint": checkpoint, "data": source.source, "images": int(len(pred["label"])),
        "labeled": int(labeled.sum()), "class_names": class_names,
        "task": meta.get("task") or "binary", "threshold": threshold,
        "threshold_from": threshold_from,
        "skipped": [{"file": k, "reason": r} for k, r in source.skipped + pred["bad"]],
        "files": ["predictions.parquet", "predictions.csv"], "out": out,
    }
    with tempfile.TemporaryDirectory() as tmp:
        table = predictions_table(pred, class_names, threshold, multilabel)
        table.to_parquet(os.path.join(tmp, "predictions.parquet"), index=False)
        table.to_csv(os.path.join(tmp, "predictions.csv"), index=False)
        if labeled.any():
            labels, probs = pred["label"][labeled], pred["probs"][labeled].astype(np.float64)
            summary["metrics"] = compute_metrics(labels, probs, class_names, threshold, multilabel)
            summary["files"] += write_pictures(labels, probs, class_names,
                                               summary["metrics"]["confusion"], threshold, tmp,
                                               multilabel)
            if saliency:
                from raypipe.report.saliency import write_saliency

                rows = {k: pred[k][labeled] for k in ("path", "key", "label", "probs")}
                summary["saliency"] = write_saliency(meta, state, source.filesystem, rows, threshold,
                                                     saliency, tmp)
                summary["files"] += list(summary["saliency"])
        summary["files"].append("metrics.json")
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)
        upload_dir(tmp, out)
    return summary
