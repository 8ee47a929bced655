"""raypipe: distributed image-classification training on Ray."""

__version__ = "0.1.0"
