"""itm: a reproducible image-text matching research pipeline."""

__version__ = "0.1.0"
