"""Drawing, shared by every figure: matplotlib (Agg) imported only when a figure is drawn, the sheet that places
axes in inches so panels, titles and captions get the room they need, text wrapping and line heights, the layout
and colour constants, and the panels themselves. Region weights are drawn on the image as a spotlight (the image is
dimmed where no attended box covers it) with each box outlined in the colour of its weight; patch weights as a heat
map over the image; the colour norm runs from 0 to a figure's largest weight, so the colour bar gives the scale
shared by every panel of a figure."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from itm.figures.selection import region_heat

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

PANEL = 1.55  # inches: the side of one image panel
TITLE = 0.3  # inches above a panel for its title
MARGIN = 0.25  # inches around the panels
COLORBAR = 1.1  # inches at the right for the colour bar and its label
MAX_COLUMNS = 8  # word or view panels per line; more continue on the next line
FONT = 9  # points, panel titles and labels
CMAP = "plasma"
DIM = 0.35  # brightness of the image where no attention falls (1: not dimmed)


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Sheet:
    """A figure whose axes are placed in inches from its top-left corner, so every panel, title and caption gets
    the room it needs whatever the number of panels (and nothing is clipped)."""

    def __init__(self, width: float, height: float) -> None:
        self.figure: Figure = pyplot().figure(figsize=(width, height))
        self.width, self.height = width, height

    def axes(self, left: float, top: float, width: float, height: float) -> Axes:
        box = (left / self.width, 1 - (top + height) / self.height, width / self.width, height / self.height)
        return self.figure.add_axes(box)

    def text(self, left: float, top: float, text: str, **style: object) -> None:
        self.figure.text(left / self.width, 1 - top / self.height, text, va="top", ha="left", **style)

    def colorbar(self, top: float, height: float, norm: Normalize, label: str, cmap: str = CMAP) -> None:
        """A vertical colour bar at the right edge, from `top` down `height` inches."""
        from matplotlib.cm import ScalarMappable

        axis = self.axes(self.width - COLORBAR + 0.15, top, 0.18, height)
        bar = self.figure.colorbar(ScalarMappable(norm, cmap), cax=axis)
        bar.set_label(label, fontsize=FONT)
        bar.ax.tick_params(labelsize=FONT - 1)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(path, dpi=120)
        pyplot().close(self.figure)


def wrap_lines(text: str, inches: float, size: float = FONT, *, bold: bool = False) -> list[str]:
    """`text` wrapped to lines that fit `inches` at font `size` (DejaVu Sans: about 0.58 em a glyph, 0.66 bold,
    on the safe side)."""
    em = 0.66 if bold else 0.58
    return textwrap.wrap(text, width=max(int(inches * 72 / (em * size)), 10)) or [""]


def fitting_size(text: str, inches: float, size: float) -> float:
    """The font size, at most `size`, at which one line of `text` fits `inches` (a panel title over its panel)."""
    return min(size, inches * 72 / (0.58 * max(len(text), 1)))


def line_height(size: float = FONT) -> float:
    return 1.45 * size / 72


def bare(axis: Axes) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def draw_regions(axis: Axes, image: np.ndarray, boxes: np.ndarray, weights: np.ndarray, norm: Normalize) -> None:
    """The image lit where attended boxes lie (spotlight on the largest covering weight) with every box outlined in
    the colour of its weight, the strongest drawn last (on top) and thickest."""
    from matplotlib.patches import Rectangle

    cmap: Colormap = pyplot().get_cmap(CMAP)
    heat = np.clip(norm(region_heat(boxes, weights, *image.shape[:2])), 0, 1)  # [H, W] in [0, 1]
    height, width = image.shape[:2]
    lit = (image * (DIM + (1 - DIM) * heat[..., None])).astype(np.uint8)
    axis.imshow(lit, extent=(0, width, height, 0), interpolation="bilinear")  # pixel edges at whole coordinates
    for region in np.argsort(weights, kind="stable"):
        x1, y1, x2, y2 = boxes[region]
        strength = float(np.clip(norm(weights[region]), 0, 1))
        axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=cmap(strength),
                                 linewidth=0.6 + 2.0 * strength))  # fmt: skip
    axis.set_xlim(0, width)
    axis.set_ylim(height, 0)
    bare(axis)


def draw_patches(axis: Axes, image: np.ndarray, grid: np.ndarray, norm: Normalize) -> None:
    """The image with its patch weights [s, s] laid over it as a heat map (transparent where the weight is low)."""
    cmap: Colormap = pyplot().get_cmap(CMAP)
    axis.imshow(image, extent=(0, 1, 1, 0))
    colours = cmap(np.clip(norm(grid), 0, 1))  # [s, s, 4]
    colours[..., 3] = 0.65 * np.clip(norm(grid), 0, 1)
    axis.imshow(colours, extent=(0, 1, 1, 0), interpolation="nearest")
    bare(axis)


def colour_norm(values: np.ndarray, gamma: float = 1.0) -> Normalize:
    """The colour scale of a figure: 0 to its largest weight, linear or compressed by `gamma` < 1 (which the
    colour bar shows)."""
    from matplotlib.colors import Normalize, PowerNorm

    vmax = max(float(np.max(values, initial=0.0)), 1e-6)
    return Normalize(0.0, vmax) if gamma == 1.0 else PowerNorm(gamma, 0.0, vmax)


def frame(axis: Axes, colour: str, width: float) -> None:
    for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)
