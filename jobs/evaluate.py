"""``python jobs/evaluate.py ...``: the ``raypipe-evaluate`` command (:mod:`raypipe.jobs.evaluate`),
kept as a script so that ``ray job submit -- python jobs/evaluate.py`` runs from a checkout."""

from raypipe.jobs.evaluate import run

if __name__ == "__main__":
    run()
