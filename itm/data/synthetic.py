"""The synthetic dataset: scenes of coloured shapes, five grammar captions each, and the boxes behind them.

It is the offline default and is built so that fine-grained matching matters:
- every image holds several objects, each with a shape (its detector class), a colour and a size (its
  attributes) and a position;
- captions come from a grammar with varied wording: attributes, exact counts, spatial relations ("left of",
  "above", "with ... to its right") and absolute positions ("in the top left corner");
- a share of the scenes come in near-duplicate pairs that differ only in one colour/shape binding (two objects
  swap colours, so the bag of words stays the same) or one spatial relation (two objects swap places).

Every split is drawn from its own random stream derived from (seed, split), so resizing `train` leaves `val` and
`test` unchanged. Output follows the Karpathy layout (`dataset.json` + `images/`), plus `objects.parquet` (one
row per object: image_id, x1, y1, x2, y2, class, attributes) and the class/attribute vocabularies, which are the
ground truth for training the bottom-up detector.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from itm.atomic import staged_dir
from itm.data.records import DATASET_JSON, IMAGES_DIR, SPLITS, ImageRecord, Sentence, Split, write_dataset_json

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES: Mapping[str, tuple[float, float]] = {"small": (0.13, 0.18), "large": (0.27, 0.33)}  # side / image side
OBJECTS_FILE = "objects.parquet"
CLASSES_FILE = "objects_vocab.txt"
ATTRIBUTES_FILE = "attributes_vocab.txt"

# Two centres are in a relation when they are this far apart (share of the image side) along the dominant axis.
RELATION_GAP = 0.12
MARGIN = 0.02  # free border, share of the image side


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; coordinates are shares of the image side (0..1), y pointing down."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def footprint(self) -> tuple[float, float, float, float]:
        """The square the shape is drawn in; placement keeps footprints apart."""
        half = self.side / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The tight bounding box of the drawn shape (centred on cx, cy)."""
        half_w, half_h = (extent * self.side / 2 for extent in HALF_EXTENTS[self.shape])
        return (self.cx - half_w, self.cy - half_h, self.cx + half_w, self.cy + half_h)


Scene = tuple[SceneObject, ...]


# --- scenes ---------------------------------------------------------------------------------------------------------


def _separated(box: tuple[float, float, float, float], others: Sequence[SceneObject]) -> bool:
    gap = MARGIN
    x1, y1, x2, y2 = box
    return all(
        x2 + gap <= o.footprint[0]
        or o.footprint[2] + gap <= x1
        or y2 + gap <= o.footprint[1]
        or o.footprint[3] + gap <= y1
        for o in others
    )


def _place(rng: np.random.Generator, side: float, others: Sequence[SceneObject]) -> tuple[float, float] | None:
    low, high = MARGIN + side / 2, 1 - MARGIN - side / 2
    for _ in range(100):
        cx, cy = rng.uniform(low, high, size=2)
        half = side / 2
        if _separated((cx - half, cy - half, cx + half, cy + half), others):
            return float(cx), float(cy)
    return None


def sample_scene(rng: np.random.Generator, min_objects: int, max_objects: int) -> Scene:
    """A scene of non-overlapping shapes with random shape, colour, size and position."""
    while True:
        objects: list[SceneObject] = []
        for _ in range(int(rng.integers(min_objects, max_objects + 1))):
            size = str(rng.choice(list(SIZES)))
            side = float(rng.uniform(*SIZES[size]))
            spot = _place(rng, side, objects)
            if spot is None:
                break
            shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
            objects.append(SceneObject(shape, color, size, spot[0], spot[1], side))
        else:
            return tuple(objects)


def _swap_binding(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """Two objects of different shape and colour exchange colours: same words, different binding."""
    pairs = [(i, j) for i, j in combinations(range(len(scene)), 2) if scene[i].shape != scene[j].shape]
    pairs = [(i, j) for i, j in pairs if scene[i].color != scene[j].color]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    twin = list(scene)
    twin[i], twin[j] = replace(scene[i], color=scene[j].color), replace(scene[j], color=scene[i].color)
    return tuple(twin)


def _swap_places(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """Two distinguishable objects in a clear spatial relation exchange places, flipping that relation."""
    pairs = [(i, j) for i, j in combinations(range(len(scene)), 2) if _words(scene[i]) != _words(scene[j])]
    pairs = [(i, j) for i, j in pairs if relation(scene[i], scene[j]) is not None]
    for k in rng.permutation(len(pairs)):
        i, j = pairs[int(k)]
        twin = list(scene)
        twin[i] = replace(scene[i], cx=scene[j].cx, cy=scene[j].cy)
        twin[j] = replace(scene[j], cx=scene[i].cx, cy=scene[i].cy)
        inside = all(MARGIN <= c <= 1 - MARGIN for o in (twin[i], twin[j]) for c in o.footprint)
        if inside and all(_separated(o.footprint, twin[:n] + twin[n + 1 :]) for n, o in enumerate(twin)):
            return tuple(twin)
    return None


def make_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """A near-duplicate of `scene` differing in one binding or one relation, or None if neither applies."""
    edits = [_swap_binding, _swap_places]
    if rng.random() < 0.5:
        edits.reverse()
    for edit in edits:
        twin = edit(scene, rng)
        if twin is not None:
            return twin
    return None


def sample_split(
    rng: np.random.Generator, n_images: int, min_objects: int, max_objects: int, twin_fraction: float
) -> list[Scene]:
    """`n_images` scenes of which about `twin_fraction` come in near-duplicate pairs, in random order."""
    n_pairs = round(n_images * twin_fraction / 2) if max_objects >= 2 else 0
    scenes: list[Scene] = []
    while len(scenes) < 2 * n_pairs:
        base = sample_scene(rng, max(min_objects, 2), max_objects)
        twin = make_twin(base, rng)
        if twin is not None:
            scenes += [base, twin]
    scenes += [sample_scene(rng, min_objects, max_objects) for _ in range(n_images - len(scenes))]
    return [scenes[int(i)] for i in rng.permutation(len(scenes))]


# --- geometry words -------------------------------------------------------------------------------------------------


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where `a` is relative to `b`: "left", "right", "above", "below", or None when not clear-cut."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > abs(dy) and abs(dx) >= RELATION_GAP:
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) >= RELATION_GAP:
        return "above" if dy < 0 else "below"
    return None


def region(obj: SceneObject) -> str:
    """The image ninth holding the object's centre: "top left", "top", ..., "centre", ..., "bottom right"."""
    column = ("left", "", "right")[min(int(obj.cx * 3), 2)]
    row = ("top", "", "bottom")[min(int(obj.cy * 3), 2)]
    return " ".join(part for part in (row, column) if part) or "centre"


def _words(obj: SceneObject) -> tuple[str, str, str]:
    return (obj.size, obj.color, obj.shape)


# --- captions -------------------------------------------------------------------------------------------------------

NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
RELATIVE_TO_IT = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
REGION_PHRASES = {
    "top left": ("in the top left corner", "at the top left"),
    "top right": ("in the top right corner", "at the top right"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "left": ("on the left", "at the left side"),
    "right": ("on the right", "at the right side"),
    "centre": ("in the centre", "in the middle"),
}
SCENE_PREFIXES = ("", "there is ", "an image of ", "a picture with ", "a grey background with ")


class _Grammar:
    """Caption templates over one scene; every sentence it returns is true of that scene."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        self.scene = scene
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return str(options[int(self.rng.integers(len(options)))])

    def noun_phrase(self, obj: SceneObject, article: str = "a") -> str:
        words = []
        if self.rng.random() < 0.4:
            words.append(self.pick(SIZE_WORDS[obj.size]))
        if self.rng.random() < 0.9:
            words.append(obj.color)
        words.append(obj.shape if len(words) == 0 or self.rng.random() < 0.9 else "shape")
        if article == "a" and words[0][0] in "aeiou":
            article = "an"
        return " ".join([article, *words])

    def listing(self) -> str:
        phrases = [self.noun_phrase(self.scene[int(i)]) for i in self.rng.permutation(len(self.scene))]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        if len(self.scene) > 1 and self.rng.random() < 0.3:
            return f"{NUMBERS[len(self.scene)]} shapes: {body}"
        return self.pick(SCENE_PREFIXES) + body

    def _related_pair(self) -> tuple[SceneObject, SceneObject, str] | None:
        pairs = [
            (a, b, rel)
            for a in self.scene
            for b in self.scene
            if a is not b and (rel := relation(a, b)) is not None and _words(a) != _words(b)
        ]
        return pairs[int(self.rng.integers(len(pairs)))] if pairs else None

    def spatial(self) -> str | None:
        pair = self._related_pair()
        if pair is None:
            return None
        a, b, rel = pair
        form = int(self.rng.integers(3))
        if form == 0:
            return f"{self.noun_phrase(a)} {self.pick(RELATION_PHRASES[rel])} {self.noun_phrase(b)}"
        if form == 1:
            return f"{self.noun_phrase(a, 'the')} is {self.pick(RELATION_PHRASES[rel])} {self.noun_phrase(b, 'the')}"
        return f"{self.noun_phrase(b)} with {self.noun_phrase(a)} {RELATIVE_TO_IT[rel]}"

    def counting(self) -> str:
        by_shape = Counter(o.shape for o in self.scene)
        by_color = Counter(o.color for o in self.scene)
        form = int(self.rng.integers(3))
        if form == 0:
            return _join_counts([(n, shape, "s") for shape, n in by_shape.items()], self.rng)
        if form == 1:
            return _join_counts([(n, f"{color} shape", "s") for color, n in by_color.items()], self.rng)
        noun = self.pick(("shapes", "objects"))
        return f"{NUMBERS[len(self.scene)]} {noun}" if len(self.scene) > 1 else "a single shape"

    def placement(self) -> str:
        obj = self.scene[int(self.rng.integers(len(self.scene)))]
        return f"{self.noun_phrase(obj)} {self.pick(REGION_PHRASES[region(obj)])}"

    def compound(self) -> str | None:
        spatial = self.spatial()
        if spatial is None or len(self.scene) < 3:
            return None
        return f"{NUMBERS[len(self.scene)]} shapes, with {spatial}"

    def sentence(self) -> str | None:
        templates = (self.listing, self.spatial, self.counting, self.placement, self.compound)
        weights = np.array([0.25, 0.3, 0.15, 0.15, 0.15])
        return templates[int(self.rng.choice(len(templates), p=weights))]()


def _join_counts(items: list[tuple[int, str, str]], rng: np.random.Generator) -> str:
    parts = [f"{NUMBERS[n]} {noun}{plural if n > 1 else ''}" if n > 1 else _article(noun) for n, noun, plural in items]
    parts = [parts[int(i)] for i in rng.permutation(len(parts))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def describe(scene: Scene, rng: np.random.Generator, n_captions: int) -> list[str]:
    """`n_captions` different captions, each true of `scene`."""
    grammar = _Grammar(scene, rng)
    captions: list[str] = []
    for _ in range(500):
        sentence = grammar.sentence()
        if sentence is not None and sentence not in captions:
            captions.append(sentence)
            if len(captions) == n_captions:
                return captions
    raise RuntimeError(f"the grammar could not produce {n_captions} different captions for {scene}")


# --- images ---------------------------------------------------------------------------------------------------------


def _unit_outline(shape: str) -> np.ndarray:
    """[V, 2] polygon vertices of `shape` with radius 1, translated so that its bounding box is centred on 0."""
    if shape == "triangle":
        angles, radii = np.deg2rad([-90, 30, 150]), np.ones(3)
    elif shape in ("square", "diamond"):
        angles, radii = np.deg2rad([45, 135, 225, 315] if shape == "square" else [0, 90, 180, 270]), np.ones(4)
        radii = radii * (np.sqrt(2) if shape == "square" else 1)
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    elif shape == "hexagon":
        angles, radii = np.deg2rad(np.arange(6) * 60), np.ones(6)
    elif shape == "circle":
        angles, radii = np.linspace(0, 2 * np.pi, 64, endpoint=False), np.ones(64)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return points - (points.min(axis=0) + points.max(axis=0)) / 2


# Half width and half height of each shape's bounding box, in units of its radius (side / 2).
HALF_EXTENTS: Mapping[str, tuple[float, float]] = {
    shape: tuple(round(float(v), 6) for v in _unit_outline(shape).max(axis=0)) for shape in SHAPES
}


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The scene drawn on a noisy grey background."""
    level = rng.uniform(105, 150)
    noise = rng.normal(0.0, 8.0, size=(image_size, image_size, 1))
    background = np.clip(level + noise + rng.normal(0.0, 4.0, size=(1, 1, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(tuple(v * image_size for v in obj.box), fill=fill)
        else:
            outline = _unit_outline(obj.shape) * (obj.side / 2) + (obj.cx, obj.cy)
            draw.polygon([tuple(point) for point in outline * image_size], fill=fill)
    return image


# --- the dataset ----------------------------------------------------------------------------------------------------


def generate_synthetic(
    out_dir: Path,
    *,
    seed: int,
    splits: Mapping[Split, int],
    image_size: int,
    captions_per_image: int,
    min_objects: int,
    max_objects: int,
    twin_fraction: float,
    jpeg_quality: int,
) -> None:
    """Write the synthetic dataset to `out_dir` (atomically: nothing appears there unless complete)."""
    with staged_dir(out_dir) as staging:
        (staging / IMAGES_DIR).mkdir()
        records: list[ImageRecord] = []
        object_rows: list[dict] = []
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, split_index])
            scenes = sample_split(rng, splits[split], min_objects, max_objects, twin_fraction)
            for scene in tqdm(scenes, desc=f"synthetic {split}", unit="img", mininterval=2):
                imgid = len(records)
                filename = f"{imgid:06d}.jpg"
                render(scene, image_size, rng).save(staging / IMAGES_DIR / filename, quality=jpeg_quality)
                captions = describe(scene, rng, captions_per_image)
                sentences = tuple(Sentence(imgid * captions_per_image + k, text) for k, text in enumerate(captions))
                records.append(ImageRecord(imgid, filename, split, sentences))
                object_rows += _object_rows(imgid, scene, image_size)
        write_dataset_json(staging / DATASET_JSON, "synthetic", records)
        _write_objects(staging, object_rows)
    log.info("wrote %d synthetic images to %s", len(records), out_dir)


def _object_rows(imgid: int, scene: Scene, image_size: int) -> list[dict]:
    rows = []
    for obj in scene:
        x1, y1, x2, y2 = (float(v * image_size) for v in obj.box)
        rows.append(
            {
                "image_id": imgid,
                "x1": x1,
                "y1": y1,
                "x2": x2,
                "y2": y2,
                "class": obj.shape,
                "attributes": [obj.color, obj.size],
            }
        )
    return rows


def _write_objects(out_dir: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    for column in ("x1", "y1", "x2", "y2"):
        frame[column] = frame[column].astype("float32")
    frame["image_id"] = frame["image_id"].astype("int64")
    frame.to_parquet(out_dir / OBJECTS_FILE, index=False)
    (out_dir / CLASSES_FILE).write_text("\n".join(SHAPES) + "\n")
    (out_dir / ATTRIBUTES_FILE).write_text("\n".join([*COLORS, *SIZES]) + "\n")
