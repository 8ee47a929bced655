"""One typed config tree for every job: YAML file -> dotted CLI overrides -> validated ``Config``.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key, the
value, what is allowed and (for typos) the closest valid key. Validation happens before Ray starts.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid. The message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str | None = Field(
        None, description="folder-per-class root (root/<class>/*.jpg), local or s3:// / gs://; "
        "with a manifest, the folder its paths are relative to; null: the built-in dataset")
    manifest: str | None = Field(None, description="CSV with a path column and a label column")
    path_column: str = Field("path", description="the manifest's column of relative file paths")
    label_column: str = Field("label", description="the manifest's column of labels")
    positive_finding: str | None = Field(
        None, description="one finding of a multi-finding label column (NIH: Effusion) as the "
        "positive class of a binary task; the other class is no_<finding>")
    label_separator: str = Field("|", description="what joins several findings in one label")
    task: Literal["auto", "binary", "multiclass", "multilabel"] = Field(
        "auto", description="multilabel: each file has zero or more findings (label_separator-"
        "joined names in a manifest's label column), one sigmoid output each; binary and "
        "multiclass: one label per file; auto: multilabel when the label column holds joined "
        "names and positive_finding is not set, else one label per file")
    no_finding: str = Field(
        "No Finding", description="multilabel: the label that means no finding (all zeros, not "
        "a class)")
    findings: list[str] | None = Field(
        None, description="multilabel: the findings to learn and their order; null = every "
        "finding of the training manifest, sorted")
    group_column: str | None = Field(
        "auto", description="manifest column whose equal values (a patient) stay on one side of "
        "the split; auto = 'Patient ID' when the manifest has it; null = every file on its own")
    group_pattern: str | None = Field(
        None, description="regex on a file's name whose first group names its group (Kermany: "
        "'person(\\d+)_'); files that do not match are their own group")
    where: list[str] = Field(
        [], description="keep only manifest rows meeting every condition, before the split: "
        "'<column> <op> <value>' with op ==, !=, <, <=, >, >= or '<column> in [a, b]'")
    val_root: str | None = Field(None, description="a separate validation folder")
    val_manifest: str | None = Field(None, description="a separate validation manifest")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0,
                                description="share of the files held out for validation")
    split_seed: int = Field(0, description="seed of the deterministic train/validation split")
    class_names: list[str] | None = Field(
        None, description="the classes to use, in this order (default: every one found, sorted)")
    extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"],
        description="file extensions read as images")
    limit: int | None = Field(None, ge=2, description="use at most N training files (smoke runs)")
    on_bad_file: Literal["skip", "fail"] = Field(
        "skip", description="unreadable files: skip (counted and listed in skipped.csv) or fail")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="stop when more than this share of files is unreadable")
    max_pixels: int = Field(100_000_000, ge=1,
                            description="larger images are refused (decompression-bomb guard)")
    cache_dir: str | None = Field(
        None, description="where the built-in dataset is written (default: $RAYPIPE_CACHE or "
        "~/.cache/raypipe)")

    @field_validator("where", mode="before")
    @classmethod
    def _one_condition(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # data.where="View Position == PA"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.positive_finding and self.task in ("multiclass", "multilabel"):
            raise ValueError(
                f"data.positive_finding={self.positive_finding!r} makes the task binary, but "
                f"data.task={self.task!r}. Remove one of the two")
        if self.findings is not None:
            if self.positive_finding or self.task in ("binary", "multiclass"):
                raise ValueError(
                    f"data.findings={self.findings} is for data.task multilabel (or auto), but "
                    f"data.task={self.task!r}, data.positive_finding={self.positive_finding!r}. "
                    "Remove data.findings, or data.positive_finding, or set data.task=multilabel")
            dup = sorted({f for f in self.findings if self.findings.count(f) > 1})
            if not self.findings or dup or self.no_finding in self.findings:
                raise ValueError(
                    f"data.findings={self.findings}: list at least one finding, each once, and "
                    f"not the no-finding label data.no_finding={self.no_finding!r}")
        if self.group_pattern is not None:
            if self.group_column not in ("auto", None):
                raise ValueError(
                    f"data.group_column={self.group_column!r} and data.group_pattern="
                    f"{self.group_pattern!r} both name the groups. Keep one of the two")
            try:
                groups = re.compile(self.group_pattern).groups
            except (re.error, OverflowError, RecursionError) as exc:
                raise ValueError(
                    f"data.group_pattern={self.group_pattern!r} is not a regex: {exc}") from None
            if groups < 1:
                raise ValueError(
                    f"data.group_pattern={self.group_pattern!r} has no (...) group to name the "
                    "patient; for example 'person(\\d+)_'")
        for condition in self.where:
            parse_where(condition)
        return self


_WHERE_IN = re.compile(r"^\s*(?P<col>.+?)\s+(?P<op>not\s+in|in)\s*\[(?P<val>.*)\]\s*$")
_WHERE_CMP = re.compile(r"^\s*(?P<col>.+?)\s*(?P<op>==|!=|<=|>=|<|>)\s*(?P<val>.*?)\s*$")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_where(condition: str) -> tuple[str, str, list[str]]:
    """``"Patient Age <= 18"`` -> ``("Patient Age", "<=", ["18"])``; ``"View Position in [PA, AP]"``
    -> ``("View Position", "in", ["PA", "AP"])``. Values may be quoted ('PA', '' for empty)."""
    m = _WHERE_IN.match(condition)
    if m:
        values = [_unquote(v) for v in m["val"].split(",") if v.strip()]
        op = " ".join(m["op"].split())
    else:
        m = _WHERE_CMP.match(condition)
        values = [_unquote(m["val"])] if m and m["val"] else []
        op = m["op"] if m else ""
    column = _unquote(m["col"]) if m else ""
    if not m or not column or not values:
        raise ValueError(
            f"data.where condition {condition!r} is not '<column> <op> <value>' (op one of "
            "==, !=, <, <=, >, >=) or '<column> in [a, b]'; for example 'View Position == PA' "
            "or 'Patient Age <= 18'")
    return column, op, values


class PreprocessConfig(_Section):
    image_size: int = Field(64, ge=8, le=4096, description="side of the square model input")
    resize_mode: Literal["stretch", "pad", "crop"] = Field(
        "stretch", description="how a non-square image becomes square")
    channels: Literal[1, 3] = Field(3, description="1: grayscale input, 3: RGB")
    threshold: Literal["none", "fixed", "otsu"] = Field(
        "none", description="binarise the image (fixed at threshold_value, or Otsu's threshold)")
    threshold_value: float = Field(125.0, ge=0.0, le=255.0,
                                   description="the fixed threshold, on a 0-255 scale")
    morphology: list[Literal["erosion", "dilation", "opening", "closing"]] = Field(
        [], description="morphological operations with a disk, in order")
    disk_radius: int = Field(3, ge=1, le=64, description="radius of the morphology disk, pixels")
    equalize: Literal["none", "adapthist"] = Field(
        "none", description="adapthist: contrast-limited adaptive histogram equalisation")
    normalize: Literal["divide255", "minmax", "percentile", "none"] = Field(
        "divide255", description="per-image intensity scaling to [0, 1]: by the format's maximum, "
        "the image's min and max, or its percentiles")
    percentiles: tuple[float, float] = Field(
        (5.0, 95.0), description="low and high percentile for normalize: percentile")
    window: Literal["auto", "none"] | tuple[float, float] = Field(
        "auto", description="DICOM films' VOI: auto = the file's VOI LUT or WindowCenter/"
        "WindowWidth when it has one, else none; none = the modality values (stored values "
        "after RescaleSlope/RescaleIntercept) as they are; [center, width] = that LINEAR window "
        "on every film. Other formats ignore it")
    mean: list[float] | None = Field(
        None, description="per-channel mean to subtract after scaling (null: the weights' own "
        "with model.pretrained, see model.pretrained_stats; else none)")
    std: list[float] | None = Field(
        None, description="per-channel std to divide by after scaling (null: as for mean)")

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {lo}, {hi}")
        if isinstance(self.window, tuple) and not self.window[1] >= 1.0:
            raise ValueError(
                f"window [center, width] needs width >= 1 (DICOM's LINEAR window), got "
                f"{list(self.window)}; or use window: auto / none")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(v)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self


class AugmentConfig(_Section):
    enabled: bool = Field(True, description="augment training images (validation never is)")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a vertical flip")
    rotation: float = Field(15.0, ge=0.0, le=180.0, description="rotation, degrees, +/-")
    zoom: tuple[float, float] = Field((0.9, 1.1), description="zoom factor range")
    translate: float = Field(0.05, ge=0.0, le=0.5, description="shift, fraction of the size, +/-")
    shear: float = Field(0.0, ge=0.0, le=45.0, description="shear, degrees, +/-")
    crop_scale: float = Field(1.0, gt=0.0, le=1.0,
                              description="random crop of at least this share of the area")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="brightness shift, +/-")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="contrast factor change, +/-")
    gamma: float = Field(0.0, ge=0.0, le=1.0, description="gamma exp(+/- this)")
    noise_std: float = Field(0.0, ge=0.0, le=1.0, description="std of added Gaussian noise")
    tta: Literal["none", "hflip"] = Field(
        "none", description="test-time augmentation for validation and the evaluate job: hflip "
        "averages the logits of each image and its mirror image (whether or not training augments)")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        lo, hi = self.zoom
        if not 0.1 <= lo <= hi <= 10.0:
            raise ValueError(f"zoom must satisfy 0.1 <= low <= high <= 10, got {lo}, {hi}")
        return self


class PipelineConfig(_Section):
    workers: int | Literal["auto"] = Field(
        "auto", description="data workers (Ray Data actors, or tasks for short epochs) that read, "
        "decode, preprocess and augment images; auto: from 1, growing with the work queued up "
        "to the CPUs the training workers leave free (the cluster's, as it grows)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs each data worker reserves")
    files_per_batch: int = Field(
        32, ge=1, description="files a data worker processes per block; its output is one "
        "block of that many preprocessed images")
    prefetch_batches: int = Field(
        2, ge=0, description="training batches each training worker fetches ahead")
    cache: bool | Literal["auto"] = Field(
        "auto", description="keep the decoded, resized, not yet augmented images in Ray's object "
        "store after the first pass, and augment from there each epoch (validation: the finished "
        "images); auto: when they fit in a quarter of the smallest node's object store; false: "
        "read and decode every file every epoch")
    deterministic: bool = Field(
        True, description="the same config gives the same run: blocks reach the training "
        "workers in file-list order (and on a GPU cuDNN uses deterministic kernels); false: as "
        "they finish")


class ModelConfig(_Section):
    name: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = Field(
        "resnet18", description="the ResNet depth")
    init: Literal["default", "kaiming", "xavier"] = Field(
        "kaiming", description="weight initialisation: He, Glorot, or PyTorch's")
    pretrained: str | None = Field(
        None, description="a torchvision-format ResNet state_dict to start from: an s3:// or "
        "gs:// URI (fetched once per node into model.cache_dir) or a local path (read on each "
        "node, so it must exist on every node)")
    pretrained_stats: Literal["auto", "imagenet", "none"] = Field(
        "auto", description="the input statistics model.pretrained was trained with, used as "
        "preprocess.mean/std when both are unset. imagenet: ImageNet's; auto: ImageNet's when the "
        "file is a torchvision ResNet state_dict with a 1000-class (ImageNet-1k) head, else none; "
        "none: leave preprocess.mean/std as they are")
    cache_dir: str | None = Field(
        None, description="each node's folder for fetched model.pretrained files (default: "
        "$RAYPIPE_CACHE/pretrained or ~/.cache/raypipe/pretrained, resolved on each node)")
    freeze: Literal["none", "stem", "backbone"] = Field(
        "none", description="weights held fixed for the first model.freeze_epochs epochs: stem = "
        "conv1 + bn1, backbone = everything but fc (their BatchNorm layers keep their running "
        "statistics meanwhile)")
    freeze_epochs: int = Field(
        1, ge=0, description="epochs that model.freeze lasts; after them every weight trains")
    zero_init_residual: bool = Field(
        False, description="start each residual block's last BatchNorm at zero")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.pretrained is not None and not self.pretrained.strip():
            raise ValueError("pretrained is empty: give a file path or an s3:// / gs:// URI, or null")
        if self.pretrained_stats == "imagenet" and not self.pretrained:
            raise ValueError(
                "pretrained_stats=imagenet describes the weights of model.pretrained, which is not "
                "set. Set model.pretrained, or for ImageNet statistics without pretrained weights "
                "set preprocess.mean=[0.485,0.456,0.406] and preprocess.std=[0.229,0.224,0.225]")
        return self


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, description="training epochs")
    lr: float = Field(0.05, ge=0.0, description="peak learning rate")
    batch_size: int = Field(32, ge=1, description="global training batch, split across workers")
    num_workers: int = Field(2, ge=1, description="data-parallel training workers")
    cpus_per_worker: float = Field(
        0.5, gt=0.0, description="CPUs each training worker reserves (and its torch threads, "
        "rounded, at least 1)")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: when the cluster has GPUs")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs each training worker reserves")
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field("sgd", description="optimiser")
    momentum: float | None = Field(
        None, ge=0.0, lt=1.0, description="SGD's and RMSprop's momentum; null: each one's usual "
        "value, 0.9 for SGD and 0 for RMSprop (with 0.9 RMSprop's early steps are about 25x the "
        "learning rate)")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD)")
    weight_decay: float = Field(1e-4, ge=0.0, description="weight decay")
    schedule: Literal["none", "step", "multistep", "exponential", "cosine", "plateau", "onecycle"] = (
        Field("cosine", description="per-epoch learning-rate schedule"))
    warmup_epochs: int = Field(0, ge=0, description="epochs of linear warm-up before the schedule")
    step_size: int = Field(5, ge=1, description="schedule step: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0,
                         description="step/multistep/exponential/plateau: decay factor")
    milestones: list[int] = Field([30, 60], description="schedule multistep: epochs of the decays")
    plateau_metric: Literal["val_loss", "val_auc"] = Field(
        "val_loss", description="schedule plateau: the metric watched")
    plateau_patience: int = Field(2, ge=0, description="schedule plateau: epochs without progress")
    loss: Literal["ce", "weighted_ce", "focal", "bce", "weighted_bce", "weighted"] = Field(
        "weighted_ce", description="how the loss weighs; its form follows the task: one label per "
        "file, cross-entropy with class weights N / (K n_k); multilabel, binary cross-entropy per "
        "finding with positive weights negatives / positives. ce, bce: unweighted; weighted_ce, "
        "weighted_bce, weighted: weighted; focal: weighted and focal")
    class_weights: list[float] | None = Field(
        None, description="explicit class weights (default: N / (K n_k) from the training counts)")
    focal_gamma: float = Field(2.0, ge=0.0, description="loss focal: the focusing exponent")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this")
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="mixup: train on convex mixes of image pairs (and their losses), "
        "mixing weight ~ Beta(alpha, alpha); 0 = off")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="validate, checkpoint and evaluate an exponential moving "
        "average of the weights (and BatchNorm statistics), updated every step with this decay")
    bn_stats: Literal["precise", "ema"] = Field(
        "precise", description="BatchNorm statistics that validation and checkpoints use. "
        "precise: recomputed after each epoch with its final weights over its last "
        "bn_stats_samples training images; ema: PyTorch's running average over the steps")
    bn_stats_samples: int = Field(
        512, ge=2, description="training images that bn_stats: precise recomputes the statistics "
        "over, each worker its equal share of them (the workers' statistics are then averaged)")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision on GPUs (fp16 with a grad scaler)")
    channels_last: bool = Field(False, description="channels-last memory format on GPUs")
    seed: int = Field(0, description="seed of initialisation, file order and augmentation")
    overfit_subset: int | None = Field(
        None, ge=1, description="overfit check: train on this many images, no augmentation")
    overfit_loss: float = Field(0.1, gt=0.0,
                                description="overfit check: the final training loss must fall below this")
    grad_spike_factor: float = Field(
        10.0, gt=1.0, description="warn when a gradient norm exceeds this times the running median")
    threshold: float = Field(0.5, ge=0.0, le=1.0,
                             description="decision threshold on the positive class's score (binary)")
    max_failures: int = Field(0, ge=-1, description="restarts from the last checkpoint after a failure")


CHECKPOINT_METRICS = ("val_auc", "val_loss", "val_acc", "val_balanced_acc", "val_pr_auc", "val_f1")


class CheckpointConfig(_Section):
    metric: str = Field(
        "val_auc", description=f"the validation metric that ranks checkpoints: one of "
        f"{', '.join(CHECKPOINT_METRICS)}, or (multilabel) one finding's AUC, val_auc/<finding> "
        "(val_auc is then the macro mean over the findings)")
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="auto: min for val_loss, else max")
    num_to_keep: int = Field(2, ge=1, description="best checkpoints kept (and always the latest)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        finding = v.removeprefix("val_auc/") if v.startswith("val_auc/") else None
        if v not in CHECKPOINT_METRICS and not (finding and finding.strip() == finding):
            raise ValueError(
                f"expected one of {', '.join(CHECKPOINT_METRICS)} or val_auc/<finding> (for "
                f"example val_auc/Effusion), got {v!r}")
        return v

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric == "val_loss" else "max"


class RunConfig(_Section):
    name: str | None = Field(
        None, min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="null: <config name>-<date>-<time>; an existing name resumes that run",
    )
    storage_path: str = Field("~/raypipe-results",
                              description="where runs are written, local or s3:// / gs://")
    tensorboard: bool = Field(True, description="write TensorBoard events")
    verbose: bool = Field(
        False, description="also show what Ray's workers print and Ray's INFO lines (--verbose)")


class TrackConfig(_Section):
    mlflow: bool = Field(
        False, description="log every run and search trial to MLflow: the config as params, each "
        "epoch's metrics, the best checkpoint's, the report files (pip install 'raypipe[track]')")
    uri: str | None = Field(
        None, description="MLflow tracking URI: http(s)://host:port of a tracking server, or a "
        "database (sqlite:///..., postgresql://...); null: a local store in "
        "<run.storage_path>/mlruns, no server needed")
    experiment: str | None = Field(
        None, description="MLflow experiment of the run; null: the config's name (a search's "
        "trials: the search's name)")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str | None) -> str | None:
        # a bare path would be read by MLflow as its retired file store
        if v is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", v):
            raise ValueError(
                f"track.uri needs a scheme, got {v!r}: http://host:5000 for a tracking server, "
                "sqlite:////absolute/path/mlflow.db for a local database, or null for the local "
                "store under run.storage_path")
        return v


class Config(_Section):
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    pipeline: PipelineConfig = PipelineConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    track: TrackConfig = TrackConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading and overrides


def _fields_at(path: list[str]) -> list[str]:
    """Valid key names at a dotted path (for 'did you mean' suggestions)."""
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _unknown_key_message(loc: tuple, value: Any) -> str:
    keys = [str(p) for p in loc]
    valid = _fields_at(keys[:-1])
    dotted = ".".join(keys)
    close = difflib.get_close_matches(keys[-1], valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{'.'.join(keys[:-1] + close)}'?" if close else ""
    where = ".".join(keys[:-1]) or "the top level"
    return (
        f"unknown config key '{dotted}' (value {value!r}).{hint} "
        f"Valid keys in {where}: {', '.join(valid)}."
    )


# pydantic names the member of a union that failed (``workers.int``, ``workers.literal['auto']``)
_TYPE_TAGS = {"int", "float", "bool", "str", "none", "list", "tuple", "dict"}


def _key_of(loc: tuple) -> tuple:
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    merged: dict[tuple, list[str]] = {}
    values: dict[tuple, Any] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append("  - " + _unknown_key_message(loc, value))
            continue
        allowed = ""
        ctx = e.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in e["msg"]:
            allowed = f" Allowed: {ctx['expected']}."
        key = _key_of(loc)
        values.setdefault(key, value)
        merged.setdefault(key, []).append(f"{e['msg']}.{allowed}")
    for key, messages in merged.items():
        dotted = ".".join(str(p) for p in key) or "(top level)"
        lines.append(f"  - {dotted} = {values[key]!r}: {' Or: '.join(messages)}")
    lines.append("Fix the YAML file or the key=value override and run again.")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' is not of the form key=value (for example train.lr=0.01)."
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}': empty key. Use dotted keys like train.lr=0.01.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value {raw!r} is not valid YAML: {exc}") from exc
    return key.split("."), value


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override '{'.'.join(keys)}': '{'.'.join(keys[: i + 1])}' is a value, "
                "not a section."
            )
        node = child
    node[keys[-1]] = value


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, or relative to the project's ``configs/`` folder."""
    p = Path(path)
    if p.exists():
        return p
    alt = CONFIG_DIR / p
    if alt.exists():
        return alt
    alt = CONFIG_DIR / f"{p}.yaml"
    if alt.exists():
        return alt
    raise ConfigError(
        f"config file '{path}' not found (also looked in {CONFIG_DIR}). "
        f"Available: {', '.join(sorted(f.name for f in CONFIG_DIR.glob('*.yaml')))}."
    )


def load_yaml(path: str | os.PathLike) -> dict:
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{p}' is not UTF-8 text ({exc}). Save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{p}': {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{p}' must hold a mapping of sections (data:, train:, ...), "
            f"got {type(data).__name__}."
        )
    return data


def build_config(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _apply(tree: dict, overrides: list[str], source: str) -> Config:
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return build_config(tree, source)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load ``path`` (default: ``configs/default.yaml``), apply dotted overrides, validate."""
    return _apply(load_yaml(path or CONFIG_DIR / "default.yaml"), list(overrides),
                  str(path or "configs/default.yaml"))


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with dotted overrides applied, validated."""
    return _apply(cfg.to_dict(), list(overrides), "config") if overrides else cfg


def config_help() -> str:
    """Every config key, one line each: ``section.key = default  description``."""
    lines = []
    for section, field in Config.model_fields.items():
        for name, sub in field.annotation.model_fields.items():
            default = yaml.safe_dump(sub.get_default(call_default_factory=True),
                                     default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {section}.{name} = {default}  {sub.description or ''}".rstrip())
    return "\n".join(lines)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
