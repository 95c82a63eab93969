"""`itm search`: rankings equal the evaluation's, the shortlist's cheap score, image queries in and outside the
index (detector and pixel paths), the contact sheet, and one-line errors with exit status 2."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pydantic import TypeAdapter

from itm import commands
from itm.config import DetectorArchitecture, MatcherParams
from itm.data.captions import read_concept_labels
from itm.data.loaders import read_captions
from itm.data.records import read_dataset_json
from itm.data.regions import write_store
from itm.data.splits import DataFolders
from itm.data.text import tokenize
from itm.data.vocab import load_vocab
from itm.detect.extract import Selection, regions_of_batch
from itm.detect.images import load_bgr
from itm.detect.saved import save_detector
from itm.errors import UserError
from itm.evaluate.run import evaluate_matcher
from itm.evaluate.score_file import SplitScores
from itm.models import MatcherInputs, build_matcher
from itm.models.base import Encoded
from itm.models.encoders import l2norm
from itm.models.saved import save_matcher
from itm.search.engine import search_image, search_text
from itm.search.index import SearchIndex, open_index
from itm.search.options import Options
from itm.search.queries import query_concepts, text_query
from itm.search.shortlist import hard_attention_scores, hard_direction, shortlist_rank
from itm.seeds import seed_path
from itm.tracking import start_run
from stages import train
from tests.conftest import TINY_DETECTOR, TINY_SYNTHETIC
from tests.test_convert import random_detector
from tests.test_matcher_stages import prepared  # noqa: F401  (the module fixture: params, captions, oracle regions)
from tests.test_mvam import TINY_CLIP

CPU = torch.device("cpu")
N_IMAGES = TINY_SYNTHETIC["splits"]["test"]
N_CAPTIONS = 5 * N_IMAGES
TRAINED = ("scan_t2i_avg", "scan_i2t_lse", "vsepp", "cvse")
KNOWN = "trained models in models: " + ", ".join(f"{name}/seed0" for name in sorted(TRAINED))


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(prepared: Path, tiny_synthetic: Path) -> Path:  # noqa: F811
    """`prepared` with the dataset at data/raw/synthetic (as params.yaml names it) and tiny trained matchers."""
    raw = prepared / "data" / "raw" / "synthetic"
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.symlink_to(tiny_synthetic, target_is_directory=True)
    for name in TRAINED:  # seed 0, the first of train.seeds, as train@<name>-0 trains it
        if not (seed_path(prepared / "models", name, 0) / "model.pt").is_file():
            train.main(["--params", str(prepared / "params.yaml"), "--matcher", name, "--seed", "0",
                        "--regions", str(prepared / "data/regions"), "--captions", str(prepared / "data/captions"),
                        "--out", str(seed_path(prepared / "models", name, 0)),
                        "--work", str(seed_path(prepared / "data/work/train", name, 0)), "--workers", "0"])  # fmt: skip
    return prepared


def _index(repo: Path, name: str, regions: Path | None = None, models: Path | None = None) -> SearchIndex:
    data = DataFolders(regions or repo / "data/regions", repo / "data/captions", repo / "data/raw/synthetic")
    return open_index(seed_path(models or repo / "models", name, 0), data, "test", device=CPU, batch_size=16)


@pytest.fixture(scope="module")
def full_scores(repo: Path) -> dict[str, SplitScores]:
    """The evaluation's test matrix of every trained matcher."""
    matrices = {}
    for name in TRAINED:
        path = seed_path(repo / "data/scores", name, 0, ".npz")
        data = DataFolders(repo / "data/regions", repo / "data/captions")
        evaluation = evaluate_matcher(seed_path(repo / "models", name, 0), data, "synthetic", scores_path=path,
                                      device=CPU, batch_size=16, precision="fp32")  # fmt: skip
        # the metrics (what the metrics file holds) carry no time: the times are measured apart
        assert not [key for key in evaluation.metrics if "seconds" in key]
        assert evaluation.timing.keys() == {"test/seconds_per_query", "test/score_seconds", "test/encode_seconds"}
        assert all(seconds > 0 for seconds in evaluation.timing.values())
        matrices[name] = SplitScores.load(path)
    return matrices


def _test_texts(repo: Path) -> tuple[list[int], list[int], list[str]]:
    table = read_captions(repo / "data/captions", "test", texts=True)
    return table.caption_ids.tolist(), table.image_ids.tolist(), table.texts


def _assert_ranking(ids: list[int], scores: list[float], column: torch.Tensor, gallery_ids: np.ndarray) -> None:
    """`ids`/`scores` are the best items of `column` (the evaluation's scores over `gallery_ids`), best first: the
    same scores at the same items, and nothing left out scores higher (up to rounding)."""
    position = {int(item): row for row, item in enumerate(gallery_ids)}
    rows = [position[item] for item in ids]
    assert torch.allclose(torch.tensor(scores), column[rows], atol=1e-5)
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(scores))
    rest = torch.ones(len(column), dtype=torch.bool)
    rest[rows] = False
    assert float(column[rest].max()) <= min(scores) + 1e-5


# --- the cheap score ------------------------------------------------------------------------------------------------


def _random_encoded(n: int, length: int, dim: int, seed: int) -> Encoded:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    mask = torch.arange(length)[None] < lengths[:, None]  # [n, length]
    local = l2norm(torch.randn(n, length, dim, generator=generator)).masked_fill(~mask[..., None], 0)
    return Encoded(local, mask, l2norm(torch.randn(n, dim, generator=generator)))


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_hard_attention_score_equals_a_direct_loop(direction: str) -> None:
    """SCAN with λ1 → ∞: each query fragment takes its most similar context fragment; AVG over the query side."""
    images, captions = _random_encoded(5, 6, 8, seed=0), _random_encoded(7, 9, 8, seed=1)
    expected = torch.zeros(5, 7)
    for k in range(5):
        regions = images.local[k][images.mask[k]]  # [R_k, E]
        for c in range(7):
            words = captions.local[c][captions.mask[c]]  # [L_c, E]
            cos = F.cosine_similarity(regions[:, None], words[None], dim=-1)  # [R_k, L_c]
            if direction == "t2i":
                expected[k, c] = torch.stack([cos[:, j].max() for j in range(len(words))]).mean()
            else:
                expected[k, c] = torch.stack([cos[i, :].max() for i in range(len(regions))]).mean()
    for max_elements in (1, 100, 2**24):  # one caption per chunk, a few, all at once
        got = hard_attention_scores(images, captions, direction, max_elements=max_elements)
        assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.slow
def test_the_hard_score_lets_the_words_of_a_text_query_attend(repo: Path) -> None:
    """Text queries: words attend (t2i) whatever the matcher's direction; image queries: the matcher's direction
    (the better shortlists measured by bench/search_shortlist.py)."""
    t2i, i2t = _index(repo, "scan_t2i_avg").matcher, _index(repo, "scan_i2t_lse").matcher
    assert [hard_direction(m, "text") for m in (t2i, i2t)] == ["t2i", "t2i"]
    assert [hard_direction(m, "image") for m in (t2i, i2t)] == ["t2i", "i2t"]


def test_shortlist_rank_rescores_only_the_shortlist_and_keeps_gallery_order_on_ties() -> None:
    full = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.7])
    cheap = torch.tensor([0.0, 1.0, 0.2, 0.9, 0.8, 0.1])  # disagrees with the full score on items 4 and 5
    seen = []

    def score_rows(rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows.tolist())
        return full[rows]

    rows, scores = shortlist_rank(cheap, score_rows, 6, shortlist=3, top=2)
    assert seen == [[1, 3, 4]] and rows.tolist() == [1, 3] and scores.tolist() == pytest.approx([0.9, 0.9])
    rows, _ = shortlist_rank(cheap, score_rows, 6, shortlist=1, top=4)  # the shortlist holds at least `top`
    assert seen[-1] == [1, 2, 3, 4] and rows.tolist() == [1, 3, 2, 4]
    whole, _ = shortlist_rank(None, score_rows, 6, shortlist=3, top=6)
    assert whole.tolist() == [1, 3, 5, 2, 4, 0]  # ties (items 1 and 3) in gallery order


# --- text queries ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_a_caption_as_query_ranks_like_the_evaluation(repo: Path, full_scores: dict, name: str) -> None:
    """The query is encoded as the stored caption is (same token ids, same concepts), and the full ranking is the
    evaluation's column for that caption."""
    index = _index(repo, name)
    test = full_scores[name]
    _, _, texts = _test_texts(repo)
    gallery = index.gallery_captions()
    for column in (0, 7, 42, N_CAPTIONS - 1):
        encoded = text_query(index, texts[column])
        assert torch.allclose(encoded.local[0], gallery.local[column, : encoded.local.shape[1]], atol=1e-6)
        result = search_text(index, texts[column], Options(top=10, shortlist=0))
        assert result.scored == N_IMAGES and [h.rank for h in result.hits] == list(range(1, 11))
        _assert_ranking([h.item_id for h in result.hits], [h.score for h in result.hits],
                        test.scores[:, column], test.image_ids)  # fmt: skip
        assert all(h.path is not None and h.path.is_file() for h in result.hits)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scan_t2i_avg", "scan_i2t_lse"])
@pytest.mark.parametrize("by", ["hard", "pooled"])
def test_a_shortlist_of_the_whole_gallery_is_the_full_ranking(repo: Path, name: str, by: str) -> None:
    index = _index(repo, name)
    _, _, texts = _test_texts(repo)
    for text in (texts[3], "a red circle to the left of a blue square"):
        full = search_text(index, text, Options(top=N_IMAGES, shortlist=0))
        for shortlist in (N_IMAGES, N_IMAGES + 5):
            listed = search_text(index, text, Options(top=N_IMAGES, shortlist=shortlist, shortlist_by=by))
            assert listed.hits == full.hits
        short = search_text(index, text, Options(top=3, shortlist=8, shortlist_by=by))
        assert short.scored == 8
        exact = {h.item_id: h.score for h in full.hits}
        assert all(h.score == pytest.approx(exact[h.item_id], abs=1e-6) for h in short.hits)  # full scores


@pytest.mark.slow
def test_query_concepts_are_the_tokenize_labels(repo: Path) -> None:
    index = _index(repo, "cvse")
    labels = read_concept_labels(repo / "data/captions", "test")
    caption_ids, _, texts = _test_texts(repo)
    for caption_id, text in zip(caption_ids, texts, strict=True):
        assert query_concepts(tokenize(text), index.concept_words) == labels[caption_id]


@pytest.mark.slow
def test_unknown_words_are_named(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = _index(repo, "scan_t2i_avg")
    with caplog.at_level(logging.WARNING, logger="itm.search"):
        result = search_text(index, "a red zyzzyva circle", Options(top=2))
    assert len(result.hits) == 2 and "zyzzyva" in caplog.text
    with pytest.raises(UserError, match=r"none of the query's words is in the vocabulary .*: zyzzyva, quux"):
        search_text(index, "zyzzyva quux", Options())


# --- image queries --------------------------------------------------------------------------------------------------


def _test_image(tiny_synthetic: Path, position: int = 0) -> tuple[int, Path]:
    record = [r for r in read_dataset_json(tiny_synthetic / "dataset.json") if r.split == "test"][position]
    return record.imgid, tiny_synthetic / "images" / record.filename


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scan_t2i_avg", "vsepp"])
def test_an_indexed_image_finds_its_own_captions_marked(
    repo: Path, tiny_synthetic: Path, full_scores: dict, name: str
) -> None:
    index = _index(repo, name)
    image_id, path = _test_image(tiny_synthetic, 4)
    via = repo / "data/raw/synthetic/images/.." / "images" / path.name  # another spelling of the same file
    result = search_image(index, via, Options(top=N_CAPTIONS, shortlist=0), repo / "models/detector")
    assert result.query_image_id == image_id and result.gallery == N_CAPTIONS
    _, caption_images, _ = _test_texts(repo)
    own = {h.item_id for h in result.hits if h.matches}
    test = full_scores[name]
    assert own == {int(c) for c, i in zip(test.caption_ids, caption_images, strict=True) if i == image_id}
    row = list(test.image_ids).index(image_id)
    _assert_ranking([h.item_id for h in result.hits[:10]], [h.score for h in result.hits[:10]],
                    test.scores[row], test.caption_ids)  # fmt: skip


@pytest.mark.slow
def test_an_oracle_store_refuses_images_outside_the_index(repo: Path, tiny_synthetic: Path, tmp_path: Path) -> None:
    index = _index(repo, "scan_t2i_avg")
    _, path = _test_image(tiny_synthetic)
    copy = shutil.copy(path, tmp_path / "copy.jpg")
    with pytest.raises(UserError, match="regions come from 'oracle', not from a detector"):
        search_image(index, Path(copy), Options(), repo / "models/detector")


@pytest.fixture(scope="module")
def detected(repo: Path, tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny detector, the test split's regions extracted with it, and a SCAN t-i matcher over them."""
    root = tmp_path_factory.mktemp("detected")
    architecture = DetectorArchitecture(**TINY_DETECTOR)
    model = random_detector(architecture, 7, 5, seed=0)
    card = save_detector(root / "detector", model, architecture, None, None, source={"kind": "random"})
    selection = Selection(min_boxes=3, max_boxes=10)
    records = [r for r in read_dataset_json(tiny_synthetic / "dataset.json") if r.split == "test"]
    with torch.no_grad():
        images = [
            regions_of_batch(model, [load_bgr(tiny_synthetic / "images" / r.filename)], [r.imgid], selection, "fp32")[0]
            for r in records
        ]
    info = {"source": "detector", "detector_sha256": card["sha256"], "selection": dataclasses.asdict(selection),
            "precision": "fp32"}  # fmt: skip
    write_store(root / "regions" / "test", images, [], architecture.feature_dim, info)
    vocab = load_vocab(repo / "data/captions/vocab.json")
    _save(root / "models", "scan", {"kind": "scan", "embed_dim": 16, "word_dim": 8}, architecture.feature_dim, vocab)
    return root


def _save(models: Path, name: str, block: dict, feature_dim: int, vocab: object) -> Path:
    """An untrained matcher saved as train@<name>-0 saves it: models/<name>/seed0; returns that folder."""
    torch.manual_seed(0)
    params = TypeAdapter(MatcherParams).validate_python(block)
    matcher = build_matcher(params, MatcherInputs(feature_dim, len(vocab)))
    card = {"name": name, "kind": params.kind, "params": params.model_dump(mode="json"), "seed": 0,
            "feature_dim": feature_dim, "vocab_size": len(vocab), "vocab_digest": vocab.digest()}  # fmt: skip
    save_matcher(seed_path(models, name, 0), matcher.state_dict(), card)
    return seed_path(models, name, 0)


@pytest.mark.slow
def test_an_image_outside_the_index_goes_through_the_detector(
    repo: Path, detected: Path, tiny_synthetic: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy of a test image elsewhere is outside the index: the detector describes it as the regions stage did,
    so it ranks the captions exactly as the indexed image does, without marks; a changed image ranks otherwise."""
    index = _index(repo, "scan", regions=detected / "regions", models=detected / "models")
    detector = detected / "detector"
    image_id, path = _test_image(tiny_synthetic, 2)
    options = Options(top=12)
    indexed = search_image(index, path, options, detector)
    copy = Path(shutil.copy(path, tmp_path / "copy.jpg"))
    with caplog.at_level(logging.INFO, logger="itm.search"):
        outside = search_image(index, copy, options, detector)
    assert "not in the test index: the detector" in caplog.text
    assert indexed.query_image_id == image_id and outside.query_image_id is None
    assert [(h.item_id, h.score) for h in outside.hits] == [(h.item_id, h.score) for h in indexed.hits]
    assert any(h.matches for h in indexed.hits) and not any(h.matches for h in outside.hits)

    with Image.open(path) as image:
        ImageOps.mirror(image).save(tmp_path / "mirrored.png")
    mirrored = search_image(index, tmp_path / "mirrored.png", options, detector)
    assert [h.score for h in mirrored.hits] != [h.score for h in indexed.hits]

    index.store.info["detector_sha256"] = "0" * 64
    with pytest.raises(UserError, match="is not the one that made"):
        search_image(index, copy, options, detector)


@pytest.mark.slow
def test_a_pixel_matcher_prepares_an_outside_image_as_its_store(
    repo: Path, tiny_synthetic: Path, tmp_path: Path
) -> None:
    """MVAM over open_clip: an indexed image is read through PixelStore, a copy elsewhere through the same
    preparation, so both rank the captions alike; its own tokenizer encodes a text query."""
    config = tmp_path / "itm-search-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    block = {"kind": "mvam", "embed_dim": 32, "views": 4, "backbone": "open_clip", "clip_model": "itm-search-clip",
             "clip_config": str(config)}  # fmt: skip
    model_dir = _save(tmp_path / "models", "mvam_clip", block, 6, load_vocab(repo / "data/captions/vocab.json"))
    data = DataFolders(repo / "data/regions", repo / "data/captions", repo / "data/raw/synthetic")
    index = open_index(model_dir, data, "test", device=CPU, batch_size=16)
    assert index.matcher.pixels is not None
    image_id, path = _test_image(tiny_synthetic, 1)
    indexed = search_image(index, path, Options(top=5), tmp_path / "no-detector")
    outside = search_image(index, Path(shutil.copy(path, tmp_path / "copy.jpg")), Options(top=5), tmp_path)
    assert indexed.query_image_id == image_id and outside.query_image_id is None
    assert [h.item_id for h in outside.hits] == [h.item_id for h in indexed.hits]
    assert [h.score for h in outside.hits] == pytest.approx([h.score for h in indexed.hits], abs=1e-6)
    assert len(search_text(index, "a red circle", Options(top=3)).hits) == 3


# --- the command ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_command_prints_a_table_and_writes_sheets(
    repo: Path, tiny_synthetic: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """Run from the repository folder with the default paths (dataset and seed from params.yaml)."""
    monkeypatch.chdir(repo)
    _, _, texts = _test_texts(repo)
    commands.main(["search", "--model", "models/scan_t2i_avg", "--text", texts[0], "--top", "4",
                   "--sheet", str(tmp_path / "text.png")])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# scan_t2i_avg: top 4 of 30 test images") and out[1].split() == [
        "rank", "score", "image_id", "file"
    ]  # fmt: skip
    assert [line.split()[0] for line in out[2:]] == ["1", "2", "3", "4"]
    assert all(line.split()[-1].startswith("data/raw/synthetic/images/") for line in out[2:])

    image_id, path = _test_image(tiny_synthetic, 0)
    commands.main(["search", "--model", "models/vsepp/seed0", "--image", str(path), "--top", str(N_CAPTIONS)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# vsepp: top {N_CAPTIONS} of {N_CAPTIONS} test captions for image {image_id} (all")
    assert len(out) == 2 + N_CAPTIONS and sum("✓" in line for line in out[2:]) == 5  # its five captions
    commands.main(["search", "--model", "models/scan_i2t_lse", "--seed", "0", "--image", str(path), "--shortlist",
                   "20", "--sheet", str(tmp_path / "image.png")])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# scan_i2t_lse: top 5 of 150 test captions for image {image_id} (20 shortlisted")
    for sheet in ("text.png", "image.png"):
        with Image.open(tmp_path / sheet) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200


@pytest.mark.slow
def test_the_command_takes_an_mlflow_model_uri(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """A model logged by its train run (`models:/<id>`, `runs:/<run id>/model`) ranks as its folder does."""
    monkeypatch.chdir(repo)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    folder = repo / "models" / "scan_t2i_avg" / "seed0"
    with start_run("train@scan_t2i_avg-0") as tracker:
        tracker.log_artifact(folder / "model.pt", "model")
        tracker.log_artifact(folder / "card.json", "model")
        model_id = tracker.log_model(folder, "scan_t2i_avg", params={}, metrics={}, tags={})
    _, _, texts = _test_texts(repo)
    tables = []
    for model in ("models/scan_t2i_avg/seed0", f"models:/{model_id}", f"runs:/{tracker.run_id}/model"):
        commands.main(["search", "--model", model, "--text", texts[0], "--top", "4"])
        tables.append(capsys.readouterr().out.splitlines()[1:])  # the header's time differs
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 5
    with pytest.raises(SystemExit) as stopped:
        commands.main(["search", "--model", "models:/m-unknown", "--text", texts[0]])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "models:/m-unknown: cannot download it from sqlite:///" in error


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "models/nope", "--text", "a circle"], f"models/nope: no such model folder ({KNOWN})"),
        (["--model", "models/nope/seed0", "--text", "a circle"], f"models/nope/seed0: no such model folder ({KNOWN})"),
        (["--model", "models/vsepp", "--seed", "7", "--text", "a"],
         "models/vsepp/seed7: no such model folder (trained models in models/vsepp: seed0)"),
        (["--model", "models/vsepp/seed0", "--seed", "0", "--text", "a"],
         "--seed picks a model of a matcher's folder, but models/vsepp/seed0 is a model folder"),
        (["--model", "models/scan_t2i_avg", "--text", ""], "--text is empty"),
        (["--model", "models/scan_t2i_avg", "--text", "?!"], "the query '?!' has no words"),
        (["--model", "models/scan_t2i_avg", "--text", "zyzzyva quux"], "vocabulary (63 words): zyzzyva, quux"),
        (["--model", "models/scan_t2i_avg", "--image", "missing.jpg"], "missing.jpg: image not found"),
        (["--model", "models/scan_t2i_avg", "--image", "params.yaml"], "params.yaml: cannot read the image"),
        (["--model", "models/scan_t2i_avg", "--text", "a circle", "--top", "0"], "--top must be at least 1"),
        (["--model", "models/scan_t2i_avg", "--text", "a", "--image", "x.jpg"], "either --text or --image"),
        (["--model", "models/scan_t2i_avg"], "either --text or --image"),
        (["--model", "models/scan_t2i_avg", "--text", "a", "--top", "many"], "invalid int value: 'many'"),
        (["--model", "models/scan_t2i_avg", "--text", "a", "--split", "dev"], "invalid choice: 'dev'"),
        (["--text", "a circle"], "the following arguments are required: --model"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_and_exit_2(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as stopped:
        commands.main(["search", *args])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


@pytest.mark.slow
def test_the_console_script(repo: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("itm")
    assert script.is_file(), f"{script}: the console script of pyproject's [project.scripts] is not installed"
    done = subprocess.run([str(script), "search", "--model", "models/nope", "--text", "a circle"], cwd=repo,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: models/nope: no such model folder"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")  # outside the index: its decoding fails before anything is logged
    done = subprocess.run([str(script), "search", "--model", "models/vsepp", "--image", str(broken)], cwd=repo,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith(f"error: {broken}: cannot read the image"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([str(script), "search", "--model", "models/vsepp", "--text", "a red circle", "--top", "2"],
                          cwd=repo, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 4  # header, column names, two results
