"""Ablation experiments: ``python jobs/ablate.py [--config FILE] [--spec FILE] [key=value ...]``.

1. Overfit check: train on a few images (default 32) without augmentation; the training loss must
   keep falling and end below a threshold. If it does not, print what the run saw and the usual
   causes in the order to try them, and stop (exit code 1).
2. Component ablation: the full config and one variant per component removed (each preprocessing
   step, each augmentation, the weighted loss, the LR decay), all on the same subset and seeds.
   Writes a table (Markdown + CSV) of best val AUC / val loss and their differences from the full
   config, and a bar chart, to ``<storage>/<name>/``.
"""

from __future__ import annotations

import argparse

from raypipe.cli import exit_with, settle, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="base training config (default: configs/default.yaml)")
    ap.add_argument("--spec", default="ablation.yaml",
                    help="ablation settings (default: configs/ablation.yaml)")
    ap.add_argument("--set", dest="spec_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an ablation-spec key, e.g. --set seeds=[0,1,2] (repeatable)")
    ap.add_argument("--name", default=None, help="experiment name; an existing one is resumed")
    ap.add_argument("--resume", action="store_true", help="continue the latest interrupted ablation")
    step = ap.add_mutually_exclusive_group()
    step.add_argument("--overfit-only", action="store_true", help="run only the overfit check")
    step.add_argument("--skip-overfit", action="store_true", help="run only the component grid")
    ap.add_argument("overrides", nargs="*", help="base config overrides, e.g. preprocess.image_size=32")
    args = ap.parse_args(argv)
    setup_logging()
    from raypipe.tune.ablation import load_ablation_spec
    from raypipe.tune.search import run_ablation

    extra = [f"name={args.name}"] if args.name else []
    spec = load_ablation_spec(args.spec, args.spec_overrides + extra)
    out = run_ablation(args.config, args.overrides, spec, overfit=not args.skip_overfit,
                       grid=not args.overfit_only, resume=args.resume)
    settle()  # the results below are the last lines
    print(f"ablation directory: {out['dir']}")
    if "overfit" in out:
        o = out["overfit"]
        losses = " -> ".join(f"{x:.3g}" for x in o["losses"])
        print(f"overfit check: {'PASSED' if o['passed'] else 'FAILED'}: final training loss "
              f"{o['final_loss']} (threshold {o['threshold']}), losses {losses}")
        if not o["passed"]:
            print(o["diagnosis"])
            return 1
    if "table_markdown" in out:
        print(out["table_markdown"])
        print(f"table: {out['markdown']} and {out['csv']}")
        print(f"chart: {out['chart']}")
    return 0


def run() -> None:
    """Console-script entry point (``raypipe-ablate``)."""
    exit_with(main)


if __name__ == "__main__":
    run()
