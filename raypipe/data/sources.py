"""Discover image files and labels on any pyarrow filesystem, and split them deterministically.

Two layouts are understood:

* folder-per-class: ``root/<class>/**/<image>``;
* a CSV manifest with a path column and a label column, including the NIH ChestX-ray14 form
  (``Image Index``, ``Finding Labels`` with ``|``-separated findings, ``Patient ID``), filtered
  first by ``data.where``.

Labels (``data.task``). Single-label (``binary``/``multiclass``): each :class:`Record` holds one
class index into ``DatasetSplit.class_names``; a multi-finding column is made binary by
``data.positive_finding``. Multilabel: each record holds a 0/1 tuple over the findings
(``DatasetSplit.class_names``, in that order); ``data.no_finding`` is all zeros, not a class.
:func:`label_array` turns records into the array a batch carries: int64 ``(N,)`` class indices or
float32 ``(N, K)`` multi-hot rows.

The split is seeded, stratified, grouped and stable. Files of one group (``data.group_column``,
default the ``Patient ID`` column; ``data.group_pattern`` for file names) always land on the same
side; a file without a group is a group of its own. Each group belongs to the stratum of the
rarest class or finding among its files (groups with no finding: one last stratum). From the
rarest stratum to the most common, validation takes the stratum's groups with the lowest hash
(seed + group, or the relative path of an ungrouped file), as many as bring the validation
files of the stratum's class or finding closest to ``round(n * val_fraction)``, counting those
that rarer strata already put there (the last stratum aims at the total file count); at least
one group goes to each side when the stratum has two. So every finding is split in proportion
as far as the groups allow, and adding files never reshuffles the split: an existing group
changes side only when a new group with a lower hash takes its place in its stratum, when a
stratum's target moves (more files, or rarer strata placing a few files differently), or when a
new file gives the group a rarer finding (and so another stratum). Ungrouped single-label data
splits exactly as a per-class hash split: per class, the ``round(n * val_fraction)`` files with
the lowest hash.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import logging
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.fs as pafs

from raypipe.config import DataConfig, parse_where

log = logging.getLogger(__name__)

NIH_PATH_COLUMN = "Image Index"
NIH_LABEL_COLUMN = "Finding Labels"
NIH_GROUP_COLUMN = "Patient ID"  # data.group_column=auto groups by it when a manifest has it

Task = Literal["binary", "multiclass", "multilabel"]
Label = int | tuple[int, ...]


class DataSourceError(ValueError):
    """The dataset location or layout is unusable. The message names the path and the fix."""


@dataclass(slots=True)  # slots: a 112,120-row manifest is as many records in the driver
class Record:
    """One image file.

    ``label``: single-label, the class index into ``DatasetSplit.class_names`` (int); multilabel,
    a 0/1 tuple with one entry per finding of ``DatasetSplit.class_names`` (records with the same
    findings share one tuple object). ``group``: the patient (or other group) whose files stay on
    one side of the split; None = the file is its own group.
    """

    path: str  # path on ``filesystem`` (no scheme)
    label: Label
    key: str  # stable, relative identifier (split hashing, augmentation seeds, reports)
    size: int | None = None  # bytes, when the listing told us (cheap duplicate detection)
    group: str | None = None


@dataclass
class DatasetSplit:
    """Training and validation files of one dataset.

    ``task``: ``binary`` or ``multiclass`` (``Record.label`` is a class index; ``class_names``
    are the classes) or ``multilabel`` (``Record.label`` is a 0/1 tuple; ``class_names`` are the
    findings). Left out, it follows from the records. ``group_by``: what grouped files for the
    split (``column 'Patient ID'``, ``file-name pattern '...'``), None when files were split one
    by one.
    """

    filesystem: pafs.FileSystem
    class_names: list[str]
    train: list[Record]
    val: list[Record]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) at listing time
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train key, val key), same bytes
    task: Task | None = None
    group_by: str | None = None

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = infer_task(self.class_names, self.train or self.val)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def label_array(self, records: list[Record]) -> np.ndarray:
        """int64 ``(N,)`` class indices, or float32 ``(N, K)`` multi-hot rows (multilabel)."""
        return label_array(records, len(self.class_names), self.multilabel)

    def _per_class(self, records: list[Record]) -> dict[str, int]:
        counts = label_counts(records, len(self.class_names), self.multilabel)
        return dict(zip(self.class_names, counts, strict=True))

    def counts(self) -> dict:
        """Files per class (single-label) or positives per finding (multilabel) on each side,
        training prevalence, and groups per side when the split was grouped."""
        train, val = self._per_class(self.train), self._per_class(self.val)
        n_train = max(1, len(self.train))
        out = {
            "source": self.source,
            "task": self.task,
            "class_names": self.class_names,
            "train": train,
            "val": val,
            "train_total": len(self.train),
            "val_total": len(self.val),
            "prevalence_train": {k: v / n_train for k, v in train.items()},
            "train_val_duplicates": len(self.duplicates),
        }
        if self.multilabel:
            n_val = max(1, len(self.val))
            out["prevalence_val"] = {k: v / n_val for k, v in val.items()}
            out["no_finding_train"] = _no_finding(self.train)
            out["no_finding_val"] = _no_finding(self.val)
        if self.group_by:
            train_groups, val_groups = _groups(self.train), _groups(self.val)
            out.update(group_by=self.group_by, train_groups=len(train_groups),
                       val_groups=len(val_groups),
                       groups_on_both_sides=len(train_groups & val_groups))
        return out

    def describe(self) -> str:
        """The split in one line for the log: classes, then per-class counts of each side
        (multilabel: positives and prevalence per finding); groups per side when grouped."""
        if self.multilabel:
            def side(records: list[Record]) -> str:
                n = max(1, len(records))
                per = ", ".join(f"{k} {v} ({v / n:.1%})" for k, v in self._per_class(records).items())
                return f"{len(records)}{self._of_groups(records)} ({per}; none {_no_finding(records)})"

            head = f"multilabel, {len(self.class_names)} findings"
        else:
            def side(records: list[Record]) -> str:
                per = ", ".join(f"{k} {v}" for k, v in self._per_class(records).items())
                return f"{len(records)}{self._of_groups(records)} ({per})"

            head = f"{len(self.class_names)} classes"
        dup = len(self.duplicates)
        by = f"; grouped by {self.group_by}" if self.group_by else ""
        shared = len(_groups(self.train) & _groups(self.val)) if self.group_by else 0
        return (f"{head}; train {side(self.train)}, val {side(self.val)}{by}"
                + (f"; {shared} group(s) on both sides" if shared else "")
                + (f"; {dup} validation image(s) duplicate a training image" if dup else ""))

    def _of_groups(self, records: list[Record]) -> str:
        return f" files of {len(_groups(records))} groups" if self.group_by else ""

    def train_label_counts(self) -> list[int]:
        """Training files per class, or training positives per finding (multilabel)."""
        return label_counts(self.train, len(self.class_names), self.multilabel)

    def undefined_auc(self, records: list[Record] | None = None) -> list[str]:
        """Classes (one-vs-rest) or findings with no positive or no negative among ``records``
        (default: validation): they have no AUC there."""
        records = self.val if records is None else records
        pos = np.asarray(label_counts(records, len(self.class_names), self.multilabel))
        return [n for n, p in zip(self.class_names, pos, strict=True) if p == 0 or p == len(records)]


def infer_task(class_names: list[str], records: list[Record]) -> Task:
    """``multilabel`` when the records hold 0/1 tuples, else ``binary`` (two classes) or
    ``multiclass``."""
    if records and isinstance(records[0].label, tuple):
        return "multilabel"
    return "binary" if len(class_names) == 2 else "multiclass"


def _groups(records: list[Record]) -> set[str]:
    """The groups of ``records``; an ungrouped file counts as its own group."""
    return {r.group if r.group is not None else "\0" + r.key for r in records}


def _no_finding(records: list[Record]) -> int:
    """Multilabel records with no finding at all."""
    return sum(1 for r in records if not any(r.label))


def label_array(records: list[Record], num_classes: int | None = None,
                multilabel: bool | None = None) -> np.ndarray:
    """The labels a batch of ``records`` carries: int64 ``(N,)`` class indices (single-label), or
    float32 ``(N, K)`` 0/1 rows (multilabel, K = ``num_classes`` findings). ``multilabel``
    defaults to what the records hold."""
    if multilabel is None:
        multilabel = bool(records) and isinstance(records[0].label, tuple)
    if not multilabel:
        return np.fromiter((r.label for r in records), np.int64, len(records))
    if not records:
        return np.zeros((0, num_classes or 0), np.float32)
    out = np.array([r.label for r in records], np.float32)
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"records hold {out.shape[1]} findings, expected {num_classes}")
    return out


def label_counts(records: list[Record], num_classes: int, multilabel: bool | None = None) -> list[int]:
    """Files per class by class index (single-label), or positive files per finding
    (multilabel)."""
    labels = label_array(records, num_classes, multilabel)
    if labels.ndim == 2:
        return [int(v) for v in labels.sum(axis=0, dtype=np.int64)]
    labels = labels[(labels >= 0) & (labels < num_classes)]  # -1: an unlabelled file
    return [int(v) for v in np.bincount(labels, minlength=num_classes)]


# ---------------------------------------------------------------- filesystems


def get_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI pyarrow understands (s3://, gs://, ...).

    For S3, the standard AWS environment variables apply (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``/
    ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for an S3-compatible
    server such as MinIO). Credentials are read by the AWS SDK and never logged.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, _, rest = uri.partition("://")
    if scheme.lower() == "s3":
        path = rest.strip("/")
        if not path:
            raise DataSourceError(f"'{uri}' names no bucket. Use s3://<bucket>/<prefix>.")
        return _s3_filesystem(path.split("/", 1)[0]), path
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for bad URIs
        raise DataSourceError(f"cannot open '{uri}': {exc}") from exc
    return fs, path.rstrip("/")


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3`` wins), if any."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint.strip().rstrip("/") if endpoint and endpoint.strip() else None


def _s3_region(bucket: str, endpoint: str | None) -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    if endpoint is None:  # real AWS: ask where the bucket lives, or requests get redirected
        return _bucket_region(bucket)
    return "us-east-1"


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    """One network request per bucket and process (the filesystem is built for every file op)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return "us-east-1"  # missing bucket or no network: the first real request says so


S3_MAX_ATTEMPTS = 3
# what pyarrow's S3 client says when the endpoint itself is gone (not when one object is bad)
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused",
                "Could not resolve host", "Timeout was reached", "timed out")


class StorageUnreachableError(RuntimeError):
    """Object storage stopped answering during a run (after the client's retries). Not an
    ``OSError``: the readers' bad-file handling must not take it for one unreadable file."""


def unreachable(exc: BaseException, fs: pafs.FileSystem, path: str) -> StorageUnreachableError | None:
    """A :class:`StorageUnreachableError` naming ``path`` if ``exc`` is the object store being
    unreachable (a network failure), else None (a bad or missing object is a bad file)."""
    if not isinstance(fs, pafs.S3FileSystem) or not any(m in str(exc) for m in _UNREACHABLE):
        return None
    where = s3_endpoint() or "AWS S3"
    return StorageUnreachableError(
        f"object storage unreachable while reading 's3://{path}' (endpoint {where}), after "
        f"{S3_MAX_ATTEMPTS} attempts with back-off: {exc}. Nothing is counted as a bad file. "
        "Check the endpoint and the network, then re-run the same command (same run.name) to "
        "resume from the last checkpoint.")


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    # short timeouts and few retries: an unreachable endpoint fails in seconds, not minutes
    kwargs: dict = {
        "region": _s3_region(bucket, endpoint),
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def _missing_bucket(fs: pafs.FileSystem, path: str, uri: str) -> str | None:
    """For an S3 URI whose bucket does not exist, a message saying so; else None."""
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return None
    if not missing:
        return None
    where = s3_endpoint() or "AWS S3"
    return (f"bucket '{bucket}' of '{uri}' does not exist at {where}. Create it, or fix the URI "
            "(and AWS_ENDPOINT_URL for an S3-compatible server).")


def join_uri(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise DataSourceError(
            f"cannot reach '{uri}': {exc}. Check the path, the endpoint and the credentials."
        ) from exc
    if info.type == pafs.FileType.NotFound:
        message = _missing_bucket(fs, path, uri)
        if message:
            raise DataSourceError(message)
    return info


def _list_tree(fs: pafs.FileSystem, root: str, uri: str) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as exc:
        raise DataSourceError(
            f"cannot list '{uri}': {exc}. Check that it exists and is readable."
        ) from exc
    return [i for i in infos if i.type == pafs.FileType.File]


def _is_image(name: str, extensions: list[str]) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in extensions


# ---------------------------------------------------------------- layouts


def list_folder_per_class(
    uri: str, cfg: DataConfig
) -> tuple[pafs.FileSystem, list[str], list[Record], list[tuple[str, str]]]:
    """Every image under ``uri/<class>/``; class names sorted unless ``cfg.class_names`` given."""
    if cfg.task == "multilabel" or cfg.findings or cfg.where:
        key = "data.where" if cfg.where else "data.task=multilabel / data.findings"
        raise DataSourceError(
            f"{key} needs a CSV manifest, but '{uri}' is read as folder-per-class (one class per "
            "image, no columns). Set data.manifest to a CSV with a path and a label column, or "
            "remove the setting.")
    fs, root = get_filesystem(uri)
    info = _info(fs, root, uri)
    if info.type != pafs.FileType.Directory:
        raise DataSourceError(
            f"data root '{uri}' does not exist or is not a folder. Set data.root to a folder "
            "holding one sub-folder per class (root/<class>/*.jpg), or use data.manifest."
        )
    files = _list_tree(fs, root, uri)
    by_class: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    for f in files:
        rel = posixpath.relpath(f.path, root) if "://" in uri else os.path.relpath(f.path, root)
        rel = rel.replace(os.sep, "/")
        parts = rel.split("/")
        if len(parts) < 2:
            if _is_image(rel, cfg.extensions):
                skipped.append((rel, "image directly in the root, not in a class folder"))
            continue
        if not _is_image(rel, cfg.extensions):
            if not posixpath.basename(rel).startswith("."):
                skipped.append((rel, f"extension not in data.extensions {cfg.extensions}"))
            continue
        by_class.setdefault(parts[0], []).append(rel)
        sizes[rel] = f.size
    # class folders holding nothing usable still count as classes the user meant to have
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if entry.type == pafs.FileType.Directory and not entry.base_name.startswith("."):
            by_class.setdefault(entry.base_name, [])
    class_names = _resolve_class_names(list(by_class), cfg, uri)
    empty = [c for c in class_names if not by_class.get(c)]
    if empty:
        raise DataSourceError(
            f"class folder(s) {empty} under '{uri}' hold no images with extensions "
            f"{cfg.extensions}. Add images, remove the folder, or list the classes to use in "
            "data.class_names."
        )
    index = {c: i for i, c in enumerate(class_names)}
    records = [
        Record(path=f"{root}/{rel}", label=index[c], key=rel, size=sizes.get(rel))
        for c in class_names
        for rel in sorted(by_class[c])
    ]
    if cfg.group_pattern:
        groups = pattern_groups([r.key for r in records], cfg.group_pattern)
        for r, g in zip(records, groups, strict=True):
            r.group = g
    return fs, class_names, records, skipped


def pattern_groups(paths: list[str], pattern: str) -> list[str | None]:
    """The first group of ``pattern`` searched in each path's file name (Kermany's
    ``person(\\d+)_`` gives ``'12'`` for ``PNEUMONIA/person12_virus_3.jpeg``); None where it does
    not match (the file is then its own group)."""
    import pandas as pd

    names = pd.Series([posixpath.basename(p) for p in paths], dtype=object)
    found = names.str.extract(pattern, expand=True).iloc[:, 0]
    return _interned(found.where(found.notna() & (found != ""), None))


def _resolve_class_names(
    found: list[str], cfg: DataConfig, where: str, ordered: bool = False
) -> list[str]:
    """``data.class_names`` checked against ``found``, else ``found`` (sorted unless ``ordered``)."""
    if cfg.class_names:
        missing = [c for c in cfg.class_names if c not in found]
        if missing:
            raise DataSourceError(
                f"data.class_names lists {missing}, not found in '{where}' (found: {sorted(found)})."
            )
        names = list(cfg.class_names)
    else:
        names = list(found) if ordered else sorted(found)
    if len(names) < 2:
        raise DataSourceError(
            f"'{where}' has {len(names)} class(es) {names}; classification needs at least two. "
            "Use one sub-folder per class (root/<class>/...) or a manifest with two labels."
        )
    return names


def read_manifest_table(uri: str):
    """The manifest CSV at ``uri`` as a pandas DataFrame (all columns as strings)."""
    import pandas as pd

    fs, path = get_filesystem(uri)
    info = _info(fs, path, uri)
    if info.type != pafs.FileType.File:
        raise DataSourceError(f"manifest '{uri}' not found. Set data.manifest to a CSV file.")
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataSourceError(f"manifest '{uri}' is not a readable CSV: {exc}") from exc


def list_manifest(
    manifest: str, cfg: DataConfig, base: str | None = None, *,
    findings: list[str] | None = None, single_label: bool = False,
) -> tuple[pafs.FileSystem, list[str], list[Record], list[tuple[str, str]]]:
    """Records from a CSV manifest. Paths resolve against ``base`` (data.root) or the CSV's folder.

    Rows are filtered by ``data.where`` first. The labels follow ``data.task`` (see the module
    docstring); ``findings`` fixes a multilabel manifest's findings to the training side's (a
    validation manifest: other findings in it are ignored, with a warning), ``single_label``
    keeps auto-detection from making a validation manifest multilabel when training was not.
    Groups come from ``data.group_column`` or ``data.group_pattern``.
    """
    df = read_manifest_table(manifest)
    path_col, label_col = _label_columns(df, cfg, manifest)
    # the column's form decides the task, whichever rows data.where keeps
    multilabel = findings is not None or (
        not single_label and _is_multilabel(df[label_col].astype(str), cfg, manifest, label_col))
    df = filter_rows(df, cfg.where, manifest)
    paths = df[path_col].astype(str)
    _check_safe_paths(paths, manifest)  # every row, before anything is read
    labels_raw = df[label_col].astype(str)
    if multilabel:
        class_names, labels = _multilabel(labels_raw, cfg, manifest, label_col, findings)
    else:
        class_names, labels = _single_label(labels_raw, cfg, manifest, label_col)
    groups = _manifest_groups(df, paths, cfg, manifest)
    if base is None:
        base = posixpath.dirname(manifest) if "://" in manifest else os.path.dirname(
            os.path.abspath(manifest)
        )
    fs, root = get_filesystem(base)
    found = _resolve_paths(paths, _existing_files(fs, root, base), root)
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    for rel, full, size, lab, grp in zip(paths.tolist(), *found, labels,
                                         groups if groups is not None else [None] * len(paths),
                                         strict=True):
        if full is None:
            skipped.append((rel, "listed in the manifest but not found under " + base))
        else:
            records.append(Record(full, lab, rel, size, grp))
    _check_missing(skipped, len(paths), cfg, manifest, base)
    return fs, class_names, records, skipped


def _label_columns(df, cfg: DataConfig, manifest: str) -> tuple[str, str]:
    """The path and label columns: as configured, or NIH's when the configured ones are absent."""
    path_col, label_col = cfg.path_column, cfg.label_column
    if path_col not in df.columns and NIH_PATH_COLUMN in df.columns:
        path_col = NIH_PATH_COLUMN
    if label_col not in df.columns and NIH_LABEL_COLUMN in df.columns:
        label_col = NIH_LABEL_COLUMN
    for col, key in ((path_col, "data.path_column"), (label_col, "data.label_column")):
        if col not in df.columns:
            raise DataSourceError(
                f"manifest '{manifest}' has no column '{col}'{_closest(col, df.columns)} "
                f"(columns: {list(df.columns)}). Set {key} to the right column name."
            )
    return path_col, label_col


def _closest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _interned(values) -> list:
    """``values`` (a pandas Series) as a list in which equal values are one object: a patient's
    hundred films hold one string, the same findings one tuple."""
    import pandas as pd

    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    table = list(uniques) + [None]  # code -1: a missing value
    return [table[c] for c in codes.tolist()]


def _is_multilabel(labels, cfg: DataConfig, manifest: str, column: str) -> bool:
    """``data.task`` resolved for a manifest; ``auto`` picks multilabel when the label column joins
    names with ``data.label_separator`` and no ``data.positive_finding`` is set, and says so."""
    if cfg.task != "auto":
        return cfg.task == "multilabel"
    if cfg.positive_finding:
        return False
    joined = labels.str.contains(cfg.label_separator, regex=False)
    n = int(joined.sum())
    if n:
        log.info("data.task=auto: multilabel, since %d of the %d rows of column '%s' of '%s' join "
                 "several findings with '%s' (e.g. '%s') and data.positive_finding is not set; "
                 "each file gets a 0/1 vector over the findings, '%s' (data.no_finding) meaning "
                 "none. For one finding against the rest set data.positive_finding=<finding>; "
                 "for each label string as one class, data.task=multiclass",
                 n, len(labels), column, manifest, cfg.label_separator, labels[joined].iloc[0],
                 cfg.no_finding)
    return n > 0


def _findings_of(uniques: list[str], cfg: DataConfig) -> list[frozenset[str]]:
    """The finding names in each distinct label string (no-finding and blanks removed)."""
    return [frozenset(t.strip() for t in u.split(cfg.label_separator)) - {cfg.no_finding, ""}
            for u in uniques]


def _multilabel(labels, cfg: DataConfig, manifest: str, column: str,
                fixed: list[str] | None) -> tuple[list[str], list[tuple[int, ...]]]:
    """Finding names and each row's 0/1 tuple; parsed once per distinct label string."""
    import pandas as pd

    codes, uniques = pd.factorize(labels)
    uniques = [str(u) for u in uniques]
    empty = [i for i, u in enumerate(uniques) if not u.strip()]
    if empty:
        rows = int(np.isin(codes, empty).sum())
        raise DataSourceError(
            f"{rows} row(s) of manifest '{manifest}' have an empty '{column}'. Write "
            f"'{cfg.no_finding}' (data.no_finding) for files without findings, or leave those rows "
            f"out with data.where=\"{column} != ''\".")
    sets = _findings_of(uniques, cfg)
    per_row = np.bincount(codes, minlength=len(uniques))
    found = Counter()
    for names, n in zip(sets, per_row.tolist(), strict=True):
        for name in names:
            found[name] += n
    if fixed is not None:
        names = list(fixed)
        other = sorted(set(found) - set(names))
        if other:
            log.warning("manifest '%s' has findings %s that the training manifest does not; they "
                        "are ignored", manifest, other)
    elif cfg.findings:
        unknown = [f for f in cfg.findings if f not in found]
        if unknown:
            raise DataSourceError(
                f"data.findings names {unknown}, not found in column '{column}' of manifest "
                f"'{manifest}'{_closest(unknown[0], found)}. Its findings: "
                f"{', '.join(f'{k} ({v})' for k, v in sorted(found.items()))}. Names are "
                "case-sensitive.")
        names = list(cfg.findings)
    else:
        names = sorted(found)
    if not names:
        raise DataSourceError(
            f"column '{column}' of manifest '{manifest}' holds no finding other than "
            f"'{cfg.no_finding}' (data.no_finding); a multilabel task needs at least one.")
    rows = [tuple(int(n in s) for n in names) for s in sets]
    return names, [rows[c] for c in codes.tolist()]


def _single_label(labels, cfg: DataConfig, manifest: str,
                  column: str) -> tuple[list[str], list[int]]:
    """Class names and each row's class index: the label string, or with
    ``data.positive_finding`` ``no_<finding>`` / ``<finding>``."""
    import pandas as pd

    codes, uniques = pd.factorize(labels)
    uniques = [str(u) for u in uniques]
    if cfg.positive_finding:
        pos = cfg.positive_finding
        names = [f"no_{pos}", pos]
        flags = [pos in [t.strip() for t in u.split(cfg.label_separator)] for u in uniques]
        if not any(flags):
            raise DataSourceError(
                f"no row of manifest '{manifest}' has finding '{pos}' in column '{column}'. "
                "Check data.positive_finding (it is case-sensitive)."
            )
        uniques = [names[int(f)] for f in flags]
        found = [n for n in names if n in uniques]  # the finding is the positive class (index 1)
    else:
        found = sorted(set(uniques))
    class_names = _resolve_class_names(found, cfg, manifest, ordered=bool(cfg.positive_finding))
    if cfg.task == "binary" and len(class_names) != 2:
        raise DataSourceError(
            f"data.task=binary, but manifest '{manifest}' gives {len(class_names)} classes "
            f"{class_names[:10]}. Set data.class_names to two of them, data.positive_finding for "
            "one finding against the rest, or data.task=multiclass.")
    index = {c: i for i, c in enumerate(class_names)}
    per_row = np.bincount(codes, minlength=len(uniques))
    _check_known_labels(Counter({u: int(n) for u, n in zip(uniques, per_row, strict=True)
                                 if u not in index}), index, manifest, column)
    table = [index.get(u, -1) for u in uniques]
    return class_names, [table[c] for c in codes.tolist()]


def _manifest_groups(df, paths, cfg: DataConfig, manifest: str) -> list[str | None] | None:
    """Each row's group: the ``data.group_column`` value (auto: ``Patient ID`` when present and no
    ``data.group_pattern`` is set), else the ``data.group_pattern`` match; None = ungrouped."""
    column = cfg.group_column
    if column == "auto":
        column = NIH_GROUP_COLUMN if (NIH_GROUP_COLUMN in df.columns
                                      and not cfg.group_pattern) else None
    if column is not None:
        if column not in df.columns:
            raise DataSourceError(
                f"data.group_column='{column}' is not a column of manifest '{manifest}'"
                f"{_closest(column, df.columns)} (columns: {list(df.columns)}). Name the column "
                "that identifies the patient, or set data.group_column=null to split file by file.")
        values = df[column].astype(str).str.strip()
        return _interned(values.where(values != "", None))
    if cfg.group_pattern:
        return pattern_groups(paths.tolist(), cfg.group_pattern)
    return None


def filter_rows(df, conditions: list[str], manifest: str):
    """The rows of ``df`` meeting every condition of ``data.where`` (see
    :func:`raypipe.config.parse_where`). Values compare as numbers where both the cell and the
    value are numbers, else as text. An unknown column or a condition that no row meets is an
    error naming it."""
    if not conditions:
        return df
    keep = np.ones(len(df), bool)
    kept: list[str] = []
    for condition in conditions:
        column, op, values = parse_where(condition)
        if column not in df.columns:
            raise DataSourceError(
                f"data.where condition '{condition}': manifest '{manifest}' has no column "
                f"'{column}'{_closest(column, df.columns)}. Its columns: {list(df.columns)}.")
        mask = _condition_mask(df[column].astype(str), op, values)
        if not mask.any():
            raise DataSourceError(
                f"data.where condition '{condition}' matches no row of manifest '{manifest}' "
                f"({len(df)} rows); column '{column}' holds {_value_summary(df[column])}. Fix the "
                "value (text compares exactly, case-sensitive) or remove the condition.")
        keep &= mask
        kept.append(f"'{condition}' {int(mask.sum())}")
    if not keep.any():
        raise DataSourceError(
            f"the data.where conditions together match no row of manifest '{manifest}' (rows "
            f"meeting each: {', '.join(kept)}). Loosen one of them.")
    log.info("data.where keeps %d of the %d rows of manifest '%s' (rows meeting each: %s)",
             int(keep.sum()), len(df), manifest, ", ".join(kept))
    return df[keep].reset_index(drop=True)


def _condition_mask(cells, op: str, values: list[str]) -> np.ndarray:
    import pandas as pd

    text = cells.str.strip().to_numpy(dtype=object)
    numbers = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64)
    wanted = [_number(v) for v in values]
    if op in ("in", "not in"):
        mask = np.zeros(len(text), bool)
        for v, x in zip(values, wanted, strict=True):
            mask |= _equal(text, numbers, v, x)
        return ~mask if op == "not in" else mask
    v, x = values[0], wanted[0]
    if op in ("==", "!="):
        eq = _equal(text, numbers, v, x)
        return ~eq if op == "!=" else eq
    compare = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}[op]
    if x is not None:  # a number: cells that are not numbers do not meet it
        with np.errstate(invalid="ignore"):
            return compare(numbers, x) & ~np.isnan(numbers)
    return compare(text.astype(str), v)


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return None if np.isnan(x) else x


def _equal(text: np.ndarray, numbers: np.ndarray, value: str, number: float | None) -> np.ndarray:
    eq = text == value.strip()
    if number is not None:
        eq |= numbers == number  # '058' == 58
    return eq


def _value_summary(cells) -> str:
    """A few of a column's values, or its range when they are numbers."""
    import pandas as pd

    numbers = pd.to_numeric(cells, errors="coerce")
    if numbers.notna().all() and len(numbers):
        return f"numbers from {numbers.min():g} to {numbers.max():g}"
    common = cells.astype(str).value_counts()
    listed = ", ".join(f"'{v}' ({n})" for v, n in common.head(8).items())
    return f"{len(common)} distinct values: {listed}" + (", ..." if len(common) > 8 else "")


def _check_safe_paths(paths, manifest: str) -> None:
    """Every path is relative and stays inside the data root (vectorised; the first offender is
    reported by :func:`_check_safe_relative`)."""
    bad = (paths.str.startswith(("/", "\\")) | paths.str.contains("://", regex=False)
           | (paths.str[1:2] == ":") | paths.str.contains(r"(?:^|[/\\])\.\.(?:[/\\]|$)",
                                                          regex=True))
    if bad.any():
        _check_safe_relative(str(paths[bad].iloc[0]), manifest)


def _resolve_paths(paths, existing: dict[str, int | None],
                   root: str) -> tuple[list[str | None], list[int | None]]:
    """Each manifest path's file under ``root`` and its size: ``root/<path>``, else the first
    listed file with the same name anywhere under ``root`` (NIH's images_001/images/...); None
    where neither exists."""
    full = [f"{root}/{rel}" for rel in paths.tolist()]
    hits = [f if f in existing else None for f in full]
    if any(h is None for h in hits):
        by_name: dict[str, str] = {}
        for p in existing:
            by_name.setdefault(p.rpartition("/")[2], p)
        hits = [h if h is not None else by_name.get(rel.rpartition("/")[2])
                for h, rel in zip(hits, paths.tolist(), strict=True)]
    return hits, [existing[h] if h is not None else None for h in hits]


def _check_known_labels(unknown: Counter, index: dict[str, int], manifest: str, column: str) -> None:
    """``unknown``: rows per label that is not a class."""
    if unknown:
        listed = ", ".join(f"'{lab}' ({n} rows)" for lab, n in unknown.most_common(5))
        raise DataSourceError(
            f"manifest '{manifest}' has labels in column '{column}' that are not in "
            f"data.class_names {sorted(index)}: {listed}. Add them to data.class_names, remove "
            "those rows, or set data.positive_finding for a one-vs-rest label."
        )


def _check_missing(
    missing: list[tuple[str, str]], n_rows: int, cfg: DataConfig, manifest: str, base: str
) -> None:
    """Rows whose file is absent follow the bad-file policy: listed and skipped, unless
    ``data.on_bad_file=fail`` or there are more than ``data.max_bad_fraction`` of them."""
    if not missing:
        return
    fraction = len(missing) / max(1, n_rows)
    if cfg.on_bad_file == "fail" or fraction > cfg.max_bad_fraction:
        first = ", ".join(f"'{k}'" for k, _ in missing[:5])
        why = ("data.on_bad_file=fail" if cfg.on_bad_file == "fail"
               else f"{fraction:.1%}, above data.max_bad_fraction={cfg.max_bad_fraction}")
        raise DataSourceError(
            f"manifest '{manifest}' lists {len(missing)} of {n_rows} files that do not exist under "
            f"'{base}' ({why}); first: {first}. Fix data.root (the folder the manifest's paths are "
            "relative to) or the manifest."
        )
    log.warning("manifest '%s': %d listed files not found under '%s'; they are skipped and listed "
                "in the run's skipped.csv", manifest, len(missing), base)


def _existing_files(fs: pafs.FileSystem, root: str, uri: str) -> dict[str, int | None]:
    """Every file under ``root``: path -> size in bytes."""
    return {f.path.replace(os.sep, "/"): f.size for f in _list_tree(fs, root, uri)}


def _check_safe_relative(rel: str, manifest: str) -> None:
    if rel.startswith(("/", "\\")) or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise DataSourceError(
            f"manifest '{manifest}' lists absolute path '{rel}'. Paths must be relative to the "
            "data root (data.root) so that they cannot point outside it."
        )
    if ".." in rel.replace("\\", "/").split("/"):
        raise DataSourceError(
            f"manifest '{manifest}' lists '{rel}', which climbs out of the data root with '..'. "
            "Use paths relative to data.root."
        )


# ---------------------------------------------------------------- split


def _split_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")


def stratified_split(
    records: list[Record], fraction: float, seed: int, *, by_group: bool = True
) -> tuple[list[Record], list[Record]]:
    """``(train, val)``: the files of each group on one side, stratified by the rarest class or
    finding of each group (see the module docstring for the rule and what stays put when files
    are added). ``by_group=False`` treats every file as its own group. Both lists come sorted
    by key."""
    if not records:
        return [], []
    labels = _label_matrix(records)
    ident = [("\0" + r.key) if (r.group is None or not by_group) else r.group for r in records]
    codes, first = _factorize(ident)
    n_groups = len(first)
    sizes = np.bincount(codes, minlength=n_groups)
    per_group = np.zeros((n_groups, labels.shape[1]), np.int64)
    np.add.at(per_group, codes, labels)
    # strata from the rarest class or finding (ties: the lower index) to the most common, then
    # the groups with none; each stratum's prefix aims at its label's total validation share,
    # counting the files that rarer strata already put there (iterative stratification)
    n_labels = labels.shape[1]
    order = np.lexsort((np.arange(n_labels), labels.sum(axis=0)))
    rank = np.empty(n_labels, np.int64)
    rank[order] = np.arange(n_labels)
    stratum = np.where(per_group > 0, rank[None, :], n_labels).min(axis=1)
    # an ungrouped file hashes as before grouping existed: by its key
    hashes = np.fromiter((_split_hash(seed, ident[i].removeprefix("\0")) for i in first),
                         np.uint64, n_groups)
    in_val = np.zeros(n_groups, bool)
    placed = np.zeros(n_labels, np.int64)  # files of each label already in validation
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        members = members[np.argsort(hashes[members], kind="stable")]
        if s < n_labels:
            label = order[s]
            weights = per_group[members, label]
            target = round(int(labels[:, label].sum()) * fraction) - placed[label]
        else:
            weights = sizes[members]
            target = round(len(records) * fraction) - int(sizes[in_val].sum())
        chosen = members[:_prefix(weights, target)]
        in_val[chosen] = True
        placed += per_group[chosen].sum(axis=0)
    val_rows = in_val[codes]
    key = lambda r: r.key  # noqa: E731
    train = sorted((r for r, v in zip(records, val_rows, strict=True) if not v), key=key)
    val = sorted((r for r, v in zip(records, val_rows, strict=True) if v), key=key)
    return train, val


def _prefix(weights: np.ndarray, target: int) -> int:
    """How many of a stratum's groups (in hash order, holding ``weights`` files of its label)
    go to validation: the count whose files come closest to ``target``, with at least one group
    on each side when there are two (for groups of one file: exactly ``target``)."""
    if len(weights) < 2:
        return 0
    cum = np.cumsum(weights)[:-1]  # files in validation after 1 .. n-1 groups
    return 1 + int(np.argmin(np.abs(cum - target)))


def _factorize(values: list[str]) -> tuple[np.ndarray, list[int]]:
    """Codes of ``values`` numbered by first appearance, and each code's first index."""
    index: dict[str, int] = {}
    first: list[int] = []
    codes = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        c = index.get(v)
        if c is None:
            c = index[v] = len(first)
            first.append(i)
        codes[i] = c
    return codes, first


def _label_matrix(records: list[Record]) -> np.ndarray:
    """0/1 int8 ``(N, C)``: one-hot class (single-label; C = highest index + 1) or the findings."""
    labels = label_array(records)
    if labels.ndim == 2:
        return labels.astype(np.int8)
    out = np.zeros((len(labels), int(labels.max()) + 1), np.int8)
    out[np.arange(len(labels)), labels] = 1
    return out


# ---------------------------------------------------------------- built-in dataset


def builtin_root(cfg: DataConfig) -> str:
    """Materialise scikit-image's ``lfw_subset`` (100 faces, 100 non-faces, 25x25 gray) as PNGs
    in folder-per-class layout, once, and return the folder."""
    base = Path(
        cfg.cache_dir or os.environ.get("RAYPIPE_CACHE") or Path.home() / ".cache" / "raypipe"
    ).expanduser()
    root = base / "lfw_faces"
    marker = root / ".complete"
    if marker.exists():
        return str(root)
    from PIL import Image
    from skimage import data as skdata

    images = skdata.lfw_subset()  # (200, 25, 25) float64 in [0, 1]; faces first
    tmp = base / f".lfw_faces.tmp{os.getpid()}"
    for i, img in enumerate(images):
        cls = "face" if i < 100 else "not_face"
        out = tmp / cls / f"{i:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(out)
    (tmp / ".complete").write_text("lfw_subset from scikit-image\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(root)


# ---------------------------------------------------------------- entry point


def _list(uri: str | None, manifest: str | None, cfg: DataConfig, **fixed):
    if manifest:
        return list_manifest(manifest, cfg, base=uri, **fixed)
    return list_folder_per_class(uri, cfg)


def discover(cfg: DataConfig) -> DatasetSplit:
    """List, label and split the dataset described by ``cfg``."""
    root = cfg.root
    if root is None and cfg.manifest is None:
        root = builtin_root(cfg)
    source = cfg.manifest or root
    fs, class_names, records, skipped = _list(root, cfg.manifest, cfg)
    if not records:
        raise DataSourceError(f"no usable images found in '{source}'.")
    task = infer_task(class_names, records)
    group_by = _group_by(records, cfg, bool(cfg.manifest))
    val_fs = fs
    if cfg.val_root or cfg.val_manifest:
        # the validation side takes the training side's task and findings
        fixed = ({"findings": class_names} if task == "multilabel" else {"single_label": True}
                 if cfg.val_manifest else {})
        val_fs, val_names, val, val_skipped = _list(cfg.val_root or root, cfg.val_manifest, cfg,
                                                    **fixed)
        if val_names != class_names:
            raise DataSourceError(
                f"validation classes {val_names} differ from training classes {class_names}. "
                "Give both the same class folders, or set data.class_names."
            )
        train, skipped = records, skipped + val_skipped
        group_by = group_by or _group_by(val, cfg, bool(cfg.val_manifest))
    else:
        train, val = stratified_split(records, cfg.val_fraction, cfg.split_seed)
    if cfg.limit is not None and cfg.limit < len(train):
        train, _ = _stratified_subset(train, cfg.limit, cfg.split_seed)
        val, _ = _stratified_subset(val, max(2, cfg.limit // 4), cfg.split_seed)
    duplicates = find_duplicates(fs, train, val_fs, val)
    split = DatasetSplit(fs, class_names, train, val, source, skipped, duplicates, task, group_by)
    log.info("dataset %s: %s", source, split.describe())
    shared = _groups(train) & _groups(val) if group_by else set()
    if shared:  # only a given validation set can do this: the split never does
        log.warning("%d group(s) (%s) have files on both sides of the given validation set, e.g. "
                    "%s: validation metrics will be optimistic. Remove them from one side.",
                    len(shared), group_by, ", ".join(sorted(shared)[:3]))
    if duplicates:
        examples = ", ".join(f"{v} = {t}" for v, t in duplicates[:3])
        log.warning(
            "%d validation image(s) have the same bytes as a training image (train/val leakage; "
            "e.g. %s). Validation metrics will be optimistic: remove the copies.",
            len(duplicates), examples,
        )
    return split


def _group_by(records: list[Record], cfg: DataConfig, manifest: bool) -> str | None:
    """What grouped ``records`` for the split, in words; None when no file has a group."""
    if not any(r.group is not None for r in records):
        return None
    column = NIH_GROUP_COLUMN if cfg.group_column == "auto" else cfg.group_column
    if manifest and column is not None and not (cfg.group_column == "auto" and cfg.group_pattern):
        return f"column '{column}'"
    return f"file-name pattern '{cfg.group_pattern}'"


# ---------------------------------------------------------------- train/val leakage

FINGERPRINT_BYTES = 64 * 1024
FINGERPRINT_THREADS = 16


def _fill_sizes(fs: pafs.FileSystem, records: list[Record]) -> dict[str, int]:
    """path -> size for ``records``, asking the filesystem only for those the listing left out."""
    sizes = {r.path: r.size for r in records if r.size is not None}
    unknown = [r.path for r in records if r.size is None]
    if unknown:
        try:
            sizes.update({i.path: i.size for i in fs.get_file_info(unknown) if i.size is not None})
        except OSError:
            pass  # unreadable files are reported by the pipeline, not here
    return sizes


def _fingerprint(fs: pafs.FileSystem, path: str, size: int) -> bytes | None:
    """Hash of the size, the first and the last 64 KiB (the whole file when smaller): two reads
    at most per file, and only for files whose size matches one on the other side."""
    try:
        with fs.open_input_file(path) as f:
            if size <= 2 * FINGERPRINT_BYTES:
                data = f.read()
            else:
                data = f.read_at(FINGERPRINT_BYTES, 0) + f.read_at(FINGERPRINT_BYTES,
                                                                   size - FINGERPRINT_BYTES)
    except OSError:
        return None
    return hashlib.sha1(size.to_bytes(8, "big") + data).digest()


def find_duplicates(
    fs: pafs.FileSystem, train: list[Record], val_fs: pafs.FileSystem, val: list[Record]
) -> list[tuple[str, str]]:
    """``(val key, train key)`` for every validation file whose bytes also occur in training.

    Files are first grouped by size (known from the listing), so only same-size candidates are
    read, and of those only the head and tail; empty files are left to the bad-file report.
    """
    train_sizes, val_sizes = _fill_sizes(fs, train), _fill_sizes(val_fs, val)
    common = {s for s in train_sizes.values() if s} & set(val_sizes.values())
    if not common:
        return []

    def prints(filesystem, records, sizes) -> list[tuple[Record, bytes | None]]:
        todo = [r for r in records if sizes.get(r.path) in common]
        # object stores answer each read in tens of milliseconds: many reads at once
        with ThreadPoolExecutor(max_workers=FINGERPRINT_THREADS) as pool:
            return list(zip(todo, pool.map(lambda r: _fingerprint(filesystem, r.path, sizes[r.path]),
                                           todo), strict=True))

    by_print: dict[bytes, str] = {}
    for r, fp in prints(fs, train, train_sizes):
        if fp is not None:
            by_print.setdefault(fp, r.key)
    return [(r.key, by_print[fp]) for r, fp in prints(val_fs, val, val_sizes)
            if fp is not None and fp in by_print]


def _stratified_subset(records: list[Record], n: int, seed: int) -> tuple[list[Record], list]:
    """``n`` records keeping class proportions (at least one per class when possible)."""
    if n >= len(records):
        return records, []
    frac = 1.0 - n / len(records)
    # a subset of one side: groups are already on one side, so every file counts alone
    rest, chosen = stratified_split(records, frac, seed + 1, by_group=False)
    return rest, chosen


def subset(records: list[Record], n: int, seed: int) -> list[Record]:
    """A stratified subset of ``n`` records (the overfit check's "small chunk")."""
    return _stratified_subset(records, n, seed)[0]
