"""scale: a real manifest's row count (NIH ChestX-ray14: 112,120 films) through the real pipeline.

(a) ``--write-standins DIR`` writes a stand-in film for every file name of the manifest (``Image
    Index``): a small 8-bit grayscale PNG (``--standin-size``, 64 px) whose pixels derive from a
    hash of the name alone, so the same name always gets the same bytes. Files already there are
    left as they are. Stand-ins carry no signal: no accuracy is ever claimed from them.
(b) For each ``--rows N`` (default: a tenth of the manifest, then all of it), the manifest's first
    N rows are listed, labelled and split (``discover``, timed), then every one of their files
    (training and validation side alike) is streamed through one epoch of the training input
    exactly as a training run feeds it, with no model, from the files (``pipeline.cache=false``).
    Reported: images/s, and the peak memory of the whole Ray session (driver and every process it
    started) over the listing and over the epoch; the ratio of the largest to the smallest
    size's peak (target <= 1.2: memory does not grow with the row count). One unmeasured short
    epoch runs first, so that every size starts from the same pool of worker processes.
(c) ``--s3-objects N`` (>= 10,000 for the figure): the same from a moto S3 server started here,
    N stand-ins uploaded and the manifest's first N rows beside them; the listing goes through
    pyarrow's S3 filesystem, paging included (``all_rows_listed``). It runs in a child process
    with its own local Ray, whose workers get the server's endpoint from their environment as a
    cluster's nodes do.
(d) ``--train-files N``: a short training run, one epoch on N training files (``data.limit``: the
    run's step limit) on the multilabel task (``data.task=multilabel``) with the patient-grouped
    split (``data.group_column``: NIH's ``Patient ID``), that ends with per-finding AUCs in
    ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.fs as pafs

from raypipe.benchmarks.common import (
    MIB,
    PeakSampler,
    add_pipeline_arguments,
    at_least,
    ensure_ray,
    pipeline_overrides,
    ray_epochs,
    scratch_dir,
    session_memory,
    stage_cpus,
)
from raypipe.config import Config, load_config
from raypipe.data.sources import DatasetSplit, discover, get_filesystem, read_manifest_table

NIH_MANIFEST = "/work/shared/data/nih-chestxray14/Data_Entry_2017_v2020.csv.gz"
PATH_COLUMNS = ("Image Index", "path")  # NIH's, then raypipe's default
S3_BUCKET = "raypipe-scale"
# at most this many stand-ins per task of the writer's pool: a task's start is then nothing
CHUNK = 2000


# ---------------------------------------------------------------- (a) stand-in films


def standin_pixels(name: str, size: int = 64) -> np.ndarray:
    """(size, size) uint8: a bright body with two darker lung fields at an offset, plus noise,
    all drawn from a hash of ``name`` alone (film-like texture, no label signal)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    body = 190 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.18)
    lungs = sum(80 * np.exp(-(((xx - cx - s * 0.17) / 0.12) ** 2 + ((yy - cy) / 0.22) ** 2))
                for s in (-1, 1))
    img = 30 + body - lungs + rng.normal(0, 6, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def standin_png(name: str, size: int = 64) -> bytes:
    """The PNG bytes of ``name``'s stand-in film (8-bit grayscale)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(standin_pixels(name, size), "L").save(buf, "PNG")
    return buf.getvalue()


def _check_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or ":" in name or ".." in parts:
        raise ValueError(f"manifest file name {name!r}: stand-ins are written under the folder, "
                         "so names must be relative paths without '..'")


def _write_chunk(folder: str, names: list[str], size: int) -> tuple[int, int]:
    """Write the stand-ins of ``names`` missing from ``folder``: (written, already there). Each
    file appears whole or not at all (written aside, then renamed), so an interrupted writer
    leaves no half file to be taken for a finished one."""
    written = present = 0
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            present += 1
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(standin_png(name, size))
        os.replace(tmp, path)
        written += 1
    return written, present


def write_standins(names: list[str], folder: str, size: int = 64,
                   processes: int | None = None) -> dict:
    """A stand-in film (:func:`standin_png`) for each of ``names`` in ``folder``, skipping those
    there already, on ``processes`` processes (default: every CPU). Returns the counts and time."""
    import multiprocessing

    for name in names:
        _check_name(name)
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    processes = max(1, min(processes or os.cpu_count() or 1, len(names)))
    # a few tasks per process, so that the processes finish together
    step = max(1, min(CHUNK, math.ceil(len(names) / (4 * processes))))
    chunks = [names[i:i + step] for i in range(0, len(names), step)]
    if processes <= 1:
        counts = [_write_chunk(folder, chunk, size) for chunk in chunks]
    else:
        # spawned, not forked: this process may run Ray's threads, whose locks a fork inherits
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            counts = pool.starmap(_write_chunk, [(folder, c, size) for c in chunks])
    return {"standins": len(names), "written": sum(c[0] for c in counts),
            "already_there": sum(c[1] for c in counts), "write_s": time.perf_counter() - t0,
            "standin_size": size, "folder": folder, "processes": processes}


def path_column(columns: list[str], wanted: str | None) -> str:
    """The manifest's file-name column: ``wanted``, else NIH's ``Image Index``, else ``path``."""
    for col in [wanted] if wanted else PATH_COLUMNS:
        if col in columns:
            return col
    raise ValueError(f"the manifest has no file-name column {wanted or ' or '.join(PATH_COLUMNS)}"
                     f" (columns: {columns}); name it with --path-column")


# ---------------------------------------------------------------- (b) one epoch per row count


def first_rows(manifest: str, n: int, total: int) -> str:
    """``manifest`` itself when it has ``n`` rows (``total``), else a CSV of its first ``n``
    rows in a scratch folder."""
    if n >= total:
        return manifest
    path = os.path.join(scratch_dir("raypipe-scale-"), f"first-{n}.csv")
    read_manifest_table(manifest).head(n).to_csv(path, index=False)
    return path


def scale_config(args: argparse.Namespace, manifest: str, root: str) -> Config:
    """The manifest over the stand-ins, 1-channel films, augmentation on, the data stage from
    the arguments, then ``--set`` overrides."""
    finding = [] if args.finding == "none" else [f"data.positive_finding={args.finding}"]
    return load_config(None, [
        f"data.manifest={manifest}", f"data.root={root}", *finding, *_path_override(args),
        f"preprocess.image_size={args.image_size}", "preprocess.channels=1",
        "preprocess.normalize=divide255", "augment.enabled=true",
        f"train.batch_size={args.batch_size}", *pipeline_overrides(args, stage_cpus(args)),
        *args.set,
    ])


def workers_of(cfg: Config) -> int:
    """The data tasks at a time of ``cfg``'s stage (``auto``: as many as the cluster's CPUs
    hold)."""
    import ray

    from raypipe.data.pipeline import data_workers

    return data_workers(cfg, float(ray.cluster_resources().get("CPU", 1.0)))


def _path_override(args: argparse.Namespace) -> list[str]:
    return [f"data.path_column={args.path_column}"] if args.path_column else []


def _every_row(split: DatasetSplit) -> DatasetSplit:
    """All listed files as the stream to ingest (training and validation side), two of them as
    the validation set (built, never read here)."""
    return dataclasses.replace(split, train=split.train + split.val, val=split.val[:2])


def ingest_rows(args: argparse.Namespace, manifest: str, root: str, rows: int) -> dict:
    """One size of (b): listing, then one epoch of every row, each under a peak sampler."""
    cfg = scale_config(args, manifest, root)
    base = session_memory()[0]
    with PeakSampler(args.interval) as listing:
        t0 = time.perf_counter()
        split = _every_row(discover(cfg.data))
        listing_s = time.perf_counter() - t0
    with PeakSampler(args.interval) as epoch:
        images, seconds, first = ray_epochs(cfg, split, args.batch_size, 1)[0]
    peak = max(listing.peak, epoch.peak)
    return {"rows": rows, "listed": len(split.train), "skipped": len(split.skipped),
            "all_rows_listed": len(split.train) == rows, "listing_s": listing_s,
            "images": images, "epoch_s": seconds, "first_batch_s": first,
            "images_per_s": images / max(seconds, 1e-9), "baseline_mib": base / MIB,
            "listing_peak_mib": listing.peak / MIB, "epoch_peak_mib": epoch.peak / MIB,
            "peak_mib": peak / MIB, "driver_peak_mib": max(listing.driver_peak,
                                                           epoch.driver_peak) / MIB}


def warm_epoch(args: argparse.Namespace, manifest: str, root: str) -> None:
    """An unmeasured short epoch (a few blocks for every data worker): Ray keeps the worker
    processes it starts idle in its pool, so every measured size starts from the same pool."""
    cfg = scale_config(args, manifest, root)
    split = _every_row(discover(cfg.data))
    n = min(len(split.train), 4 * cfg.pipeline.files_per_batch * workers_of(cfg))
    ray_epochs(cfg, dataclasses.replace(split, train=split.train[:n]), args.batch_size, 1)


def files_under(root: str) -> tuple[int, float]:
    """(files under ``root``, seconds to list them): one recursive listing through pyarrow, as
    ``discover`` lists a manifest's folder (on S3, page after page of 1,000 keys)."""
    fs, path = get_filesystem(root)
    t0 = time.perf_counter()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.type == pafs.FileType.File for i in infos), time.perf_counter() - t0


def ingest_sizes(args: argparse.Namespace, manifest: str, root: str, total: int) -> dict:
    """(b) at every ``--rows`` size (default: a tenth of ``total``, then ``total``)."""
    ensure_ray(args)
    root_files, root_listing_s = files_under(root)
    sizes = sorted({min(n, total) for n in (args.rows or [max(1, total // 10), total])})
    manifests = {n: first_rows(manifest, n, total) for n in sizes}
    warm_epoch(args, manifests[sizes[0]], root)
    rows = []
    for n in sizes:
        time.sleep(1.0)  # let the previous epoch's processes settle before the baseline
        rows.append(ingest_rows(args, manifests[n], root, n))
    out = {"manifest": manifest, "root": root, "root_files": root_files,
           "root_listing_s": root_listing_s, "sizes": rows,
           "workers": workers_of(scale_config(args, manifest, root))}
    if len(rows) > 1:
        out["peak_ratio"] = rows[-1]["peak_mib"] / rows[0]["peak_mib"]
        out["target_peak_ratio_max"] = 1.2
    return out


# ---------------------------------------------------------------- (c) the same from S3


def _child_arguments(args: argparse.Namespace) -> list[str]:
    """The options of (b) that the S3 run repeats."""
    out = ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--cpus-per-worker", repr(args.cpus_per_worker),
           "--files-per-batch", str(args.files_per_batch), "--interval", repr(args.interval),
           "--finding", args.finding, *(["--path-column", args.path_column]
                                        if args.path_column else [])]
    if args.cpus is not None:
        out += ["--cpus", repr(args.cpus)]
    if args.num_cpus:
        out += ["--num-cpus", str(args.num_cpus)]
    for item in args.set:
        out += ["--set", item]
    return out


def _upload(client, names: list[str], size: int, prefix: str, threads: int = 16) -> float:
    def put(name: str) -> None:
        client.put_object(Bucket=S3_BUCKET, Key=posixpath.join(prefix, name),
                          Body=standin_png(name, size))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, names))
    return time.perf_counter() - t0


def s3_run(args: argparse.Namespace, manifest: str, names: list[str]) -> dict:
    """(c): a moto S3 server with ``--s3-objects`` stand-ins and the manifest's first as many
    rows, then (b) over them in a child process that reads from the server."""
    import boto3
    from moto.server import ThreadedMotoServer

    n = min(args.s3_objects, len(names))
    requests = logging.getLogger("werkzeug")  # the server logs every request it answers
    level = requests.level
    requests.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "raypipe-bench",
               "AWS_SECRET_ACCESS_KEY": "raypipe-bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=S3_BUCKET)
        upload_s = _upload(client, names[:n], args.standin_size, "images")
        table = read_manifest_table(manifest).head(n)
        client.put_object(Bucket=S3_BUCKET, Key="manifest.csv",
                          Body=table.to_csv(index=False).encode())
        sizes = [str(max(1, n // 10)), str(n)] if not args.s3_rows else [str(r) for r in args.s3_rows]
        out = os.path.join(scratch_dir("raypipe-scale-s3-"), "scale-s3.json")
        command = [sys.executable, "-m", "raypipe.jobs.benchmark", "scale", "--json", out,
                   "--manifest", f"s3://{S3_BUCKET}/manifest.csv",
                   "--root", f"s3://{S3_BUCKET}/images", "--rows", *sizes, *_child_arguments(args)]
        # a local Ray of its own: its workers inherit the endpoint and the keys, as a cluster's
        # nodes get theirs from the cluster config; no other AWS setting of this process
        child_env = {k: v for k, v in os.environ.items()
                     if k != "RAY_ADDRESS" and not k.startswith("AWS_")} | env
        proc = subprocess.run(command, env=child_env, capture_output=True, text=True,
                              timeout=args.s3_timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the S3 run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            result = json.load(f)
    finally:
        server.stop()
        requests.setLevel(level)
    return {"objects": n, "upload_s": upload_s, **result.get("ingest", {})}


# ---------------------------------------------------------------- (d) a short training run


def train_run(args: argparse.Namespace, manifest: str, root: str) -> dict:
    """(d): one epoch on ``--train-files`` training files, multilabel, patient split."""
    from raypipe.training.trainer import run_training

    ensure_ray(args)
    storage = scratch_dir("raypipe-scale-run-")
    cfg = load_config(None, [
        f"data.manifest={manifest}", f"data.root={root}", "data.task=multilabel",
        *_path_override(args),
        f"data.limit={args.train_files}", f"preprocess.image_size={args.image_size}",
        "preprocess.channels=1", f"train.batch_size={args.batch_size}", "train.epochs=1",
        "train.num_workers=1", "train.use_gpu=false", *pipeline_overrides(args),
        f"run.storage_path={storage}", "run.name=scale-train", "run.tensorboard=false",
        *args.set,
    ])
    t0 = time.perf_counter()
    summary = run_training(cfg)
    best = summary.get("best_metrics", {})
    history = summary.get("history") or [{}]
    data = summary.get("data", {})
    return {"train_files": args.train_files, "train_steps": history[-1].get("train_steps"),
            "run_s": time.perf_counter() - t0, "status": summary.get("status"),
            "task": data.get("task"), "group_by": data.get("group_by"),
            "groups_on_both_sides": data.get("groups_on_both_sides"),
            "val_auc": best.get("val_auc"),
            "val_auc_per_finding": {k.removeprefix("val_auc/"): v for k, v in best.items()
                                    if k.startswith("val_auc/")},
            "note": "stand-in pixels carry no signal: these AUCs say the run works, not how well"}


# ---------------------------------------------------------------- the benchmark


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=NIH_MANIFEST,
                   help="CSV (local or s3://) whose file names get stand-ins and are ingested")
    p.add_argument("--path-column", default=None,
                   help="its file-name column (default: 'Image Index', else 'path')")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--write-standins", metavar="DIR", default=None,
                       help="write the stand-ins missing from DIR, then read them from there")
    where.add_argument("--root", default=None,
                       help="read the files from here (local or s3://) without writing any")
    p.add_argument("--standin-size", type=at_least(8), default=64, help="stand-in side, pixels")
    p.add_argument("--standin-processes", type=at_least(1), default=None,
                   help="processes writing stand-ins (default: every CPU)")
    p.add_argument("--rows", type=at_least(1), nargs="+", default=None,
                   help="row counts to ingest, each the manifest's first N rows (default: a "
                        "tenth of it, then all of it)")
    p.add_argument("--no-ingest", action="store_true", help="only write the stand-ins")
    p.add_argument("--image-size", type=at_least(8), default=64)
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--finding", default="none",
                   help="data.positive_finding of the ingest runs, making them one-vs-rest; none: "
                        "the labels as the config takes them (NIH's: multilabel). Labels do not "
                        "change what is read")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    p.add_argument("--s3-objects", type=at_least(0), default=0,
                   help="also ingest this many stand-ins from a moto S3 server (>= 10,000 for "
                        "the figure); 0: not")
    p.add_argument("--s3-rows", type=at_least(1), nargs="+", default=None,
                   help="row counts of the S3 run (default: a tenth of --s3-objects, then all)")
    p.add_argument("--s3-timeout", type=at_least(1), default=3600, help="seconds")
    p.add_argument("--train-files", type=at_least(0), default=0,
                   help="also a one-epoch multilabel training run on this many training files, "
                        "patients kept on one side; 0: not")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the runs (repeatable), e.g. pipeline.workers=8")
    add_pipeline_arguments(p, cache=None)


def run(args: argparse.Namespace) -> dict:
    root = args.write_standins or args.root
    if root is None and (args.train_files or not args.s3_objects):
        raise SystemExit("scale: give --write-standins DIR or --root DIR (or only --s3-objects N)")
    table = read_manifest_table(args.manifest)
    names = table[path_column(list(table.columns), args.path_column)].astype(str).tolist()
    del table
    out: dict = {"benchmark": "scale", "manifest": args.manifest, "manifest_rows": len(names)}
    rows: list[dict] = []
    if args.write_standins:
        out["standins"] = write_standins(names, args.write_standins, args.standin_size,
                                         args.standin_processes)
        rows.append({"part": "stand-ins", "files": len(names),
                     "written": out["standins"]["written"], "seconds": out["standins"]["write_s"]})
    if root is not None and not args.no_ingest:
        out["ingest"] = ingest_sizes(args, args.manifest, root, len(names))
        rows += _size_rows("ingest", out["ingest"])
    if args.s3_objects:
        out["s3"] = s3_run(args, args.manifest, names)
        rows += _size_rows("ingest from S3", out["s3"])
    if args.train_files:
        out["train"] = train_run(args, args.manifest, root)
        rows.append({"part": "train", "files": args.train_files, "seconds": out["train"]["run_s"],
                     "val_auc": out["train"]["val_auc"]})
    out["table"] = rows or [{"part": "nothing to do"}]
    return out


def _size_rows(part: str, result: dict) -> list[dict]:
    rows = [{"part": part, "rows": r["rows"], "images_per_s": r["images_per_s"],
             "listing_s": r["listing_s"], "peak_mib": r["peak_mib"],
             "driver_peak_mib": r["driver_peak_mib"], "all_rows_listed": r["all_rows_listed"]}
            for r in result.get("sizes", [])]
    if "root_files" in result:
        rows.insert(0, {"part": f"{part}: list the folder", "files": result["root_files"],
                        "listing_s": result["root_listing_s"]})
    if "peak_ratio" in result:
        rows.append({"part": f"{part}: peak ratio largest/smallest",
                     "peak_ratio": result["peak_ratio"]})
    return rows
