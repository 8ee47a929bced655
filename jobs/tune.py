"""``python jobs/tune.py ...``: the ``raypipe-tune`` command (:mod:`raypipe.jobs.tune`),
kept as a script so that ``ray job submit -- python jobs/tune.py`` runs from a checkout."""

from raypipe.jobs.tune import run

if __name__ == "__main__":
    run()
