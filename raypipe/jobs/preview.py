"""See preprocessing and augmentation: ``python jobs/preview.py [--config FILE] [--n 16] [--out preview.png]
[key=value ...]``.

Writes a PNG grid: a few original images of the dataset, each preprocessing step in order, and
``--n`` augmented versions of each. Runs locally, without Ray.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, load, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    ap.add_argument("--n", type=int, default=16, help="augmented versions per image (default 16)")
    ap.add_argument("--images", type=int, default=3, help="how many dataset images to show (default 3)")
    ap.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/flowers")
    args = ap.parse_args(argv)
    if args.n < 0 or args.images < 1:
        ap.error(f"--n must be >= 0 and --images >= 1, got --n {args.n} --images {args.images}")
    setup_logging()
    cfg = load(args.config, args.overrides)

    from raypipe.report.preview import render_preview

    path = render_preview(cfg, args.out, n=args.n, images=args.images)
    print(f"preview written to {path}")
    return 0


def run() -> None:
    """Console-script entry point (``raypipe-preview``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
