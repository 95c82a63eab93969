"""itm: a reproducible image-text matching research pipeline."""
