"""The synthetic generator: determinism, captions true of their boxes, boxes true of their pixels, twin scenes."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from itm.data.records import read_dataset_json
from itm.data.synthetic import COLORS, SHAPES, generate_synthetic
from tests.conftest import TINY_SYNTHETIC

# An independent reading of the caption grammar: the generator's code is not used to check its captions.
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
NP = (
    r"(?:a|an|the) (?:(?P<{p}size>small|little|tiny|large|big) )?(?:(?P<{p}color>"
    + "|".join(COLORS)
    + r") )?(?P<{p}shape>"
    + "|".join(SHAPES)
    + r"|shape)"
)
RELATION_WORDS = {
    "to the left of": "left",
    "left of": "left",
    "on the left of": "left",
    "to the right of": "right",
    "right of": "right",
    "on the right of": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}
RELATIVE_TO_IT = {"to its left": "left", "to its right": "right", "above it": "above", "below it": "below"}
REGIONS = {
    "in the top left corner": "top left",
    "at the top left": "top left",
    "in the top right corner": "top right",
    "at the top right": "top right",
    "in the bottom left corner": "bottom left",
    "at the bottom left": "bottom left",
    "in the bottom right corner": "bottom right",
    "at the bottom right": "bottom right",
    "at the top": "top",
    "near the top": "top",
    "at the bottom": "bottom",
    "near the bottom": "bottom",
    "on the left": "left",
    "at the left side": "left",
    "on the right": "right",
    "at the right side": "right",
    "in the centre": "centre",
    "in the middle": "centre",
}
_alternatives = sorted(RELATION_WORDS, key=len, reverse=True)
RELATION_RE = re.compile(
    rf"^(?:\w+ shapes, with )?{NP.format(p='a')}(?: is)? (?P<rel>{'|'.join(_alternatives)}) {NP.format(p='b')}$"
)
RELATIVE_RE = re.compile(
    rf"^(?:\w+ shapes, with )?{NP.format(p='b')} with {NP.format(p='a')} (?P<rel>{'|'.join(RELATIVE_TO_IT)})$"
)
REGION_RE = re.compile(rf"^{NP.format(p='a')} (?P<region>{'|'.join(sorted(REGIONS, key=len, reverse=True))})$")
NP_RE = re.compile(NP.format(p=""))
SHAPE_COUNT_RE = re.compile(rf"\b(?P<n>{'|'.join(NUMBER_WORDS)}) (?P<shape>{'|'.join(SHAPES)})s\b")
COLOR_COUNT_RE = re.compile(rf"\b(?P<n>{'|'.join(NUMBER_WORDS)}) (?P<color>{'|'.join(COLORS)}) shapes\b")
TOTAL_RE = re.compile(rf"^(?P<n>{'|'.join(NUMBER_WORDS)}) (?:shapes|objects)\b")


def _matches(obj: pd.Series, groups: dict, prefix: str) -> bool:
    size, color, shape = groups[f"{prefix}size"], groups[f"{prefix}color"], groups[f"{prefix}shape"]
    return (
        (size is None or SIZE_WORDS[size] == obj.attributes[1])
        and (color is None or color == obj.attributes[0])
        and (shape == "shape" or shape == obj["class"])
    )


def _relation(a: pd.Series, b: pd.Series, image_size: int) -> str | None:
    dx = (a.x1 + a.x2 - b.x1 - b.x2) / 2 / image_size
    dy = (a.y1 + a.y2 - b.y1 - b.y2) / 2 / image_size
    if abs(dx) > abs(dy) and abs(dx) >= 0.12 - 1e-6:
        return "left" if dx < 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) >= 0.12 - 1e-6:
        return "above" if dy < 0 else "below"
    return None


def _region(obj: pd.Series, image_size: int) -> str:
    cx, cy = (obj.x1 + obj.x2) / 2 / image_size, (obj.y1 + obj.y2) / 2 / image_size
    column = ("left", "", "right")[min(int(cx * 3), 2)]
    row = ("top", "", "bottom")[min(int(cy * 3), 2)]
    return " ".join(part for part in (row, column) if part) or "centre"


def check_caption(caption: str, objects: pd.DataFrame, image_size: int) -> list[str]:
    """Every claim this reader can find in `caption` that the boxes contradict."""
    problems = []
    rows = [row for _, row in objects.iterrows()]
    for match in NP_RE.finditer(caption):
        if not any(_matches(obj, match.groupdict(), "") for obj in rows):
            problems.append(f"no object fits {match.group(0)!r}")
    for pattern, words in ((RELATION_RE, RELATION_WORDS), (RELATIVE_RE, RELATIVE_TO_IT)):
        match = pattern.match(caption)
        if match:
            wanted = words[match["rel"]]
            pairs = [(a, b) for a in rows for b in rows if a is not b]
            if not any(
                _matches(a, match.groupdict(), "a")
                and _matches(b, match.groupdict(), "b")
                and _relation(a, b, image_size) == wanted
                for a, b in pairs
            ):
                problems.append(f"no pair is {wanted!r} in {caption!r}")
    match = REGION_RE.match(caption)
    if match and not any(
        _matches(obj, match.groupdict(), "a") and _region(obj, image_size) == REGIONS[match["region"]] for obj in rows
    ):
        problems.append(f"no object in the {REGIONS[match['region']]} for {caption!r}")
    shapes = Counter(objects["class"])
    colors = Counter(attributes[0] for attributes in objects.attributes)
    for match in SHAPE_COUNT_RE.finditer(caption):
        if shapes[match["shape"]] != NUMBER_WORDS[match["n"]]:
            problems.append(f"{match.group(0)!r} but {shapes[match['shape']]} present")
    for match in COLOR_COUNT_RE.finditer(caption):
        if colors[match["color"]] != NUMBER_WORDS[match["n"]]:
            problems.append(f"{match.group(0)!r} but {colors[match['color']]} present")
    match = TOTAL_RE.match(caption)
    if match and len(rows) != NUMBER_WORDS[match["n"]]:
        problems.append(f"{match.group(0)!r} but {len(rows)} objects")
    return problems


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sha.update(path.relative_to(folder).as_posix().encode())
            sha.update(path.read_bytes())
    return sha.hexdigest()


def test_layout_and_split_sizes(tiny_synthetic: Path) -> None:
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    assert Counter(r.split for r in records) == TINY_SYNTHETIC["splits"]
    assert [r.imgid for r in records] == list(range(len(records)))
    for record in records:
        assert (tiny_synthetic / "images" / record.filename).is_file()
        texts = [s.raw for s in record.sentences]
        assert len(texts) == 5 and len(set(texts)) == 5, texts
    assert (tiny_synthetic / "objects_vocab.txt").read_text().split("\n")[:-1] == list(SHAPES)
    assert set((tiny_synthetic / "attributes_vocab.txt").read_text().split()) == {*COLORS, "small", "large"}


def test_captions_are_true_of_the_boxes(tiny_synthetic: Path) -> None:
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    objects = pd.read_parquet(tiny_synthetic / "objects.parquet")
    by_image = dict(tuple(objects.groupby("image_id")))
    checked_relations = 0
    problems = []
    for record in records:
        for sentence in record.sentences:
            problems += check_caption(sentence.raw, by_image[record.imgid], TINY_SYNTHETIC["image_size"])
            checked_relations += bool(RELATION_RE.match(sentence.raw) or RELATIVE_RE.match(sentence.raw))
    assert problems == []
    assert checked_relations > 50  # the reader really recognised the spatial captions


def test_checker_catches_false_captions(tiny_synthetic: Path) -> None:
    objects = pd.read_parquet(tiny_synthetic / "objects.parquet")
    scene = objects[objects.image_id == 0]
    absent_color = next(c for c in COLORS if c not in {a[0] for a in scene.attributes})
    assert check_caption(f"a {absent_color} {scene['class'].iloc[0]}", scene, 96)
    assert check_caption(f"{['two', 'three', 'four', 'five', 'six'][len(scene) - 1]} shapes", scene, 96)


def test_boxes_hold_their_objects(tiny_synthetic: Path) -> None:
    objects = pd.read_parquet(tiny_synthetic / "objects.parquet")
    size = TINY_SYNTHETIC["image_size"]
    palette = np.array(list(COLORS.values()), dtype=float)
    names = list(COLORS)
    wrong = 0
    for image_id, scene in objects.groupby("image_id"):
        pixels = np.asarray(Image.open(tiny_synthetic / "images" / f"{image_id:06d}.jpg").convert("RGB"), dtype=float)
        for obj in scene.itertuples():
            assert 0 <= obj.x1 < obj.x2 <= size and 0 <= obj.y1 < obj.y2 <= size
            centre = pixels[int((obj.y1 + obj.y2) / 2), int((obj.x1 + obj.x2) / 2)]
            nearest = names[int(np.argmin(((palette - centre) ** 2).sum(axis=1)))]
            wrong += nearest != obj.attributes[0]
    assert wrong == 0
    assert set(objects["class"]) <= set(SHAPES)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, tiny_synthetic: Path) -> None:
    generate_synthetic(tmp_path / "again", **TINY_SYNTHETIC)
    assert _digest(tmp_path / "again") == _digest(tiny_synthetic)
    generate_synthetic(tmp_path / "seed7", **(TINY_SYNTHETIC | {"seed": 7}))
    assert _digest(tmp_path / "seed7") != _digest(tiny_synthetic)


def test_test_split_does_not_depend_on_train_size(tmp_path: Path, tiny_synthetic: Path) -> None:
    bigger = TINY_SYNTHETIC | {"splits": TINY_SYNTHETIC["splits"] | {"train": 80}}
    generate_synthetic(tmp_path / "bigger", **bigger)

    def test_captions(folder: Path) -> list[list[str]]:
        return [[s.raw for s in r.sentences] for r in read_dataset_json(folder / "dataset.json") if r.split == "test"]

    assert test_captions(tmp_path / "bigger") == test_captions(tiny_synthetic)


def _signature(scene: pd.DataFrame) -> Counter:
    return Counter((row["class"], *row.attributes) for _, row in scene.iterrows())


def _placed(scene: pd.DataFrame) -> list[tuple]:
    return sorted((row["class"], *row.attributes, round(row.x1), round(row.y1)) for _, row in scene.iterrows())


@pytest.mark.parametrize("twin_fraction", [0.0, 1.0])
def test_twins_differ_only_in_a_binding_or_a_relation(tmp_path: Path, twin_fraction: float) -> None:
    spec = TINY_SYNTHETIC | {"splits": {"train": 2, "val": 2, "test": 40}, "twin_fraction": twin_fraction}
    generate_synthetic(tmp_path / "twins", **spec)
    objects = pd.read_parquet(tmp_path / "twins" / "objects.parquet")
    test_ids = [r.imgid for r in read_dataset_json(tmp_path / "twins" / "dataset.json") if r.split == "test"]
    scenes = {i: objects[objects.image_id == i] for i in test_ids}
    with_twin = 0
    for i in test_ids:
        shapes, colors = Counter(scenes[i]["class"]), Counter(a[0] for a in scenes[i].attributes)
        for j in test_ids:
            if i == j:
                continue
            other = scenes[j]
            binding_swap = (
                Counter(other["class"]) == shapes
                and Counter(a[0] for a in other.attributes) == colors
                and _signature(other) != _signature(scenes[i])
            )
            same_objects_moved = _signature(other) == _signature(scenes[i]) and _placed(other) != _placed(scenes[i])
            if binding_swap or same_objects_moved:
                with_twin += 1
                break
    if twin_fraction == 1.0:
        assert with_twin == len(test_ids)
    else:
        assert with_twin < len(test_ids) // 4  # chance coincidences only
