"""The test suite's tiers, timed: ``python -m pytest -m <tier>`` from this checkout, its wall time
against the tier's target (fast: 2 minutes; everything: 20 minutes)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the tier -> (pytest's marker expression, or None for everything; the target wall time, s)
TIERS = {"fast": ("fast", 120.0), "not-slow": ("not slow", None), "all": (None, 1200.0)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``jobs/benchmark.py suite``."""
    parser.add_argument("--tier", choices=sorted(TIERS), default="fast",
                        help="which tests: fast (no Ray, no subprocess jobs), not-slow, or all")
    parser.add_argument("--processes", default=None,
                        help="pytest-xdist processes (-n); default: the project's setting (2)")


def counts(summary: str) -> dict[str, int]:
    """``{"passed": 612, "failed": 1, ...}`` from pytest's last line."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                                             summary)}


def run(args: argparse.Namespace) -> dict:
    tests = ROOT / "tests"
    if not tests.is_dir():
        raise SystemExit(f"no tests at {tests}: run this benchmark from a checkout of raypipe "
                         "(the installed wheel has no tests)")
    marker, target = TIERS[args.tier]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)]
    if marker:
        cmd += ["-m", marker]
    if args.processes is not None:
        cmd += ["-n", str(args.processes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    found = counts(last)
    out = {"tier": args.tier, "command": " ".join(cmd[1:]), "wall_s": wall, **found,
           "exit_code": proc.returncode, "target_s": target,
           "met": None if target is None else bool(wall <= target and proc.returncode == 0)}
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
    return out
