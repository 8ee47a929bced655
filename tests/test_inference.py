"""raypipe.inference.predict and jobs/predict.py: one image without Ray, a folder through Ray Data,
CSV and Parquet tables, clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from checkpoints import save_test_checkpoint
from conftest import make_image_folder, run_job

from raypipe.config import Config
from raypipe.data.decode import decode_image
from raypipe.data.transforms import Preprocessor
from raypipe.evaluate import EvaluationError, load_checkpoint
from raypipe.inference import PredictionError, predict
from raypipe.models.resnet import create_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_image_folder(root / "imgs", {"cats": 8, "dogs": 8}, size=(36, 28))
    return save_test_checkpoint(root / "ckpt", data, [
        "preprocess.image_size=32", "preprocess.channels=3", "preprocess.normalize=minmax",
        "augment.tta=hflip", "train.batch_size=4",
        "data.max_bad_fraction=0.5"])


def expected_scores(checkpoint, path) -> np.ndarray:
    """Decode, Preprocessor, model, mirror-image TTA and softmax, spelled out."""
    meta, state = load_checkpoint(str(checkpoint))
    cfg = Config.model_validate(meta["config"])
    img = decode_image(path.read_bytes(), draft_size=cfg.preprocess.image_size)
    x = torch.from_numpy(np.array(Preprocessor(cfg.preprocess)(img, 255.0).transpose(2, 0, 1)))[None]
    model = create_model("resnet18", in_channels=3, num_classes=2)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = (model(x) + model(torch.flip(x, dims=[-1]))) / 2
    return torch.softmax(logits, dim=1)[0].numpy()


def data_folder(checkpoint):
    return checkpoint.parent / "imgs"


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_one_image_is_scored_without_ray(checkpoint, tmp_path, ext, monkeypatch):
    import ray
    import ray.data

    def no_ray(*args, **kwargs):
        raise AssertionError("one image is scored in this process, without Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray.data, "from_items", no_ray)
    monkeypatch.setattr(ray.data, "read_datasource", no_ray)
    was = ray.is_initialized()  # another test of this process may have connected already
    image = sorted((data_folder(checkpoint) / "dogs").glob("*.png"))[0]
    out = tmp_path / f"one.{ext}"
    table = predict(str(checkpoint), str(image), str(out))
    assert ray.is_initialized() == was
    assert list(table.columns) == ["path", "score_cats", "score_dogs", "predicted_label"]
    want = expected_scores(checkpoint, image)
    np.testing.assert_allclose(table[["score_cats", "score_dogs"]].to_numpy()[0], want, atol=1e-6)
    back = pd.read_csv(out) if ext == "csv" else pd.read_parquet(out)
    assert list(back.columns) == list(table.columns) and back["path"][0] == str(image)
    np.testing.assert_allclose(back[["score_cats", "score_dogs"]].to_numpy()[0], want, atol=1e-6)
    assert back["predicted_label"][0] == ["cats", "dogs"][int(want[1] >= 0.5)]


def test_bad_input_says_what_to_do(checkpoint, tmp_path):
    image = sorted((data_folder(checkpoint) / "cats").glob("*.png"))[0]
    with pytest.raises(EvaluationError, match=r"checkpoint '.*nowhere' does not exist\. Pass a checkpoint"):
        predict(str(tmp_path / "nowhere"), str(image))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these are not pixels")
    with pytest.raises(PredictionError, match=r"cannot decode '.*broken\.png': not a readable image"):
        predict(str(checkpoint), str(broken))
    with pytest.raises(PredictionError, match=r"output '.*scores\.xlsx' has extension '\.xlsx', "
                                              r"expected one of \['\.csv', '\.parquet', '\.pq'\]"):
        predict(str(checkpoint), str(image), str(tmp_path / "scores.xlsx"))
    with pytest.raises(PredictionError, match=r"'.*missing\.png' does not exist\. Give an image file"):
        predict(str(checkpoint), str(tmp_path / "missing.png"))


@pytest.mark.slow  # a job in a subprocess, or several processes
def test_predict_job_one_image(checkpoint, tmp_path):
    image = sorted((data_folder(checkpoint) / "cats").glob("*.png"))[0]
    out = tmp_path / "p.csv"
    proc = run_job("predict.py", "--checkpoint", str(checkpoint), "--source", str(image), "--out", str(out),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"scored 1 image: {out}" in proc.stdout
    np.testing.assert_allclose(pd.read_csv(out)[["score_cats", "score_dogs"]].to_numpy()[0],
                               expected_scores(checkpoint, image), atol=1e-6)
    proc = run_job("predict.py", "--checkpoint", str(checkpoint), "--source", str(image), "--out",
                   str(tmp_path / "p.json"), timeout=300)
    assert proc.returncode == 1 and "has extension '.json'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_folder_is_scored_through_ray_data(checkpoint, ray_cluster, tmp_path):
    folder = tmp_path / "new"
    make_image_folder(folder, {"cats": 3, "dogs": 3}, size=(50, 40), seed=7)
    (folder / "dogs" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "folder.parquet"
    table = predict(str(checkpoint), str(folder), str(out))
    assert len(table) == 6
    assert [name for name, _ in table.attrs["skipped"]] == ["dogs/truncated.png"]
    back = pd.read_parquet(out)
    assert sorted(back["path"]) == sorted(str(p) for p in folder.rglob("*.png") if p.name != "truncated.png")
    # the batch path scores exactly as the single-image path does
    for path in sorted(folder.rglob("0*.png"))[:2]:
        row = back[back["path"] == str(path)]
        np.testing.assert_allclose(row[["score_cats", "score_dogs"]].to_numpy()[0],
                                   expected_scores(checkpoint, path), atol=1e-5)
    proc = run_job("predict.py", "--checkpoint", str(checkpoint), "--source", str(folder),
                   "--out", str(tmp_path / "folder.csv"), env={"RAY_ADDRESS": ray_cluster}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 6 images, 1 skipped" in proc.stdout and "skipped dogs/truncated.png" in proc.stdout
    csv = pd.read_csv(tmp_path / "folder.csv")
    pd.testing.assert_frame_equal(csv.sort_values("path").reset_index(drop=True),
                                  back.sort_values("path").reset_index(drop=True),
                                  check_exact=False, atol=1e-6)
