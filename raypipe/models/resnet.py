"""ResNet building blocks and the resnet18..152 registry (He et al. 2015; torchvision layout).

``ResNet(block, layers, in_channels, num_classes)`` takes ``(N, in_channels, H, W)`` float32 with
H, W >= 32 and returns logits ``(N, num_classes)``. Parameter names and counts match torchvision's,
so torchvision-format weight files load directly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from raypipe.models.pretrained import PretrainedError


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152); the
    stride sits on the 3x3 convolution (ResNet v1.5, as torchvision)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet v1.5 for ``(N, in_channels, H, W)`` inputs (H, W >= 32) -> ``(N, num_classes)``
    logits. ``init``: ``kaiming``, ``xavier`` or ``default`` (see :func:`init_weights`)."""

    def __init__(
        self,
        block: Block,
        layers: list[int],
        in_channels: int = 3,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self._inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, init)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: Block, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != width * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self._inplanes, width * block.expansion, stride),
                nn.BatchNorm2d(width * block.expansion),
            )
        layers = [block(self._inplanes, width, stride, downsample)]
        self._inplanes = width * block.expansion
        layers += [block(self._inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, 64, H/4, W/4) -> ... -> (N, 512*e, H/32, W/32) -> (N, classes)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_weights(model: nn.Module, scheme: str) -> None:
    """``kaiming`` (He, fan-out, as torchvision), ``xavier`` (Glorot) or ``default`` (PyTorch's
    own ``reset_parameters``). BatchNorm always starts at weight 1, bias 0."""
    if scheme not in ("kaiming", "xavier", "default"):
        raise ValueError(f"unknown init '{scheme}', expected kaiming, xavier or default")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if scheme == "default":
                m.reset_parameters()
            elif scheme == "kaiming":
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    m.reset_parameters()
            else:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


REGISTRY: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def create_model(
    name: str,
    in_channels: int = 3,
    num_classes: int = 1000,
    init: str = "kaiming",
    zero_init_residual: bool = False,
    pretrained: str | Mapping[str, torch.Tensor] | None = None,
) -> ResNet:
    """Build a registry model. ``pretrained``: a local torchvision-format state-dict file, or a
    state dict already read (see :func:`load_pretrained`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model '{name}', expected one of {sorted(REGISTRY)}")
    block, layers = REGISTRY[name]
    model = ResNet(block, layers, in_channels, num_classes, zero_init_residual, init)
    if pretrained is not None and (not isinstance(pretrained, str) or pretrained):
        load_pretrained(model, pretrained, name)
    return model


def read_state_dict(path: str, source: str | None = None) -> dict[str, torch.Tensor]:
    """The ``name -> tensor`` dict saved at local ``path`` (a plain state dict, one saved from
    DDP with ``module.`` prefixes, or a raypipe checkpoint's ``model.pt``). ``source``: what the
    user named (e.g. the s3:// URI ``path`` was fetched from), for messages."""
    where = source or path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PretrainedError(f"model.pretrained: weight file '{where}' not found") from None
    except Exception as exc:
        raise PretrainedError(
            f"model.pretrained: '{where}' is not a readable weight file: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a raypipe checkpoint's model.pt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(
            f"model.pretrained: '{where}' holds a {type(state).__name__}, expected a state_dict "
            "(name -> tensor), e.g. torch.save(torchvision.models.resnet18().state_dict(), path)."
        )
    return {str(k).removeprefix("module."): v for k, v in state.items()}  # saved from DDP


@functools.cache
def _registry_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape of a 3-channel, 1000-class registry model (torchvision's
    layout), built on the meta device: shapes only, no memory."""
    block, layers = REGISTRY[name]
    with torch.device("meta"):
        model = ResNet(block, layers, 3, 1000, init="default")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _body(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The entries that do not depend on the input channels or the class count."""
    return {k: v for k, v in shapes.items() if k != "conv1.weight" and not k.startswith("fc.")}


def architecture_of(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registry name whose layout (every key and shape but conv1's and fc's) ``state`` has,
    e.g. ``"resnet50"``; None when it is no registry ResNet."""
    body = _body({k: tuple(v.shape) for k, v in state.items()})
    return next((n for n in REGISTRY if _body(_registry_shapes(n)) == body), None)


def _listing(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def adapt_state_dict(
    model: ResNet, state: Mapping[str, torch.Tensor], name: str = "model",
    source: str = "the file",
) -> dict[str, torch.Tensor]:
    """``state`` fitted to ``model``: a 1-channel model gets conv1's RGB filters summed (a gray
    image then gives what the RGB network gives on that image in three copies); another channel
    count gets their mean repeated; a different class count drops the file's ``fc`` (the model
    keeps its fresh one). Raises :class:`PretrainedError` listing the first missing, unexpected
    and mis-shaped keys when the layouts differ. ``model`` may live on the meta device (checks
    only)."""
    state = dict(state)
    own = model.state_dict()
    w = state.get("conv1.weight")
    if w is not None and w.dim() == 4 and w.shape[1] != model.in_channels:
        if model.in_channels == 1:
            state["conv1.weight"] = w.sum(dim=1, keepdim=True)
        else:
            state["conv1.weight"] = w.mean(dim=1, keepdim=True).repeat(1, model.in_channels, 1, 1)
    if "fc.weight" in state and state["fc.weight"].shape != own["fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    bad_shape = [
        f"{k} file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or bad_shape:
        found = architecture_of(state)
        if found is not None and found != name:
            fix = f"The file holds a {found}: set model.name={found}."
        else:
            fix = (f"Use weights saved from a torchvision {name} (or set model.name to the file's "
                   f"architecture), e.g. torch.save(torchvision.models.{name}().state_dict(), path).")
        raise PretrainedError(
            f"model.pretrained: '{source}' does not match {name} ({model.in_channels}-channel "
            f"input, {model.num_classes} classes): {len(missing)} missing keys "
            f"[{_listing(missing)}]; {len(unexpected)} unexpected keys [{_listing(unexpected)}]; "
            f"{len(bad_shape)} shape mismatches [{_listing(bad_shape)}]. {fix}"
        )
    return state


def load_pretrained(
    model: ResNet, weights: str | Mapping[str, torch.Tensor], name: str = "model",
    source: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load torchvision-format weights (a local file or a state dict read by
    :func:`read_state_dict`) into ``model``, fitted by :func:`adapt_state_dict`. Returns the
    tensors loaded (the fresh ``fc`` is not among them when the class count differs)."""
    if isinstance(weights, str):
        source = source or weights
        weights = read_state_dict(weights, source)
    state = adapt_state_dict(model, weights, name, source or "the state dict")
    model.load_state_dict(state, strict=False)
    return state
