"""Train a ResNet on Ray: ``python jobs/train.py [--config FILE] [key=value ...]``.

Joins the Ray cluster it is submitted to (``ray job submit``), or starts a local one.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, init_ray, load, settle, setup_logging
from raypipe.config import config_help, config_to_yaml, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value):\n" + config_help())
    ap.add_argument("--config", default=None,
                    help="YAML config, or the name of a shipped one (default: default)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the latest run of this config (same run.name) from its checkpoint")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config as YAML and exit")
    ap.add_argument("--verbose", action="store_true",
                    help="also show Ray's own progress bars and INFO lines (run.verbose=true)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + (["run.verbose=true"] if args.verbose else [])
    if args.print_config:
        print(config_to_yaml(load_config(args.config, overrides)), end="")
        return 0
    cfg = load(args.config, overrides, resume=args.resume)
    setup_logging(cfg.run.verbose)

    import raypipe
    from raypipe.report.run_report import best_epoch_text

    init_ray(verbose=cfg.run.verbose)
    summary = raypipe.train(cfg)
    settle()  # the results below are the last lines
    print(f"run directory: {summary['run_dir']}")
    print(f"best {summary['metric']}: {summary['best_value']} at epoch {best_epoch_text(summary)}")
    print(f"best checkpoint: {summary['best_checkpoint']}")
    return 0


def run() -> None:
    """Console-script entry point (``raypipe-train``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
