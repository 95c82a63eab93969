"""Flickr30K with precomputed features and no images: the download stage fetches captions and splits only, the
regions come from the release, and the comparison's figures that need pixels leave a note in their place."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import TypeAdapter

from itm.compare import Examples, Inputs, draw_figures
from itm.config import MatcherParams
from itm.data.captions import VOCAB_FILE
from itm.data.loaders import read_captions
from itm.data.records import DATASET_JSON, IMAGES_DIR, read_dataset_json
from itm.data.regions import RegionStore
from itm.data.vocab import load_vocab
from itm.errors import UserError
from itm.evaluate.score_file import SplitScores
from itm.figures.canvas import Sheet
from itm.models import MatcherInputs, build_matcher
from itm.models.saved import save_matcher
from itm.report import Entry, comparison_table
from itm.seeds import seed_path
from stages import download, regions, tokenize
from tests.conftest import REPO
from tests.http_server import http_server_fixture  # noqa: F401 - provides the `http_server` fixture

SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
WORDS = ["dog", "cat", "red", "ball", "grass", "runs", "sits", "small"]
DIM = 8


def _images() -> list[dict[str, Any]]:
    """Karpathy's dataset_flickr30k.json entries: 5 captions each from a small vocabulary."""
    images = []
    for imgid, split in enumerate(SPLITS):
        sentences = [
            {"raw": f"A {WORDS[(imgid + k) % 8]} {WORDS[(imgid * 3 + k) % 8]} on the {WORDS[k % 8]}.",
             "tokens": [], "imgid": imgid, "sentid": imgid * 5 + k}
            for k in range(5)
        ]  # fmt: skip
        images.append({"filename": f"{1000 + imgid}.jpg", "imgid": imgid, "split": split, "sentences": sentences})
    return images


def _split_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("dataset_flickr30k.json", json.dumps({"dataset": "flickr30k", "images": _images()}))
    return buffer.getvalue()


def _write_vse_release(root: Path) -> None:
    """VSE∞'s data/f30k/: precomp/ with the three files of each split, id_mapping.json beside it."""
    precomp = root / "precomp"
    precomp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = _images()
    for ours, theirs in (("train", "train"), ("val", "dev"), ("test", "test")):
        split = [image for image in images if image["split"] == ours]
        np.save(precomp / f"{theirs}_ims.npy", rng.normal(size=(len(split), 36, DIM)).astype(np.float32))
        (precomp / f"{theirs}_ids.txt").write_text("".join(f"{image['imgid']}\n" for image in split))
        captions = [sentence["raw"] for image in split for sentence in image["sentences"]]
        (precomp / f"{theirs}_caps.txt").write_text("".join(f"{caption}\n" for caption in captions))
    (root / "id_mapping.json").write_text(json.dumps({str(image["imgid"]): image["filename"] for image in images}))


@pytest.fixture
def flickr(http_server, tmp_path: Path):
    """params.yaml for Flickr30K served locally without an image archive, regions from VSE∞'s release layout."""
    data = _split_zip()
    url = http_server.add("/caption_datasets.zip", data)
    _write_vse_release(tmp_path / "vse" / "data" / "f30k")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["dataset"] = "flickr30k"
    raw["datasets"]["flickr30k"]["karpathy"] |= {"source": url, "size": len(data), "md5": hashlib.md5(data).hexdigest()}
    raw["datasets"]["flickr30k"]["images"][0]["source"] = None
    raw["detector"]["weights"] = "none"
    raw["regions"] |= {"source": "precomp", "precomp_dir": str(tmp_path / "vse" / "data" / "f30k")}
    raw["tokenize"]["min_count"] = 1

    def params(change=None) -> Path:
        changed = copy.deepcopy(raw)
        if change:
            change(changed)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(changed))
        return path

    return params, http_server


def _download(params: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data" / "raw" / "flickr30k"
    download.main(["--params", str(params), "--out", str(out), "--cache", str(tmp_path / "downloads")])
    return out


def test_precomputed_regions_download_captions_and_splits_only(flickr, tmp_path: Path, caplog) -> None:
    params, server = flickr
    with caplog.at_level(logging.INFO, logger="itm.data.karpathy"):
        out = _download(params(), tmp_path)
    assert sorted(path.name for path in out.iterdir()) == [DATASET_JSON]
    records = read_dataset_json(out / DATASET_JSON)
    assert [record.split for record in records] == SPLITS and all(len(r.sentences) == 5 for r in records)
    assert [request.path for request in server.requests] == ["/caption_datasets.zip"]
    assert any("fetching captions and splits only" in record.getMessage() for record in caplog.records)


def test_without_precomputed_regions_the_archive_is_still_required(flickr, tmp_path: Path) -> None:
    params, server = flickr
    detector = params(lambda raw: raw["regions"].update(source="detector"))
    with pytest.raises(UserError) as raised:
        _download(detector, tmp_path)
    message = str(raised.value)
    assert message.startswith("params.yaml: datasets.flickr30k.images[0].source is not set")
    assert "forms.illinois.edu" in message and "regions.source: precomp" in message and "\n" not in message
    assert server.requests == [] and not (tmp_path / "data").exists()


def test_a_matcher_that_reads_pixels_needs_the_images(flickr, tmp_path: Path) -> None:
    params, server = flickr

    def clip(raw: dict) -> None:
        raw["matchers"]["mvam"]["backbone"] = "open_clip"

    with pytest.raises(UserError) as raised:
        _download(params(clip), tmp_path)
    message = str(raised.value)
    assert message.startswith("params.yaml: matchers.mvam reads the images themselves (backbone: open_clip), but ")
    assert "datasets.flickr30k.images[0].source is not set" in message and "\n" not in message
    assert server.requests == []


def test_some_archives_set_and_others_not_is_refused_even_with_precomputed_regions(flickr, tmp_path: Path) -> None:
    params, _ = flickr

    def two_archives(raw: dict) -> None:
        archive = raw["datasets"]["flickr30k"]["images"][0]
        raw["datasets"]["flickr30k"]["images"] = [archive | {"source": str(tmp_path / "a.tar")}, archive]

    with pytest.raises(UserError, match=r"images\[1\]\.source is not set: .*unset every images\[\]\.source"):
        _download(params(two_archives), tmp_path)


def test_the_detector_refuses_a_captions_only_dataset(flickr, tmp_path: Path) -> None:
    params, _ = flickr
    dataset = _download(params(), tmp_path)
    detector = params(lambda raw: raw["regions"].update(source="detector"))
    with pytest.raises(UserError, match=r"flickr30k: no images/ to run the detector on .*images\[\]\.source"):
        regions.main(["--params", str(detector), "--dataset", str(dataset), "--detector", str(tmp_path / "detector"),
                      "--out", str(tmp_path / "regions"), "--metrics", str(tmp_path / "regions.json")])  # fmt: skip
    assert not (tmp_path / "regions").exists()


# The comparison's figures --------------------------------------------------------------------------------------


def _pipeline(params: Path, tmp_path: Path) -> Path:
    """download (captions only), tokenize and regions (VSE∞'s release) into tmp_path/data."""
    dataset = _download(params, tmp_path)
    data = tmp_path / "data"
    tokenize.main(["--params", str(params), "--dataset-json", str(dataset / DATASET_JSON),
                   "--out", str(data / "captions")])  # fmt: skip
    regions.main(["--params", str(params), "--dataset", str(dataset), "--detector", str(tmp_path / "detector"),
                  "--out", str(data / "regions"), "--metrics", str(tmp_path / "regions.json")])  # fmt: skip
    return dataset


def _save_models(data: Path, models: Path) -> list[Entry]:
    """Untrained matchers of each figure family, saved as train@<name>-0 and evaluate@<name>-0 save them (model and
    test scores); the entries of the comparison, an ensemble last."""
    vocab = load_vocab(data / "captions" / VOCAB_FILE)
    table = read_captions(data / "captions", "test")
    image_ids = np.unique(table.image_ids)
    entries = []
    metrics = {f"test/{side}_r{k}": 10.0 * k for side in ("i2t", "t2i") for k in (1, 5, 10)} | {"test/rsum": 96.0}
    for name, kind in (("vsepp", "vsepp"), ("scan", "scan"), ("mvam", "mvam")):
        views = {"views": 4} if kind == "mvam" else {}  # views of 4 dimensions (of 1, every score would be the same)
        resolved = TypeAdapter(MatcherParams).validate_python({"kind": kind, "embed_dim": 16, "word_dim": 8, **views})
        torch.manual_seed(0)
        matcher = build_matcher(resolved, MatcherInputs(DIM, len(vocab)))
        card = {"name": name, "kind": kind, "params": resolved.model_dump(mode="json"), "feature_dim": DIM,
                "vocab_size": len(vocab), "vocab_digest": vocab.digest()}  # fmt: skip
        save_matcher(seed_path(models, name, 0), matcher.state_dict(), card)
        scores = torch.rand(len(image_ids), len(table), generator=torch.Generator().manual_seed(len(entries)))
        caption_image = torch.from_numpy(np.searchsorted(image_ids, table.image_ids))
        SplitScores(scores, image_ids, table.caption_ids, caption_image).save(
            seed_path(data / "scores", name, 0, ".npz")
        )
        entries.append(Entry(name, "single", kind, metrics, 10, seed_path(models, name, 0)))
    return [*entries, Entry("ensemble", "ensemble", "ensemble", metrics, 30, members=("vsepp", "scan"))]


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The texts of every figure saved, by file name."""
    texts: dict[str, list[str]] = {}
    save = Sheet.save

    def keep(sheet: Sheet, path: Path) -> None:
        texts[path.name] = [text.get_text() for text in sheet.figure.texts]
        save(sheet, path)

    monkeypatch.setattr(Sheet, "save", keep)
    return texts


@pytest.mark.slow
def test_figures_that_need_pixels_leave_a_note_in_their_place(flickr, tmp_path: Path, notes, caplog) -> None:
    params, _ = flickr
    dataset = _pipeline(params(), tmp_path)
    assert RegionStore(tmp_path / "data" / "regions" / "test").info["layout"] == "vse_infty"
    data, models = tmp_path / "data", tmp_path / "models"
    entries = _save_models(data, models)
    inputs = Inputs(tmp_path / "metrics", models, data / "scores", data / "regions", data / "captions", dataset)
    folder = tmp_path / "figures"
    with caplog.at_level(logging.WARNING, logger="itm.compare"):
        drawn = draw_figures(inputs, entries, comparison_table(entries), folder, Examples(count=2, top=3))

    skipped = ["attention_scan.png", "views_mvam.png"] + [
        f"retrieval_{direction}_{entry.name}.png" for entry in entries for direction in ("t2i", "i2t")
    ]
    assert sorted(path.name for path in drawn) == sorted(["recall_bars_test.png", *skipped])
    assert sorted(path.name for path in folder.iterdir()) == sorted(path.name for path in drawn)
    for name in skipped:
        heading, reason = notes[name]
        assert heading == f"{Path(name).stem}: not drawn"
        expected = f"{dataset} has no images/: the download stage fetched captions and splits only"
        assert "".join(reason.split()).startswith("".join(expected.split()))  # wrapped, also at hyphens
        assert "datasets.flickr30k.images[].source" in " ".join(reason.split())
    assert "recall_bars_test.png" not in notes  # drawn by report.py, not a note
    warnings = [record.getMessage() for record in caplog.records if record.name == "itm.compare"]
    assert len(warnings) == 1 and warnings[0].startswith("figures that need the images are not drawn")


@pytest.mark.slow
def test_with_images_but_precomputed_regions_only_region_attention_is_a_note(flickr, tmp_path: Path, notes) -> None:
    params, _ = flickr
    dataset = _pipeline(params(), tmp_path)
    for record in read_dataset_json(dataset / DATASET_JSON):  # as if the archive had been set
        (dataset / IMAGES_DIR).mkdir(exist_ok=True)
        Image.new("RGB", (12, 8), (record.imgid * 20, 80, 160)).save(dataset / IMAGES_DIR / record.filename)
    data, models = tmp_path / "data", tmp_path / "models"
    entries = _save_models(data, models)
    inputs = Inputs(tmp_path / "metrics", models, data / "scores", data / "regions", data / "captions", dataset)
    draw_figures(inputs, entries, comparison_table(entries), tmp_path / "figures", Examples(count=2, top=3))

    for name in ("attention_scan.png", "views_mvam.png"):
        assert notes[name][0] == f"{Path(name).stem}: not drawn"
        assert notes[name][1].replace("\n", " ").startswith("the test regions have no boxes")
    assert any("text → image" in text for text in notes["retrieval_t2i_scan.png"])  # a real retrieval figure
