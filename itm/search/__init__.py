"""Searching one split with a trained matcher: a text against the split's images, or an image against its captions.

The split's images come from the region store the pipeline extracted (or, for a matcher that reads pixels, from
the dataset's image files), its captions from the tokenize stage, so a search ranks exactly what `evaluate` scores.
A query image that is not in the index goes through the same detector and region selection as the `regions` stage
(or the same pixel preparation as `itm.data.pixels.PixelStore`).

Cross-attention matchers (SCAN, UARDA) score a pair by attending every word over every region; a search first ranks
the whole gallery with a cheap score computed from the same fragment embeddings and re-ranks only a shortlist with
the full score: `hard` (SCAN's stacked cross attention with λ1 → ∞, Lee et al., ECCV 2018) or `pooled` (the cosine
of the pooled vectors). Their derivation, and the measurements behind which side attends, are in
`itm.search.shortlist`. Other matchers (VSE++, CVSE, MH-CVSE, MVAM) already score by one dot product of two
vectors: every item is scored.

The modules: `shortlist` (cheap scores and the shortlist ranking), `index` (the split and matcher searched),
`queries` (encoding a text or an image query), `engine` (the searches and their results), `presentation` (the
printed table and the contact sheet). Their public names are re-exported here.
"""

from itm.search.engine import Hit, Options, SearchResult, search_image, search_text
from itm.search.index import SearchIndex, is_matcher_folder, open_index
from itm.search.presentation import format_table, write_sheet
from itm.search.queries import ImageQuery, detect_regions, image_query, indexed_image_id, query_concepts, text_query
from itm.search.shortlist import (
    DEFAULT_SHORTLIST,
    DEFAULT_SHORTLIST_BY,
    HARD_MAX_ELEMENTS,
    SHORTLIST_BY,
    QueryKind,
    ShortlistBy,
    cheap_scores,
    hard_attention_scores,
    hard_direction,
    pooled_scores,
    scorer_direction,
    shortlist_rank,
)

__all__ = [
    "DEFAULT_SHORTLIST",
    "DEFAULT_SHORTLIST_BY",
    "HARD_MAX_ELEMENTS",
    "SHORTLIST_BY",
    "Hit",
    "ImageQuery",
    "Options",
    "QueryKind",
    "SearchIndex",
    "SearchResult",
    "ShortlistBy",
    "cheap_scores",
    "detect_regions",
    "format_table",
    "hard_attention_scores",
    "hard_direction",
    "image_query",
    "indexed_image_id",
    "is_matcher_folder",
    "open_index",
    "pooled_scores",
    "query_concepts",
    "scorer_direction",
    "search_image",
    "search_text",
    "shortlist_rank",
    "text_query",
    "write_sheet",
]
