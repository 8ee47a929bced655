"""Optimisers and LR schedules: each schedule's LR sequence against torch's own scheduler."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as sched

from raypipe.config import ConfigError, TrainConfig, load_config
from raypipe.training.optim import EpochScheduler, build_optimizer, momentum_of

EPOCHS = 9
BASE = dict(lr=0.1, epochs=EPOCHS, step_size=2, gamma=0.5, milestones=[3, 5], plateau_patience=1)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def ours(cfg: TrainConfig, metrics: list[dict] | None = None) -> list[float]:
    """The LR each epoch uses under EpochScheduler."""
    opt = torch.optim.SGD(_params(), lr=cfg.lr)
    s = EpochScheduler(opt, cfg)
    out = []
    for e in range(cfg.epochs):
        out.append(s.lr)
        opt.step()
        s.step(metrics[e] if metrics else None)
    return out


def torch_reference(schedule: str, n: int, metric_values: list[float] | None = None,
                    mode: str = "min") -> list[float]:
    """The LR sequence of torch's own scheduler run alone for ``n`` epochs."""
    opt = torch.optim.SGD(_params(), lr=0.1)
    s = {
        "none": lambda: sched.LambdaLR(opt, lambda _: 1.0),
        "step": lambda: sched.StepLR(opt, step_size=2, gamma=0.5),
        "multistep": lambda: sched.MultiStepLR(opt, milestones=[3, 5], gamma=0.5),
        "exponential": lambda: sched.ExponentialLR(opt, gamma=0.5),
        "cosine": lambda: sched.CosineAnnealingLR(opt, T_max=n),
        "onecycle": lambda: sched.OneCycleLR(opt, max_lr=0.1, total_steps=n + 1),
        "plateau": lambda: sched.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=1),
    }[schedule]()
    out = []
    for e in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if schedule == "plateau":
            s.step(metric_values[e])
        else:
            s.step()
    return out


SCHEDULES = ["none", "step", "multistep", "exponential", "cosine", "onecycle"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_torch(schedule):
    got = ours(TrainConfig(schedule=schedule, warmup_epochs=0, **BASE))
    assert got == pytest.approx(torch_reference(schedule, EPOCHS), rel=1e-12)
    assert len(set(got)) > 1 or schedule == "none"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_then_main_schedule(schedule):
    warm = 3
    got = ours(TrainConfig(schedule=schedule, warmup_epochs=warm, **BASE))
    # linear warm-up: as torch's LinearLR from 1/(w+1) of the LR up to the full LR
    opt = torch.optim.SGD(_params(), lr=0.1)
    lin = sched.LinearLR(opt, start_factor=1 / (warm + 1), end_factor=1.0, total_iters=warm)
    expected_warm = []
    for _ in range(warm):
        expected_warm.append(opt.param_groups[0]["lr"])
        opt.step()
        lin.step()
    assert got[:warm] == pytest.approx(expected_warm, rel=1e-12)
    assert got[:warm] == pytest.approx([0.1 * (e + 1) / (warm + 1) for e in range(warm)])
    # then the main schedule, started fresh over the remaining epochs
    assert got[warm:] == pytest.approx(torch_reference(schedule, EPOCHS - warm), rel=1e-12)


@pytest.mark.parametrize("metric,mode,values", [
    ("val_loss", "min", [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.85, 0.9, 0.9]),
    ("val_auc", "max", [0.6, 0.7, 0.7, 0.65, 0.7, 0.8, 0.8, 0.75, 0.79]),
])
@pytest.mark.parametrize("warm", [0, 2])
def test_reduce_on_plateau(metric, mode, values, warm):
    metrics = [{"val_loss": 5.0, "val_auc": 0.5, metric: v} for v in values]
    got = ours(TrainConfig(schedule="plateau", plateau_metric=metric, warmup_epochs=warm, **BASE),
               metrics)
    ref = torch_reference("plateau", EPOCHS - warm, values[warm:], mode=mode)
    assert got[warm:] == pytest.approx(ref, rel=1e-12)
    assert min(got[warm:]) < 0.1  # the plateau really was detected on this metric


def test_plateau_ignores_the_other_metric():
    # val_auc improves steadily while val_loss is flat: watching val_auc never reduces the LR
    metrics = [{"val_loss": 1.0, "val_auc": 0.5 + 0.05 * e} for e in range(EPOCHS)]
    got = ours(TrainConfig(schedule="plateau", plateau_metric="val_auc", **BASE), metrics)
    assert got == [0.1] * EPOCHS
    got = ours(TrainConfig(schedule="plateau", plateau_metric="val_loss", **BASE), metrics)
    assert min(got) < 0.1


@pytest.mark.parametrize("schedule", SCHEDULES + ["plateau"])
def test_state_dict_resume_continues_the_sequence(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_epochs=2, **BASE)
    metrics = [{"val_loss": 1.0 - 0.01 * (e % 3)} for e in range(EPOCHS)]
    full = ours(cfg, metrics)
    for cut in (1, 2, 4):
        opt = torch.optim.SGD(_params(), lr=cfg.lr)
        s = EpochScheduler(opt, cfg)
        for e in range(cut):
            opt.step()
            s.step(metrics[e])
        saved_opt, saved = opt.state_dict(), s.state_dict()
        opt2 = torch.optim.SGD(_params(), lr=cfg.lr)
        s2 = EpochScheduler(opt2, cfg)
        opt2.load_state_dict(saved_opt)
        s2.load_state_dict(saved)
        rest = []
        for e in range(cut, EPOCHS):
            rest.append(s2.lr)
            opt2.step()
            s2.step(metrics[e])
        assert rest == pytest.approx(full[cut:], rel=1e-12), f"resumed after epoch {cut}"


def test_resume_with_more_epochs_does_not_crash_onecycle():
    short = TrainConfig(schedule="onecycle", **{**BASE, "epochs": 3})
    opt = torch.optim.SGD(_params(), lr=0.1)
    s = EpochScheduler(opt, short)
    for _ in range(3):
        opt.step()
        s.step()
    longer = TrainConfig(schedule="onecycle", **{**BASE, "epochs": 6})
    opt2 = torch.optim.SGD(_params(), lr=0.1)
    s2 = EpochScheduler(opt2, longer)
    opt2.load_state_dict(opt.state_dict())
    s2.load_state_dict(s.state_dict())
    for _ in range(3):  # would raise "Tried to step ... times" with the old total_steps
        opt2.step()
        s2.step()
    assert s2.lr >= 0


@pytest.mark.parametrize("name,cls", [
    ("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
    ("rmsprop", torch.optim.RMSprop),
])
def test_each_optimizer_selectable_from_config(name, cls):
    cfg = load_config(None, [f"train.optimizer={name}", "train.lr=0.02",
                             "train.weight_decay=0.001"])
    opt = build_optimizer(_params(), cfg.train)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.02 and group["weight_decay"] == 0.001
    if name in ("sgd", "rmsprop"):
        assert group["momentum"] == momentum_of(cfg.train)
    # it really optimises: a quadratic bowl goes down
    p = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = build_optimizer([p], cfg.train.model_copy(update={"lr": 0.05}))
    start = float((p.detach() ** 2).sum())
    for _ in range(20):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert float((p.detach() ** 2).sum()) < start


def test_momentum_defaults_to_each_optimisers_own():
    # SGD's 0.9 made RMSprop's early steps ~25x its learning rate: every RMSprop trial of the
    # default search diverged to constant predictions (val AUC 0.5)
    assert build_optimizer(_params(), TrainConfig(optimizer="sgd")).param_groups[0]["momentum"] == 0.9
    assert build_optimizer(_params(), TrainConfig(optimizer="rmsprop")).param_groups[0]["momentum"] == 0.0
    # a momentum the user sets is used as given, by either optimiser
    for name in ("sgd", "rmsprop"):
        cfg = TrainConfig(optimizer=name, momentum=0.5)
        assert build_optimizer(_params(), cfg).param_groups[0]["momentum"] == 0.5
    # and a config written with `momentum: null` loads back to the same choice
    cfg = load_config(None, ["train.optimizer=rmsprop", "train.momentum=null"])
    assert cfg.train.momentum is None and momentum_of(cfg.train) == 0.0


def test_rmsprop_defaults_take_steps_near_the_learning_rate():
    # the size of the early steps is what blew up: with momentum 0.9 the 8th step moves each
    # weight 25x the learning rate; with RMSprop's own default it is 3x (10x at the first step)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = build_optimizer([p], TrainConfig(optimizer="rmsprop", lr=1e-3, weight_decay=0.0))
    for _ in range(8):
        before = p.detach().clone()
        opt.zero_grad()
        p.grad = torch.randn(1000).abs()  # a consistent direction, as early in training
        opt.step()
    step = (p.detach() - before).abs().mean() / 1e-3
    assert step < 10, f"the 8th step moved each weight {step:.0f}x the learning rate"


def test_sgd_nesterov():
    cfg = TrainConfig(optimizer="sgd", nesterov=True, momentum=0.9)
    assert build_optimizer(_params(), cfg).param_groups[0]["nesterov"] is True
    # Nesterov needs momentum: with none it is switched off rather than crashing torch
    cfg = TrainConfig(optimizer="sgd", nesterov=True, momentum=0.0)
    assert build_optimizer(_params(), cfg).param_groups[0]["nesterov"] is False


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=lamb"])


def test_weight_average_follows_the_ramped_decay_and_copies_integer_buffers():
    from raypipe.training.loop import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightAverage(model, decay=0.5)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.train()(torch.randn(5, 3))  # moves the BatchNorm statistics and its step counter
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            want[k] = v.clone() if not v.dtype.is_floating_point else d * want[k] + (1 - d) * v
    got = ema.module.state_dict()
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float()), k
    assert int(got["1.num_batches_tracked"]) == 4 and ema.steps == 4
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_checkpoint_with_weight_average_keeps_both_and_resumes_both(tmp_path):
    from raypipe.config import Config
    from raypipe.training.loop import WeightAverage
    from raypipe.training.worker import _restore, save_checkpoint

    torch.manual_seed(0)
    t = TrainConfig(epochs=3)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), t)
    sched_ = EpochScheduler(opt, t)
    ema = WeightAverage(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    save_checkpoint(str(tmp_path), model, opt, sched_, None, 1, {"history": [{"epoch": 1}]}, ema)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    # "model" is what was validated (and what the evaluate job loads): the average
    assert torch.equal(state["model"]["weight"], ema.module.weight)
    assert torch.equal(state["train_model"]["weight"], model.weight)

    fresh, fresh_ema = torch.nn.Linear(3, 2), None
    fresh_opt = build_optimizer(fresh.parameters(), t)
    fresh_ema = WeightAverage(fresh, 0.9)
    start, history = _restore(str(tmp_path), fresh, fresh_opt,
                              EpochScheduler(fresh_opt, t), None, fresh_ema)
    assert start == 2 and history == [{"epoch": 1}]
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_ema.module.weight, ema.module.weight) and fresh_ema.steps == 3
    assert Config.model_validate({"train": {"ema_decay": 0.99}}).train.ema_decay == 0.99
