"""``model.pretrained``: bring a weight file onto this node once, fingerprint what was loaded, and
say which input statistics the weights expect.

A URI (``s3://``, ``gs://``) is downloaded into a per-node cache folder keyed by the URI and the
object's size and modification time, under a file lock, so the training workers of one node (and
a driver on it) download it once between them and a changed object is fetched again. A local
path is read in place on each node: it has to exist on every node, which object storage gives
for free on a multi-node cluster. Fetching needs no torch (a process that only fetches starts
fast); the functions on tensors import it when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
from filelock import FileLock

from raypipe.config import ModelConfig, PreprocessConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torchvision's ImageNet transforms (the meta of every ResNet*_Weights.IMAGENET1K_V1/V2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000

WEIGHTS_FILE = "weights.pt"
SOURCE_FILE = "source.json"  # written last: a cache entry without it is incomplete
_CHUNK = 8 << 20


class PretrainedError(ValueError):
    """``model.pretrained`` cannot be used: missing, unreachable, unreadable, or not the model's
    architecture. The message names the file, what was expected and what arrived."""


@dataclass(frozen=True)
class LocalWeights:
    """A weight file on this node's disk."""

    path: str
    sha256: str  # of the file's bytes
    downloaded: bool  # this call fetched it from object storage (False: cached, or a local path)
    source: str  # model.pretrained as given


def default_cache_dir() -> Path:
    """This node's folder for fetched weights: ``$RAYPIPE_CACHE/pretrained`` or
    ``~/.cache/raypipe/pretrained``."""
    base = os.environ.get("RAYPIPE_CACHE") or Path.home() / ".cache" / "raypipe"
    return Path(base).expanduser() / "pretrained"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.lower().startswith("file://")


def fetch_pretrained(uri: str, cache_dir: str | None = None) -> LocalWeights:
    """``uri`` as a file on this node. Object storage: downloaded into ``cache_dir`` (default
    :func:`default_cache_dir`, resolved on this node) unless an earlier call on this node did;
    local path: used in place. Raises :class:`PretrainedError` saying what is missing and how to
    fix it."""
    if not is_remote(uri):
        return _local(uri)
    from raypipe.data.sources import DataSourceError, get_filesystem

    try:
        fs, path = get_filesystem(uri)
    except DataSourceError as exc:
        raise PretrainedError(f"model.pretrained: {exc}") from None
    info = _remote_info(fs, path, uri)
    entry = _entry_dir(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
                       uri, info)
    entry.parent.mkdir(parents=True, exist_ok=True)
    # the workers of one node race here; the first downloads, the others wait and reuse its file
    with FileLock(str(entry) + ".lock"):
        cached = _cached(entry, info.size)
        if cached is not None:
            log.info("model.pretrained: %s from this node's cache %s", uri, entry)
            return LocalWeights(str(entry / WEIGHTS_FILE), cached, False, uri)
        digest = _download(fs, path, uri, entry, info)
    return LocalWeights(str(entry / WEIGHTS_FILE), digest, True, uri)


def _local(uri: str) -> LocalWeights:
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise PretrainedError(
            f"model.pretrained: '{uri}' {what} on node {socket.gethostname()}. A local path is "
            "read on every node that trains, from that node's own disk: give the path of a "
            "state_dict file there, or, for a multi-node cluster, put the file in object "
            "storage and give its s3:// or gs:// URI (fetched once per node).")
    return LocalWeights(path, file_sha256(path), False, uri)


def _remote_info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise PretrainedError(
            f"model.pretrained: cannot reach '{uri}': {exc}. Check the URI, the endpoint "
            "(AWS_ENDPOINT_URL for an S3-compatible server) and the credentials.") from None
    if info.type == pafs.FileType.NotFound:
        raise PretrainedError(
            f"model.pretrained: '{uri}' does not exist. Upload the state_dict there (e.g. "
            "torch.save(torchvision.models.resnet18().state_dict(), 'resnet18.pth'), then copy "
            "it to the bucket) or fix the URI.")
    if info.type != pafs.FileType.File:
        raise PretrainedError(
            f"model.pretrained: '{uri}' is a folder, expected one state_dict file in it.")
    return info


def _entry_dir(cache: Path, uri: str, info: pafs.FileInfo) -> Path:
    """One folder per (URI, size, modification time): an object written again is a new entry.
    Its name starts with the file's name, for people looking in the cache."""
    key = hashlib.sha256(f"{uri}\0{info.size}\0{info.mtime_ns or 0}".encode()).hexdigest()[:24]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:64]
    return cache / f"{name}-{key}"


def _cached(entry: Path, size: int) -> str | None:
    """The sha256 of a complete cache entry of ``size`` bytes, else None."""
    try:
        meta = json.loads((entry / SOURCE_FILE).read_text())
        if os.path.getsize(entry / WEIGHTS_FILE) == size == meta["size"]:
            return str(meta["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    return None


def _download(fs: pafs.FileSystem, path: str, uri: str, entry: Path,
              info: pafs.FileInfo) -> str:
    """``uri`` into ``entry`` (under its lock): the bytes into a temporary file renamed into
    place, then the entry's ``source.json``. Returns the bytes' sha256."""
    entry.mkdir(parents=True, exist_ok=True)
    (entry / SOURCE_FILE).unlink(missing_ok=True)
    tmp = entry / f"{WEIGHTS_FILE}.part{os.getpid()}"
    digest, n, t0 = hashlib.sha256(), 0, time.monotonic()
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                n += len(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PretrainedError(
            f"model.pretrained: downloading '{uri}' to {entry} failed after {n} of {info.size} "
            f"bytes: {exc}. Check the endpoint and the network, and that {entry.parent} on "
            f"node {socket.gethostname()} is writable with room for the file "
            "(model.cache_dir).") from None
    if n != info.size:
        tmp.unlink(missing_ok=True)
        raise PretrainedError(
            f"model.pretrained: '{uri}' gave {n} bytes, its listing said {info.size}: it was "
            "probably written again while being downloaded. Run again once it is complete.")
    os.replace(tmp, entry / WEIGHTS_FILE)
    sha = digest.hexdigest()
    meta = {"uri": uri, "size": info.size, "mtime_ns": info.mtime_ns, "sha256": sha,
            "node": socket.gethostname(), "fetched_at": time.time()}
    (entry / f"{SOURCE_FILE}.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(entry / f"{SOURCE_FILE}.tmp", entry / SOURCE_FILE)
    log.info("model.pretrained: downloaded %s (%.1f MB, %.1f s) into this node's cache %s",
             uri, n / 1e6, time.monotonic() - t0, entry)
    return sha


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``state``'s tensors: equal digests,
    equal weights."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- input statistics


def weights_statistics(state: Mapping[str, torch.Tensor], mode: str) -> tuple[bool, str]:
    """(whether the weights expect ImageNet's mean/std, why). A state dict does not record the
    statistics it was trained with; ``auto`` takes a torchvision ResNet layout with a 1000-class
    classifier for ImageNet-1k weights, whose torchvision recipes all use ImageNet's."""
    from raypipe.models.resnet import architecture_of

    if mode == "imagenet":
        return True, "model.pretrained_stats=imagenet"
    if mode == "none":
        return False, "model.pretrained_stats=none"
    arch = architecture_of(state)
    fc = state.get("fc.weight")
    classes = int(fc.shape[0]) if fc is not None and fc.dim() == 2 else None
    if arch is not None and classes == IMAGENET_CLASSES:
        return True, (f"model.pretrained_stats=auto: a torchvision {arch} state_dict with a "
                      f"{IMAGENET_CLASSES}-class (ImageNet-1k) head")
    what = f"a {arch}" if arch else "not a torchvision ResNet layout"
    head = f"a {classes}-class head" if classes is not None else "no classifier"
    return False, (f"model.pretrained_stats=auto: {what} with {head}, so the statistics it was "
                   "trained with are unknown (set model.pretrained_stats=imagenet or "
                   "preprocess.mean/std if you know them)")


def input_statistics(preprocess: PreprocessConfig, model: ModelConfig,
                     state: Mapping[str, torch.Tensor]) -> tuple[PreprocessConfig, str]:
    """``preprocess`` with ``mean``/``std`` set to the weights' statistics where the config
    leaves both unset, and a line for the log saying what was chosen and why."""
    imagenet, why = weights_statistics(state, model.pretrained_stats)
    if preprocess.mean is not None or preprocess.std is not None:
        return preprocess, (f"preprocess.mean={preprocess.mean} std={preprocess.std} as configured "
                            f"(the weights: {'ImageNet' if imagenet else 'unknown'} statistics, "
                            f"{why})")
    if not imagenet:
        return preprocess, f"preprocess.mean/std unset: no standardisation ({why})"
    if preprocess.channels == 1:
        # the summed conv1 sees a gray pixel as equal R, G and B; the RGB network standardised
        # each channel by its own statistics, which one channel can only approximate by their mean
        mean = [round(sum(IMAGENET_MEAN) / 3, 4)]
        std = [round(sum(IMAGENET_STD) / 3, 4)]
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    note = ""
    if preprocess.normalize == "none":
        note = (" WARNING: preprocess.normalize=none leaves pixels at their stored scale, while "
                "ImageNet's statistics are for images scaled to [0, 1]")
    return (preprocess.model_copy(update={"mean": mean, "std": std}),
            f"preprocess.mean={mean} std={std}: ImageNet's ({why}).{note}")
