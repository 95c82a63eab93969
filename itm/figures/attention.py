"""The word-region attention figure of a cross-attention matcher (SCAN t2i/i2t, UARDA): for a few test pairs, the
caption over the image and one panel per word, the image's region boxes lit and outlined by the word's attention
(SCAN's figure); words UARDA leaves out (no region above its relevance threshold) are marked skipped. Holds the
figure's data (`attention_pairs`) apart from its drawing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itm.data.splits import DataFolders
from itm.figures.canvas import (
    COLORBAR,
    FONT,
    MARGIN,
    MAX_COLUMNS,
    PANEL,
    TITLE,
    Sheet,
    bare,
    colour_norm,
    draw_regions,
    fitting_size,
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
from itm.figures.selection import pick_rows, shown_tokens
from itm.models.saved import load_matcher
from itm.pair_attention import is_cross_attention, pair_attention

GAMMA = 0.5  # cross attention: colour and light ~ weight**GAMMA, so weak weights stay visible beside a peak


@dataclass(frozen=True)
class WordPanels:
    """One pair of the attention figure: the caption's words and the weights of each word over the image's regions."""

    caption: str
    image_id: int
    caption_id: int
    image: np.ndarray  # [H, W, 3] uint8
    boxes: np.ndarray  # [R, 4] x1, y1, x2, y2 in the image's pixels
    words: list[str]
    weights: np.ndarray  # [W, R] for the shown words
    skipped: np.ndarray  # [W] bool: the matcher leaves the word out (UARDA, no region above its threshold)


@dataclass(frozen=True)
class AttentionPairs:
    """What the attention figure shows: a cross-attention matcher's word panels for a few test pairs."""

    name: str  # the matcher, e.g. "scan_t2i_avg (scan)"
    direction: str  # "t2i" or "i2t"
    threshold: float | None  # UARDA's relevance threshold
    pairs: list[WordPanels]


def attention_figure(
    model_dir: Path,
    regions_dir: Path,
    captions_dir: Path,
    dataset_dir: Path,
    path: Path,
    *,
    pairs: int = 3,
    seed: int = 0,
) -> None:
    """For a cross-attention matcher (SCAN t2i/i2t, UARDA): `pairs` test captions with their own image (rows of
    the test captions picked by `pick_rows(seed)`, the same for every matcher), one row of panels per pair and one
    panel per word: the image, its region boxes lit and outlined by the word's attention (SCAN's figure). t2i:
    the word's attention over the regions (sums to 1); i2t: the share of each region's attention (a softmax over
    the words) that goes to the word. Raises ValueError for a matcher without cross attention."""
    _draw_attention(attention_pairs(model_dir, regions_dir, captions_dir, dataset_dir, pairs=pairs, seed=seed), path)


def attention_pairs(
    model_dir: Path, regions_dir: Path, captions_dir: Path, dataset_dir: Path, *, pairs: int = 3, seed: int = 0
) -> AttentionPairs:
    """The data of `attention_figure`: per picked test pair, its words (without <start> and <end>) and their
    attention over the image's regions."""
    matcher, card = load_matcher(model_dir, CPU)
    if not is_cross_attention(matcher):
        raise ValueError(f"{model_dir}: a {card['kind']} matcher has no word-region cross attention to draw")
    data = DataFolders(regions_dir, captions_dir, dataset_dir)
    store = data.regions("test")
    table = data.captions("test", matcher.reads, texts=True)
    files = image_files(dataset_dir)
    usable = np.array([int(image_id) in store for image_id in table.image_ids], dtype=bool)
    panels, direction, threshold = [], "t2i", None
    for row in pick_rows(len(table), pairs, seed, usable):
        image_id = int(table.image_ids[row])
        image = read_image(files, image_id)
        boxes = box_image(store, image_id, image)
        attention = pair_attention(matcher, store.collate([store.features_of(image_id)]),
                                   caption_batch(matcher, table, row))  # fmt: skip
        direction, threshold = attention.direction, attention.threshold
        labels = token_labels(matcher, card, data, table.token_ids[row])
        shown = shown_tokens(labels)
        panels.append(WordPanels(
            str(table.texts[row]), image_id, int(table.caption_ids[row]), image, boxes, [labels[j] for j in shown],
            attention.weights.numpy()[shown], ~attention.attending.numpy()[shown],
        ))  # fmt: skip
    return AttentionPairs(matcher_name(model_dir, card), direction, threshold, panels)


def _attention_title(figure: AttentionPairs) -> str:
    if figure.direction == "t2i":
        what = "each word's attention over the image's regions (a word's weights sum to 1 over the regions)"
    else:
        what = ("for each word, the share of each region's attention that goes to it "
                "(each region's attention is a softmax over the caption's words)")  # fmt: skip
    title = f"{figure.name}, {figure.direction} cross attention: {what}"
    if figure.threshold is not None:
        title += f"; words with no region above the relevance threshold {figure.threshold:.2f} are skipped"
    return title


def _draw_attention(figure: AttentionPairs, path: Path) -> None:
    """One block per pair: the caption (wrapped) over the image and lines of at most MAX_COLUMNS word panels."""
    panels = figure.pairs
    columns = max(min(max(len(p.words) for p in panels), MAX_COLUMNS), 1)
    words_left = MARGIN + PANEL + 0.15  # the first column shows the image itself
    width = words_left + columns * PANEL + MARGIN + COLORBAR
    title_lines = wrap_lines(_attention_title(figure), width - 2 * MARGIN, FONT + 1, bold=True)
    captions = [wrap_lines(f"{n}. image {p.image_id}, caption {p.caption_id}: “{p.caption}”", columns * PANEL, FONT + 1)
                for n, p in enumerate(panels, start=1)]  # fmt: skip
    lines = [math.ceil(len(p.words) / columns) for p in panels]
    heading = MARGIN + len(title_lines) * line_height(FONT + 1) + 0.15
    blocks = [len(c) * line_height(FONT + 1) + 0.1 + n * (TITLE + PANEL) + 0.2
              for c, n in zip(captions, lines, strict=True)]  # fmt: skip
    sheet = Sheet(width, heading + sum(blocks) + MARGIN)
    sheet.text(MARGIN, MARGIN, "\n".join(title_lines), fontsize=FONT + 1, fontweight="bold")
    shown = [p.weights[~p.skipped] for p in panels]
    norm = colour_norm(np.concatenate([w.ravel() for w in shown]), GAMMA)
    top = heading
    for pair, caption, block in zip(panels, captions, blocks, strict=True):
        sheet.text(MARGIN, top, "\n".join(caption), fontsize=FONT + 1)
        panel_top = top + len(caption) * line_height(FONT + 1) + 0.1
        axis = sheet.axes(MARGIN + 0.04, panel_top + TITLE, PANEL - 0.08, PANEL - 0.08)
        axis.imshow(pair.image)
        bare(axis)
        axis.set_title(f"image ({len(pair.boxes)} regions)", fontsize=FONT, pad=3)
        for position, word in enumerate(pair.words):
            line, column = divmod(position, columns)
            axis = sheet.axes(words_left + column * PANEL + 0.04, panel_top + line * (TITLE + PANEL) + TITLE,
                              PANEL - 0.08, PANEL - 0.08)  # fmt: skip
            skipped = bool(pair.skipped[position])
            weights = np.zeros_like(pair.weights[position]) if skipped else pair.weights[position]
            draw_regions(axis, pair.image, pair.boxes, weights, norm)
            label = f"{word} (skipped)" if skipped else word
            axis.set_title(label, fontsize=fitting_size(label, PANEL - 0.1, FONT + 1),
                           color="grey" if skipped else "black", pad=3)  # fmt: skip
        top += block
    label = "word's attention on the region" if figure.direction == "t2i" else "region's attention on the word"
    sheet.colorbar(heading, min(sum(blocks), 4.0), norm, label)
    sheet.save(path)
