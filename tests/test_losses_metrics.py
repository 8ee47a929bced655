"""Losses against hand computations; metrics against scikit-learn, also gathered across workers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from raypipe.training.losses import (
    FocalLoss,
    build_loss,
    inverse_prevalence_weights,
    loss_facts,
    loss_text,
)
from raypipe.training.metrics import classification_metrics, softmax

# ---------------------------------------------------------------- losses


def test_inverse_prevalence_weights_from_counts():
    assert inverse_prevalence_weights([30, 10]) == pytest.approx([40 / 60, 40 / 20])
    assert inverse_prevalence_weights([5, 5, 5]) == [1.0, 1.0, 1.0]
    w = inverse_prevalence_weights([90, 9, 1])
    assert w == pytest.approx([100 / 270, 100 / 27, 100 / 3])
    # each class then carries the same total weight: n_k * w_k = N / K
    assert [c * x for c, x in zip([90, 9, 1], w, strict=True)] == pytest.approx([100 / 3] * 3)
    assert inverse_prevalence_weights([4, 0]) == [0.5, 0.0]


def test_a_run_says_what_its_loss_weighs():
    """The log line, summary.json and report.md name the loss and each class's weight."""
    names, counts = ["NORMAL", "PNEUMONIA"], [102, 17]
    facts = loss_facts("weighted_ce", names, counts, None)
    assert facts["loss"] == "weighted_ce"
    assert facts["class_weights"] == pytest.approx({"NORMAL": 119 / 204, "PNEUMONIA": 119 / 34})
    assert loss_text(facts) == ("weighted_ce, class weights NORMAL 0.583, PNEUMONIA 3.5 "
                                "(inverse prevalence of the 119 training files)")
    given = loss_facts("focal", names, counts, [1.0, 4.0])
    assert given["class_weights"] == {"NORMAL": 1.0, "PNEUMONIA": 4.0}
    assert loss_text(given).endswith("(train.class_weights)")
    # plain cross-entropy ignores the weights, so none are claimed
    plain = loss_facts("ce", names, counts, None)
    assert plain["class_weights"] is None and plain["class_weights_from"] is None
    assert loss_text(plain) == "ce, unweighted"


def _nll(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log softmax(z)[y] per sample, by hand in float64."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (9, 3))
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    return logits, y


def test_weighted_ce_equals_hand_computation(batch):
    logits, y = batch
    weights = inverse_prevalence_weights(np.bincount(y, minlength=3).tolist())
    loss = build_loss("weighted_ce", weights)(torch.tensor(logits, dtype=torch.float32),
                                              torch.tensor(y))
    w = np.array(weights)[y]
    expected = float((w * _nll(logits, y)).sum() / w.sum())
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # and it differs from the plain mean, which the majority class dominates
    plain = build_loss("ce", weights)(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    assert float(plain) == pytest.approx(float(_nll(logits, y).mean()), rel=1e-5)
    assert abs(float(plain) - expected) > 1e-3


def test_explicit_class_weights_are_used(batch):
    logits, y = batch
    loss = build_loss("weighted_ce", [1.0, 2.0, 5.0])(torch.tensor(logits, dtype=torch.float32),
                                                      torch.tensor(y))
    w = np.array([1.0, 2.0, 5.0])[y]
    assert float(loss) == pytest.approx(float((w * _nll(logits, y)).sum() / w.sum()), rel=1e-5)


def test_focal_loss(batch):
    logits, y = batch
    t_logits, t_y = torch.tensor(logits, dtype=torch.float32), torch.tensor(y)
    nll = _nll(logits, y)
    p = np.exp(-nll)
    got = float(FocalLoss(None, gamma=2.0)(t_logits, t_y))
    assert got == pytest.approx(float(((1 - p) ** 2 * nll).mean()), rel=1e-5)
    # gamma=0 is (weighted) cross-entropy
    w = [1.0, 3.0, 0.5]
    f0 = build_loss("focal", w, focal_gamma=0.0)(t_logits, t_y)
    ce = build_loss("weighted_ce", w)(t_logits, t_y)
    assert float(f0) == pytest.approx(float(ce), rel=1e-5)
    # focusing: easy, confident examples contribute less than under cross-entropy
    assert got < float(nll.mean())


def test_label_smoothing_matches_torch(batch):
    logits, y = batch
    t_logits, t_y = torch.tensor(logits, dtype=torch.float32), torch.tensor(y)
    ours = build_loss("ce", None, label_smoothing=0.1)(t_logits, t_y)
    ref = torch.nn.functional.cross_entropy(t_logits, t_y, label_smoothing=0.1)
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    # focal with gamma 0 and smoothing is smoothed cross-entropy too
    f = build_loss("focal", None, focal_gamma=0.0, label_smoothing=0.1)(t_logits, t_y)
    assert float(f) == pytest.approx(float(ref), rel=1e-5)


def test_unknown_loss():
    with pytest.raises(ValueError, match="ce, weighted_ce or focal"):
        build_loss("hinge", None)


# ---------------------------------------------------------------- metrics


def _binary_set(n=60, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = np.stack([rng.normal(0, 1, n), rng.normal(0, 1, n) + 1.2 * y], axis=1)
    return y, logits


def _multi_set(n=90, k=4, seed=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.0
    return y, logits


def test_binary_metrics_equal_sklearn():
    y, logits = _binary_set()
    probs = softmax(logits)
    m = classification_metrics(y, probs, ["neg", "pos"], threshold=0.4)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, probs[:, 1]), abs=1e-12)
    pred = (probs[:, 1] >= 0.4).astype(int)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["confusion"] == skm.confusion_matrix(y, pred).tolist()
    assert m["n"] == len(y)


def test_multiclass_macro_ovr_auc_equals_sklearn():
    y, logits = _multi_set()
    probs = softmax(logits)
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y, probs, names)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)
    for i, name in enumerate(names):
        assert m[f"auc_{name}"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]))
    pred = probs.argmax(1)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert np.array(m["confusion"]).shape == (4, 4) and np.array(m["confusion"]).sum() == len(y)


def test_auc_undefined_with_one_class_is_nan_not_a_crash():
    probs = softmax(np.random.default_rng(0).normal(size=(5, 2)))
    m = classification_metrics(np.zeros(5, int), probs, ["a", "b"])
    assert math.isnan(m["auc"])


# ---------------------------------------------------------------- gathered across Ray Train workers


@pytest.mark.slow
def test_auc_gathered_across_two_workers_with_uneven_shards_equals_sklearn(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypipe.training.trainer import fit

    # defined here so that it pickles by value: workers cannot import this test module
    def _gather_worker(config: dict) -> None:
        """Each rank scores its own uneven slice of each case; metrics come from the gathered
        predictions."""
        import ray.train

        from raypipe.training.worker import gather_predictions

        rank = ray.train.get_context().get_world_rank()
        out = {}
        for case, c in config["cases"].items():
            lo, hi = c["bounds"][rank]
            y = np.asarray(c["y"], np.int64)[lo:hi]
            logits = np.asarray(c["logits"], np.float32)[lo:hi]
            if len(y) == 0:
                logits = np.zeros((0, 0), np.float32)  # what loop.predict returns for no batches
            labels, gathered = gather_predictions(y, logits)
            m = classification_metrics(labels, softmax(gathered.astype(np.float64)),
                                       [str(i) for i in range(gathered.shape[1])])
            out[case] = {"auc": m["auc"], "n": m["n"], "local_n": len(y), "order": labels.tolist()}
        if rank == 0:  # metrics without a checkpoint do not reach Result.metrics in Train V2
            with open(config["out"], "w") as f:
                json.dump(out, f)
        ray.train.report({})

    yb, lb = _binary_set(n=37)
    ym, lm = _multi_set(n=41, k=3)
    cases = {
        "binary_uneven": (yb, lb, [(0, 29), (29, 37)]),
        "multiclass_uneven": (ym, lm, [(0, 11), (11, 41)]),
        "one_empty_shard": (ym, lm, [(0, 41), (41, 41)]),
    }
    trainer = TorchTrainer(
        _gather_worker,
        train_loop_config={"out": str(tmp_path / "gathered.json"), "cases": {
            k: {"y": y.tolist(), "logits": lg.tolist(), "bounds": b}
            for k, (y, lg, b) in cases.items()}},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="gather", storage_path=str(tmp_path)),
    )
    fit(trainer)
    got = json.loads((tmp_path / "gathered.json").read_text())
    for case, (y, logits, bounds) in cases.items():
        probs = softmax(logits)
        expected = (skm.roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2
                    else skm.roc_auc_score(y, probs, multi_class="ovr"))
        g = got[case]
        assert g["n"] == len(y), case
        assert g["local_n"] == bounds[0][1] - bounds[0][0], case  # rank 0's own shard
        assert g["order"] == y.tolist(), case  # rank order: every sample exactly once
        assert g["auc"] == pytest.approx(expected, abs=1e-6), case
        if case != "one_empty_shard":  # averaging per-shard AUCs would give another number
            per_shard = [skm.roc_auc_score(y[lo:hi], probs[lo:hi, 1]) if probs.shape[1] == 2
                         else skm.roc_auc_score(y[lo:hi], probs[lo:hi], multi_class="ovr")
                         for lo, hi in bounds]
            assert abs(np.mean(per_shard) - expected) > 1e-4, case


def test_hflip_tta_averages_the_logits_of_each_image_and_its_mirror():
    from raypipe.training.loop import forward_eval, predict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 5, 2))
    x = torch.rand(6, 3, 4, 5)
    with torch.no_grad():
        want = (model(x) + model(torch.flip(x, [-1]))) / 2
        assert torch.allclose(forward_eval(model, x, "hflip"), want)
        assert torch.allclose(forward_eval(model, x, "none"), model(x))
        # a left-right asymmetric image gives different plain logits, so the test can fail
        assert not torch.allclose(model(x), want)
    batches = [{"image": x[:4], "label": torch.tensor([0, 1, 0, 1])},
               {"image": x[4:], "label": torch.tensor([1, 1])}]
    labels, logits = predict(model, batches, torch.device("cpu"), tta="hflip")
    assert labels.tolist() == [0, 1, 0, 1, 1, 1]
    np.testing.assert_allclose(logits, want.numpy(), rtol=1e-5, atol=1e-6)


def test_mixup_loss_mixes_images_and_losses_with_the_same_weight():
    from raypipe.training.loop import mixup_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 1, 0, 1])
    loss_fn = build_loss("weighted_ce", [0.7, 1.3])
    torch.manual_seed(1)
    got = mixup_loss(model, x, y, loss_fn, alpha=0.4)
    torch.manual_seed(1)  # the same draws, by hand
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(5)
    out = model(lam * x + (1 - lam) * x[perm])
    want = lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y[perm])
    assert torch.allclose(got, want)
    assert 0 < lam < 1 and not torch.allclose(got, loss_fn(model(x), y))


def _buffers_after_sharing(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from raypipe.training.worker import _share_rank0_buffers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(rank)
    bn = torch.nn.BatchNorm1d(3)
    bn.train()(torch.randn(8, 3) * (rank + 1))  # each worker's own running statistics
    _share_rank0_buffers(bn)
    torch.save(bn.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # a job in a subprocess, or several processes
def test_every_worker_validates_with_rank0_batchnorm_statistics(tmp_path):
    """DDP keeps weights equal but not BatchNorm statistics; before validation every worker takes
    rank 0's, so all of them score the model the checkpoint holds."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_buffers_after_sharing, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert not torch.equal(r0["running_mean"], torch.zeros(3))  # rank 0 did move its statistics


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 4), st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 1000]),
       st.floats(0.05, 0.95))
def test_numpy_metrics_equal_sklearn_with_ties_and_missing_classes(k, n, seed, levels, threshold):
    """The metrics are plain numpy (no scikit-learn import in the training workers); they must be
    scikit-learn's, value for value, also with tied scores, classes absent from the labels or the
    predictions, and a single sample."""
    import warnings

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    # few score levels: many ties (AUC's half credit, AP's one threshold per distinct score)
    probs = rng.integers(0, levels, (n, k)).astype(np.float64) + 1e-3
    probs /= probs.sum(axis=1, keepdims=True)
    m = classification_metrics(labels, probs, [str(i) for i in range(k)], threshold=threshold)
    pred = (probs[:, 1] >= threshold).astype(int) if k == 2 else probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about absent classes
        both = len(np.unique(labels)) == 2
        if k == 2:
            assert (math.isnan(m["auc"]) and not both) or m["auc"] == pytest.approx(
                skm.roc_auc_score(labels, probs[:, 1]), abs=1e-12)
            if both:
                assert m["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probs[:, 1]),
                                                    abs=1e-12)
            avg = {"average": "binary"}
        else:
            for i in range(k):
                y = labels == i
                if 0 < y.sum() < n:
                    assert m[f"auc_{i}"] == pytest.approx(skm.roc_auc_score(y, probs[:, i]), abs=1e-12)
                else:
                    assert math.isnan(m[f"auc_{i}"])
            ap = np.mean([skm.average_precision_score(labels == i, probs[:, i]) for i in range(k)])
            assert m["pr_auc"] == pytest.approx(ap, abs=1e-12)
            avg = {"average": "macro", "labels": list(range(k))}
        assert m["acc"] == pytest.approx(skm.accuracy_score(labels, pred))
        if len(np.unique(labels)) > 1:
            assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
        p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, zero_division=0, **avg)
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
        assert m["confusion"] == skm.confusion_matrix(labels, pred, labels=list(range(k))).tolist()


def test_training_workers_do_not_import_scikit_learn():
    """What the training workers import at start-up stays free of scikit-learn and SciPy (about
    1.3 s of CPU per worker process)."""
    import subprocess
    import sys

    code = ("import sys; import raypipe.training.worker; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
