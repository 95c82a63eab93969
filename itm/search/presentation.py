"""Presentation of a search result: the fixed-width table `itm search` prints, and the contact sheet PNG it writes
on request (matplotlib is imported only then)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from itm.search.engine import SearchResult


def format_table(result: SearchResult) -> str:
    """The hits as a small fixed-width table (rank, score, id, and the file or the caption)."""
    if result.kind == "text":
        lines = [f"{'rank':>4}  {'score':>7}  {'image_id':>8}  file"]
        lines += [f"{h.rank:>4}  {h.score:>7.4f}  {h.item_id:>8}  {h.path or '-'}" for h in result.hits]
    else:
        lines = [f"{'rank':>4}  {'score':>7}  {'caption_id':>10}  {'match':^5}  text"]
        lines += [
            f"{h.rank:>4}  {h.score:>7.4f}  {h.item_id:>10}  {'✓' if h.matches else '':^5}  {h.text}"
            for h in result.hits
        ]
    return "\n".join(lines)


def write_sheet(result: SearchResult, path: Path) -> None:
    """A contact sheet PNG: for a text query, the query as title over the top images (rank, score, file name); for
    an image query, the query image beside the ranked captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from itm.atomic import staged_file

    figure = _text_sheet(plt, result) if result.kind == "text" else _image_sheet(plt, result)
    try:
        with staged_file(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)


def _text_sheet(plt: Any, result: SearchResult) -> Any:  # plt: matplotlib.pyplot, imported when needed
    n = len(result.hits)
    figure, axes = plt.subplots(1, n, figsize=(2.4 * n, 3.2), squeeze=False)
    for axis, hit in zip(axes[0], result.hits, strict=True):
        _show_image(axis, hit.path)
        axis.set_title(f"#{hit.rank}  {hit.score:.3f}", fontsize=10)
        axis.set_xlabel(hit.path.name if hit.path else f"image {hit.item_id}", fontsize=8)
    figure.suptitle(_wrap(f"“{result.query}”", 30 * max(n, 2)), fontsize=11)
    figure.tight_layout()
    return figure


def _image_sheet(plt: Any, result: SearchResult) -> Any:
    n = len(result.hits)
    figure = plt.figure(figsize=(11, max(3.0, 0.5 * n + 1.2)))
    grid = figure.add_gridspec(1, 2, width_ratios=(1, 3))
    picture, listing = figure.add_subplot(grid[0]), figure.add_subplot(grid[1])
    query = Path(result.query)
    _show_image(picture, query)
    where = f"image {result.query_image_id}" if result.query_image_id is not None else "not in the index"
    picture.set_title(_wrap(f"{query.name} ({where})", 30), fontsize=9)
    listing.axis("off")
    for line, hit in enumerate(result.hits):
        mark = "✓" if hit.matches else " "
        listing.text(0.0, 1.0 - (line + 0.5) / max(n, 1), f"#{hit.rank}  {hit.score:.3f}  {mark}  {hit.text}",
                     fontsize=10, va="center", ha="left", transform=listing.transAxes,
                     color="darkgreen" if hit.matches else "black")  # fmt: skip
    figure.suptitle(f"captions for {query.name}", fontsize=11)
    figure.tight_layout()
    return figure


def _show_image(axis: Any, path: Path | None) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    try:
        if path is None:
            raise OSError("no file")
        with Image.open(path) as image:
            axis.imshow(np.asarray(image.convert("RGB")))
    except OSError:
        axis.text(0.5, 0.5, "(unreadable)", ha="center", va="center", transform=axis.transAxes)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text
