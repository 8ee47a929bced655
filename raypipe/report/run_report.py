"""End-of-run report, written by the driver: ``training_curves.png`` and ``report.md`` in the run
directory (resolved config, dataset counts and prevalence per split, skipped files and why, best
epoch and metrics, links to the pictures)."""

from __future__ import annotations

import math
import os
import tempfile

import pyarrow.fs as pafs

from raypipe.config import Config, config_to_yaml

CURVES_FILE = "training_curves.png"
REPORT_FILE = "report.md"
MAX_SKIPPED_LISTED = 50


def publish_dir(local: str, uri: str) -> None:
    """Copy the files of local folder ``local`` into ``uri`` (local path or object storage)."""
    from raypipe.data.sources import get_filesystem

    fs, path = get_filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _split_table(data: dict) -> list[str]:
    names = data.get("class_names", [])
    lines = ["| split | total | " + " | ".join(names) + " | " + " | ".join(f"prevalence {n}" for n in names)
             + " |", "|---" * (2 + 2 * len(names)) + "|"]
    for split in ("train", "val"):
        counts = data.get(split, {})
        # files per side (multilabel: a file may count under several findings, or none)
        files = data.get(f"{split}_total", sum(counts.values()))
        total = files or 1
        lines.append(f"| {split} | {files} | "
                     + " | ".join(str(counts.get(n, 0)) for n in names) + " | "
                     + " | ".join(f"{counts.get(n, 0) / total:.3f}" for n in names) + " |")
    return lines


def _history_table(history: list[dict]) -> list[str]:
    cols = ["epoch", "lr", "train_loss", "val_loss", "val_auc", "val_acc", "images_per_s_total",
            "data_wait_frac", "epoch_time_s"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for h in history:
        lines.append("| " + " | ".join(_fmt(h.get(c, "")) for c in cols) + " |")
    return lines


def best_epoch_text(summary: dict) -> str:
    """The best epoch as the per-epoch log lines count it ("7/8"); ``best_epoch`` counts from 0."""
    best = summary.get("best_epoch")
    return "?" if best is None else f"{best + 1}/{summary.get('epochs', '?')}"


def render_report(cfg: Config, summary: dict, pictures: list[str]) -> str:
    """``report.md``'s text from the run's config and ``summary.json`` content."""
    from raypipe.training.losses import loss_text  # torch: only where a report is written

    data = summary.get("data", {})
    best = summary.get("best_metrics", {})
    skipped = summary.get("skipped", [])
    lines = [
        f"# Run {cfg.run.name}", "",
        f"Run directory: `{summary.get('run_dir')}`; {summary.get('epochs')} epochs in "
        f"{_fmt(float(summary.get('wall_time_s', math.nan)))} s.", "",
        "## Best epoch", "",
        f"Best {summary.get('metric')} = {_fmt(summary.get('best_value'))} at epoch "
        f"{best_epoch_text(summary)} (checkpoint `{summary.get('best_checkpoint')}`).", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in best.items()], "",
        "## Data", "",
        f"Source: `{data.get('source')}`; classes {data.get('class_names')}. Files found "
        f"{data.get('files_found')}, used {data.get('files_used')}, skipped {data.get('files_skipped')}.",
        "", *_split_table(data), "",
        *([f"Loss: {loss_text(summary)}.", ""] if "loss" in summary else []),
        "## Skipped files", "",
    ]
    if skipped:
        lines += ["| file | reason |", "|---|---|"]
        lines += [f"| `{s['file']}` | {s['reason']} |" for s in skipped[:MAX_SKIPPED_LISTED]]
        if len(skipped) > MAX_SKIPPED_LISTED:
            lines.append(f"\n… and {len(skipped) - MAX_SKIPPED_LISTED} more (see summary.json).")
    else:
        lines.append("None: every file was read.")
    lines += ["", "## Training curves", ""]
    lines += [f"![{p}]({p})" for p in pictures]
    if cfg.run.tensorboard:
        lines += ["", "TensorBoard: `tensorboard --logdir "
                  f"{summary.get('run_dir', '.').rstrip('/')}/tensorboard`"]
    lines += ["", "## Per epoch", "", *_history_table(summary.get("history", [])), "",
              "## Resolved config", "", "```yaml", config_to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def write_run_report(cfg: Config, summary: dict) -> list[str]:
    """Write the training-curve PNG and ``report.md`` into the run directory; their names."""
    from raypipe.report.plots import training_curves_png

    with tempfile.TemporaryDirectory() as tmp:
        pictures = []
        if summary.get("history"):
            training_curves_png(summary["history"], os.path.join(tmp, CURVES_FILE))
            pictures.append(CURVES_FILE)
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            f.write(render_report(cfg, summary, pictures))
        publish_dir(tmp, summary["run_dir"])
    return pictures + [REPORT_FILE]
