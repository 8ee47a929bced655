"""ResNet registry: every depth builds, trains a step, matches torchvision; init; pretrained files."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from raypipe.models.resnet import REGISTRY, BasicBlock, Bottleneck, create_model, init_weights


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# the deepest two take most of this file's time on a busy 2-core machine
DEPTHS = [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet101", "resnet152") else n
          for n in sorted(REGISTRY)]


@pytest.mark.parametrize("name", DEPTHS)
def test_every_depth_forward_backward_odd_classes_1_and_3_channels(name):
    torch.manual_seed(0)
    for channels in (1, 3):
        model = create_model(name, in_channels=channels, num_classes=7)
        x = torch.randn(2, channels, 32, 32)
        out = model(x)
        assert out.shape == (2, 7)
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 6]))
        loss.backward()
        assert math.isfinite(float(loss.detach()))
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads), "every parameter takes part in the forward"
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        assert model.conv1.weight.grad.abs().sum() > 0
        del model, out, loss


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_parameter_count_equals_torchvision(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = create_model(name, in_channels=3, num_classes=1000, init="default")
        theirs = getattr(torchvision.models, name)(weights=None)
    assert _count(ours) == _count(theirs)
    # same names and shapes, so torchvision-format files load directly
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}


def test_blocks_match_the_registry():
    assert REGISTRY["resnet18"] == (BasicBlock, [2, 2, 2, 2])
    assert REGISTRY["resnet50"][0] is Bottleneck
    assert sum(REGISTRY["resnet152"][1]) * 3 + 2 == 152  # 3 layers per bottleneck, stem, fc


def test_non_square_and_larger_inputs():
    model = create_model("resnet18", in_channels=1, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 48)).shape == (1, 3)
        assert model(torch.randn(1, 1, 96, 64)).shape == (1, 3)


def test_unknown_model_and_bad_sizes():
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet19")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


def _conv_std(model) -> float:
    return float(model.layer1[0].conv1.weight.std())


def test_init_schemes():
    torch.manual_seed(0)
    k = create_model("resnet18", init="kaiming")
    w = k.layer1[0].conv1.weight.detach()  # 64 -> 64, 3x3: He fan-out normal, std sqrt(2 / (64*9))
    assert float(w.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)

    x = create_model("resnet18", init="xavier")
    w = x.layer1[0].conv1.weight.detach()  # Glorot uniform, bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (64 * 9 + 64 * 9))
    assert float(w.abs().max()) <= bound + 1e-6
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert float(x.fc.bias.abs().max()) == 0.0

    d = create_model("resnet18", init="default")
    w = d.layer1[0].conv1.weight.detach()  # torch's reset_parameters: kaiming_uniform(a=sqrt(5))
    bound = 1 / math.sqrt(64 * 9)
    assert float(w.abs().max()) <= bound + 1e-6
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)

    for m in (k, x, d):
        assert float(m.bn1.weight.min()) == 1.0 and float(m.bn1.bias.abs().max()) == 0.0
    with pytest.raises(ValueError, match="kaiming, xavier or default"):
        init_weights(k, "orthogonal")


@pytest.mark.parametrize("init", ["kaiming", "xavier", "default"])
def test_zero_init_residual_survives_every_init(init):
    m = create_model("resnet18", init=init, zero_init_residual=True)
    assert float(m.layer1[0].bn2.weight.abs().max()) == 0.0
    m = create_model("resnet50", init=init, zero_init_residual=True)
    assert float(m.layer1[0].bn3.weight.abs().max()) == 0.0


@pytest.fixture(scope="module")
def tv_resnet18_file(tmp_path_factory):
    """A torchvision-format resnet18 weight file (random weights: no download)."""
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    return path, tv.state_dict()


def test_pretrained_rgb_same_classes_loads_everything(tv_resnet18_file):
    path, ref = tv_resnet18_file
    m = create_model("resnet18", in_channels=3, num_classes=1000, pretrained=str(path))
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_pretrained_one_channel_sums_conv1_and_keeps_fresh_head(tv_resnet18_file):
    path, ref = tv_resnet18_file
    torch.manual_seed(2)
    fresh = create_model("resnet18", in_channels=1, num_classes=5)
    torch.manual_seed(2)
    m = create_model("resnet18", in_channels=1, num_classes=5, pretrained=str(path))
    assert m.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(m.conv1.weight, ref["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(m.layer3[1].conv2.weight, ref["layer3.1.conv2.weight"])
    assert torch.equal(m.bn1.running_var, ref["bn1.running_var"])
    # a different class count keeps the freshly initialised classifier
    assert torch.equal(m.fc.weight, fresh.fc.weight)
    # a gray image through the summed filters equals the RGB model on the same image in 3 copies
    rgb = create_model("resnet18", in_channels=3, num_classes=1000, pretrained=str(path)).eval()
    gray = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a = m.eval().conv1(gray)
        b = rgb.conv1(gray.repeat(1, 3, 1, 1))
    assert torch.allclose(a, b, atol=1e-5)


def test_pretrained_from_ddp_prefixed_file(tmp_path, tv_resnet18_file):
    _, ref = tv_resnet18_file
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in ref.items()}, path)
    m = create_model("resnet18", pretrained=str(path))
    assert torch.equal(m.conv1.weight, ref["conv1.weight"])


def test_pretrained_mismatch_is_a_clear_error(tv_resnet18_file):
    path, _ = tv_resnet18_file
    with pytest.raises(ValueError) as err:
        create_model("resnet50", in_channels=3, num_classes=1000, pretrained=str(path))
    msg = str(err.value)
    assert "does not match resnet50" in msg and str(path) in msg
    assert "missing keys" in msg and "shape mismatches" in msg
    # names the first offending keys and what the file is instead
    assert "layer1.0.conv3.weight" in msg and "layer1.0.conv1.weight file (64, 64, 3, 3)" in msg
    assert "The file holds a resnet18: set model.name=resnet18" in msg


def test_pretrained_missing_or_garbage_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        create_model("resnet18", pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable weight file"):
        create_model("resnet18", pretrained=str(bad))
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    with pytest.raises(ValueError, match="expected a state_dict"):
        create_model("resnet18", pretrained=str(lst))
