"""The views figure of a multi-view matcher (MVAM): for one test pair, a panel per view with the view's attention
over the image (region boxes, or ViT patches for the open_clip backbone, shown as the matcher sees the image) and
its cosine, over a [views × words] heat map of the views' attention over the caption. Holds the figure's data
(`view_panels`) apart from its drawing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itm.data.splits import DataFolders
from itm.figures.canvas import (
    CMAP,
    COLORBAR,
    FONT,
    MARGIN,
    MAX_COLUMNS,
    PANEL,
    TITLE,
    Sheet,
    colour_norm,
    draw_patches,
    draw_regions,
    line_height,
    wrap_lines,
)
from itm.figures.reading import (
    CPU,
    box_image,
    caption_batch,
    image_files,
    matcher_name,
    read_image,
    token_labels,
)
from itm.figures.selection import patch_grid, pick_rows, shown_tokens
from itm.models.saved import load_matcher
from itm.pair_attention import is_multi_view, pair_views


@dataclass(frozen=True)
class ViewPanels:
    """What the views figure shows: per view its weights over the image (regions or patches) and the caption."""

    heading: str
    image: np.ndarray  # [H, W, 3] uint8, as the matcher sees it (pixel matchers: resized and cropped)
    image_weights: np.ndarray  # [m, R] over the regions, or [m, s, s] over the patch grid
    boxes: np.ndarray | None  # [R, 4] region boxes in the image's pixels; None for patches
    class_weight: np.ndarray  # [m, k] weight on ViT tokens before the patches (k = 0 for regions and plain grids)
    cosines: np.ndarray  # [m]
    words: list[str]
    word_weights: np.ndarray  # [m, W] over the shown words
    special_weight: np.ndarray  # [m] weight on the tokens not shown (<start>, <end>)


def views_figure(
    model_dir: Path,
    regions_dir: Path,
    captions_dir: Path,
    dataset_dir: Path,
    path: Path,
    *,
    seed: int = 0,
) -> None:
    """For a multi-view matcher (MVAM): one test caption with its own image (the first of `pick_rows(seed)`, as in
    `attention_figure`): a small image panel per view with the view's attention over the regions (boxes) or the
    ViT patches (heat map), its cosine in the title, and a [views × words] heat map of the views' attention over
    the caption. Raises ValueError for a matcher without views."""
    _draw_views(view_panels(model_dir, regions_dir, captions_dir, dataset_dir, seed=seed), path)


def view_panels(
    model_dir: Path, regions_dir: Path, captions_dir: Path, dataset_dir: Path, *, seed: int = 0
) -> ViewPanels:
    """The data of `views_figure`: the picked pair's per-view weights over the image and the caption's words."""
    matcher, card = load_matcher(model_dir, CPU)
    if not is_multi_view(matcher):
        raise ValueError(f"{model_dir}: a {card['kind']} matcher has no views to draw")
    data = DataFolders(regions_dir, captions_dir, dataset_dir)
    store = data.store("test", matcher.reads)
    table = data.captions("test", matcher.reads, texts=True)
    usable = np.array([int(image_id) in store for image_id in table.image_ids], dtype=bool)
    row = int(pick_rows(len(table), 1, seed, usable)[0])
    image_id = int(table.image_ids[row])
    views = pair_views(matcher, store.collate([store.features_of(image_id)]), caption_batch(matcher, table, row))
    image_attention = views.image_attention.numpy()  # [m, N]
    if matcher.pixels is None:
        image = read_image(image_files(dataset_dir), image_id)
        boxes, image_weights, class_weight = box_image(store, image_id, image), image_attention, image_attention[:, :0]
    else:
        image = _pixels_image(store.features_of(image_id), matcher.pixels.mean, matcher.pixels.std)
        boxes, (image_weights, class_weight) = None, patch_grid(image_attention)
    labels = token_labels(matcher, card, data, table.token_ids[row])
    shown = shown_tokens(labels)
    caption_attention = views.caption_attention.numpy()  # [m, L]
    heading = (f"{matcher_name(model_dir, card)}: where each of its {len(image_attention)} views looks, for test "
               f"image {image_id} and its caption {int(table.caption_ids[row])} “{table.texts[row]}” "
               f"(pair score = mean view cosine = {views.score:.3f})")  # fmt: skip
    return ViewPanels(
        heading, image, image_weights, boxes, class_weight, views.view_cosines.numpy(), [labels[j] for j in shown],
        caption_attention[:, shown], 1 - caption_attention[:, shown].sum(axis=1),
    )  # fmt: skip


def _pixels_image(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[S, S, 3] uint8 from normalised pixels [3, S, S]: the image as a pixel matcher sees it."""
    mean_, std_ = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (mean, std))
    return (np.clip(pixels * std_ + mean_, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def _draw_views(panels: ViewPanels, path: Path) -> None:
    """Image panels (one per view, MAX_COLUMNS a line) over the [views × words] heat map, each with a colour bar."""
    count, words = len(panels.cosines), panels.words
    columns = min(count, MAX_COLUMNS)
    width = max(2 * MARGIN + columns * PANEL + COLORBAR, 2 * MARGIN + 1.3 + 0.5 * len(words) + COLORBAR)
    text_width = width - 2 * MARGIN
    what = "region" if panels.boxes is not None else "ViT patch"
    note = ""
    if panels.class_weight.size:
        share = panels.class_weight.sum(axis=1)  # [m]
        note = f"; the class token's weight, {share.min():.2f}–{share.max():.2f}, is not drawn"
    if panels.boxes is None:
        note += f"; the image as the matcher sees it, {len(panels.image)} px square"
    heading = wrap_lines(panels.heading, text_width, FONT + 1, bold=True)
    image_text = wrap_lines(f"each view's attention over the image's {what}s (a view's weights sum to 1{note})",
                            text_width, FONT + 1)  # fmt: skip
    special = panels.special_weight
    word_text = wrap_lines(
        f"each view's attention over the caption's words (a view's weights sum to 1 with the start and end tokens, "
        f"not shown: {special.min():.2f}–{special.max():.2f} of a view's weight)", text_width, FONT + 1,
    )  # fmt: skip
    image_top = MARGIN + len(heading) * line_height(FONT + 1) + 0.2
    panels_top = image_top + len(image_text) * line_height(FONT + 1) + 0.05
    panels_height = math.ceil(count / columns) * (TITLE + PANEL + 0.1)
    map_text_top = panels_top + panels_height + 0.25
    map_top = map_text_top + len(word_text) * line_height(FONT + 1) + 0.1
    map_height, map_width = max(0.22 * count, 1.3), width - 2 * MARGIN - 1.3 - COLORBAR
    longest = max(len(word) for word in words) * 0.58 * FONT / 72  # inches
    rotate = longest > 0.9 * map_width / len(words)
    sheet = Sheet(width, map_top + map_height + (0.75 * longest if rotate else 0) + 0.35 + MARGIN)
    sheet.text(MARGIN, MARGIN, "\n".join(heading), fontsize=FONT + 1, fontweight="bold")
    sheet.text(MARGIN, image_top, "\n".join(image_text), fontsize=FONT + 1)
    _draw_view_images(sheet, panels_top, panels_height, panels, columns, what)
    sheet.text(MARGIN, map_text_top, "\n".join(word_text), fontsize=FONT + 1)
    axis = sheet.axes(MARGIN + 1.3, map_top, map_width, map_height)
    norm = colour_norm(panels.word_weights)
    axis.imshow(panels.word_weights, aspect="auto", cmap=CMAP, norm=norm, interpolation="nearest")  # [m, W]
    if rotate:
        axis.set_xticks(range(len(words)), words, rotation=45, ha="right", rotation_mode="anchor", fontsize=FONT)
    else:
        axis.set_xticks(range(len(words)), words, fontsize=FONT)
    axis.set_yticks(range(count), [f"view {v + 1} (cos {c:.2f})" for v, c in enumerate(panels.cosines)],
                    fontsize=FONT - 1)  # fmt: skip
    sheet.colorbar(map_top, map_height, norm, "weight on the word")
    sheet.save(path)


def _draw_view_images(sheet: Sheet, top: float, height: float, panels: ViewPanels, columns: int, what: str) -> None:
    """One image panel per view: its weights over the regions (boxes) or the patches (heat map)."""
    norm = colour_norm(panels.image_weights)
    for view, cosine in enumerate(panels.cosines):
        line, column = divmod(view, columns)
        axis = sheet.axes(MARGIN + column * PANEL + 0.04, top + line * (TITLE + PANEL + 0.1) + TITLE,
                          PANEL - 0.08, PANEL - 0.08)  # fmt: skip
        if panels.boxes is not None:
            draw_regions(axis, panels.image, panels.boxes, panels.image_weights[view], norm)
        else:
            draw_patches(axis, panels.image, panels.image_weights[view], norm)
        axis.set_title(f"view {view + 1}: cos {cosine:.2f}", fontsize=FONT, pad=3)
    sheet.colorbar(top + TITLE, max(min(height - TITLE - 0.1, 3.0), PANEL - 0.08), norm, f"weight on the {what}")
