"""``python jobs/preview.py ...``: the ``raypipe-preview`` command (:mod:`raypipe.jobs.preview`),
kept as a script so that ``ray job submit -- python jobs/preview.py`` runs from a checkout."""

from raypipe.jobs.preview import run

if __name__ == "__main__":
    run()
