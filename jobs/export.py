"""``python jobs/export.py ...``: the ``raypipe-export`` command (:mod:`raypipe.jobs.export`),
kept as a script so that ``ray job submit -- python jobs/export.py`` runs from a checkout."""

from raypipe.jobs.export import run

if __name__ == "__main__":
    run()
