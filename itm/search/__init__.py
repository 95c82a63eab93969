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

The modules: `options` (how a search ranks; free of torch, for the command's arguments), `shortlist` (cheap scores
and the shortlist ranking), `index` (the split and matcher searched), `queries` (encoding a text or an image query),
`engine` (the searches and their results), `presentation` (the printed table and the contact sheet). Import from
them: this package imports nothing, so that `itm --help` stays quick.
"""
