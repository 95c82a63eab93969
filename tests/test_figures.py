"""Figures of what matchers look at and retrieve: the fixed pick of test items, the ranking with its ground-truth
flags, one panel per word (or view), the matchers each figure refuses, and PNGs drawn from untrained matchers on
the tiny synthetic set (regions with real boxes, the tiny open_clip model for patches)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter

from itm.config import MatcherParams
from itm.data.captions import VOCAB_FILE
from itm.data.loaders import read_captions
from itm.data.records import DATASET_JSON
from itm.data.regions import RegionStore, write_store
from itm.data.text import tokenize
from itm.data.vocab import load_vocab
from itm.errors import UserError
from itm.evaluate.score_file import SplitScores
from itm.figures import (
    attention_figure,
    attention_pairs,
    first_true_rank,
    image_to_text_queries,
    patch_grid,
    pick_rows,
    region_heat,
    retrieval_figures,
    shown_tokens,
    text_to_image_queries,
    top_hits,
    view_panels,
    views_figure,
)
from itm.figures.canvas import PANEL, Sheet
from itm.models import MatcherInputs, build_matcher
from itm.models.saved import save_matcher
from tests.conftest import TINY_SYNTHETIC
from tests.test_matcher_stages import prepared  # noqa: F401 (a module fixture)
from tests.test_mvam import TINY_CLIP

SIZE = TINY_SYNTHETIC["image_size"]
SMALL = {"embed_dim": 16, "word_dim": 8}


# The pure parts ---------------------------------------------------------------------------------------------------


def test_pick_rows_is_fixed_by_the_seed_and_passes_over_unusable_rows() -> None:
    rows = pick_rows(50, 5, seed=0)
    assert rows.tolist() == pick_rows(50, 5, seed=0).tolist() == np.random.default_rng(0).permutation(50)[:5].tolist()
    assert rows.tolist() != pick_rows(50, 5, seed=1).tolist()
    usable = np.ones(50, dtype=bool)
    usable[rows[1]] = False
    assert pick_rows(50, 4, 0, usable).tolist() == [rows[0], *rows[2:5].tolist()]
    with pytest.raises(ValueError, match="only 1 of 3 are usable"):
        pick_rows(3, 2, 0, np.array([True, False, False]))


def test_top_hits_rank_by_score_and_flag_the_truth() -> None:
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    truth = np.array([False, False, True, False, True])
    hits = top_hits(scores, truth, 3)
    assert [(h.index, h.rank, h.truth) for h in hits] == [(1, 1, False), (3, 2, False), (2, 3, True)]  # ties by index
    assert hits[0].score == pytest.approx(0.9)
    assert first_true_rank(scores, truth) == 3
    assert first_true_rank(np.array([0.5, 0.5]), np.array([False, True])) == 1  # a tie counts for the query


def _hand_scores() -> SplitScores:
    """3 images × 6 captions (2 per image). Caption 0 ranks its image 0 third; image 2 ranks its captions 4, 5 top."""
    scores = torch.tensor([
        [0.1, 0.8, 0.0, 0.3, 0.0, 0.0],
        [0.9, 0.2, 0.7, 0.1, 0.1, 0.2],
        [0.5, 0.1, 0.2, 0.9, 0.8, 0.7],
    ])  # fmt: skip
    return SplitScores(scores, np.array([10, 11, 12]), np.arange(100, 106), torch.tensor([0, 0, 1, 1, 2, 2]))


def test_queries_follow_the_scores_and_the_ground_truth() -> None:
    scores = _hand_scores()
    captions = [f"caption {j}" for j in range(6)]
    by_caption = {query.query: query for query in text_to_image_queries(scores, captions, 6, 2, seed=0)}
    assert [(h.index, h.truth) for h in by_caption["caption 0"].hits] == [(1, False), (2, False)]
    assert by_caption["caption 0"].true_rank == 3
    assert [(h.index, h.truth) for h in by_caption["caption 1"].hits] == [(0, True), (1, False)]
    assert by_caption["caption 3"].true_rank == 3  # its own image 1 scores 0.1, below images 2 and 0
    by_image = {query.query: query for query in image_to_text_queries(scores, 3, 3, seed=0)}
    assert [(h.index, h.truth) for h in by_image[12].hits] == [(3, False), (4, True), (5, True)]
    assert by_image[12].true_rank == 2 and by_image[10].true_rank == 1
    assert [q.query for q in text_to_image_queries(scores, captions, 2, 1, 7)] == [
        captions[j] for j in pick_rows(6, 2, 7)
    ]


def test_shown_tokens_drop_the_frame_and_padding() -> None:
    assert shown_tokens(["<start>", "a", "<unk>", "star", "<end>", "<pad>"]) == [1, 2, 3]
    assert shown_tokens(["<start_of_text>", "red", "<end_of_text>"]) == [1]


def test_patch_grid_with_and_without_a_class_token() -> None:
    weights = np.arange(2 * 16, dtype=np.float32).reshape(2, 16)
    grid, prefix = patch_grid(weights)
    assert grid.shape == (2, 4, 4) and prefix.shape == (2, 0) and grid[1, 3, 0] == weights[1, 12]
    grid, prefix = patch_grid(np.arange(2 * 17, dtype=np.float32).reshape(2, 17))
    assert grid.shape == (2, 4, 4) and prefix[:, 0].tolist() == [0, 17] and grid[0, 0, 0] == 1
    with pytest.raises(ValueError, match="15 image tokens"):
        patch_grid(np.zeros((1, 15)))


def test_region_heat_keeps_the_largest_covering_weight() -> None:
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6]], dtype=np.float32)
    heat = region_heat(boxes, np.array([0.3, 0.6]), 8, 8)
    assert heat[1, 1] == pytest.approx(0.3) and heat[3, 3] == pytest.approx(0.6) and heat[7, 7] == 0


# Figures from matchers ------------------------------------------------------------------------------------------


def _save_model(root: Path, name: str, params: dict[str, Any], buffers: dict[str, float] | None = None) -> Path:
    """An untrained matcher saved as the train stage does (its card names the tiny set's vocabulary)."""
    vocab = load_vocab(root / "captions" / VOCAB_FILE)
    feature_dim = RegionStore(root / "regions" / "test").feature_dim
    resolved = TypeAdapter(MatcherParams).validate_python(params | SMALL)
    torch.manual_seed(0)
    matcher = build_matcher(resolved, MatcherInputs(feature_dim, len(vocab)))
    state = matcher.state_dict() | {key: torch.tensor(value) for key, value in (buffers or {}).items()}
    card = {"name": name, "kind": resolved.kind, "params": resolved.model_dump(mode="json"),
            "feature_dim": feature_dim, "vocab_size": len(vocab), "vocab_digest": vocab.digest()}  # fmt: skip
    save_matcher(root / "models" / name, state, card)
    return root / "models" / name


@pytest.fixture(scope="module")
def repo(prepared: Path, tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny set's captions and images, test regions with boxes (the oracle's own, background regions the whole
    image), and untrained matchers of every drawn kind."""
    root = tmp_path_factory.mktemp("figures")
    shutil.copytree(prepared / "data" / "captions", root / "captions")
    (root / "raw").symlink_to(tiny_synthetic)
    oracle = RegionStore(prepared / "data" / "regions" / "test")
    images = []
    for regions in oracle:
        features = regions.features.astype(np.float32)
        boxes = np.where(features[:, -1:] > 0, [0.0, 0.0, SIZE, SIZE], features[:, -5:-1] * SIZE)  # [n, 4]
        images.append(regions.__class__(**{**vars(regions), "boxes": boxes.astype(np.float32)}))
    write_store(root / "regions" / "test", images, [], oracle.feature_dim, {"source": "oracle with boxes"})
    _save_model(root, "scan_t2i", {"kind": "scan", "direction": "t2i"})
    _save_model(root, "scan_i2t", {"kind": "scan", "direction": "i2t", "pooling": "lse"})
    _save_model(root, "uarda", {"kind": "uarda"}, {"scorer.threshold.value": 2.0})  # above any cosine: all skipped
    _save_model(root, "mvam", {"kind": "mvam", "views": 3})
    _save_model(root, "vsepp", {"kind": "vsepp"})
    clip_config = root / "itm-figures-clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    _save_model(root, "mvam_clip", {"kind": "mvam", "views": 4, "backbone": "open_clip",
                                    "clip_model": "itm-figures-clip", "clip_config": str(clip_config)})  # fmt: skip
    return root


def _inputs(root: Path) -> dict[str, Path]:
    return {"regions_dir": root / "regions", "captions_dir": root / "captions", "dataset_dir": root / "raw"}


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The matplotlib figures the module saves, kept for inspection."""
    kept: list[Any] = []
    save = Sheet.save

    def keep(sheet: Sheet, path: Path) -> None:
        kept.append(sheet.figure)
        save(sheet, path)

    monkeypatch.setattr(Sheet, "save", keep)
    return kept


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.slow
def test_attention_pairs_are_the_same_for_every_matcher_with_one_panel_per_word(repo: Path) -> None:
    t2i = attention_pairs(repo / "models" / "scan_t2i", **_inputs(repo), pairs=3, seed=4)
    i2t = attention_pairs(repo / "models" / "scan_i2t", **_inputs(repo), pairs=3, seed=4)
    assert (t2i.direction, i2t.direction) == ("t2i", "i2t") and t2i.threshold is None
    assert [p.caption_id for p in t2i.pairs] == [p.caption_id for p in i2t.pairs]
    table = read_captions(repo / "captions", "test", texts=True)
    assert [p.caption_id for p in t2i.pairs] == table.caption_ids[pick_rows(len(table), 3, 4)].tolist()
    for pair in t2i.pairs:
        assert len(pair.words) == len(tokenize(pair.caption)) and "<start>" not in pair.words
        assert pair.weights.shape == (len(pair.words), len(pair.boxes)) == (len(pair.words), 4)
        np.testing.assert_allclose(pair.weights.sum(axis=1), 1.0, atol=1e-5)  # t2i: over the regions
        assert pair.image.shape == (SIZE, SIZE, 3) and not pair.skipped.any()
    assert not np.allclose(i2t.pairs[0].weights.sum(axis=1), 1.0)  # i2t: rows are shares, not distributions


@pytest.mark.slow
def test_attention_figure_draws_the_image_and_a_panel_per_word(repo: Path, drawn: list[Any]) -> None:
    path = repo / "out" / "attention.png"
    attention_figure(repo / "models" / "scan_t2i", **_inputs(repo), path=path, pairs=2, seed=1)
    pairs = attention_pairs(repo / "models" / "scan_t2i", **_inputs(repo), pairs=2, seed=1).pairs
    titles = [axis.get_title() for axis in drawn[0].axes]
    expected = [title for pair in pairs for title in (f"image ({len(pair.boxes)} regions)", *pair.words)]
    assert titles == [*expected, ""]  # the colour bar last
    width, height = _png_size(path)
    assert width == pytest.approx(120 * drawn[0].get_figwidth(), abs=1) and height > 2 * 120 * PANEL
    attention_figure(repo / "models" / "scan_t2i", **_inputs(repo), path=repo / "out" / "one.png", pairs=1, seed=1)
    assert _png_size(repo / "out" / "one.png")[1] < height  # the figure grows with the pairs


@pytest.mark.slow
def test_skipped_words_are_marked(repo: Path, drawn: list[Any]) -> None:
    uarda = attention_pairs(repo / "models" / "uarda", **_inputs(repo), pairs=1)
    assert uarda.threshold == pytest.approx(2.0) and uarda.pairs[0].skipped.all()
    attention_figure(repo / "models" / "uarda", **_inputs(repo), path=repo / "out" / "uarda.png", pairs=1)
    word_titles = [axis.get_title() for axis in drawn[0].axes[1:-1]]
    assert word_titles == [f"{word} (skipped)" for word in uarda.pairs[0].words]


@pytest.mark.slow
def test_views_over_regions(repo: Path, drawn: list[Any]) -> None:
    panels = view_panels(repo / "models" / "mvam", **_inputs(repo), seed=4)
    first = attention_pairs(repo / "models" / "scan_t2i", **_inputs(repo), pairs=1, seed=4).pairs[0]
    assert panels.words == first.words  # the same pair as the attention figure's first
    assert panels.image_weights.shape == (3, 4) and panels.boxes is not None and panels.cosines.shape == (3,)
    assert panels.word_weights.shape == (3, len(first.words))
    np.testing.assert_allclose(panels.word_weights.sum(axis=1) + panels.special_weight, 1.0, atol=1e-5)
    views_figure(repo / "models" / "mvam", **_inputs(repo), path=repo / "out" / "views.png", seed=4)
    axes = drawn[0].axes
    titles = [f"view {view + 1}: cos {cosine:.2f}" for view, cosine in enumerate(panels.cosines)]
    assert [axis.get_title() for axis in axes[:3]] == titles
    heatmap = axes[4]  # after the views' panels and their colour bar
    assert [label.get_text() for label in heatmap.get_xticklabels()] == first.words
    assert _png_size(repo / "out" / "views.png")[0] > 500


@pytest.mark.slow
def test_views_over_vit_patches(repo: Path, drawn: list[Any]) -> None:
    panels = view_panels(repo / "models" / "mvam_clip", **_inputs(repo))
    side = TINY_CLIP["vision_cfg"]["image_size"] // TINY_CLIP["vision_cfg"]["patch_size"]
    assert panels.boxes is None and panels.image_weights.shape == (4, side, side) and panels.class_weight.size == 0
    np.testing.assert_allclose(panels.image_weights.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert panels.image.shape == (64, 64, 3)  # as the matcher sees it
    assert "a" in panels.words or "the" in panels.words  # open_clip's own tokens, decoded
    views_figure(repo / "models" / "mvam_clip", **_inputs(repo), path=repo / "out" / "clip.png")
    assert len(drawn[0].axes) == 4 + 1 + 1 + 1  # views, their colour bar, the word map and its colour bar


@pytest.mark.slow
def test_matchers_without_the_drawn_attention_are_refused(repo: Path) -> None:
    out = repo / "out" / "refused.png"
    for name in ("vsepp", "mvam"):
        with pytest.raises(ValueError, match="no word-region cross attention"):
            attention_figure(repo / "models" / name, **_inputs(repo), path=out)
    for name in ("vsepp", "scan_t2i"):
        with pytest.raises(ValueError, match="no views"):
            views_figure(repo / "models" / name, **_inputs(repo), path=out)
    assert not out.exists()


@pytest.mark.slow
def test_missing_inputs_are_user_errors(repo: Path, prepared: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(UserError, match=r"model\.pt: not found"):
        attention_figure(tmp_path / "nothing", **_inputs(repo), path=tmp_path / "a.png")
    no_boxes = _inputs(repo) | {"regions_dir": prepared / "data" / "regions"}  # the oracle's regions: boxes NaN
    with pytest.raises(UserError, match="have no boxes"):
        attention_figure(repo / "models" / "scan_t2i", **no_boxes, path=tmp_path / "a.png")
    (tmp_path / "raw").mkdir()
    shutil.copy(repo / "raw" / DATASET_JSON, tmp_path / "raw" / DATASET_JSON)  # no images/
    with pytest.raises(UserError, match="image not found"):
        attention_figure(repo / "models" / "scan_t2i", **_inputs(repo) | {"dataset_dir": tmp_path / "raw"},
                         path=tmp_path / "a.png")  # fmt: skip


def _planted_scores(root: Path) -> SplitScores:
    """Test scores where a caption in an even column scores 1 with its own image, one in an odd column 0; all other
    pairs between 0 and 0.5."""
    table = read_captions(root / "captions", "test")
    image_ids = np.unique(table.image_ids)
    caption_image = torch.from_numpy(np.searchsorted(image_ids, table.image_ids))
    scores = torch.rand(len(image_ids), len(table), generator=torch.Generator().manual_seed(0)) / 2
    even = torch.arange(len(table)) % 2 == 0
    scores[caption_image[even], torch.nonzero(even)[:, 0]] = 1.0
    scores[caption_image[~even], torch.nonzero(~even)[:, 0]] = 0.0
    return SplitScores(scores, image_ids, table.caption_ids, caption_image)


@pytest.mark.slow
def test_retrieval_figures_mark_the_ground_truth_as_the_scores_say(repo: Path, drawn: list[Any]) -> None:
    scores = _planted_scores(repo)
    t2i, i2t = repo / "out" / "t2i.png", repo / "out" / "i2t.png"
    retrieval_figures(scores, repo / "captions", repo / "raw", t2i, i2t, queries=4, top=3, seed=2, title="planted")
    columns = pick_rows(scores.scores.shape[1], 4, 2)
    image_axes = drawn[0].axes
    assert len(image_axes) == 4 * 3
    framed = [axis.spines["top"].get_edgecolor() for axis in image_axes]
    green = [tuple(colour) == pytest.approx((0x1A / 255, 0x96 / 255, 0x41 / 255, 1.0)) for colour in framed]
    for line, column in enumerate(columns):  # an even caption finds its image first; an odd one not in the top 3
        assert green[3 * line : 3 * line + 3] == ([True, False, False] if column % 2 == 0 else [False] * 3)
    assert sum("✓" in axis.get_title() for axis in image_axes) == sum(column % 2 == 0 for column in columns)
    rows = pick_rows(scores.scores.shape[0], 4, 2)
    own_even = [int(((scores.caption_image == row) & (torch.arange(scores.scores.shape[1]) % 2 == 0)).sum())
                for row in rows]  # fmt: skip
    ticked = [text.get_text() for text in drawn[1].texts if text.get_text().startswith("#")]
    assert len(ticked) == 4 * 3
    expected = [rank <= min(n, 3) for n in own_even for rank in (1, 2, 3)]
    assert ["✓" in text for text in ticked] == expected
    assert _png_size(t2i)[0] > _png_size(t2i)[1] / 2 and _png_size(i2t)[1] > 300
    assert any("planted: text → image" in text.get_text() for text in drawn[0].texts)
