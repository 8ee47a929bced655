"""Discover image files and labels on any pyarrow filesystem, and split them deterministically.

Two layouts are understood:

* folder-per-class: ``root/<class>/**/<image>``;
* a CSV manifest with a path column and a label column, including the NIH ChestX-ray14 form
  (``Image Index``, ``Finding Labels`` with ``|``-separated findings) made binary by naming the
  positive finding.

The split is seeded, stratified and stable: within each class a file goes to validation when its
hash (seed + relative path) is among the lowest ``round(n * val_fraction)`` of that class, so adding
files never reshuffles the split: an existing file changes side only when a new file takes its place
(or the validation share grows).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from raypipe.config import DataConfig

log = logging.getLogger(__name__)

NIH_PATH_COLUMN = "Image Index"
NIH_LABEL_COLUMN = "Finding Labels"


class DataSourceError(ValueError):
    """The dataset location or layout is unusable. The message names the path and the fix."""


@dataclass
class Record:
    path: str  # path on ``filesystem`` (no scheme)
    label: int
    key: str  # stable, relative identifier (split hashing, augmentation seeds, reports)
    size: int | None = None  # bytes, when the listing told us (cheap duplicate detection)


@dataclass
class DatasetSplit:
    filesystem: pafs.FileSystem
    class_names: list[str]
    train: list[Record]
    val: list[Record]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) at listing time
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train key, val key), same bytes

    def _per_class(self, records: list[Record]) -> dict[str, int]:
        return dict(zip(self.class_names, label_counts(records, len(self.class_names)), strict=True))

    def counts(self) -> dict:
        train, val = self._per_class(self.train), self._per_class(self.val)
        n_train = max(1, len(self.train))
        return {
            "source": self.source,
            "class_names": self.class_names,
            "train": train,
            "val": val,
            "train_total": len(self.train),
            "val_total": len(self.val),
            "prevalence_train": {k: v / n_train for k, v in train.items()},
            "train_val_duplicates": len(self.duplicates),
        }

    def describe(self) -> str:
        """The split in one line for the log: classes, then per-class counts of each side."""
        def side(records: list[Record]) -> str:
            return f"{len(records)} ({', '.join(f'{k} {v}' for k, v in self._per_class(records).items())})"

        dup = len(self.duplicates)
        return (f"{len(self.class_names)} classes; train {side(self.train)}, val {side(self.val)}"
                + (f"; {dup} validation image(s) duplicate a training image" if dup else ""))

    def train_label_counts(self) -> list[int]:
        return label_counts(self.train, len(self.class_names))


def label_counts(records: list[Record], num_classes: int) -> list[int]:
    """Files per class, by class index."""
    c = Counter(r.label for r in records)
    return [int(c.get(i, 0)) for i in range(num_classes)]


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
    return fs, class_names, records, skipped


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
    manifest: str, cfg: DataConfig, base: str | None = None
) -> tuple[pafs.FileSystem, list[str], list[Record], list[tuple[str, str]]]:
    """Records from a CSV manifest. Paths resolve against ``base`` (data.root) or the CSV's folder."""
    df = read_manifest_table(manifest)
    path_col, label_col = cfg.path_column, cfg.label_column
    if path_col not in df.columns and NIH_PATH_COLUMN in df.columns:
        path_col = NIH_PATH_COLUMN
    if label_col not in df.columns and NIH_LABEL_COLUMN in df.columns:
        label_col = NIH_LABEL_COLUMN
    for col, key in ((path_col, "data.path_column"), (label_col, "data.label_column")):
        if col not in df.columns:
            raise DataSourceError(
                f"manifest '{manifest}' has no column '{col}' (columns: {list(df.columns)}). "
                f"Set {key} to the right column name."
            )
    if base is None:
        base = posixpath.dirname(manifest) if "://" in manifest else os.path.dirname(
            os.path.abspath(manifest)
        )
    fs, root = get_filesystem(base)

    labels_raw = df[label_col].astype(str).tolist()
    if cfg.positive_finding:
        pos = cfg.positive_finding
        flags = [pos in [t.strip() for t in s.split(cfg.label_separator)] for s in labels_raw]
        names = [f"no_{pos}", pos]
        if not any(flags):
            raise DataSourceError(
                f"no row of manifest '{manifest}' has finding '{pos}' in column '{label_col}'. "
                "Check data.positive_finding (it is case-sensitive)."
            )
        labels = [names[int(f)] for f in flags]
    else:
        labels = labels_raw
    found = sorted(set(labels))
    if cfg.positive_finding:  # the finding is the positive class (index 1), whatever the spelling
        found = [n for n in names if n in found]
    class_names = _resolve_class_names(found, cfg, manifest, ordered=bool(cfg.positive_finding))
    index = {c: i for i, c in enumerate(class_names)}

    paths = df[path_col].astype(str).tolist()
    existing = _existing_files(fs, root, base)
    by_name: dict[str, str] | None = None
    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    for rel in paths:  # every row, before anything is read: no path may leave the data root
        _check_safe_relative(rel, manifest)
    _check_known_labels(labels, index, manifest, label_col)
    for rel, lab in zip(paths, labels, strict=True):
        full = f"{root}/{rel}"
        if full not in existing:
            if by_name is None:
                by_name = {}
                for p in existing:
                    by_name.setdefault(posixpath.basename(p), p)
            found = by_name.get(posixpath.basename(rel))
            if found is None:
                skipped.append((rel, "listed in the manifest but not found under " + base))
                continue
            full = found
        records.append(Record(path=full, label=index[lab], key=rel, size=existing[full]))
    _check_missing(skipped, len(paths), cfg, manifest, base)
    return fs, class_names, records, skipped


def _check_known_labels(labels: list[str], index: dict[str, int], manifest: str, column: str) -> None:
    unknown = Counter(lab for lab in labels if lab not in index)
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
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Per class, the ``round(n * fraction)`` records with the lowest hash go to validation
    (at least one when the class has two or more)."""
    train: list[Record] = []
    val: list[Record] = []
    by_label: dict[int, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: _split_hash(seed, r.key))
        k = int(round(len(group) * fraction))
        if len(group) >= 2:
            k = min(max(k, 1), len(group) - 1)
        else:
            k = 0
        val.extend(group[:k])
        train.extend(group[k:])
    key = lambda r: r.key  # noqa: E731
    return sorted(train, key=key), sorted(val, key=key)


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


def _list(uri: str | None, manifest: str | None, cfg: DataConfig):
    if manifest:
        return list_manifest(manifest, cfg, base=uri)
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
    val_fs = fs
    if cfg.val_root or cfg.val_manifest:
        val_fs, val_names, val, val_skipped = _list(cfg.val_root or root, cfg.val_manifest, cfg)
        if val_names != class_names:
            raise DataSourceError(
                f"validation classes {val_names} differ from training classes {class_names}. "
                "Give both the same class folders, or set data.class_names."
            )
        train, skipped = records, skipped + val_skipped
    else:
        train, val = stratified_split(records, cfg.val_fraction, cfg.split_seed)
    if cfg.limit is not None and cfg.limit < len(train):
        train, _ = _stratified_subset(train, cfg.limit, cfg.split_seed)
        val, _ = _stratified_subset(val, max(2, cfg.limit // 4), cfg.split_seed)
    duplicates = find_duplicates(fs, train, val_fs, val)
    split = DatasetSplit(fs, class_names, train, val, source, skipped, duplicates)
    log.info("dataset %s: %s", source, split.describe())
    if duplicates:
        examples = ", ".join(f"{v} = {t}" for v, t in duplicates[:3])
        log.warning(
            "%d validation image(s) have the same bytes as a training image (train/val leakage; "
            "e.g. %s). Validation metrics will be optimistic: remove the copies.",
            len(duplicates), examples,
        )
    return split


# ---------------------------------------------------------------- train/val leakage

FINGERPRINT_BYTES = 64 * 1024


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
    by_print: dict[bytes, str] = {}
    for r in train:
        size = train_sizes.get(r.path)
        if size in common:
            fp = _fingerprint(fs, r.path, size)
            if fp is not None:
                by_print.setdefault(fp, r.key)
    pairs = []
    for r in val:
        size = val_sizes.get(r.path)
        if size in common:
            fp = _fingerprint(val_fs, r.path, size)
            if fp is not None and fp in by_print:
                pairs.append((r.key, by_print[fp]))
    return pairs


def _stratified_subset(records: list[Record], n: int, seed: int) -> tuple[list[Record], list]:
    """``n`` records keeping class proportions (at least one per class when possible)."""
    if n >= len(records):
        return records, []
    frac = 1.0 - n / len(records)
    rest, chosen = stratified_split(records, frac, seed + 1)
    return rest, chosen


def subset(records: list[Record], n: int, seed: int) -> list[Record]:
    """A stratified subset of ``n`` records (the overfit check's "small chunk")."""
    return _stratified_subset(records, n, seed)[0]
