"""Evaluate a checkpoint: ``python jobs/evaluate.py --checkpoint PATH [--data PATH_OR_URI] [--out DIR]
[--saliency N]``.

Without ``--data`` it evaluates the validation split of the dataset the checkpoint was trained on.
Writes predictions (Parquet and CSV), ``metrics.json``, and ROC / precision-recall / confusion-matrix
pictures to ``--out`` (default ``<run dir>/eval-<checkpoint>[-<data>]``); with ``--saliency N``,
Grad-CAM grids of the N most confident true positives, false positives and false negatives.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, init_ray, settle, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint folder (<run dir>/checkpoint_epochNNNN) or a run directory (its best)")
    ap.add_argument("--data", default=None,
                    help="folder (class sub-folders give labels; a flat folder: predictions only), "
                         "CSV manifest, local or s3:// / gs://; default: the checkpoint's validation split")
    ap.add_argument("--out", default=None, help="output folder or URI")
    ap.add_argument("--cpu", action="store_true", help="do not use a GPU even when the cluster has one")
    ap.add_argument("--threshold", default="config",
                    help="decision threshold: config (train.threshold), validation (binary: the "
                         "validation set's Youden threshold at the checkpoint's epoch) or a number")
    ap.add_argument("--saliency", type=int, default=0, metavar="N",
                    help="Grad-CAM grids of the N most confident true positives, false positives and "
                         "false negatives (per class; labelled images; needs raypipe[explain])")
    args = ap.parse_args(argv)
    setup_logging()

    from raypipe.evaluate import evaluate

    init_ray()
    summary = evaluate(args.checkpoint, args.data, args.out, use_gpu=False if args.cpu else None,
                       saliency=args.saliency, threshold=args.threshold)
    settle()  # the results below are the last lines
    print(f"evaluated {summary['images']} images ({summary['labeled']} labeled) from {summary['data']}")
    m = summary.get("metrics")
    if m:
        print("  ".join(f"{k}={m[k]:.4f}" for k in ("auc", "pr_auc", "acc", "balanced_acc", "f1", "loss")))
        if m.get("auc_ci95"):
            lo, hi = m["auc_ci95"]
            print(f"auc 95% bootstrap interval {lo:.4f}-{hi:.4f}; threshold {summary['threshold']:.4f} "
                  f"({summary['threshold_from']})")
        for row in m.get("findings", []):
            print(f"  {row['finding']:<20} auc={row['auc']:.4f} ap={row['ap']:.4f} "
                  f"prevalence={row['prevalence']:.4f} sens={row['sensitivity']:.3f} "
                  f"spec={row['specificity']:.3f} youden_sens={row['youden_sensitivity']:.3f} "
                  f"youden_spec={row['youden_specificity']:.3f}")
    if summary.get("saliency"):
        print("saliency: " + ", ".join(f"{name} ({k} images)" for name, k in summary["saliency"].items()))
    elif args.saliency:
        print("saliency: no labelled images to explain")
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} files skipped (listed in metrics.json)")
    print(f"results: {summary['out']} ({', '.join(summary['files'])})")
    return 0


def run() -> None:
    """Console-script entry point (``raypipe-evaluate``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
