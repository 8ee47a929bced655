"""raypipe: distributed image-classification training on Ray.

``raypipe.train(config=..., overrides={...})`` trains as ``jobs/train.py`` does and returns the
run's summary. Nothing is imported or started until it is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(config: Any = None, overrides: Any = None, *, resume: bool = False) -> dict:
    """See :func:`raypipe.api.train`."""
    from raypipe.api import train as _train

    return _train(config, overrides, resume=resume)
