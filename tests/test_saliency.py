"""Grad-CAM saliency: the map finds what a trained model looks at; case selection for binary and
multi-class tasks; the grids evaluate --saliency writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import save_test_checkpoint
from conftest import make_image_folder, run_job
from PIL import Image
from torch import nn

from raypipe.report.saliency import gradcam, select_cases, tile_title, write_saliency

SIZE, SQUARE = 48, 12


class SquareNet(nn.Module):
    """A small CNN with a ``layer4`` (the stage Grad-CAM reads) and global average pooling. Pooling
    alone is blind to position, so a second input plane is the image times its x coordinate:
    where the image is bright, it says how far right (a bare coordinate plane would let the model
    find "right" in the background too)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        coord = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(n, 1, h, w)
        return self.fc(self.layer4(self.stem(torch.cat([x, x * coord], dim=1))).mean(dim=(2, 3)))


def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(images (n, 1, SIZE, SIZE), labels 0 = square in the left half / 1 = right, square
    corners (row, col)) on a noisy background."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    corners = np.zeros((n, 2), int)
    for i, label in enumerate(labels):
        r = rng.integers(0, SIZE - SQUARE + 1)
        c = rng.integers(0, SIZE // 2 - SQUARE + 1) + label * SIZE // 2
        x[i, 0, r:r + SQUARE, c:c + SQUARE] = 1.0
        corners[i] = r, c
    return torch.from_numpy(x), torch.from_numpy(labels), corners


def train_square_net(seed: int = 0) -> SquareNet:
    """Trained on one thread: the net is too small to gain from more, and on a busy 2-core machine
    the default two threads took 142 s where one took 18 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = SquareNet()
        x, y, _ = squares(256, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(100):
            i = torch.randint(0, len(x), (32,))
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_gradcam_peak_lies_in_the_square():
    model = train_square_net()
    xt, yt, corners = squares(40, seed=1)
    with torch.no_grad():
        accuracy = (model(xt).argmax(dim=1) == yt).float().mean().item()
    assert accuracy >= 0.95, f"the test model did not learn the task (accuracy {accuracy:.2f})"
    maps = gradcam(model, xt, [0, 1])  # one map per requested class
    assert maps.shape == (40, 2, SIZE, SIZE) and maps.min() >= 0.0 and maps.max() <= 1.0
    inside = []
    for i in range(len(xt)):
        m = maps[i, int(yt[i])]  # the evidence for the image's own class
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        top, left = corners[i]
        inside.append(top <= r < top + SQUARE and left <= c < left + SQUARE)
    assert all(inside), f"peak outside the square for {inside.count(False)} of {len(inside)} images"
    mirrored = gradcam(model, xt[:4], [1], tta="hflip")
    assert mirrored.shape == (4, 1, SIZE, SIZE) and np.isfinite(mirrored).all()


def test_select_cases_binary_and_multiclass():
    labels = np.array([1, 1, 0, 0, 1, 0])
    p1 = np.array([0.9, 0.2, 0.8, 0.1, 0.6, 0.55])
    groups = {g.name: g for g in select_cases(labels, np.stack([1 - p1, p1], 1), ["neg", "pos"], 0.5, 2)}
    assert sorted(groups) == ["pos-fn", "pos-fp", "pos-tp"]
    assert groups["pos-tp"].rows == [0, 4]  # highest P(pos) first
    assert groups["pos-fp"].rows == [2, 5]
    assert groups["pos-fn"].rows == [1]  # the lowest P(pos) first
    assert {g.target for g in groups.values()} == {1}

    labels = np.array([0, 1, 2, 2, 1])
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1]])
    groups = {g.name: g for g in select_cases(labels, scores, ["a", "b", "c"], 0.5, 5)}
    assert len(groups) == 9
    assert groups["c-tp"].rows == [2] and groups["c-fp"].rows == [1] and groups["c-fn"].rows == [3]
    assert groups["b-tp"].rows == [4] and groups["b-fp"].rows == [3] and groups["b-fn"].rows == [1]
    assert groups["a-fp"].rows == [] and groups["c-fn"].target == 2
    assert tile_title("c/a_very_long_file_name_indeed.png", "c", "b", 0.5) == \
        "a_very_long_file_na...\ntrue c · P(b) 0.500"


def test_write_saliency_grids(tmp_path):
    import pyarrow.fs as pafs

    from raypipe.evaluate import load_checkpoint

    data = make_image_folder(tmp_path / "imgs", {"cats": 4, "dogs": 4}, size=(70, 64))
    ckpt = save_test_checkpoint(tmp_path / "ckpt", data, ["preprocess.image_size=64"])
    meta, state = load_checkpoint(str(ckpt))
    files = sorted(data.rglob("*.png"))
    labels = np.array([0 if f.parent.name == "cats" else 1 for f in files])
    p1 = np.linspace(0.05, 0.95, len(files))
    pred = {"path": np.array([str(f) for f in files], object),
            "key": np.array([f"{f.parent.name}/{f.name}" for f in files], object),
            "label": labels, "probs": np.stack([1 - p1, p1], 1).astype(np.float32)}
    written = write_saliency(meta, state, pafs.LocalFileSystem(), pred, 0.5, 3, str(tmp_path))
    # cats: p1 0.05..0.44 (no false positives); dogs: p1 0.56..0.95 (no false negatives)
    assert written == {"saliency-dogs-tp.png": 3}
    with Image.open(tmp_path / "saliency-dogs-tp.png") as img:
        assert img.format == "PNG" and img.size[0] >= 300


@pytest.mark.slow
@pytest.mark.ray
def test_evaluate_job_writes_saliency(ray_cluster, tmp_path):
    data = make_image_folder(tmp_path / "imgs", {"cats": 10, "dogs": 10}, size=(70, 64))
    ckpt = save_test_checkpoint(tmp_path / "ckpt", data, ["preprocess.image_size=64", "train.batch_size=4",
                                                           "pipeline.files_per_batch=4"])
    out = tmp_path / "eval"
    proc = run_job("evaluate.py", "--checkpoint", str(ckpt), "--out", str(out), "--saliency", "2",
                   env={"RAY_ADDRESS": ray_cluster}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    (tn, fp), (fn, tp) = summary["metrics"]["confusion"]
    expected = {f"saliency-dogs-{g}.png": min(2, k) for g, k in (("tp", tp), ("fp", fp), ("fn", fn)) if k}
    assert summary["saliency"] == expected and expected
    for name in summary["saliency"]:
        with Image.open(out / name) as img:
            assert img.format == "PNG"
    assert "saliency: saliency-dogs-" in proc.stdout
