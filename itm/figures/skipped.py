"""The note drawn in place of a figure whose inputs the pipeline does not have (the images of a captions-only
download, the boxes of precomputed regions): a small PNG under the figure's own name that says which figure it is
and why it was not drawn, so the report's figures folder, DVC's plots and the MLflow run all show the reason."""

from __future__ import annotations

import logging
from pathlib import Path

from itm.figures.canvas import FONT, MARGIN, Sheet, line_height, wrap_lines

log = logging.getLogger(__name__)

WIDTH = 6.0  # inches


def missing_inputs(dataset_dir: Path, *, images: bool, boxes: bool) -> str | None:
    """Why a figure cannot be drawn when it lacks the dataset's `images` or the regions' `boxes`; None if it can.
    `dataset_dir` is the download stage's `data/raw/<dataset>`."""
    if not images:
        return (
            f"{dataset_dir} has no images/: the download stage fetched captions and splits only, because the regions "
            f"are precomputed (regions.source: precomp) and no image archive is set; set "
            f"datasets.{dataset_dir.name}.images[].source and run the pipeline again to draw this figure"
        )
    if not boxes:
        return (
            "the test regions have no boxes (precomputed features carry none), so attention over them cannot be drawn"
        )
    return None


def skipped_figure(path: Path, reason: str, title: str | None = None) -> None:
    """Write a note at `path` (a PNG) in place of the figure `title` (default: the file's stem): "<title>: not
    drawn" over `reason`."""
    log.info("%s: not drawn, a note in its place: %s", path.name, reason)
    heading = wrap_lines(f"{title or path.stem}: not drawn", WIDTH - 2 * MARGIN, FONT + 2, bold=True)
    body = wrap_lines(reason, WIDTH - 2 * MARGIN, FONT + 1)
    body_top = MARGIN + len(heading) * line_height(FONT + 2) + 0.1
    sheet = Sheet(WIDTH, body_top + len(body) * line_height(FONT + 1) + MARGIN)
    sheet.text(MARGIN, MARGIN, "\n".join(heading), fontsize=FONT + 2, fontweight="bold")
    sheet.text(MARGIN, body_top, "\n".join(body), fontsize=FONT + 1, color="#444444")
    sheet.save(path)
