"""The exported model and its preprocessing: the shipped reference against raypipe's kernels, the
wrapped model against the checkpoint model, ONNX and TorchScript round trips on synthetic and real
images, and the check failing on a tampered file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from badfiles import image_bytes
from checkpoints import calibrate_batchnorm, meta_for, save_test_checkpoint
from conftest import make_image_folder, run_job

from raypipe import export_reference as ref
from raypipe.config import load_config
from raypipe.data import functional as F
from raypipe.data.decode import decode_image
from raypipe.data.transforms import Preprocessor
from raypipe.evaluate import EvaluationError
from raypipe.export import (
    ExportCheckError,
    ExportError,
    build_spec,
    check_records,
    checkpoint_outputs,
    export,
    read_records,
    serving_module,
    verify,
)
from raypipe.models.resnet import create_model


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
def test_reference_resize_is_the_training_resample(mode):
    """The caller's resize is raypipe's bit for bit (a threshold after it must flip the same
    pixels); the model's matrices agree with it to float32 rounding."""
    rng = np.random.default_rng(0)
    for (h, w), size in [((20, 24), 32), ((224, 224), 128), ((375, 500), 96), ((1, 7), 8),
                         ((97, 31), 64), ((257, 1000), 32)]:
        for shape, dtype in (((h, w), np.uint8), ((h, w, 3), np.uint8), ((h, w), np.float32),
                             ((h, w), np.uint16)):
            img = rng.integers(0, 256, shape).astype(dtype)
            want = F.resize(img, size, mode)
            np.testing.assert_array_equal(ref.resize(img, size, mode), want)
            wy, wx, iy, ix = ref.resize_weights((h, w), size, mode)
            by_matrix = np.einsum("oh,hw...,pw->op...", wy, img.astype(np.float32), wx, optimize=True)
            assert np.abs(by_matrix - want).max() <= 1e-5 * 255, (h, w, size, mode)
            if mode == "pad":
                assert iy.min() == 0 or ix.min() == 0 or h == w  # the letterbox is outside
    lo = 17.0  # the pointwise path fills the outside with the image's low value
    img = rng.integers(20, 200, (30, 60)).astype(np.uint8)
    np.testing.assert_array_equal(ref.resize(img, 32, "pad", cval=lo),
                                  F.warp_affine(img, F.resize_matrix((30, 60), 32, "pad"), (32, 32), cval=lo))


@pytest.mark.parametrize("mode,size,kwargs", [
    ("RGB", (30, 20), {}), ("L", (30, 20), {}), ("LA", (30, 20), {}), ("RGBA", (30, 20), {}),
    ("P", (30, 20), {}), ("I;16", (30, 20), {}), ("RGB", (400, 300), {"fmt": "JPEG"}),
])
@pytest.mark.parametrize("gray", [False, True])
def test_reference_decode_is_raypipes(mode, size, kwargs, gray):
    data = image_bytes(mode, size, **kwargs)
    spec = {"decode": {"gray": gray, "draft_size": 64, "max_pixels": 10**8}}
    want = decode_image(data, gray=gray, draft_size=64)
    got = ref.decode(data, spec)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if kwargs:  # the JPEG was drafted: 400x300 -> 200x150 keeps both sides >= 64*2
        assert got.shape[:2] == (75, 100)


# every preprocessing family: folded resize, resize outside, normalisation here or in the model,
# scikit-image steps outside, gray sources for colour models
CASES = {
    "divide255-rgb-mean-std-tta": (["preprocess.channels=3", "preprocess.normalize=divide255",
                                    "preprocess.mean=[0.5,0.4,0.3]", "preprocess.std=[0.2,0.3,0.25]",
                                    "augment.tta=hflip"], (40, 52, 3), True),
    "minmax-gray-pad": (["preprocess.channels=1", "preprocess.normalize=minmax",
                         "preprocess.resize_mode=pad"], (30, 70), True),
    "percentile-gray-large": (["preprocess.channels=1", "preprocess.normalize=percentile"],
                              (300, 250), True),
    "percentile-gray-outside": (["preprocess.channels=1", "preprocess.normalize=percentile",
                                 "preprocess.resize_mode=crop"], (300, 250), False),
    "minmax-rgb-outside": (["preprocess.channels=3", "preprocess.normalize=minmax"], (50, 41, 3), False),
    "divide255-gray-source-rgb-model": (["preprocess.channels=3", "preprocess.normalize=divide255"],
                                        (45, 45), False),
    "otsu-opening": (["preprocess.channels=1", "preprocess.threshold=otsu",
                      "preprocess.morphology=[opening]", "preprocess.disk_radius=1",
                      "preprocess.normalize=minmax"], (60, 48, 3), False),
    "clahe-rgb-percentile": (["preprocess.channels=3", "preprocess.equalize=adapthist",
                              "preprocess.normalize=percentile"], (50, 50, 3), False),
    "morphology-gray-divide": (["preprocess.channels=1", "preprocess.morphology=[closing]",
                                "preprocess.disk_radius=1"], (40, 40), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_plus_model_is_the_checkpoint_path(name):
    overrides, shape, fold = CASES[name]
    cfg = load_config(None, ["preprocess.image_size=32", *overrides])
    meta = meta_for(cfg, ["a", "b", "c"])
    torch.manual_seed(0)
    net = create_model("resnet18", in_channels=cfg.preprocess.channels, num_classes=3)
    rng = np.random.default_rng(1)
    images = []
    for i in range(4):  # structure (a bright blob) plus noise, so that every step has work to do
        img = rng.integers(0, 90, shape).astype(np.float32)
        img[i * 3: shape[0] // 2 + i * 3, shape[1] // 3:] += 140
        images.append(img.astype(np.uint8))
    pre = Preprocessor(cfg.preprocess)
    x_ckpt = torch.from_numpy(np.empty((4, cfg.preprocess.channels, 32, 32), np.float32))
    for i, im in enumerate(images):  # as the data pipeline fills its batches
        x_ckpt[i] = torch.from_numpy(pre(im, 255.0).transpose(2, 0, 1))
    calibrate_batchnorm(net, x_ckpt)
    from raypipe.training.loop import forward_eval

    with torch.no_grad():
        want = torch.softmax(forward_eval(net, x_ckpt, cfg.augment.tta), dim=1).numpy()
    spec = build_spec(meta, "onnx", shape[:2] if fold else None, 255.0)
    assert spec["plan"]["resize_in_model"] == fold
    module = serving_module(meta, net.state_dict(), spec)
    x = np.stack([ref.prepare(im, spec) for im in images])
    assert list(x.shape[1:]) == spec["input"]["shape"][1:]
    seen = []
    module.net.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        logits, scores = module(torch.from_numpy(x))
    # what the network is fed: the checkpoint path's input to float32 rounding
    assert np.abs(seen[0].numpy() - x_ckpt.numpy()).max() <= 1e-5
    assert np.abs(scores.numpy() - want).max() <= 1e-4
    assert spec["caller_steps"][0].startswith("decode with Pillow")


def test_folded_model_refuses_other_sizes():
    cfg = load_config(None, ["preprocess.image_size=32", "preprocess.channels=1"])
    spec = build_spec(meta_for(cfg, ["a", "b"]), "onnx", (40, 40), 255.0)
    with pytest.raises(ValueError, match=r"30x20 .* exported for 40x40 .*--input-size none"):
        ref.prepare(np.zeros((20, 30), np.uint8), spec)


# ---------------------------------------------------------------- files, the check, the job


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_image_folder(root / "imgs", {"cats": 10, "dogs": 10}, size=(40, 30))
    ckpt = save_test_checkpoint(root / "ckpt", data, [
        "preprocess.image_size=32", "preprocess.channels=3", "preprocess.normalize=percentile",
        "preprocess.mean=[0.5]", "preprocess.std=[0.25]", "augment.tta=hflip"])
    return ckpt


@pytest.mark.parametrize("fmt,input_size", [("onnx", "auto"), ("torchscript", "none")])
def test_export_round_trip_synthetic(synthetic_checkpoint, tmp_path, fmt, input_size):
    out = tmp_path / "out"
    spec = export(str(synthetic_checkpoint), fmt, str(out), input_size=input_size)
    names = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
    assert sorted(p.name for p in out.iterdir()) == sorted([names[fmt], "preprocess.json", "preprocess.py"])
    written = json.loads((out / "preprocess.json").read_text())
    assert written["check"]["images"] == 4  # the whole validation split of 20 images
    assert written["check"]["max_abs_diff_scores"] <= 1e-4
    assert written["check"]["max_abs_diff_logits"] <= 1e-4
    # auto: every image decodes to 30x40, so the resize is in the model; none: it is not
    assert written["plan"]["resize_in_model"] == (input_size == "auto")
    assert written["input"]["shape"] == ["batch", *((30, 40) if input_size == "auto" else (32, 32)), 3]
    assert spec["class_names"] == ["cats", "dogs"]
    if fmt == "onnx":  # the shipped script scores a file with onnxruntime alone, raypipe not imported
        img = sorted((synthetic_checkpoint.parent / "imgs" / "dogs").glob("*.png"))[0]
        serve = tmp_path / "serve.py"
        serve.write_text(
            "import runpy, sys\n"
            "path = sys.argv[1]\n"
            "sys.argv = [path, *sys.argv[2:]]\n"
            "try:\n"
            "    runpy.run_path(path, run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print('raypipe imported:', any(m.startswith('raypipe') for m in sys.modules))\n")
        proc = subprocess.run([sys.executable, str(serve), str(out / "preprocess.py"), str(img)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "cats=" in proc.stdout and "dogs=" in proc.stdout
        assert "raypipe imported: False" in proc.stdout


@pytest.mark.slow  # a job in a subprocess, or several processes
def test_tampered_export_fails_the_check(synthetic_checkpoint, tmp_path):
    import onnx
    from onnx import numpy_helper

    from raypipe.config import Config
    from raypipe.evaluate import load_checkpoint

    out = tmp_path / "out"
    spec = export(str(synthetic_checkpoint), "onnx", str(out), input_size="none")
    meta, state = load_checkpoint(str(synthetic_checkpoint))
    fs, records, _ = check_records(Config.model_validate(meta["config"]), 64)
    files = read_records(fs, records)
    expected = checkpoint_outputs(meta, state, files)
    assert verify(str(out), spec, expected, files)["max_abs_diff_scores"] <= 1e-4
    model = onnx.load(str(out / "model.onnx"))
    bias = next(t for t in model.graph.initializer if t.name.endswith("fc.bias"))
    shifted = numpy_helper.to_array(bias).copy()
    shifted[0] += np.float32(1e-3)  # one class only: the scores move too, not just the logits
    bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))
    onnx.save(model, str(out / "model.onnx"))
    with pytest.raises(ExportCheckError, match=r"differs from the checkpoint model by (\S+) in scores "
                       r"and 0.001\d* in logits \(tolerance 0.0001\)") as err:
        verify(str(out), spec, expected, files)
    assert float(err.value.args[0].split(" by ")[1].split(" ")[0]) > 1e-4  # the scores moved


def test_export_refuses_bad_requests(synthetic_checkpoint, tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        export(str(tmp_path / "nope"), "onnx", str(tmp_path / "o"))
    with pytest.raises(ExportError, match=r"--format 'tflite': expected one of \['onnx', 'torchscript'\]"):
        export(str(synthetic_checkpoint), "tflite", str(tmp_path / "o"))
    with pytest.raises(ExportError, match="--input-size 'big': expected auto, none, or HEIGHTxWIDTH"):
        export(str(synthetic_checkpoint), "onnx", str(tmp_path / "o"), input_size="big")
    with pytest.raises(ExportCheckError, match=r"none of the 4 checked .* 50x50 .*they are 30x40 \(4\)\)"):
        export(str(synthetic_checkpoint), "torchscript", str(tmp_path / "o"), input_size="50x50")
    assert not (tmp_path / "o").exists()  # nothing written when the check fails


@pytest.mark.slow  # a job in a subprocess, or several processes
def test_export_job(synthetic_checkpoint, tmp_path):
    out = tmp_path / "job"
    proc = run_job("export.py", "--checkpoint", str(synthetic_checkpoint), "--format", "torchscript",
                   "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check on 4 validation images" in proc.stdout
    assert (out / "model.torchscript.pt").is_file()
    proc = run_job("export.py", "--checkpoint", str(tmp_path / "missing"), "--format", "onnx",
                   "--out", str(out), timeout=300)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- real images


@pytest.mark.slow  # real films through both exporters
@pytest.mark.parametrize("fmt,input_size", [("onnx", "112x112"), ("torchscript", "auto")])
def test_export_real_chest_films(shared_data, tmp_path, fmt, input_size):
    """Chest films (mostly 224x224 JPEG re-saves, which decode drafted to 112x112 for a 64 px
    model, and a few large originals), gray, percentile-normalised: the resize folded in for the
    112x112 ones (ONNX), the resize in preprocess.py for all (TorchScript)."""
    ckpt = save_test_checkpoint(tmp_path / "ckpt", shared_data / "chest-xray-sample", [
        "preprocess.image_size=64", "preprocess.channels=1", "preprocess.normalize=percentile"])
    spec = export(str(ckpt), fmt, str(tmp_path / "out"), input_size=input_size, check_images=24)
    c = spec["check"]
    assert c["max_abs_diff_scores"] <= 1e-4 and c["max_abs_diff_logits"] <= 1e-4
    assert c["images"] + c["other_size_skipped"] == 24
    assert c["images"] >= 12
    assert spec["plan"]["resize_in_model"] == (input_size != "auto")
