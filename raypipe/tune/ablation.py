"""Ablation experiments: the overfit check and the remove-one-component grid.

* :func:`overfit_verdict` reads a run's per-epoch history and says whether the training loss kept
  falling and ended below the threshold; when it did not, :func:`diagnose` explains what the run
  saw (flat loss, NaN, tiny or huge gradients, a zero learning rate) and lists the usual causes in
  the order they should be tried.
* :func:`component_variants` derives, from the base config, one variant per component that is
  switched on (each preprocessing step, each augmentation, the weighted loss, the LR decay),
  each removing exactly that component. :func:`summarise` and :func:`bar_chart` turn the trials'
  results into the comparison table and its chart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raypipe.config import Config, ConfigError, _set_dotted, load_yaml, parse_override

FULL = "full"

# the course's reasons why a network does not learn, in the order to try them
CAUSES = (
    "1. activation function: the ResNet blocks use ReLU, which does not saturate; a custom block "
    "with sigmoid/tanh activations can stop gradients from flowing;",
    "2. learning rate not tuned: try train.lr=0.1, 0.01 and 0.001 (jobs/tune.py searches them);",
    "3. optimiser: use SGD with momentum (train.optimizer=sgd train.momentum=0.9);",
    "4. initialisation: try model.init=kaiming (He) or model.init=xavier;",
    "5. network architecture, last of all: only if none of the above helps, change model.name "
    "(resnet18, resnet34, resnet50, ...).",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OverfitSpec(_Section):
    images: int = Field(32, ge=2, description="training images the model must memorise")
    epochs: int = Field(30, ge=2)
    batch_size: int = Field(8, ge=1)
    lr: float | None = Field(None, ge=0.0, description="None: the base config's train.lr")
    threshold: float | None = Field(None, gt=0.0, description="None: train.overfit_loss")
    overrides: list[str] = []


class AblationSpec(_Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$")
    storage_path: str | None = None
    subset: int | None = Field(64, ge=2, description="training images per variant; None = all")
    seeds: list[int] = Field([0], min_length=1)
    metric: Literal["val_auc"] = "val_auc"
    auto: bool = Field(True, description="derive one variant per component switched on")
    exclude: list[str] = []
    extra: dict[str, dict[str, Any]] = {}
    trial_overrides: list[str] = []
    max_concurrent_trials: int | None = Field(None, ge=1)
    overfit: OverfitSpec = OverfitSpec()


def load_ablation_spec(path: str, overrides: list[str] = ()) -> AblationSpec:
    """Read ``configs/ablation.yaml``-style settings, apply dotted overrides, validate."""
    tree = load_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    try:
        return AblationSpec.model_validate(tree)
    except ValidationError as err:
        lines = [f"invalid ablation spec ({path}):"]
        for e in err.errors():
            dotted = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  - {dotted} = {e.get('input')!r}: {e['msg']}.")
        lines.append(f"Valid top-level keys: {', '.join(AblationSpec.model_fields)}.")
        raise ConfigError("\n".join(lines)) from None


# ---------------------------------------------------------------- the component grid


_AUGMENTATIONS: tuple[tuple[str, str, Any], ...] = (
    # (field, variant suffix, value that switches it off)
    ("hflip", "hflip", 0.0), ("vflip", "vflip", 0.0), ("rotation", "rotation", 0.0),
    ("zoom", "zoom", [1.0, 1.0]), ("translate", "translate", 0.0), ("shear", "shear", 0.0),
    ("crop_scale", "random_crop", 1.0), ("brightness", "brightness", 0.0),
    ("contrast", "contrast", 0.0), ("gamma", "gamma", 0.0), ("noise_std", "noise", 0.0),
)


def component_variants(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{variant name: overrides}`` removing one component of ``cfg`` at a time, ``full`` first.

    Only components that are switched on in ``cfg`` get a variant (removing an absent step would
    repeat the full configuration)."""
    p, a, t = cfg.preprocess, cfg.augment, cfg.train
    out: dict[str, dict[str, Any]] = {FULL: {}}
    if p.channels == 1:
        out["no_grayscale"] = {"preprocess.channels": 3}
    if p.threshold != "none":
        out["no_threshold"] = {"preprocess.threshold": "none"}
    for op in p.morphology:
        out[f"no_{op}"] = {"preprocess.morphology": [m for m in p.morphology if m != op]}
    if p.equalize != "none":
        out["no_equalize"] = {"preprocess.equalize": "none"}
    if p.normalize != "none" or p.mean is not None:
        out["no_normalize"] = {"preprocess.normalize": "none", "preprocess.mean": None,
                               "preprocess.std": None}
        if cfg.model.pretrained:  # or the weights' statistics would be filled in again
            out["no_normalize"]["model.pretrained_stats"] = "none"
    if a.enabled:
        out["no_augmentation"] = {"augment.enabled": False}
        for name, suffix, off in _AUGMENTATIONS:
            value = getattr(a, name)
            if (list(value) if isinstance(value, tuple) else value) != off:
                out[f"no_{suffix}"] = {f"augment.{name}": off}
    if t.loss == "weighted_ce" or t.class_weights is not None:
        out["no_weighted_loss"] = {"train.loss": "ce", "train.class_weights": None}
    if t.schedule != "none" or t.warmup_epochs:
        out["no_lr_decay"] = {"train.schedule": "none", "train.warmup_epochs": 0}
    return out


def ablation_variants(cfg: Config, spec: AblationSpec) -> dict[str, dict[str, Any]]:
    """The variants to run: derived ones (``spec.auto``) plus ``spec.extra``, minus ``exclude``."""
    variants = component_variants(cfg) if spec.auto else {FULL: {}}
    variants.update(spec.extra)
    unknown = [n for n in spec.exclude if n not in variants]
    if unknown:
        raise ConfigError(
            f"ablation exclude names {unknown}, which are not variants of this config. "
            f"Variants: {', '.join(variants)}."
        )
    if FULL in spec.exclude:
        raise ConfigError("ablation exclude cannot remove 'full': every variant is compared with it.")
    return {k: v for k, v in variants.items() if k not in spec.exclude}


@dataclass
class VariantResult:
    variant: str
    auc: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def summarise(rows, variants: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per variant (in ``variants`` order): mean best val AUC and best val loss over seeds, their
    spread, and the difference from ``full``. ``rows`` are :class:`~raypipe.tune.driver.TrialRow`."""
    by = {v: VariantResult(v) for v in variants}
    for r in rows:
        res = by.get(r.params.get("variant"))
        if res is None:
            continue
        if r.best is None:
            res.failed.append(r.error or r.status)
            continue
        res.auc.append(r.best)
        if r.val_loss_min is not None:
            res.loss.append(r.val_loss_min)
    full = by.get(FULL)
    full_auc = _mean(full.auc) if full else None
    full_loss = _mean(full.loss) if full else None
    header = ["variant", "seeds", "best_val_auc", "auc_std", "delta_auc", "best_val_loss",
              "delta_loss", "failed"]
    out = []
    for v in variants:
        res = by[v]
        auc, loss = _mean(res.auc), _mean(res.loss)
        out.append({
            "variant": v, "seeds": len(res.auc), "best_val_auc": auc,
            "auc_std": statistics.stdev(res.auc) if len(res.auc) > 1 else None,
            "delta_auc": _diff(auc, full_auc), "best_val_loss": loss,
            "delta_loss": _diff(loss, full_loss), "failed": "; ".join(res.failed),
        })
    return header, out


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def bar_chart(records: list[dict[str, Any]], path: str, title: str) -> None:
    """Horizontal bars of each variant's change in best val AUC and val loss against ``full``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["variant"] != FULL]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(rows), 2) + 1.6), sharey=True)
    for ax, key, label, good in ((axes[0], "delta_auc", "Δ best val AUC (higher is better)", 1),
                                 (axes[1], "delta_loss", "Δ best val loss (lower is better)", -1)):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        colors = ["#2e7d32" if good * v > 0 else "#c62828" if good * v < 0 else "#9e9e9e"
                  for v in vals]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()
    fig.suptitle(title + "\n(each bar: the full configuration with that one component removed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the overfit check


@dataclass
class OverfitVerdict:
    passed: bool
    falling: bool
    final_loss: float | None
    threshold: float
    losses: list[float]
    diagnosis: str = ""


def loss_keeps_falling(losses: list[float]) -> bool:
    """The trend is down: the last loss is below the first, and the second half of the run
    still improved on the best of the first half (so learning did not stall early)."""
    if len(losses) < 2 or any(not math.isfinite(x) for x in losses):
        return False
    half = len(losses) // 2
    return losses[-1] < losses[0] and min(losses[half:]) < min(losses[:half])


def overfit_verdict(history: list[dict], threshold: float, lr: float,
                    error: str | None = None) -> OverfitVerdict:
    """Whether the run memorised its small training set; with a diagnosis when it did not."""
    losses = [float(h["train_loss"]) for h in history if "train_loss" in h]
    final = losses[-1] if losses else None
    falling = loss_keeps_falling(losses)
    passed = error is None and falling and final is not None and final < threshold
    v = OverfitVerdict(passed, falling, final, threshold, losses)
    if not passed:
        v.diagnosis = diagnose(history, threshold, lr, error)
    return v


def diagnose(history: list[dict], threshold: float, lr: float, error: str | None = None) -> str:
    """What the run saw, then the usual causes in the order to try them."""
    seen: list[str] = []
    losses = [float(h["train_loss"]) for h in history if "train_loss" in h]
    if error is not None:
        what = "the loss or gradients became NaN/inf" if _is_nan_error(error) else "the run failed"
        seen.append(f"{what}: {error}")
    if losses and any(not math.isfinite(x) for x in losses):
        seen.append("the training loss became NaN/inf (exploding outputs: most often a too-high "
                    "learning rate; SGD and gradient clipping help)")
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) >= 2:
        first, last = finite[0], finite[-1]
        change = (first - last) / max(abs(first), 1e-12)
        trail = " -> ".join(f"{x:.3g}" for x in _sample(finite, 8))
        if abs(change) < 0.05 or lr == 0.0:
            # with lr 0 only the batch composition (BatchNorm's batch statistics) moves the loss
            seen.append(f"the training loss is flat ({trail}): the weights are not learning")
        elif change < 0:
            seen.append(f"the training loss rose ({trail}): steps overshoot, the learning rate "
                        "is probably too high")
        elif last >= threshold:
            seen.append(f"the training loss fell but stopped at {last:.3g}, above the threshold "
                        f"{threshold:g} ({trail}): train longer, or tune the learning rate")
    if lr == 0.0:
        seen.append("the learning rate is 0 (train.lr=0): no update can change the weights")
    seen += _gradient_findings(history)
    if not seen:
        seen.append("no epoch finished, so there is nothing to diagnose from")
    return ("What the run saw:\n" + "\n".join(f"  - {s}" for s in seen)
            + "\nLikely causes, in the order to try them:\n" + "\n".join(f"  {c}" for c in CAUSES))


def _gradient_findings(history: list[dict]) -> list[str]:
    means = [float(h["grad_norm_mean"]) for h in history
             if h.get("grad_norm_mean") is not None and math.isfinite(float(h["grad_norm_mean"]))]
    maxes = [float(h["grad_norm_max"]) for h in history
             if h.get("grad_norm_max") is not None and math.isfinite(float(h["grad_norm_max"]))]
    out = []
    if means and max(means) < 1e-4:
        out.append(f"gradient norms are tiny (at most {max(means):.2g}): gradients vanish before "
                   "reaching the early layers (activation or initialisation)")
    if maxes and max(maxes) > 1e3:
        out.append(f"gradient norms are huge (up to {max(maxes):.3g}): exploding gradients (lower "
                   "the learning rate, use SGD, or set train.grad_clip)")
    if means and not out:
        out.append(f"gradient norms look ordinary (mean {statistics.fmean(means):.3g} per step), "
                   "so gradients do reach the weights")
    spikes = sum(int(h.get("grad_spikes", 0) or 0) for h in history)
    if spikes:
        out.append(f"{spikes} gradient spike(s) were flagged by the training doctor")
    return out


def _sample(xs: list[float], n: int) -> list[float]:
    if len(xs) <= n:
        return xs
    step = (len(xs) - 1) / (n - 1)
    return [xs[round(i * step)] for i in range(n)]


def _is_nan_error(text: str) -> bool:
    low = text.lower()
    return "diverged" in low or "nan" in low or "not finite" in low
