"""Checkpoint folders and the marker that says one is complete.

A run's checkpoints are ``<run dir>/checkpoint_epochNNNN/`` folders holding ``model.pt`` and
``meta.json``, persisted by ``ray.train.report``. Once the report has returned (the files are
written and closed in storage), rank 0 writes ``complete.json`` into the folder, last, with the
size of each file. Resuming, picking the best checkpoint and the evaluate job trust only folders
whose marker is there and whose files still have the sizes it records; any other folder is named
in a warning and left as it is. Nothing here deletes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import tempfile
from typing import Any

import pyarrow.fs as pafs

from raypipe.data.sources import get_filesystem, join_uri

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
MARKER_FILE = "complete.json"
CHECKPOINT_PREFIX = "checkpoint_epoch"  # + the epoch, four digits: checkpoint_epoch0003
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def epoch_of(uri: str) -> int:
    """The epoch in a checkpoint folder's name."""
    m = _NAME.match(uri.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1])
    if m is None:
        raise ValueError(f"'{uri}' is not a {CHECKPOINT_PREFIX}NNNN folder")
    return int(m.group(1))


def unmark(uri: str) -> None:
    """Take a marker away before a folder is written again (a re-trained epoch after a resume):
    until the new files are all in, the folder is not complete."""
    fs, path = get_filesystem(join_uri(uri, MARKER_FILE))
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def mark_complete(uri: str, epoch: int) -> None:
    """Write the marker into checkpoint folder ``uri``, after its files are in storage."""
    fs, path = get_filesystem(uri)
    infos = fs.get_file_info([posixpath.join(path, n) for n in (MODEL_FILE, META_FILE)])
    missing = [i.base_name for i in infos if i.type != pafs.FileType.File]
    if missing:
        raise OSError(f"checkpoint '{uri}' lacks {missing} after it was reported; not marked complete")
    marker = {"epoch": epoch, "files": {i.base_name: i.size for i in infos}}
    with fs.open_output_stream(posixpath.join(path, MARKER_FILE)) as f:
        f.write(json.dumps(marker).encode())


def incomplete_reason(uri: str) -> str | None:
    """Why checkpoint folder ``uri`` cannot be trusted, or None when it is complete."""
    fs, path = get_filesystem(uri)
    try:
        with fs.open_input_stream(posixpath.join(path, MARKER_FILE)) as f:
            marker = json.loads(f.read().decode())
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"no {MARKER_FILE} (its writing did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MARKER_FILE} cannot be read ({type(exc).__name__}: {exc})"
    try:
        infos = fs.get_file_info([posixpath.join(path, n) for n in files])
    except OSError as exc:
        return f"its files cannot be listed ({exc})"
    for info in infos:
        if info.type != pafs.FileType.File:
            return f"{info.base_name} is missing"
        if info.size != files[info.base_name]:
            return f"{info.base_name} has {info.size} bytes, {files[info.base_name]} when it was written"
    return None


def is_complete(uri: str) -> bool:
    return incomplete_reason(uri) is None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(epoch, uri)`` of every checkpoint folder in ``run_dir``, complete or not, by epoch."""
    fs, path = get_filesystem(run_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        log.warning("cannot list the checkpoints in %s (%s); treating the run as having none "
                    "(nothing is deleted)", run_dir, exc)
        return []
    found = []
    for entry in entries:
        m = _NAME.match(entry.base_name)
        if m and entry.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), join_uri(run_dir, entry.base_name)))
    return sorted(found)


def latest_complete(run_dir: str | None) -> str | None:
    """The complete checkpoint of ``run_dir`` with the highest epoch, or None. Incomplete folders
    newer than it are named in a warning and left as they are."""
    if not run_dir:
        return None
    for _, uri in reversed(list_checkpoints(run_dir)):
        reason = incomplete_reason(uri)
        if reason is None:
            return uri
        log.warning("checkpoint %s is not used: %s. It is left as it is; delete it yourself if "
                    "you do not need it.", uri, reason)
    return None


def read_checkpoint(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of checkpoint folder ``uri`` (local or object storage): ``torch.load``
    of ``model.pt`` (tensors and plain containers only) and ``meta.json``."""
    import torch

    fs, path = get_filesystem(uri)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (META_FILE, MODEL_FILE):
            pafs.copy_files(posixpath.join(path, name), os.path.join(tmp, name),
                            source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        with open(os.path.join(tmp, META_FILE)) as f:
            meta = json.load(f)
        state = torch.load(os.path.join(tmp, MODEL_FILE), map_location="cpu", weights_only=True)
    return state, meta


def read_meta(uri: str) -> dict[str, Any]:
    fs, path = get_filesystem(uri)
    with fs.open_input_stream(posixpath.join(path, META_FILE)) as f:
        return json.loads(f.read().decode())


def best_complete(run_dir: str, metric: str, mode: str) -> tuple[str | None, dict[str, Any]]:
    """(uri, metrics) of the complete checkpoint of ``run_dir`` with the best ``metric``
    (``mode`` max or min; NaN counts as worst), or (None, {}). Incomplete folders are named in a
    warning and left as they are."""
    best: tuple[float, int, str, dict] | None = None
    sign = 1.0 if mode == "max" else -1.0
    for epoch, uri in list_checkpoints(run_dir):
        reason = incomplete_reason(uri)
        if reason is not None:
            log.warning("checkpoint %s is not considered: %s. It is left as it is.", uri, reason)
            continue
        try:
            metrics = read_meta(uri).get("metrics") or {}
        except (OSError, ValueError) as exc:
            log.warning("checkpoint %s is not considered: its %s cannot be read (%s)", uri,
                        META_FILE, exc)
            continue
        value = metrics.get(metric)
        score = sign * float(value) if isinstance(value, int | float) and value == value else -math.inf
        if best is None or (score, epoch) > (best[0], best[1]):
            best = (score, epoch, uri, metrics)
    return (best[2], best[3]) if best is not None else (None, {})
