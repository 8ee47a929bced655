"""BatchNorm statistics for validation: recomputed after each epoch with the epoch's final weights
(``train.bn_stats: precise``) instead of PyTorch's exponential average over training steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raypipe.config import load_config
from raypipe.training.doctor import GradientDoctor
from raypipe.training.loop import RecentInputs, WeightAverage, recompute_bn_stats, train_one_epoch

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _batches(n=5, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each batch shifted differently, so that which batches are averaged shows in the result
    return [{"image": torch.randn(size, 1, 6, 6, generator=g) * (1 + i) + i,
             "label": torch.randint(0, 2, (size,), generator=g)} for i in range(n)]


def _conv_stats(model, xs):
    """Per batch: the conv output's per-channel mean and unbiased variance (BatchNorm's input)."""
    with torch.no_grad():
        outs = [model[0](x) for x in xs]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs])
    vars_ = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs])
    return means.mean(0), vars_.mean(0)


def test_recompute_averages_the_batches_statistics_under_the_current_weights():
    model = _model().eval()
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as from earlier weights
    params = copy.deepcopy(model.state_dict())
    xs = [b["image"] for b in _batches()]
    recompute_bn_stats(model, xs, CPU)
    mean, var = _conv_stats(model, xs)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert int(bn.num_batches_tracked) == len(xs)
    # weights untouched; the layer's momentum and the model's mode put back
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, params[k]), k
    assert bn.momentum == 0.1 and not model.training


def test_recent_inputs_keeps_the_last_whole_batches_covering_the_count():
    recent = RecentInputs(20)
    xs = [torch.full((8, 1), float(i)) for i in range(6)]
    for x in xs:
        recent.add(x)
    assert [float(b[0]) for b in recent.batches] == [3.0, 4.0, 5.0]  # 24 >= 20; 16 would not do
    assert recent.count == 24
    none = RecentInputs(0)
    none.add(xs[0])
    assert not none.batches


def _epoch(model, samples, ema=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return train_one_epoch(model, _batches(), opt, nn.CrossEntropyLoss(), CPU, GradientDoctor(),
                           epoch=0, ema=ema, bn_stats_samples=samples)


@pytest.mark.parametrize("samples, batches_used", [(1000, 5), (16, 2)])
def test_an_epoch_leaves_the_statistics_of_its_final_weights(samples, batches_used):
    precise, ema_style = _model(), _model()
    timed = _epoch(precise, samples)
    untimed = _epoch(ema_style, 0)
    # the same training either way: only the statistics differ
    for name, p in precise.named_parameters():
        assert torch.equal(p, dict(ema_style.named_parameters())[name]), name
    xs = [b["image"] for b in _batches()][-batches_used:]
    mean, var = _conv_stats(precise, xs)
    assert torch.allclose(precise[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(precise[1].running_var, var, rtol=1e-4)
    # PyTorch's exponential average over the steps is far from them (0.1 per step from 0 and 1)
    assert not torch.allclose(ema_style[1].running_mean, mean, atol=0.1)
    # the recompute's time is reported, as a part of the epoch's
    assert 0.0 < timed["bn_stats_s"] < timed["epoch_time_s"]
    assert untimed["bn_stats_s"] < 1e-3


def test_the_weight_average_gets_statistics_of_its_own_weights():
    model = _model()
    ema = WeightAverage(model, decay=0.9)
    _epoch(model, 1000, ema=ema)
    xs = [b["image"] for b in _batches()]
    mean, _ = _conv_stats(ema.module, xs)
    assert torch.allclose(ema.module[1].running_mean, mean, atol=1e-5)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # two different models


def test_config_default_is_precise_and_ema_can_be_chosen():
    cfg = load_config(None, [])
    assert cfg.train.bn_stats == "precise" and cfg.train.bn_stats_samples == 512
    assert load_config(None, ["train.bn_stats=ema"]).train.bn_stats == "ema"


def _recompute_share_and_save(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from raypipe.training.worker import _share_rank0_buffers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    model = _model()
    xs = [b["image"] for b in _batches(n=6)]
    recompute_bn_stats(model, xs[rank::world], CPU)  # each worker its own share of the images
    _share_rank0_buffers(model, average_bn=True)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_workers_recompute_their_shares_and_average_to_one_recompute_over_all(tmp_path):
    """``bn_stats: precise`` with several workers: each recomputes over its share of the last
    images; the average is what one worker recomputing over all of them gets."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_recompute_share_and_save, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    alone = _model()
    recompute_bn_stats(alone, [b["image"] for b in _batches(n=6)], CPU)
    for key in ("1.running_mean", "1.running_var"):
        assert torch.equal(r0[key], r1[key]), key
        assert torch.allclose(r0[key], alone.state_dict()[key], rtol=1e-5, atol=1e-6), key
    rank0_alone = _model()
    recompute_bn_stats(rank0_alone, [b["image"] for b in _batches(n=6)][0::2], CPU)
    assert not torch.allclose(r0["1.running_mean"], rank0_alone.state_dict()["1.running_mean"])
