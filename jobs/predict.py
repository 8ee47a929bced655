"""``python jobs/predict.py ...``: the ``raypipe-predict`` command (:mod:`raypipe.jobs.predict`),
kept as a script so that ``ray job submit -- python jobs/predict.py`` runs from a checkout."""

from raypipe.jobs.predict import run

if __name__ == "__main__":
    run()
