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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid. The message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str | None = Field(None, description="folder-per-class root or URI; None = built-in")
    builtin: Literal["lfw_faces"] = "lfw_faces"
    manifest: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    positive_finding: str | None = Field(
        None, description="one finding of a multi-finding label column made the positive class of "
        "a binary task (NIH: Effusion); the other class is no_<finding>")
    label_separator: str = "|"
    task: Literal["auto", "binary", "multiclass", "multilabel"] = Field(
        "auto", description="multilabel: each file has zero or more findings (label_separator-"
        "joined names in a manifest's label column), one sigmoid output each; binary and "
        "multiclass: one label per file (binary also checks there are two classes); auto: "
        "multilabel when the label column holds joined names and positive_finding is not set, "
        "else one label per file")
    no_finding: str = Field(
        "No Finding", description="multilabel: the label that means no finding (all zeros, not "
        "a class)")
    findings: list[str] | None = Field(
        None, description="multilabel: the findings to learn and their order; None = every "
        "finding of the training manifest, sorted")
    group_column: str | None = Field(
        "auto", description="manifest column whose equal values (a patient) stay on one side of "
        "the split; auto = 'Patient ID' when the manifest has it; null = every file on its own")
    group_pattern: str | None = Field(
        None, description="regex on a file's name whose first group names its group (Kermany: "
        "'person(\\d+)_'); files that do not match are their own group. For folders, and for "
        "manifests without a group column")
    where: list[str] = Field(
        [], description="keep only manifest rows meeting every condition, before the split: "
        "'<column> <op> <value>' with op ==, !=, <, <=, >, >= (numeric when both sides are "
        "numbers) or '<column> in [a, b]' / 'not in [a, b]'")
    val_root: str | None = None
    val_manifest: str | None = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    class_names: list[str] | None = None
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"]
    limit: int | None = Field(None, ge=2, description="use at most N training files (smoke runs)")
    on_bad_file: Literal["skip", "fail"] = "skip"
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_pixels: int = Field(100_000_000, ge=1)
    cache_dir: str | None = None

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
    image_size: int = Field(64, ge=8, le=4096)
    resize_mode: Literal["stretch", "pad", "crop"] = "stretch"
    channels: Literal[1, 3] = 3
    threshold: Literal["none", "fixed", "otsu"] = "none"
    threshold_value: float = Field(125.0, ge=0.0, le=255.0)
    morphology: list[Literal["erosion", "dilation", "opening", "closing"]] = []
    disk_radius: int = Field(3, ge=1, le=64)
    equalize: Literal["none", "adapthist"] = "none"
    normalize: Literal["divide255", "minmax", "percentile", "none"] = "divide255"
    percentiles: tuple[float, float] = (5.0, 95.0)
    mean: list[float] | None = None
    std: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {lo}, {hi}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(v)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self


class AugmentConfig(_Section):
    enabled: bool = True
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    rotation: float = Field(15.0, ge=0.0, le=180.0, description="degrees, +/-")
    zoom: tuple[float, float] = (0.9, 1.1)
    translate: float = Field(0.05, ge=0.0, le=0.5, description="fraction of size, +/-")
    shear: float = Field(0.0, ge=0.0, le=45.0, description="degrees, +/-")
    crop_scale: float = Field(1.0, gt=0.0, le=1.0, description="random crop area fraction")
    brightness: float = Field(0.1, ge=0.0, le=1.0)
    contrast: float = Field(0.1, ge=0.0, le=1.0)
    gamma: float = Field(0.0, ge=0.0, le=1.0)
    noise_std: float = Field(0.0, ge=0.0, le=1.0)
    tta: Literal["none", "hflip"] = Field(
        "none", description="test-time augmentation for validation and the evaluate job: hflip "
        "averages the logits of each image and its mirror image (whether or not training augments)")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        lo, hi = self.zoom
        if not 0.1 <= lo <= hi <= 10.0:
            raise ValueError(f"zoom must satisfy 0.1 <= low <= high <= 10, got {lo}, {hi}")
        return self


class ActorPool(_Section):
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0.0)
    batch_size: int = Field(
        32, ge=1, description="files per part, at least: the stage takes whole blocks of the "
        "file list and processes them in parts of as many files as fill one max_block_mib "
        "block, so that each part leaves the stage in one piece (docs/performance-log.md); and the "
        "size of the first, small blocks of the file list")
    compute: Literal["auto", "actors", "tasks"] = Field(
        "auto", description="actors: a pool of long-lived processes per epoch; tasks: stateless "
        "tasks on Ray's reused worker processes (no per-epoch start-up); auto: tasks when "
        "training runs on CPUs, actors when it runs on GPUs")

    @model_validator(mode="after")
    def _check(self) -> ActorPool:
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})"
            )
        return self


class PipelineConfig(_Section):
    train: ActorPool = ActorPool()
    val: ActorPool = ActorPool(min_actors=1, max_actors=1)
    blocks: int = Field(8, ge=1, description="the file list is cut into at least this many blocks")
    block_rows: int = Field(
        512, ge=1, description="and into blocks of at most this many files, so that every actor "
        "of a large pool gets work; smaller blocks give an earlier first batch but lower steady "
        "throughput (docs/performance-log.md)")
    max_block_mib: float = Field(
        16, gt=0, description="preprocessed batches leave the map stage in blocks of at most "
        "about this many MiB (Ray Data's default is 128). Each block in flight is held in the "
        "object store and by its consumer, so this bounds the pipeline's memory whatever the "
        "dataset size or block_rows (docs/performance-log.md)")
    prefetch_batches: int = Field(2, ge=0)
    cache_val_mb: float = Field(
        512, ge=0, description="a validation set whose preprocessed tensors fit in this many MiB "
        "is preprocessed once, before training, and kept in Ray's object store (validation is "
        "deterministic); larger ones stream through the validation actors every epoch. 0: always "
        "stream")
    prefetch_next_epoch: bool = Field(
        True, description="start the next epoch's training pipeline (actor start-up, first batch) "
        "while the current epoch validates and checkpoints (with one_execution: false)")
    one_execution: bool = Field(
        True, description="stream every epoch of a run through one Ray Data execution (slots "
        "epoch * n + i), so that its start-up (new worker processes or actors, the first "
        "block) and its drain are paid once per run, not once per epoch; each worker cuts its "
        "stream into epochs by row count. false: one execution per epoch (with "
        "prefetch_next_epoch started while the epoch before validates). Falls back to one "
        "execution per epoch where the cluster cannot hold the training and validation pools "
        "at once (docs/performance-log.md)")
    deterministic: bool = Field(
        True, description="the same config gives the same run: blocks reach the training "
        "workers in file-list order (Ray Data's preserve_order), so which images each worker's "
        "batches hold does not depend on which task finished first (and on a GPU cuDNN uses "
        "deterministic kernels). false: blocks go out as their tasks finish, and on several "
        "nodes preferably to a worker on the node that made them, which may help a large pool "
        "where one slow block holds up those behind it; on 2 CPUs no difference in speed was "
        "measured (README, Ablation and tuning)")
    one_execution_max_rows: int = Field(
        4_000_000, ge=1, description="with one_execution, at most this many rows (epochs x "
        "training files) per execution: a longer run streams through one execution per "
        "max_rows // files epochs, so that the driver never holds a row table of every epoch of "
        "a big dataset")


class ModelConfig(_Section):
    name: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet18"
    init: Literal["default", "kaiming", "xavier"] = "kaiming"
    pretrained: str | None = None
    zero_init_residual: bool = False


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.05, ge=0.0)
    batch_size: int = Field(32, ge=1, description="global batch, split across workers")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0.0)
    use_gpu: bool | Literal["auto"] = "auto"
    gpus_per_worker: float = Field(1.0, gt=0.0)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    momentum: float | None = Field(
        None, ge=0.0, lt=1.0, description="SGD's and RMSprop's momentum; None = each one's usual "
        "value: 0.9 for SGD, 0 for RMSprop (with 0.9, RMSprop's early steps are about 25x the "
        "learning rate and a small run diverges)")
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["none", "step", "multistep", "exponential", "cosine", "plateau", "onecycle"] = (
        "cosine"
    )
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(5, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    milestones: list[int] = [30, 60]
    plateau_metric: Literal["val_loss", "val_auc"] = "val_loss"
    plateau_patience: int = Field(2, ge=0)
    loss: Literal["ce", "weighted_ce", "focal", "bce", "weighted_bce", "weighted"] = Field(
        "weighted_ce", description="how the loss weighs; its form follows the data's task. One "
        "label per file: cross-entropy, class weights N / (K n_k); multilabel: binary "
        "cross-entropy per finding, positive weights negatives / positives. ce, bce: "
        "unweighted; weighted_ce, weighted_bce, weighted: weighted (on multilabel data "
        "weighted_ce is weighted_bce, and so on); focal: weighted and focal")
    class_weights: list[float] | None = None
    focal_gamma: float = Field(2.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0)
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="mixup: train on convex mixes of image pairs (and their losses), "
        "mixing weight ~ Beta(alpha, alpha); 0 = off")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="validate, checkpoint and evaluate an exponential moving "
        "average of the weights (and BatchNorm statistics), updated every step with this decay")
    bn_stats: Literal["precise", "ema"] = Field(
        "precise", description="BatchNorm running statistics, which validation and checkpoints use. "
        "precise: after each epoch, recomputed with the epoch's final weights over its last "
        "bn_stats_samples training images (a forward pass, no gradients); ema: PyTorch's "
        "exponential average (momentum 0.1) of the training batches' statistics, which with few "
        "steps per epoch still holds earlier weights' statistics (and the initial 0 and 1)")
    bn_stats_samples: int = Field(
        512, ge=2, description="training images per worker that bn_stats: precise recomputes the "
        "statistics over (the epoch's last ones, kept on the training device)")
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    seed: int = 0
    overfit_subset: int | None = Field(None, ge=1)
    overfit_loss: float = Field(0.1, gt=0.0)
    grad_spike_factor: float = Field(10.0, gt=1.0)
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="decision threshold (binary)")
    max_failures: int = Field(0, ge=-1)
    torch_threads: int | None = Field(None, ge=1)


CHECKPOINT_METRICS = ("val_auc", "val_loss", "val_acc", "val_balanced_acc", "val_pr_auc", "val_f1")


class CheckpointConfig(_Section):
    metric: str = Field(
        "val_auc", description=f"one of {', '.join(CHECKPOINT_METRICS)}, or (multilabel) one "
        "finding's AUC, val_auc/<finding>; val_auc is then the macro mean over the findings")
    mode: Literal["auto", "max", "min"] = "auto"
    num_to_keep: int = Field(2, ge=1)

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
        description="None: <config name>-<date>-<time>; an existing name resumes that run",
    )
    storage_path: str = "~/raypipe-results"
    resume: bool = True
    tensorboard: bool = True


class Config(_Section):
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    pipeline: PipelineConfig = PipelineConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()

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


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append("  - " + _unknown_key_message(loc, value))
            continue
        allowed = ""
        ctx = e.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in e["msg"]:
            allowed = f" Allowed: {ctx['expected']}."
        lines.append(f"  - {dotted} = {value!r}: {e['msg']}.{allowed}")
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


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load ``path`` (default: ``configs/default.yaml``), apply dotted overrides, validate."""
    tree = load_yaml(path or CONFIG_DIR / "default.yaml")
    source = str(path or "configs/default.yaml")
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return build_config(tree, source)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
