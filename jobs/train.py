"""Train a ResNet on Ray: ``python jobs/train.py [--config FILE] [key=value ...]``.

Joins the Ray cluster it is submitted to (``ray job submit``), or starts a local one.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, init_ray, load, settle, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the latest run of this config (same run.name) from its checkpoint")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01")
    args = ap.parse_args(argv)
    setup_logging()
    cfg = load(args.config, args.overrides, resume=args.resume)

    from raypipe.report.run_report import best_epoch_text
    from raypipe.training.trainer import run_training

    init_ray()
    summary = run_training(cfg)
    settle()  # the results below are the last lines
    print(f"run directory: {summary['run_dir']}")
    print(f"best {summary['metric']}: {summary['best_value']} at epoch {best_epoch_text(summary)}")
    print(f"best checkpoint: {summary['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    exit_with(main)
