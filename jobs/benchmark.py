"""``python jobs/benchmark.py ...``: the ``raypipe-benchmark`` command (:mod:`raypipe.jobs.benchmark`),
kept as a script so that ``ray job submit -- python jobs/benchmark.py`` runs from a checkout."""

from raypipe.jobs.benchmark import run

if __name__ == "__main__":
    run()
