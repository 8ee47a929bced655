"""The command-line jobs (``raypipe-train``, ``raypipe-evaluate``, ...); ``jobs/*.py`` call them."""
