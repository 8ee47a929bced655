"""Benchmarks: ``python jobs/benchmark.py <what> [options] [--json OUT]``.

<what> is one of preprocess, ingest, memory, train, scaling, gpu, scale. Each prints a table and writes
JSON (default ``benchmark-<what>.json`` in the current directory).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from raypipe.benchmarks import SUBCOMMANDS


def _print_table(result: dict) -> None:
    rows = result.get("table") or [{k: v for k, v in result.items() if not isinstance(v, dict | list)}]
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    modules = {}
    for name in SUBCOMMANDS:
        try:
            modules[name] = importlib.import_module(f"raypipe.benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"raypipe.benchmarks.{name}":
                raise
            continue
        p = sub.add_parser(name, help=(modules[name].__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", default=f"benchmark-{name}.json", help="where to write the JSON result")
        modules[name].add_arguments(p)
    args = ap.parse_args(argv)
    result = modules[args.what].run(args)
    _print_table(result)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wrote {args.json}")
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
