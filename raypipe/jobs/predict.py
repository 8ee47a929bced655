"""Score images with a checkpoint: ``python jobs/predict.py --checkpoint PATH --source IMAGE|FOLDER|URI
[--out predictions.csv|predictions.parquet]``.

One image is scored in this process without Ray. A folder, a bucket prefix (``s3://bucket/dir``)
or a CSV manifest is scored through Ray Data (the cluster named by RAY_ADDRESS, or a local one).
Preprocessing is the checkpoint's validation preprocessing, with its test-time augmentation. The
table (path, one ``score_<class>`` column per class, predicted_label) goes to ``--out``, as CSV or
Parquet by its extension; without ``--out`` its first rows are printed.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, settle, setup_logging

SHOWN_ROWS = 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint folder (<run dir>/checkpoint_epochNNNN) or a run directory (its best)")
    ap.add_argument("--source", required=True,
                    help="an image file, a folder of images, an s3:// / gs:// prefix, or a CSV manifest")
    ap.add_argument("--out", default=None, help="a .csv or .parquet file (local or URI) for the table")
    ap.add_argument("--threshold", type=float, default=None,
                    help="binary decision threshold for predicted_label (default: the checkpoint's)")
    ap.add_argument("--cpu", action="store_true", help="do not use a GPU even when the cluster has one")
    args = ap.parse_args(argv)
    setup_logging()

    from raypipe.inference import predict

    table = predict(args.checkpoint, args.source, args.out, use_gpu=False if args.cpu else None,
                    threshold=args.threshold)
    settle()  # the results below are the last lines
    if args.out is None:
        print(table.head(SHOWN_ROWS).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if len(table) > SHOWN_ROWS:
            print(f"... {len(table) - SHOWN_ROWS} more rows: pass --out predictions.csv for all")
    skipped = table.attrs.get("skipped", [])
    for name, reason in skipped[:10]:
        print(f"skipped {name}: {reason}")
    print(f"scored {len(table)} image{'' if len(table) == 1 else 's'}"
          + (f", {len(skipped)} skipped" if skipped else "")
          + (f": {args.out}" if args.out else ""))
    return 0


def run() -> None:
    """Console-script entry point (``raypipe-predict``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
