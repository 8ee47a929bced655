"""Where the model looked: Grad-CAM maps of its most confident hits and misses.

For each class of interest (binary: the positive class, index 1; more classes: every predicted
class) three groups are picked from the evaluation's predictions: true positives and false
positives with the highest score for the class, and false negatives with the lowest (the most
confidently missed). Each group becomes one PNG grid of Grad-CAM overlays on the preprocessed
model input, each tile titled with the file name, the true label and the score.

The maps come from ``captum``'s ``LayerGradCam`` on the last residual stage (``layer4``), ReLU'd
and upsampled bilinearly to the input size. :func:`gradcam` takes a list of target classes and
returns one map per target, so that a multi-label model can show one map per requested finding.
With ``augment.tta: hflip`` the map is the average of the image's and (mirrored back) its mirror
image's, like the score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

GROUPS = {"tp": "true positives", "fp": "false positives", "fn": "false negatives"}
COLUMNS = 4


@dataclass
class CaseGroup:
    """The evaluated images one grid shows: ``rows`` of the predictions, most telling first,
    explained for class ``target``."""

    name: str  # file stem, e.g. "PNEUMONIA-fn"
    title: str
    target: int
    rows: list[int]


def select_cases(labels: np.ndarray, scores: np.ndarray, class_names: list[str], threshold: float,
                 n: int) -> list[CaseGroup]:
    """Up to ``n`` true positives, false positives and false negatives per class of interest.

    ``labels`` (N,) true class indices; ``scores`` (N, K). Binary: positive class 1, predicted
    when its score >= ``threshold``. More classes: each class c, predicted by arg-max. TP and FP
    are sorted by the class's score, highest first; FN by it, lowest first.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if scores.shape[1] == 2:
        classes, predicted = [1], np.where(scores[:, 1] >= threshold, 1, 0)
    else:
        classes, predicted = list(range(scores.shape[1])), scores.argmax(axis=1)
    groups = []
    for c in classes:
        s = scores[:, c]
        members = {
            "tp": (labels == c) & (predicted == c),
            "fp": (labels != c) & (predicted == c),
            "fn": (labels == c) & (predicted != c),
        }
        for kind, mask in members.items():
            idx = np.flatnonzero(mask)
            order = np.argsort(s[idx] if kind == "fn" else -s[idx], kind="stable")
            groups.append(CaseGroup(
                name=f"{class_names[c]}-{kind}",
                title=f"{GROUPS[kind]} for {class_names[c]}: Grad-CAM of P({class_names[c]}), layer4",
                target=c, rows=[int(i) for i in idx[order][:n]]))
    return groups


def gradcam(model, x, targets: list[int], layer=None, tta: str = "none") -> np.ndarray:
    """Grad-CAM maps: ``(N, len(targets), H, W)`` float32 in [0, 1] for inputs ``x`` (N, C, H, W).

    Each map is ReLU'd, upsampled bilinearly to H x W and divided by its own maximum (a map with
    no positive evidence stays 0). ``layer`` defaults to ``model.layer4``.
    """
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    cam = LayerGradCam(model, layer if layer is not None else model.layer4)
    h, w = x.shape[-2:]
    out = []
    with torch.enable_grad():
        for t in targets:
            a = _upsampled(cam, x, t, (h, w), LayerAttribution)
            if tta == "hflip":  # the score averages both views: so does its map
                a = (a + torch.flip(_upsampled(cam, torch.flip(x, dims=[-1]), t, (h, w),
                                               LayerAttribution), dims=[-1])) / 2
            out.append(a[:, 0])
    maps = torch.stack(out, dim=1).detach().float()
    peak = maps.amax(dim=(2, 3), keepdim=True)
    return (maps / torch.where(peak > 0, peak, torch.ones_like(peak))).numpy()


def _upsampled(cam, x, target: int, size: tuple[int, int], attribution):
    a = cam.attribute(x, target=target, relu_attributions=True)
    return attribution.interpolate(a, size, interpolate_mode="bilinear")


def display_image(x: np.ndarray) -> np.ndarray:
    """Model input (C, H, W) -> what to show: HW gray or HWC RGB in [0, 1], each image stretched
    over its own range (standardised or percentile-scaled inputs leave [0, 1])."""
    img = x[0] if x.shape[0] == 1 else np.moveaxis(x[:3], 0, 2)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def tile_title(key: str, true_name: str, class_name: str, score: float, limit: int = 22) -> str:
    """``<file name>\\ntrue <label> · P(<class>) <score>``."""
    base = key.rsplit("/", 1)[-1]
    base = base if len(base) <= limit else base[: limit - 3] + "..."
    return f"{base}\ntrue {true_name} · P({class_name}) {score:.3f}"


def overlay_grid(images: np.ndarray, maps: np.ndarray, titles: list[str], title: str, path: str) -> str:
    """One PNG: each preprocessed input (N, C, H, W) with its map (N, H, W) overlaid (jet, 45 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(COLUMNS, max(n, 1))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        img = display_image(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
        ax.set_title(titles[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_saliency(meta: dict, state: dict, filesystem, pred: dict, threshold: float, n: int,
                   out_dir: str) -> dict[str, int]:
    """Grids for the evaluation ``pred`` ({path, key, label, probs}, labelled rows only) into
    ``out_dir``: ``saliency-<class>-<tp|fp|fn>.png`` for each non-empty group. Returns
    {file name: images shown}."""
    import torch

    from raypipe.config import Config
    from raypipe.inference import build_model, load_image, preprocess

    cfg = Config.model_validate(meta["config"])
    class_names = list(meta["class_names"])
    model = build_model(meta, state)
    written: dict[str, int] = {}
    for group in select_cases(pred["label"], pred["probs"], class_names, threshold, n):
        if not group.rows:
            continue
        xs = []
        for i in group.rows:
            with filesystem.open_input_file(str(pred["path"][i])) as f:
                img, vmax = load_image(f.read(), cfg, str(pred["key"][i]))
            xs.append(preprocess(img, vmax, cfg))
        x = torch.from_numpy(np.stack(xs))
        maps = gradcam(model, x, [group.target], tta=cfg.augment.tta)[:, 0]
        titles = [tile_title(str(pred["key"][i]), class_names[int(pred["label"][i])],
                             class_names[group.target], float(pred["probs"][i, group.target]))
                  for i in group.rows]
        name = f"saliency-{group.name}.png"
        overlay_grid(x.numpy(), maps, titles, group.title, os.path.join(out_dir, name))
        written[name] = len(group.rows)
    return written
