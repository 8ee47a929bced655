"""Object storage for real: a moto S3 server on 127.0.0.1, data read from it through pyarrow's S3
filesystem, and the training job writing results and checkpoints to it end to end."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TAME, make_image_folder, run_job

BUCKET = "raypipe-test"
# distinctive, so a leak into logs or output would be found by a plain substring search
SECRET = "s3cr3t-raypipe-never-printed-7f3a"


def _upload_folder(client, folder: Path, prefix: str) -> int:
    n = 0
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")
            n += 1
    return n


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket holding ``imgs/<class>/*.png`` and ``manifest/``; yields
    (endpoint URL, the AWS env for it, boto3 client). The AWS variables are set in this process
    for the module's in-process tests and restored after."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "raypipe-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        local = tmp_path_factory.mktemp("s3src")
        make_image_folder(local / "imgs", {"cats": 12, "dogs": 12})
        _upload_folder(client, local / "imgs", "imgs")
        # manifest layout: files in one flat folder, labels in a CSV next to them
        rows = ["path,label"]
        for f in sorted((local / "imgs").rglob("*.png")):
            key = f"{f.parent.name}_{f.name}"
            client.upload_file(str(f), BUCKET, f"manifest/files/{key}")
            rows.append(f"files/{key},{f.parent.name}")
        client.put_object(Bucket=BUCKET, Key="manifest/labels.csv", Body="\n".join(rows).encode())
        yield endpoint, env, client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- listing and reading


def test_folder_per_class_from_s3(s3):
    from raypipe.config import DataConfig
    from raypipe.data.sources import discover

    split = discover(DataConfig(root=f"s3://{BUCKET}/imgs", val_fraction=0.25))
    assert split.class_names == ["cats", "dogs"]
    assert len(split.train) + len(split.val) == 24
    assert split.counts()["val"] == {"cats": 3, "dogs": 3}
    # the records point into the bucket and the bytes read back are the PNGs uploaded
    rec = split.train[0]
    assert rec.path.startswith(f"{BUCKET}/imgs/")
    with split.filesystem.open_input_file(rec.path) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_manifest_from_s3(s3):
    from raypipe.config import DataConfig
    from raypipe.data.sources import discover

    split = discover(DataConfig(manifest=f"s3://{BUCKET}/manifest/labels.csv"))
    assert split.class_names == ["cats", "dogs"]
    assert len(split.train) + len(split.val) == 24
    assert not split.skipped
    assert all(r.path.startswith(f"{BUCKET}/manifest/files/") for r in split.train + split.val)
    labels = {r.key.split("/")[1].split("_")[0]: r.label for r in split.train}
    assert labels == {"cats": 0, "dogs": 1}


def test_missing_bucket_names_the_uri(s3):
    from raypipe.config import DataConfig
    from raypipe.data.sources import DataSourceError, discover

    t0 = time.time()
    with pytest.raises(DataSourceError, match="bucket 'no-such-bucket' of 's3://no-such-bucket/imgs'"):
        discover(DataConfig(root="s3://no-such-bucket/imgs"))
    assert time.time() - t0 < 10


def test_missing_prefix_names_the_uri(s3):
    from raypipe.config import DataConfig
    from raypipe.data.sources import DataSourceError, discover

    with pytest.raises(DataSourceError, match=f"'s3://{BUCKET}/nothing-here' does not exist"):
        discover(DataConfig(root=f"s3://{BUCKET}/nothing-here"))


def test_unreachable_endpoint_fails_fast(s3, monkeypatch):
    from raypipe.config import DataConfig
    from raypipe.data.sources import DataSourceError, discover

    # a port nobody listens on: connection refused, retried a few times, then a clear error
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    t0 = time.time()
    with pytest.raises(DataSourceError) as err:
        discover(DataConfig(root=f"s3://{BUCKET}/imgs"))
    assert time.time() - t0 < 20
    assert f"s3://{BUCKET}/imgs" in str(err.value)
    assert SECRET not in str(err.value)


def test_endpoint_url_forms(monkeypatch):
    from raypipe.data.sources import get_filesystem

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    fs, path = get_filesystem("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.region == "eu-west-1"
    # the S3-specific variable wins over the generic one (AWS SDK precedence)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")
    fs, _ = get_filesystem("s3://bucket")
    assert "127.0.0.1:9001" in repr(fs.__reduce__())


# ---------------------------------------------------------------- the training job end to end


@pytest.mark.slow
def test_train_job_reads_and_writes_s3(s3, cache_dir):
    import torch

    from raypipe.data.sources import get_filesystem
    from raypipe.models.resnet import create_model

    # the job starts its own local Ray, whose workers get the credentials and the endpoint from
    # the environment as a cluster's nodes do (raypipe copies none into the job's runtime env)
    _, env, client = s3
    proc = run_job(
        "train.py", f"data.root=s3://{BUCKET}/imgs", f"run.storage_path=s3://{BUCKET}/runs",
        "run.name=s3run", "train.epochs=1", "preprocess.image_size=32", "train.batch_size=8",
        "train.num_workers=1", *TAME, env=env, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert SECRET not in out

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/s3run/")["Contents"]}
    assert {"runs/s3run/config.yaml", "runs/s3run/summary.json", "runs/s3run/history.json"} <= keys
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="runs/s3run/summary.json")["Body"].read())
    assert summary["run_dir"] == f"s3://{BUCKET}/runs/s3run"
    assert len(summary["history"]) == 1
    assert summary["data"]["files_used"] == 24
    best = summary["best_checkpoint"]
    assert best.startswith(f"s3://{BUCKET}/runs/s3run/")
    assert f"{best.split('://', 1)[1].split('/', 1)[1]}/model.pt" in keys

    # reload the best checkpoint from the bucket and use it
    fs, path = get_filesystem(best)
    with fs.open_input_stream(f"{path}/model.pt") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    with fs.open_input_stream(f"{path}/meta.json") as f:
        meta = json.loads(f.read())
    assert meta["class_names"] == ["cats", "dogs"]
    model = create_model(meta["model"]["name"], in_channels=meta["model"]["in_channels"],
                         num_classes=meta["model"]["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, meta["model"]["in_channels"], 32, 32))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_a_storage_error_while_reading_checkpoints_deletes_nothing(monkeypatch, tmp_path):
    """The object store stops answering while a run's checkpoints are looked at: raypipe finds
    none to trust (and says so); once it answers again, every complete checkpoint is there."""
    import boto3
    from moto.server import ThreadedMotoServer

    from raypipe.training import checkpoints as ck
    from raypipe.training.worker import save_checkpoint

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    run = f"s3://{BUCKET}/runs/cut"
    import torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    for epoch in (0, 1):
        local = tmp_path / f"e{epoch}"
        local.mkdir()
        save_checkpoint(str(local), model, opt, sched, None, epoch, {"metrics": {"val_auc": epoch / 2}})
        for f in local.iterdir():
            client.upload_file(str(f), BUCKET, f"runs/cut/{ck.checkpoint_name(epoch)}/{f.name}")
        ck.mark_complete(f"{run}/{ck.checkpoint_name(epoch)}", epoch)
    assert ck.latest_complete(run) == f"{run}/checkpoint_epoch0001"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]}

    server.stop()
    try:
        assert ck.latest_complete(run) is None            # nothing to trust while it is gone
        assert ck.best_complete(run, "val_auc", "max") == (None, {})
    finally:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    try:
        assert {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]} == keys
        assert ck.latest_complete(run) == f"{run}/checkpoint_epoch0001"
        assert ck.best_complete(run, "val_auc", "max")[0] == f"{run}/checkpoint_epoch0001"
    finally:
        server.stop()


def test_missing_results_bucket_fails_before_training(s3):
    from raypipe.cli import load
    from raypipe.training.trainer import RunError, run_training

    cfg = load(None, [f"data.root=s3://{BUCKET}/imgs", "run.storage_path=s3://missing-results/runs",
                      "run.name=x", "train.batch_size=8"])
    t0 = time.time()
    # the run directory is written before any Ray work starts, so this fails at once
    with pytest.raises(RunError) as err:
        run_training(cfg)
    assert time.time() - t0 < 20
    message = str(err.value)
    assert "s3://missing-results/runs/x" in message
    assert "not found" in message.lower() or "does not exist" in message.lower()
    assert SECRET not in message


# ---------------------------------------------------------------- storage gone mid-run


@pytest.mark.slow
def test_storage_gone_mid_run_is_a_clear_error_and_no_bad_files(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    running = True
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "raypipe-test-key",
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRET)
        client.create_bucket(Bucket=BUCKET)
        _upload_folder(client, make_image_folder(tmp_path / "imgs", {"cats": 12, "dogs": 12}), "imgs")
        run_dir = tmp_path / "runs" / "gone"
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "train.py"), f"data.root=s3://{BUCKET}/imgs",
             f"run.storage_path={tmp_path / 'runs'}", "run.name=gone", "train.epochs=4",
             "preprocess.image_size=32", "train.batch_size=8", "train.num_workers=1",
             # every epoch reads the store again (a cached training set would not)
             "pipeline.cache=false", *TAME],
            cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads((run_dir / "history.json").read_text()):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        server.stop()  # the object store goes away after the first epoch
        running = False
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out[-2000:] + err[-3000:]
        assert time.monotonic() - t0 < 240  # bounded retries, not a hang
        last = err.strip().splitlines()[-1]
        expected = f"error: StorageUnreachableError: object storage unreachable while reading 's3://{BUCKET}/imgs/"
        assert last.startswith(expected), err[-3000:]
        assert "resume" in err and SECRET not in out + err
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and len(summary["history"]) >= 1
        assert summary["data"]["files_skipped"] == 0  # the store was gone, the files were not bad
        assert (run_dir / "checkpoint_epoch0000" / "model.pt").is_file()
    finally:
        if running:
            server.stop()
