"""Benchmarks behind ``jobs/benchmark.py``: each module has ``add_arguments(parser)`` and
``run(args) -> dict`` (printed as a table and written as JSON)."""

SUBCOMMANDS = ("preprocess", "ingest", "memory", "train", "scaling", "gpu", "scale", "e2e", "suite")
