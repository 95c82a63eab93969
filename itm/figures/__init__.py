"""Figures of what the matchers look at and what they retrieve, for the comparison report (PNG files).

- `attention_figure`: a cross-attention matcher's (SCAN, UARDA) word-region attention for a few test pairs, one
  panel per word: the image with its bottom-up region boxes, lit and outlined by the attention (SCAN's figure).
- `views_figure`: a multi-view matcher's (MVAM) views for one test pair: where each view looks in the image
  (regions, or ViT patches for the open_clip backbone) and in the caption, with each view's cosine.
- `retrieval_figures`: from a test similarity matrix, the top images of a few caption queries and the top captions
  of a few image queries, the ground truth marked.
- `skipped_figure`: a note in place of a figure whose inputs are missing (no images after a captions-only download
  for precomputed regions, no boxes in precomputed regions), saying why it was not drawn.

Every figure picks its test items with `pick_rows(…, seed)`, so one seed shows the same pairs for every matcher and
the figures of two matchers can be set side by side. Modules: `selection` (the pure numpy parts: picking, ranking),
`reading` (the test items), `canvas` (drawing), one per figure family (`attention`, `multiview`, `retrieval`), and
`skipped` (the note in place of a figure).
"""

from itm.figures.attention import AttentionPairs, WordPanels, attention_figure, attention_pairs
from itm.figures.multiview import ViewPanels, view_panels, views_figure
from itm.figures.retrieval import retrieval_figures
from itm.figures.selection import (
    Hit,
    Query,
    first_true_rank,
    image_to_text_queries,
    patch_grid,
    pick_rows,
    region_heat,
    shown_tokens,
    text_to_image_queries,
    top_hits,
)
from itm.figures.skipped import missing_inputs, skipped_figure

__all__ = [
    "AttentionPairs",
    "Hit",
    "Query",
    "ViewPanels",
    "WordPanels",
    "attention_figure",
    "attention_pairs",
    "first_true_rank",
    "image_to_text_queries",
    "missing_inputs",
    "patch_grid",
    "pick_rows",
    "region_heat",
    "retrieval_figures",
    "shown_tokens",
    "skipped_figure",
    "text_to_image_queries",
    "top_hits",
    "view_panels",
    "views_figure",
]
