"""``python jobs/ablate.py ...``: the ``raypipe-ablate`` command (:mod:`raypipe.jobs.ablate`),
kept as a script so that ``ray job submit -- python jobs/ablate.py`` runs from a checkout."""

from raypipe.jobs.ablate import run

if __name__ == "__main__":
    run()
