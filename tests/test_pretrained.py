"""Pretrained starts: weight files fetched once per node (local and from a moto S3 server),
checked against the architecture, fitted to 1-channel input and the task's classes, their input
statistics, and ``model.freeze`` (alone, under 2-process DDP, and in a 2-worker Ray run)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TAME, free_ports, make_image_folder, run_job
from pretrained_procs import batches, ddp_freeze, epoch, fetch_in_process

from raypipe.config import Config, ConfigError, load_config
from raypipe.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedError,
    fetch_pretrained,
    input_statistics,
    state_digest,
)
from raypipe.models.resnet import architecture_of, create_model

BUCKET = "raypipe-pretrained"
KEY = "weights/resnet18.pth"


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> tuple[Path, dict]:
    """A torchvision resnet18 state dict (random weights: nothing is downloaded) and its file."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    return _save(state, tmp_path_factory.mktemp("weights") / "resnet18.pth"), state


def _adapted_1ch(state: dict) -> dict:
    """What a 1-channel, 2-class resnet18 should load: conv1 summed over RGB, no fc."""
    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    out["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    return out


# ---------------------------------------------------------------- an S3 server that counts


def _counting_server():
    """moto's threaded S3 server, recording each request's (method, path, Range header): a
    download of an object is the GET whose range starts at byte 0 (pyarrow reads in ranges)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class CountingMotoServer(ThreadedMotoServer):
        def __init__(self) -> None:
            super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
            self.requests: list[tuple[str, str, str | None]] = []

        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def counting(environ, start_response):
                self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"],
                                      environ.get("HTTP_RANGE")))
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, counting, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

        def downloads(self, key: str) -> int:
            path = f"/{BUCKET}/{key}"
            return sum(1 for m, p, r in self.requests
                       if m == "GET" and p == path and (r is None or r.startswith("bytes=0-")))

    return CountingMotoServer()


@pytest.fixture(scope="module")
def s3(r18):
    """(server, AWS env for it, boto3 client) with the resnet18 file at s3://BUCKET/KEY; the
    variables are set in this process for the module's tests and restored after."""
    boto3 = pytest.importorskip("boto3")
    server = _counting_server()
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "raypipe-test-key",
           "AWS_SECRET_ACCESS_KEY": "raypipe-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(r18[0]), BUCKET, KEY)
        yield server, env, client
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- fetching


def test_local_file_is_used_in_place(r18, tmp_path):
    path, _ = r18
    w = fetch_pretrained(str(path), str(tmp_path / "cache"))
    assert w.path == str(path) and not w.downloaded
    assert w.sha256 == _sha(path)
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_missing_local_path_says_to_use_object_storage(tmp_path):
    with pytest.raises(PretrainedError) as err:
        fetch_pretrained(str(tmp_path / "nowhere.pth"))
    msg = str(err.value)
    assert f"'{tmp_path / 'nowhere.pth'}' does not exist on node {socket.gethostname()}" in msg
    assert "s3:// or gs://" in msg and "multi-node" in msg
    with pytest.raises(PretrainedError, match="is a folder, not a file"):
        fetch_pretrained(str(tmp_path))


def test_s3_file_downloaded_once_then_from_the_cache(s3, r18, tmp_path):
    server, _, _ = s3
    path, _ = r18
    before = server.downloads(KEY)
    first = fetch_pretrained(f"s3://{BUCKET}/{KEY}", str(tmp_path))
    assert first.downloaded and Path(first.path).read_bytes() == path.read_bytes()
    assert first.sha256 == _sha(path)
    second = fetch_pretrained(f"s3://{BUCKET}/{KEY}", str(tmp_path))
    assert not second.downloaded and second.path == first.path and second.sha256 == first.sha256
    assert server.downloads(KEY) - before == 1
    meta = json.loads((Path(first.path).parent / "source.json").read_text())
    assert meta["uri"] == f"s3://{BUCKET}/{KEY}" and meta["sha256"] == first.sha256
    # and what the cached file holds loads like the original
    m = create_model("resnet18", pretrained=first.path)
    assert torch.equal(m.layer2[0].conv1.weight, r18[1]["layer2.0.conv1.weight"])


def test_an_object_written_again_is_fetched_again(s3, tmp_path):
    server, _, client = s3
    key = "weights/changing.pth"
    torch.manual_seed(3)
    a = _save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "a.pth")
    client.upload_file(str(a), BUCKET, key)
    first = fetch_pretrained(f"s3://{BUCKET}/{key}", str(tmp_path / "cache"))
    # another size (another head): another cache entry, whatever the clock's resolution
    b = _save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "b.pth")
    client.upload_file(str(b), BUCKET, key)
    second = fetch_pretrained(f"s3://{BUCKET}/{key}", str(tmp_path / "cache"))
    assert second.downloaded and second.path != first.path and second.sha256 == _sha(b)
    assert server.downloads(key) == 2


def test_missing_object_and_bucket_are_clear(s3, tmp_path):
    with pytest.raises(PretrainedError, match=f"'s3://{BUCKET}/weights/nope.pth' does not exist"):
        fetch_pretrained(f"s3://{BUCKET}/weights/nope.pth", str(tmp_path))
    with pytest.raises(PretrainedError, match="is a folder"):
        fetch_pretrained(f"s3://{BUCKET}/weights", str(tmp_path))
    with pytest.raises(PretrainedError, match="does not exist"):
        fetch_pretrained("s3://no-such-bucket-here/w.pth", str(tmp_path))


def test_two_processes_on_one_node_download_once(s3, r18, tmp_path):
    server, _, _ = s3
    before = server.downloads(KEY)
    ctx = mp.get_context("spawn")  # a fresh interpreter, like a Ray worker; never fork after S3
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=fetch_in_process,
                         args=(barrier, results, f"s3://{BUCKET}/{KEY}", str(tmp_path)))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(d for d, _, _ in got) == [False, True]  # one downloaded, one waited and reused
    assert len({(path, sha) for _, path, sha in got}) == 1 and got[0][2] == _sha(r18[0])
    assert server.downloads(KEY) - before == 1


# ---------------------------------------------------------------- checking and fitting


def test_wrong_architecture_names_the_keys_and_the_fix():
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(weights=None).state_dict()
    assert architecture_of(r50) == "resnet50"
    with pytest.raises(PretrainedError) as err:
        create_model("resnet18", in_channels=1, num_classes=2, pretrained=r50)
    msg = str(err.value)
    assert "does not match resnet18 (1-channel input, 2 classes)" in msg
    assert "unexpected keys [layer1.0.conv3.weight" in msg
    assert "layer1.0.conv1.weight file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg
    assert "The file holds a resnet50: set model.name=resnet50." in msg
    # not a ResNet at all: the keys it lacks, and what to use instead
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    assert architecture_of(mobilenet) is None
    with pytest.raises(PretrainedError) as err:
        create_model("resnet18", pretrained=mobilenet)
    msg = str(err.value)
    assert "missing keys [conv1.weight, bn1.weight" in msg and "features.0.0.weight" in msg
    assert "torchvision.models.resnet18().state_dict()" in msg


def test_mismatching_shapes_name_the_keys(r18, tmp_path):
    _, state = r18
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    bad["layer3.1.bn2.running_var"] = torch.ones(128)
    path = _save(bad, tmp_path / "bad.pth")
    with pytest.raises(PretrainedError) as err:
        create_model("resnet18", pretrained=str(path))
    msg = str(err.value)
    assert f"'{path}' does not match resnet18" in msg and "2 shape mismatches" in msg
    assert "layer2.0.conv1.weight file (128, 32, 3, 3) vs model (128, 64, 3, 3)" in msg
    assert "layer3.1.bn2.running_var file (128,) vs model (256,)" in msg
    assert "0 missing keys" in msg and "0 unexpected keys" in msg


def test_one_channel_and_two_classes_load_the_adapted_weights(r18):
    path, state = r18
    torch.manual_seed(5)
    fresh = create_model("resnet18", in_channels=1, num_classes=2)
    torch.manual_seed(5)
    m = create_model("resnet18", in_channels=1, num_classes=2, pretrained=str(path))
    expected = _adapted_1ch(state)
    got = m.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(m.fc.weight, fresh.fc.weight)  # the task's classifier starts fresh
    assert state_digest({k: got[k] for k in expected}) == state_digest(expected)
    assert state_digest(expected) != state_digest({**expected, "bn1.bias": expected["bn1.bias"] + 1})


# ---------------------------------------------------------------- input statistics


def _cfg(*overrides: str) -> Config:
    return load_config(None, ["preprocess.channels=3", *overrides])


def test_imagenet_statistics_for_a_torchvision_imagenet_head(r18):
    _, state = r18
    pre, msg = input_statistics(_cfg().preprocess, _cfg().model, state)
    assert pre.mean == list(IMAGENET_MEAN) and pre.std == list(IMAGENET_STD)
    assert "torchvision resnet18 state_dict with a 1000-class (ImageNet-1k) head" in msg
    gray = _cfg("preprocess.channels=1")
    pre, _ = input_statistics(gray.preprocess, gray.model, state)
    assert pre.mean == [0.449] and pre.std == [0.226]  # the RGB statistics averaged


def test_statistics_left_alone_when_unknown_given_or_off(r18):
    _, state = r18
    two = torchvision.models.resnet18(num_classes=2).state_dict()
    pre, msg = input_statistics(_cfg().preprocess, _cfg().model, two)
    assert pre.mean is None and pre.std is None and "2-class head" in msg and "unknown" in msg
    cfg = _cfg("model.pretrained=x.pth", "model.pretrained_stats=imagenet")
    pre, _ = input_statistics(cfg.preprocess, cfg.model, two)  # the user says so
    assert pre.mean == list(IMAGENET_MEAN)
    cfg = _cfg("model.pretrained_stats=none")
    assert input_statistics(cfg.preprocess, cfg.model, state)[0].mean is None
    cfg = _cfg("preprocess.mean=[0.5,0.5,0.5]", "preprocess.std=[0.2,0.2,0.2]")
    pre, msg = input_statistics(cfg.preprocess, cfg.model, state)
    assert pre.mean == [0.5] * 3 and "as configured" in msg and "ImageNet" in msg


def test_new_model_keys_are_validated():
    with pytest.raises(ConfigError, match="model.pretrained, which is not set"):
        _cfg("model.pretrained_stats=imagenet")
    with pytest.raises(ConfigError, match="model.freeze"):
        _cfg("model.freeze=head")
    with pytest.raises(ConfigError, match="model.freeze_epochs"):
        _cfg("model.freeze_epochs=-1")


def test_driver_check_resolves_path_and_statistics_and_refuses_bad_files(r18, tmp_path,
                                                                        monkeypatch, caplog):
    from raypipe.training.trainer import RunError, check_pretrained

    path, state = r18
    monkeypatch.chdir(path.parent)
    cfg = _cfg("model.pretrained=resnet18.pth", "preprocess.channels=1")
    with caplog.at_level("INFO", logger="raypipe"):
        out = check_pretrained(cfg, num_classes=2)
    assert out.model.pretrained == str(path)  # workers run elsewhere: made absolute
    assert out.preprocess.mean == [0.449] and cfg.preprocess.mean is None  # a copy
    assert "preprocess.mean=[0.449] std=[0.226]: ImageNet's" in caplog.text
    bad = _save({**state, "layer4.0.conv2.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RunError, match=r"layer4\.0\.conv2\.weight file \(1,\) vs model"):
        check_pretrained(_cfg(f"model.pretrained={bad}"), num_classes=2)
    with pytest.raises(RunError, match="does not exist on node"):
        check_pretrained(_cfg(f"model.pretrained={tmp_path / 'gone.pth'}"), num_classes=2)


# ---------------------------------------------------------------- freezing, plain torch


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize(("part", "frozen_prefixes"), [
    ("stem", ("conv1.", "bn1.")),
    ("backbone", ("conv1.", "bn1.", "layer")),
])
def test_freeze_holds_weights_and_batchnorm_then_releases(r18, part, frozen_prefixes):
    from raypipe.training.freeze import set_frozen

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, num_classes=2, pretrained=str(r18[0]))
    # momentum and weight decay would move a parameter with a zero gradient: frozen ones have none
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_frozen(model, part, True) > 0
    epoch(model, batches(3), opt, part)
    changed = _changed(before, model)
    frozen = {k for k in before if k.startswith(frozen_prefixes)}
    assert not changed & frozen, sorted(changed & frozen)[:5]  # weights and running statistics
    assert {"fc.weight", "fc.bias"} <= changed
    if part == "stem":
        assert "layer1.0.conv1.weight" in changed and "layer1.0.bn1.running_mean" in changed
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(frozen_prefixes))
    set_frozen(model, part, False)
    epoch(model, batches(3, seed=1), opt, "none", index=1)
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight"} <= _changed(before, model)


@pytest.mark.slow  # two fresh interpreters importing torch: ~40 s on a busy 2-core machine
def test_freeze_under_ddp_two_processes(r18, tmp_path):
    """The mechanics Ray Train's 2 workers rely on, without Ray: gradients of frozen parameters
    are left out of DDP's reduction, then reduced again once released; the ranks stay equal."""
    torch.multiprocessing.spawn(ddp_freeze, args=(2, free_ports(1)[0], str(r18[0]),
                                                   str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    backbone = [k for k in r0["start"] if not k.startswith("fc.")]
    for k in backbone:
        assert torch.equal(r0["frozen"][k], r0["start"][k]), k
    assert not torch.equal(r0["frozen"]["fc.weight"], r0["start"]["fc.weight"])
    assert not torch.equal(r0["end"]["layer4.1.conv2.weight"], r0["start"]["layer4.1.conv2.weight"])
    for key in ("frozen", "end"):
        params = [k for k in r0[key] if "running" not in k and "num_batches" not in k]
        # equal weights on both ranks: DDP's start broadcast and its reduced gradients
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in params), key


# ---------------------------------------------------------------- a 2-worker Ray run from S3


@pytest.mark.slow
def test_two_worker_run_starts_from_the_s3_weights_and_freezes_the_backbone(
        s3, r18, ray_cluster, tmp_path):
    server, env, _ = s3
    path, state = r18
    before = server.downloads(KEY)
    images = make_image_folder(tmp_path / "imgs", {"cats": 12, "dogs": 12})
    cache = tmp_path / "cache"
    job_env = {**env, "RAY_ADDRESS": ray_cluster,
               # the shared cluster was started without the endpoint: the job's workers get it
               "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env}})}
    proc = run_job(
        "train.py", f"data.root={images}", f"run.storage_path={tmp_path / 'runs'}",
        "run.name=pre", "run.tensorboard=false", "train.epochs=2", "train.batch_size=8",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "pipeline.cpus_per_worker=0.5",
        "preprocess.image_size=16", "preprocess.channels=1", *TAME,
        f"model.pretrained=s3://{BUCKET}/{KEY}", f"model.cache_dir={cache}",
        "model.freeze=backbone", "model.freeze_epochs=1",
        env=job_env, timeout=480,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "preprocess.mean=[0.449] std=[0.226]: ImageNet's" in out

    # one download on this node for the driver's check and both workers
    assert server.downloads(KEY) - before == 1
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1

    run = tmp_path / "runs" / "pre"
    ck0, ck1 = (torch.load(run / f"checkpoint_epoch000{e}" / "model.pt", weights_only=True)["model"]
                for e in (0, 1))
    meta = json.loads((run / "checkpoint_epoch0000" / "meta.json").read_text())
    expected = _adapted_1ch(state)
    started = meta["pretrained"]
    assert started["source"] == f"s3://{BUCKET}/{KEY}" and started["file_sha256"] == _sha(path)
    workers = started["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    # every worker loaded exactly the file's weights, fitted to 1 channel and 2 classes
    assert {w["loaded_sha256"] for w in workers} == {state_digest(expected)}
    assert {w["file_sha256"] for w in workers} == {_sha(path)}
    assert Counter(w["downloaded"] for w in workers) == {False: 2}  # the driver's copy, reused
    assert meta["preprocess"]["mean"] == [0.449]

    # epoch 0, backbone frozen: weights and BatchNorm statistics exactly the file's; fc trained
    for k, v in expected.items():
        assert torch.equal(ck0[k], v), k
    torch.manual_seed(0)  # rank 0's fresh classifier (train.seed + rank), which DDP gave to all
    fresh = create_model("resnet18", in_channels=1, num_classes=2)
    assert not torch.equal(ck0["fc.weight"], fresh.fc.weight)
    # epoch 1, released: the backbone trains too
    moved = [k for k in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight")
             if not torch.equal(ck1[k], expected[k])]
    assert len(moved) == 3
    assert not torch.equal(ck1["layer2.0.bn1.running_mean"], expected["layer2.0.bn1.running_mean"])


def test_search_trials_get_absolute_weight_paths_and_ablation_turns_the_statistics_off(
        tmp_path, monkeypatch):
    from raypipe.tune.ablation import component_variants
    from raypipe.tune.driver import absolute_data_overrides

    monkeypatch.chdir(tmp_path)
    cfg = _cfg("model.pretrained=w/resnet18.pth", "model.cache_dir=cache",
               f"data.root={tmp_path}")
    overrides = absolute_data_overrides(cfg)  # trials run in another directory
    assert f"model.pretrained={tmp_path / 'w' / 'resnet18.pth'}" in overrides
    assert f"model.cache_dir={tmp_path / 'cache'}" in overrides
    assert not absolute_data_overrides(_cfg(f"model.pretrained=s3://{BUCKET}/{KEY}",
                                            f"data.root={tmp_path}"))
    # removing normalisation must not have the weights' statistics filled in again
    assert component_variants(cfg)["no_normalize"]["model.pretrained_stats"] == "none"
    assert "model.pretrained_stats" not in component_variants(_cfg())["no_normalize"]
