"""The retrieval figures, from a test similarity matrix [images, captions]: text → image, a few caption queries
each with its top images (the caption's own image framed green, others red), and image → text, a few image
queries each with its top captions as a ranked list (the image's own captions ticked and green); each query notes
the rank of its first true match."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from itm.data.loaders import read_captions
from itm.errors import UserError
from itm.evaluate.score_file import SplitScores
from itm.figures.canvas import FONT, MARGIN, PANEL, TITLE, Sheet, bare, frame, line_height, wrap_lines
from itm.figures.reading import image_files, read_image
from itm.figures.selection import Query, image_to_text_queries, text_to_image_queries

TRUE_COLOUR, FALSE_COLOUR = "#1a9641", "#d7191c"  # ground truth / other, in retrieval figures


def retrieval_figures(
    scores: SplitScores,
    captions_dir: Path,
    dataset_dir: Path,
    text_to_image_path: Path,
    image_to_text_path: Path,
    *,
    queries: int = 3,
    top: int = 5,
    seed: int = 0,
    title: str = "",
) -> None:
    """Retrieval examples from a test similarity matrix [images, captions]: (a) text → image: for `queries`
    captions (columns picked by `pick_rows(seed)`), the caption then its `top` images with rank and score, the
    caption's own image framed green, others red; (b) image → text: for `queries` images (rows picked by
    `pick_rows(seed)`), the image then its `top` captions, the image's own captions ticked and green."""
    table = read_captions(captions_dir, "test", texts=True)
    texts = dict(zip(table.caption_ids.tolist(), table.texts or [], strict=True))
    missing = [int(c) for c in scores.caption_ids if int(c) not in texts]
    if missing:
        raise UserError(f"{captions_dir}: caption {missing[0]} of the scores is not a test caption; re-run evaluate")
    captions = [texts[int(c)] for c in scores.caption_ids]
    files = image_files(dataset_dir)
    images = [int(i) for i in scores.image_ids]
    prefix = f"{title}: " if title else ""
    n_images, n_captions = scores.scores.shape
    _draw_text_to_image(
        text_to_image_queries(scores, captions, queries, top, seed), files, images,
        f"{prefix}text → image: the top {top} of {n_images} test images for {queries} test captions "
        "(green frame and ✓: the caption's own image)", text_to_image_path,
    )  # fmt: skip
    _draw_image_to_text(
        image_to_text_queries(scores, queries, top, seed), files, captions,
        f"{prefix}image → text: the top {top} of {n_captions} test captions for {queries} test images "
        "(green and ✓: a caption of the image)", image_to_text_path,
    )  # fmt: skip


def _rank_note(sheet: Sheet, left: float, top: float, query: Query, what: str) -> None:
    colour = TRUE_COLOUR if query.true_rank <= len(query.hits) else FALSE_COLOUR
    sheet.text(left, top, f"{what} at rank {query.true_rank}", fontsize=FONT, color=colour)


def _draw_text_to_image(
    queries: Sequence[Query], files: dict[int, Path], images: Sequence[int], title: str, path: Path
) -> None:
    """One line per query: the caption (and the rank of its own image) at the left, then the top images, each
    framed green (the caption's own image) or red."""
    text_width = 2.4
    width = 2 * MARGIN + text_width + max(len(q.hits) for q in queries) * PANEL
    title_lines = wrap_lines(title, width - 2 * MARGIN, FONT + 1, bold=True)
    heading = MARGIN + len(title_lines) * line_height(FONT + 1) + 0.1
    labels = [wrap_lines(f"“{query.query}”", text_width - 0.2, FONT + 1) for query in queries]
    heights = [TITLE + max(PANEL, (len(label) + 1) * line_height(FONT + 1) + 0.1) + 0.1 for label in labels]
    sheet = Sheet(width, heading + sum(heights) + MARGIN)
    sheet.text(MARGIN, MARGIN, "\n".join(title_lines), fontsize=FONT + 1, fontweight="bold")
    row_top = heading + TITLE
    for query, label, height in zip(queries, labels, heights, strict=True):
        sheet.text(MARGIN, row_top, "\n".join(label), fontsize=FONT + 1)
        _rank_note(sheet, MARGIN, row_top + len(label) * line_height(FONT + 1) + 0.1, query, "its own image")
        for column, hit in enumerate(query.hits):
            axis = sheet.axes(MARGIN + text_width + column * PANEL + 0.06, row_top, PANEL - 0.12, PANEL - 0.12)
            axis.imshow(read_image(files, images[hit.index]))
            bare(axis)
            frame(axis, TRUE_COLOUR if hit.truth else FALSE_COLOUR, 4.0 if hit.truth else 1.5)
            axis.set_title(f"#{hit.rank}  {hit.score:.4f}" + ("  ✓" if hit.truth else ""), fontsize=FONT,
                           color=TRUE_COLOUR if hit.truth else "black", pad=3)  # fmt: skip
        row_top += height
    sheet.save(path)


def _draw_image_to_text(
    queries: Sequence[Query], files: dict[int, Path], captions: Sequence[str], title: str, path: Path
) -> None:
    """One line per query: the image, then its top captions as a ranked list (rank, score and mark in a column of
    their own, the caption wrapped beside them), the image's own captions green."""
    marks, text_width = 1.35, 5.2  # inches: rank, score and mark; the caption
    text_left = MARGIN + PANEL + 0.2
    width = text_left + marks + text_width + MARGIN
    title_lines = wrap_lines(title, width - 2 * MARGIN, FONT + 1, bold=True)
    heading = MARGIN + len(title_lines) * line_height(FONT + 1) + 0.1
    listings = [[wrap_lines(captions[hit.index], text_width, FONT + 1) for hit in query.hits] for query in queries]
    lines = [sum(map(len, listing)) + 1.5 for listing in listings]  # the captions and the rank note
    heights = [TITLE + max(PANEL, n * line_height(FONT + 1)) + 0.2 for n in lines]
    sheet = Sheet(width, heading + sum(heights) + MARGIN)
    sheet.text(MARGIN, MARGIN, "\n".join(title_lines), fontsize=FONT + 1, fontweight="bold")
    row_top = heading
    for query, listing, height in zip(queries, listings, heights, strict=True):
        axis = sheet.axes(MARGIN, row_top + TITLE, PANEL - 0.08, PANEL - 0.08)
        axis.imshow(read_image(files, int(query.query)))
        bare(axis)
        axis.set_title(f"image {query.query}", fontsize=FONT, pad=3)
        line_top = row_top + TITLE
        for hit, lines in zip(query.hits, listing, strict=True):
            colour = TRUE_COLOUR if hit.truth else "black"
            mark = "✓" if hit.truth else "✗"
            sheet.text(text_left, line_top, f"#{hit.rank}  {hit.score:.4f}  {mark}", fontsize=FONT + 1, color=colour)
            sheet.text(text_left + marks, line_top, "\n".join(lines), fontsize=FONT + 1, color=colour)
            line_top += len(lines) * line_height(FONT + 1)
        _rank_note(sheet, text_left, line_top + 0.08, query, "its first own caption")
        row_top += height
    sheet.save(path)
