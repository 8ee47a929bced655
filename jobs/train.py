"""``python jobs/train.py ...``: the ``raypipe-train`` command (:mod:`raypipe.jobs.train`),
kept as a script so that ``ray job submit -- python jobs/train.py`` runs from a checkout."""

from raypipe.jobs.train import run

if __name__ == "__main__":
    run()
