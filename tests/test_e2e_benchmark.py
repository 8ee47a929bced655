"""``jobs/benchmark.py e2e``: raypipe's run against a plain PyTorch loop on the same files."""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from raypipe.benchmarks import e2e
from raypipe.config import ConfigError, load_config
from raypipe.data.sources import discover, label_counts
from raypipe.data.transforms import Preprocessor
from raypipe.training.losses import inverse_prevalence_weights


def xray_config(root, *extra: str):
    return load_config("xray.yaml", [f"data.root={root}", "preprocess.image_size=16", *extra])


@pytest.fixture
def folder(tmp_path):
    # imbalanced like the chest films, so that the class weights are not all ones
    return make_image_folder(tmp_path / "imgs", {"NORMAL": 8, "PNEUMONIA": 16}, size=(40, 30),
                             fmt="jpg")


def test_the_plain_loop_trains_raypipes_split_with_its_class_weights(folder):
    cfg = xray_config(folder)
    split = discover(cfg.data)
    mem = e2e.load_split(split.train, split.filesystem, cfg.preprocess, threads=2)
    assert len(mem) == len(split.train) and len(split.train) + len(split.val) == 24
    assert mem.labels.tolist() == [r.label for r in split.train]
    assert mem.images.shape == (len(split.train), 1, 16, 16) and mem.images.dtype == torch.uint8
    weights = e2e.class_weights_of(cfg, split)
    assert weights == pytest.approx(inverse_prevalence_weights(label_counts(split.train, 2)))
    assert weights[0] > 1 > weights[1]  # the rarer NORMAL class weighs more
    assert e2e.class_weights_of(xray_config(folder, "train.loss=ce"), split) is None


@pytest.mark.parametrize("normalize", ["percentile", "minmax", "divide255", "none"])
def test_normalisation_maps_the_same_intensities_as_raypipes(normalize):
    rng = np.random.default_rng(0)
    arr = rng.integers(20, 200, (16, 16), dtype=np.uint8)
    pre = load_config("xray.yaml", [f"preprocess.normalize={normalize}"]).preprocess
    assert e2e.intensity_range(arr, pre) == pytest.approx(Preprocessor(pre).intensity_range(arr, 255.0))


def test_a_batch_is_normalised_per_image_then_standardised():
    cfg = load_config("xray.yaml", ["preprocess.mean=[0.5]", "preprocess.std=[0.25]"]).preprocess
    images = torch.tensor([[[[10, 30]]], [[[0, 255]]]], dtype=torch.uint8)  # (2, 1, 1, 2)
    mem = e2e.InMemory(images, torch.tensor([10.0, 0.0]), torch.tensor([30.0, 255.0]),
                       torch.tensor([0, 1]))
    x = e2e.model_input(mem, torch.tensor([0, 1]), cfg, None)
    assert x.flatten().tolist() == pytest.approx([-2.0, 2.0, -2.0, 2.0])


def test_augmentation_has_the_configs_kinds_and_ranges():
    xray = load_config("xray.yaml").augment
    aug = e2e.BatchAugment(xray, 32)
    assert aug.kinds() == ["RandomAffine", "brightness", "contrast"]  # hflip 0: no flips
    affine = aug.geometric.transforms[0]
    assert list(affine.degrees) == [-7.0, 7.0]
    assert tuple(affine.translate) == (0.05, 0.05) and tuple(affine.scale) == (0.9, 1.1)
    assert affine.interpolation.value == "bilinear" and affine.shear is None
    flowers = e2e.BatchAugment(load_config("flowers.yaml").augment, 32)
    assert flowers.kinds() == ["RandomResizedCrop", "RandomAffine", "RandomHorizontalFlip",
                               "brightness", "contrast"]
    assert tuple(flowers.geometric.transforms[0].scale) == (0.8, 1.0)


def test_each_image_of_a_batch_gets_its_own_draw():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32).expand(8, 1, 32, 32).clone()
    out = e2e.BatchAugment(load_config("xray.yaml").augment, 32)(x)
    assert out.shape == x.shape
    # v2 transforms called on a whole batch would give every image the same warp
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 8))


def test_brightness_and_contrast_stay_in_their_ranges():
    cfg = load_config("xray.yaml", ["augment.rotation=0", "augment.zoom=[1, 1]",
                                    "augment.translate=0"]).augment
    aug = e2e.BatchAugment(cfg, 4)
    assert aug.geometric is None and aug.kinds() == ["brightness", "contrast"]
    flat = torch.full((500, 1, 4, 4), 0.5)  # contrast leaves a flat image alone: only brightness
    shift = aug(flat)[:, 0, 0, 0] - 0.5
    assert shift.abs().max() <= 0.05 + 1e-6 and shift.std() > 0.02
    two = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).repeat(500, 1, 1, 1)
    out = aug(two)
    spread = out[:, 0, 0, 1] - out[:, 0, 0, 0]  # the contrast factor
    assert spread.min() >= 0.9 - 1e-6 and spread.max() <= 1.1 + 1e-6 and spread.std() > 0.03


def test_settings_the_plain_loop_lacks_are_refused(folder):
    e2e.check_plain_supported(xray_config(folder))
    with pytest.raises(ConfigError, match="train.ema_decay"):
        e2e.check_plain_supported(xray_config(folder, "train.ema_decay=0.99"))


def _run(epoch_s: list[float], auc: list[float], images: int = 100) -> dict:
    return {"startup_s": 5.0, "epochs": [{"epoch_s": s, "val_auc": a, "images": images}
                                         for s, a in zip(epoch_s, auc, strict=True)]}


def test_the_ratio_compares_the_later_epochs_of_every_round():
    rounds = [{"round": 0, "order": ["raypipe", "plain"], "raypipe": _run([30, 12, 12], [.5, .7, .8]),
               "plain": _run([11, 10, 10], [.6, .9, .7])},
              {"round": 1, "order": ["plain", "raypipe"], "raypipe": _run([20, 9, 9], [.5, .7, .8]),
               "plain": _run([9, 8, 8], [.6, .9, .7])}]
    out = e2e.compare(rounds)
    assert out["ratio"] == pytest.approx((24 + 18) / (20 + 16))
    assert out["round_ratios"] == pytest.approx([1.2, 18 / 16])
    assert out["ratio_first"] == pytest.approx(25 / 10)
    assert out["raypipe"]["later_epoch_s"] == pytest.approx(10.5)
    assert out["plain"]["images_per_s"] == pytest.approx(statistics_mean([100 / 10, 100 / 8]))
    assert out["plain"]["best_auc"] == pytest.approx(0.9) and out["plain"]["last_auc"] == pytest.approx(0.7)
    one_epoch = [{**r, "raypipe": _run([30], [.5]), "plain": _run([10], [.6])} for r in rounds]
    assert e2e.compare(one_epoch)["ratio"] is None
    assert out["raypipe"]["cpu"] is None  # no round measured any


def test_cpu_figures_are_averaged_over_the_rounds_process_by_process():
    a = {"driver_ms_per_image": 2.0, "total_ms_per_image": 6.0, "cores_busy": 1.0,
         "by_process_ms_per_image": {"raylet": 4.0}}
    b = {"driver_ms_per_image": 4.0, "total_ms_per_image": 7.0, "cores_busy": 2.0,
         "by_process_ms_per_image": {"raylet": 2.0, "gcs_server": 1.0}}
    got = e2e.mean_cpu([a, b])
    assert got["driver_ms_per_image"] == 3.0 and got["cores_busy"] == 1.5
    assert got["by_process_ms_per_image"] == {"raylet": 3.0, "gcs_server": 0.5}
    assert list(got["by_process_ms_per_image"]) == ["raylet", "gcs_server"]  # largest first
    rounds = [{"round": 0, "order": ["raypipe", "plain"], "raypipe": {**_run([3, 2], [.5, .6]), "cpu": a},
               "plain": {**_run([3, 2], [.5, .6]), "cpu": b}}]
    summary = e2e.compare(rounds)
    assert summary["plain"]["cpu"]["cores_busy"] == 2.0
    rows = e2e.table(rounds, summary)
    assert rows[2]["side"] == "raypipe" and rows[2]["cores_busy"] == 1.0
    assert rows[2]["cpu_ms_per_image"] == 6.0
    json.dumps(rows)


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_cpu_roles_come_from_rays_titles():
    assert e2e.cpu_role("anything", is_self=True) == "driver"
    assert e2e.cpu_role("ray::RayTrainWorker", False) == "train_workers"
    assert e2e.cpu_role("ray::ReadRange->MapBatches(process_block)", False) == "data_tasks"
    assert e2e.cpu_role("ray::_prepare_part", False) == "data_tasks"
    assert e2e.cpu_role("ray::SplitCoordinator", False) == "ray_other"
    assert e2e.cpu_role("/venv/bin/gcs_server --flags", False) == "ray_other"


def test_processes_are_named_by_ray_title_script_or_program():
    assert e2e.process_name(["ray::SplitCoordinator.get", "", ""]) == "ray::SplitCoordinator"
    assert e2e.process_name(["/v/bin/python", "-u", "/v/ray/dashboard/agent.py", "--x=1"]) == "agent.py"
    assert e2e.process_name(["/v/bin/python3.11", "-m", "ray.util.client.server"]) == "ray.util.client.server"
    assert e2e.process_name(["/v/ray/core/src/ray/raylet/raylet", "--flag"]) == "raylet"
    assert e2e.process_name(["ray-dashboard-NodeHead-0", "(/v/bin/python"]) == "ray-dashboard-NodeHead-0"


def test_cpu_sampler_counts_this_process_between_two_moments():
    with e2e.CpuSampler(interval=0.05) as cpu:
        t0 = time.time()
        end = time.process_time() + 0.3
        while time.process_time() < end:  # burn 0.3 s of CPU, letting the sampler's thread in
            sum(range(2000))
            time.sleep(0)
        t1 = time.time()
        time.sleep(0.2)
    spent = cpu.between(t0, t1)
    assert 0.15 < spent["driver"] < 0.6
    assert cpu.between(t1 + 0.1, t1 + 0.15)["driver"] < 0.05
    epochs = [{"started_at": t0 - 1, "epoch_s": 0.5, "images": 10},
              {"started_at": t0, "epoch_s": t1 - t0, "images": 10}]
    later = e2e.later_cpu(cpu, epochs)
    assert later["driver_ms_per_image"] == pytest.approx(1000 * spent["driver"] / 10)
    assert later["by_process_ms_per_image"]["driver"] == pytest.approx(
        later["driver_ms_per_image"], rel=0.5)  # nearest samples, not interpolated


@pytest.mark.slow
def test_e2e_tiny_run(ray_cluster, tmp_path):
    from raypipe.jobs.benchmark import main

    root = make_image_folder(tmp_path / "imgs", {"NORMAL": 20, "PNEUMONIA": 20}, size=(40, 30),
                             fmt="jpg")
    out = tmp_path / "e2e.json"
    assert main(["e2e", "--data", str(root), "--rounds", "1", "--epochs", "2", "--image-size", "16",
                 "--batch-size", "8", "--set", "train.num_workers=1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["same_split"] and result["image_size"] == 16 and result["epochs"] == 2
    rnd = result["rounds"][0]
    assert rnd["order"] == ["raypipe", "plain"]
    for side in ("raypipe", "plain"):
        epochs = rnd[side]["epochs"]
        assert len(epochs) == 2
        assert [e["images"] for e in epochs] == [32, 32]  # 40 files, 8 held out
        assert all(0.0 <= e["val_auc"] <= 1.0 for e in epochs)
        assert all(e["epoch_s"] > 0 for e in epochs) and rnd[side]["startup_s"] > 0
        assert 0.0 <= result[side]["best_auc"] <= 1.0
    assert rnd["plain"]["augment"] == ["RandomAffine", "brightness", "contrast"]
    assert result["ratio"] > 0 and not math.isnan(result["ratio"])
    assert result["raypipe"]["cpu"]["train_workers_ms_per_image"] > 0
    assert result["plain"]["cpu"]["driver_ms_per_image"] > 0
    assert {"side": "raypipe", "round": "mean"}.items() <= result["table"][2].items()


def test_the_subcommand_is_listed():
    from raypipe.benchmarks import SUBCOMMANDS

    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    args = p.parse_args(["--set", "train.num_workers=1", "--set", "pipeline.cache=false"])
    assert "e2e" in SUBCOMMANDS and args.config == "xray.yaml" and args.rounds == 3
    assert e2e.e2e_overrides(argparse.Namespace(**{**vars(args), "data": "/d"}))[-2:] == [
        "train.num_workers=1", "pipeline.cache=false"]
