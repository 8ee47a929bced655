"""``model.freeze``: hold part of a ResNet fixed for the first epochs. Plain torch, no Ray.

Frozen parameters get ``requires_grad=False``, so autograd computes no gradient for them (a frozen
backbone also skips its backward pass) and the optimiser, which keeps every parameter, skips them:
their gradient stays ``None``, so neither weight decay nor momentum moves them. Under
``DistributedDataParallel`` such parameters must be announced as possibly unused
(``find_unused_parameters=True``), or its gradient reduction waits for them and fails at the next
step; unfreezing sets ``requires_grad`` back and DDP reduces their gradients again (its hooks sit
on the parameters' gradient accumulators, which a flag change keeps). A frozen part's BatchNorm
layers run in eval mode: they normalise with their pretrained running statistics and do not
update them, so the frozen part computes exactly the function it was given.
"""

from __future__ import annotations

from torch import nn

FREEZE_PARTS = ("none", "stem", "backbone")
_STEM = ("conv1", "bn1")


def frozen_modules(model: nn.Module, part: str) -> list[nn.Module]:
    """The top-level modules of a ResNet that ``part`` names: ``stem`` = conv1 and bn1,
    ``backbone`` = every child but the ``fc`` classifier, ``none`` = none."""
    if part not in FREEZE_PARTS:
        raise ValueError(f"unknown freeze part '{part}', expected one of {FREEZE_PARTS}")
    children = dict(model.named_children())
    if part == "none":
        return []
    if part == "stem":
        if not all(n in children for n in _STEM):
            raise ValueError(f"freeze=stem needs a model with {_STEM} children, got "
                             f"{sorted(children)}")
        return [children[n] for n in _STEM]
    return [m for n, m in children.items() if n != "fc"]


def set_frozen(model: nn.Module, part: str, frozen: bool) -> int:
    """Freeze (or unfreeze) the parameters of ``part``; returns how many tensors changed."""
    changed = 0
    for module in frozen_modules(model, part):
        for p in module.parameters():
            changed += p.requires_grad == frozen
            p.requires_grad_(not frozen)
    return changed


def hold_frozen_batchnorm(modules: list[nn.Module]) -> None:
    """Eval mode for every BatchNorm layer inside ``modules`` (after ``model.train()``)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
