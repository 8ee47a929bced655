"""raypipe: distributed image-classification training on Ray.

``raypipe.train(config=..., overrides={...})`` trains as ``jobs/train.py`` does and returns the
run's summary; ``raypipe.predict(checkpoint, source)`` scores images. Nothing is imported or
started until they are called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(config: Any = None, overrides: Any = None, *, resume: bool = False) -> dict:
    """See :func:`raypipe.api.train`."""
    from raypipe.api import train as _train

    return _train(config, overrides, resume=resume)


def predict(checkpoint: str, source: str, out: str | None = None, **kwargs: Any):
    """See :func:`raypipe.inference.predict`: score one image (no Ray), a folder or a bucket."""
    from raypipe.inference import predict as _predict

    return _predict(checkpoint, source, out, **kwargs)
