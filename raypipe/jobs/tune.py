"""Hyperparameter search with Ray Tune: ``python jobs/tune.py [--config FILE] [key=value ...]``.

Each trial trains the base config (``--config``, overrides as in ``jobs/train.py``) with values
drawn from the search space (``--space``, default ``configs/tune.yaml``), on the ablation subset
unless ``--full``. Prints the results table sorted by the metric, and writes it with the best
trial's config (ready for ``jobs/train.py --config``) to ``<storage>/<search name>/``.
"""

from __future__ import annotations

import argparse
import os
import sys

from raypipe.cli import exit_with, settle, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None, help="base training config (default: configs/default.yaml)")
    ap.add_argument("--space", default="tune.yaml", help="search spec (default: configs/tune.yaml)")
    ap.add_argument("--set", dest="spec_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a search-spec key, e.g. --set num_samples=20 (repeatable)")
    ap.add_argument("--name", default=None, help="search name; an existing one is resumed")
    ap.add_argument("--search", choices=["grid", "random", "optuna"], default=None)
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--metric", default=None, help="metric to rank and early-stop by (default val_auc)")
    ap.add_argument("--mode", choices=["max", "min"], default=None)
    ap.add_argument("--full", action="store_true", help="train every trial on all the training data")
    ap.add_argument("--resume", action="store_true", help="continue the latest interrupted search")
    ap.add_argument("--retrain-best", action="store_true",
                    help="afterwards, train the best configuration on the full data")
    ap.add_argument("overrides", nargs="*", help="base config overrides, e.g. train.epochs=5")
    return ap.parse_args(argv)


def spec_overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.spec_overrides)
    if args.search == "grid" and args.num_samples is None and not any(
            o.startswith("num_samples=") for o in out):
        out.append("num_samples=1")  # the spec's num_samples counts random draws; a grid runs once
    for key, value in (("name", args.name), ("search", args.search), ("num_samples", args.num_samples),
                       ("metric", args.metric), ("mode", args.mode)):
        if value is not None:
            out.append(f"{key}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from raypipe.tune.search import run_tune
    from raypipe.tune.space import load_tune_spec

    spec = load_tune_spec(args.space, spec_overrides(args))
    best = run_tune(args.config, args.overrides, spec, full=args.full, resume=args.resume,
                    retrain_best=args.retrain_best)
    settle()  # the results below are the last lines
    print(best["table_markdown"])
    print(f"search directory: {best['search_dir']}")
    print(f"trials: {best['trials']} ({best['failed']} failed, {best['stopped_early']} stopped early, "
          f"{best.get('interrupted', 0)} interrupted)")
    if best.get("interrupted"):
        print(f"interrupted: run the same command again (same --name {os.path.basename(best['search_dir'])}) "
              "to resume the unfinished trials.", file=sys.stderr)
    if "best_trial" not in best:
        print(f"error: no trial reported {best['metric']}; see the error column above.", file=sys.stderr)
        return 1
    print(f"best trial: {best['best_trial']} {best['metric']}={best['best_value']:.4f} "
          f"at epoch {best['best_epoch']}")
    print(f"best overrides: {' '.join(best['best_overrides'])}")
    print(f"best config: {best['best_config']}  (python jobs/train.py --config {best['best_config']})")
    print(f"best checkpoint: {best['best_checkpoint']}")
    if "retrain" in best:
        r = best["retrain"]
        print(f"retrained on the full data: {r['run_dir']}  best {r['metric']}={r['best_value']}  "
              f"checkpoint {r['best_checkpoint']}")
    return 130 if best.get("interrupted") else 0


def run() -> None:
    """Console-script entry point (``raypipe-tune``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
