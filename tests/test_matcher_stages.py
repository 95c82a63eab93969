"""The `train@`, `evaluate@` and `ensemble@` stages on a tiny synthetic profile, as DVC calls them.

Region features here are an oracle (one region per ground-truth object: its shape, colour and size one-hot plus its
box), so the stages are exercised without training a detector, and a matcher can actually learn to retrieve.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from itm.data.records import read_dataset_json
from itm.data.regions import ImageRegions, write_store
from itm.errors import UserError
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.score_file import SplitScores
from itm.models.saved import load_matcher
from itm.train import loop
from itm.train.loop import CHECKPOINT
from stages import ensemble, evaluate, tokenize, train
from tests.conftest import REPO, TINY_SYNTHETIC
from tests.test_mvam import TINY_CLIP

TINY_MATCHER = {"embed_dim": 32, "word_dim": 16}


def _oracle_features(objects: dict, image_size: int, classes: list[str], attributes: list[str]) -> np.ndarray:
    """[max_objects, D]: per object its class one-hot, attribute multi-hot and box (x1, y1, x2, y2) / image size;
    the rows after the image's objects are background regions (last feature 1), so every image has the same count,
    as SCAN's 36 regions."""
    n = len(objects["class"])
    features = np.zeros((TINY_SYNTHETIC["max_objects"], len(classes) + len(attributes) + 5), dtype=np.float32)
    for row in range(n):
        features[row, classes.index(objects["class"][row])] = 1.0
        for attribute in objects["attributes"][row]:
            features[row, len(classes) + attributes.index(attribute)] = 1.0
        box = [objects[key][row] for key in ("x1", "y1", "x2", "y2")]
        features[row, -5:-1] = np.asarray(box) / image_size
    features[n:, -1] = 1.0
    return features


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> Path:
    """A folder with params.yaml (tiny matchers), data/captions and oracle data/regions (one region per object)."""
    root = tmp_path_factory.mktemp("matchers")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["synthetic"] = {"kind": "synthetic", **copy.deepcopy(TINY_SYNTHETIC)}
    raw["tokenize"]["min_count"] = 1
    for block in raw["matchers"].values():
        block |= TINY_MATCHER | {"epochs": None}
    raw["matchers"]["mh_cvse"] |= {"epochs": 3, "heads": 4}  # a third epoch: the first with new DWA weights
    clip_config = root / "itm-stage-clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    raw["matchers"]["mvam_clip"] = raw["matchers"]["mvam"] | {
        "views": 4, "backbone": "open_clip", "clip_model": "itm-stage-clip", "clip_config": str(clip_config)
    }  # fmt: skip
    raw["train"] |= {"epochs": 2, "batch_size": 32, "learning_rate": 1.0e-3}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))

    tokenize.main(["--params", str(params), "--dataset-json", str(tiny_synthetic / "dataset.json"),
                   "--out", str(root / "data" / "captions")])  # fmt: skip
    objects = pq.read_table(tiny_synthetic / "objects.parquet").to_pandas()
    classes = sorted(set(objects["class"]))
    attributes = sorted({a for row in objects["attributes"] for a in row})
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    for split in ("train", "val", "test"):
        images = []
        for record in (r for r in records if r.split == split):
            mine = objects[objects["image_id"] == record.imgid].to_dict("list")
            features = _oracle_features(mine, TINY_SYNTHETIC["image_size"], classes, attributes)
            n = len(features)
            images.append(
                ImageRegions(
                    image_id=record.imgid,
                    width=TINY_SYNTHETIC["image_size"],
                    height=TINY_SYNTHETIC["image_size"],
                    features=features.astype(np.float16),
                    boxes=np.full((n, 4), np.nan, dtype=np.float32),
                    object_ids=np.full(n, -1, dtype=np.int16),
                    object_confidence=np.full(n, np.nan, dtype=np.float32),
                    attribute_ids=np.full(n, -1, dtype=np.int16),
                    attribute_confidence=np.full(n, np.nan, dtype=np.float32),
                )
            )
        write_store(root / "data" / "regions" / split, images, [], images[0].features.shape[1], {"source": "oracle"})
    return root


def _train(root: Path, name: str, *extra: str) -> None:
    train.main(["--params", str(root / "params.yaml"), "--matcher", name, "--regions", str(root / "data/regions"),
                "--captions", str(root / "data/captions"), "--out", str(root / "models" / name),
                "--work", str(root / "work" / name), "--workers", "0", *extra])  # fmt: skip


def _evaluate(root: Path, name: str, *extra: str) -> dict[str, float]:
    evaluate.main(["--params", str(root / "params.yaml"), "--matcher", name, "--model", str(root / "models" / name),
                   "--regions", str(root / "data/regions"), "--captions", str(root / "data/captions"),
                   "--scores", str(root / "scores" / f"{name}.npz"),
                   "--metrics", str(root / "metrics" / f"{name}.json"),
                   "--plots", str(root / "plots" / name), *extra])  # fmt: skip
    return json.loads((root / "metrics" / f"{name}.json").read_text())


DEFAULT_MATCHERS = {"vsepp": "vsepp", "scan_t2i_avg": "scan", "scan_i2t_lse": "scan", "uarda": "uarda",
                    "cvse": "cvse", "mh_cvse": "mh_cvse", "mvam": "mvam"}  # fmt: skip


def test_the_default_matchers_are_all_tested() -> None:
    assert yaml.safe_load((REPO / "params.yaml").read_text())["matchers"].keys() == DEFAULT_MATCHERS.keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFAULT_MATCHERS)
def test_train_then_evaluate_each_default_matcher(prepared: Path, name: str) -> None:
    _train(prepared, name)
    model_dir = prepared / "models" / name
    card = json.loads((model_dir / "card.json").read_text())
    assert card["name"] == name and card["kind"] == DEFAULT_MATCHERS[name]
    assert 1 <= card["best_epoch"] <= card["train"]["epochs"] and card["val"]["rsum"] > 0
    assert (card["concepts_digest"] is not None) == name.endswith("cvse")
    assert len(card["history"]) == card["train"]["epochs"] and card["train_seconds"] > 0
    assert card["train_seconds"] == pytest.approx(sum(epoch["train/epoch_seconds"] for epoch in card["history"]))
    assert max(epoch["val/rsum"] for epoch in card["history"]) == card["val"]["rsum"]
    assert not (prepared / "work" / name / CHECKPOINT).exists()  # removed once the model is saved
    matcher, _ = load_matcher(model_dir, torch.device("cpu"))
    assert not matcher.training

    figures = _evaluate(prepared, name)
    n_images = TINY_SYNTHETIC["splits"]["test"]
    assert figures["test/images"] == n_images and figures["test/captions"] == 5 * n_images
    assert figures["test/seconds_per_query"] > 0
    assert {f"test/{side}_{key}" for side in ("i2t", "t2i") for key in ("r1", "r5", "r10", "medr")} <= set(figures)
    curve = json.loads((prepared / "plots" / name / "recall_curve.json").read_text())
    assert [point["k"] for point in curve] == list(range(1, 21))
    assert curve[0]["t2i"] == figures["test/t2i_r1"] and curve[9]["i2t"] == figures["test/i2t_r10"]
    scores = SplitScores.load(prepared / "scores" / f"{name}.npz")
    assert scores.scores.shape == (n_images, 5 * n_images)
    recomputed = recall_metrics(scores.scores, scores.caption_image)
    assert {key: figures[f"test/{key}"] for key in recomputed} == pytest.approx(recomputed)
    assert torch.isfinite(scores.scores).all()
    if name.endswith("cvse"):
        assert figures["test/transductive_concepts"] == 0.0
    else:
        assert "test/transductive_concepts" not in figures


@pytest.mark.slow
def test_mvam_over_open_clip_reads_the_raw_images(prepared: Path, tiny_synthetic: Path) -> None:
    """The open_clip backbone trains on the pixels of data/raw/<dataset>/images and its own tokens, and evaluates
    with one dot product per pair; without --dataset the stage says what is missing."""
    _train(prepared, "mvam_clip", "--dataset", str(tiny_synthetic))
    card = json.loads((prepared / "models" / "mvam_clip" / "card.json").read_text())
    assert card["images"]["source"] == "pixels" and card["images"]["size"] == 64
    figures = _evaluate(prepared, "mvam_clip", "--dataset", str(tiny_synthetic))
    n_images = TINY_SYNTHETIC["splits"]["test"]
    assert figures["test/images"] == n_images and figures["test/rsum"] > 0
    with pytest.raises(UserError, match="pass --dataset data/raw/<dataset>"):
        _evaluate(prepared, "mvam_clip")


@pytest.mark.slow
def test_mh_cvse_saves_its_loss_weights_schedule_and_concepts(prepared: Path) -> None:
    """DWA keeps CVSE's weights through epoch 2's training and sets new ones at its end, so a model selected after
    epoch 2 or later carries moved weights; the schedule is MH-CVSE's cosine; the concepts travel in model.pt."""
    if not (prepared / "models" / "mh_cvse").is_dir():
        _train(prepared, "mh_cvse")
    saved = torch.load(prepared / "models" / "mh_cvse" / "model.pt", weights_only=True)
    best_weights = saved["state_dict"]["loss.weights"]
    prior = torch.tensor([3.0, 5.0, 1.0, 2.0])
    assert torch.equal(best_weights, prior) == (saved["card"]["best_epoch"] == 1)
    assert float((best_weights / prior).mean()) == pytest.approx(1.0)  # the DWA factors average to 1
    assert saved["card"]["train"]["schedule"] == "cosine"
    assert sorted(saved["concepts"]["words"]) == sorted(
        json.loads((prepared / "data" / "captions" / "concepts.json").read_text())["concepts"]
    )


@pytest.mark.slow
def test_transductive_concepts_are_reported(prepared: Path) -> None:
    if not (prepared / "models" / "cvse").is_dir():
        _train(prepared, "cvse")
    plain = _evaluate(prepared, "cvse")
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["evaluate"]["transductive_concepts"] = True
    completed_params = prepared / "params_transductive.yaml"
    completed_params.write_text(yaml.safe_dump(raw))
    evaluate.main(["--params", str(completed_params), "--matcher", "cvse", "--model", str(prepared / "models/cvse"),
                   "--regions", str(prepared / "data/regions"), "--captions", str(prepared / "data/captions"),
                   "--scores", str(prepared / "scores" / "cvse_t.npz"),
                   "--metrics", str(prepared / "metrics" / "cvse_t.json"),
                   "--plots", str(prepared / "plots" / "cvse_t")])  # fmt: skip
    completed = json.loads((prepared / "metrics" / "cvse_t.json").read_text())
    assert plain["test/transductive_concepts"] == 0.0 and completed["test/transductive_concepts"] == 1.0
    assert completed["test/completion_seconds"] > 0 and "test/completion_seconds" not in plain
    first, second = (SplitScores.load(prepared / "scores" / f"{n}.npz").scores for n in ("cvse", "cvse_t"))
    assert not torch.equal(first, second)  # completed labels change the textual consensus embeddings


@pytest.mark.slow
def test_ensemble_of_the_two_scan_directions(prepared: Path) -> None:
    for name in ("scan_t2i_avg", "scan_i2t_lse"):
        if not (prepared / "scores" / f"{name}.npz").is_file():
            _train(prepared, name)
            _evaluate(prepared, name)
    ensemble.main(["--params", str(prepared / "params.yaml"), "--name", "scan_ensemble",
                   "--scores", str(prepared / "scores"),
                   "--metrics", str(prepared / "metrics" / "ens.json")])  # fmt: skip
    figures = json.loads((prepared / "metrics" / "ens.json").read_text())
    members = [SplitScores.load(prepared / "scores" / f"{name}.npz") for name in ("scan_t2i_avg", "scan_i2t_lse")]
    expected = recall_metrics((members[0].scores + members[1].scores) / 2, members[0].caption_image)
    assert figures["test/rsum"] == pytest.approx(expected["rsum"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vsepp", "mh_cvse"])
def test_an_interrupted_training_resumes_to_the_same_model(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Stop a training after its second epoch's checkpoint, run it again: same weights as one whole run (for
    MH-CVSE, also the same dynamic loss weights, which its third epoch is the first to change)."""
    whole = prepared / "models" / f"{name}_whole"
    _train(prepared, name, "--out", str(whole), "--work", str(prepared / "work" / f"{name}_whole"))

    saved = loop._save
    calls = []

    def save_then_stop(*args: object, **kwargs: object) -> None:
        saved(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_stop)
    resumed = prepared / "models" / f"{name}_resumed"
    work = prepared / "work" / f"{name}_resumed"
    with pytest.raises(KeyboardInterrupt):
        _train(prepared, name, "--out", str(resumed), "--work", str(work))
    assert (work / CHECKPOINT).is_file() and not resumed.exists()
    monkeypatch.setattr(loop, "_save", saved)
    _train(prepared, name, "--out", str(resumed), "--work", str(work))

    first = torch.load(whole / "model.pt", weights_only=True)
    second = torch.load(resumed / "model.pt", weights_only=True)
    assert first["card"]["best_epoch"] == second["card"]["best_epoch"]
    assert first["card"]["val"] == second["card"]["val"]
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "stages.train", "--matcher", "nope", "--regions", "r", "--captions", "c", "--out", "o", "--work", "w"],
         "--matcher 'nope' is not a key of matchers"),
        (["-m", "stages.ensemble", "--name", "nope", "--scores", "s", "--metrics", "m.json"],
         "--name 'nope' is not a key of evaluate.ensembles"),
        (["-m", "stages.evaluate", "--matcher", "vsepp", "--model", "missing", "--regions", "r", "--captions",
          "missing", "--scores", "s.npz", "--metrics", "m.json", "--plots", "p"],
         "vocabulary not found (run the tokenize stage first)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, *args, "--params", str(REPO / "params.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"ITM_TRACKING": "off", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_processes_train_and_evaluate_under_torchrun(prepared: Path) -> None:
    """`train.gpus: 2` and `evaluate.gpus: 2` on a CPU: each stage re-launches itself under torchrun as two gloo
    processes. Training matches one process with the same global batch up to rounding (SCAN has no parameter with a
    rounding-only gradient), rank 0 alone writes the model; evaluation gives exactly one process's figures."""
    name = "scan_t2i_avg"
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"] |= {"gpus": 2}
    raw["evaluate"] |= {"gpus": 2}
    two = prepared / "params_two_processes.yaml"
    two.write_text(yaml.safe_dump(raw))
    single = prepared / "models" / name
    if not single.exists():
        _train(prepared, name)
    out, scores = prepared / "models" / f"{name}_ddp", prepared / "scores" / f"{name}_ddp.npz"
    metrics = prepared / "metrics" / f"{name}_ddp.json"
    common = ["--regions", str(prepared / "data/regions"), "--captions", str(prepared / "data/captions")]
    for command in (
        ["-m", "stages.train", "--params", str(two), "--matcher", name, "--out", str(out),
         "--work", str(prepared / "work" / f"{name}_ddp"), "--workers", "0", *common],
        ["-m", "stages.evaluate", "--params", str(two), "--matcher", name, "--model", str(single),
         "--scores", str(scores), "--metrics", str(metrics), "--plots", str(prepared / "plots" / f"{name}_ddp"),
         *common],
    ):  # fmt: skip
        done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "launching 2 processes" in done.stderr

    first = torch.load(single / "model.pt", weights_only=True)
    second = torch.load(out / "model.pt", weights_only=True)
    assert second["card"]["train"]["gpus"] == 2 and first["card"]["best_epoch"] == second["card"]["best_epoch"]
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    distributed_figures, single_figures = json.loads(metrics.read_text()), _evaluate(prepared, name)
    assert distributed_figures.keys() == single_figures.keys()
    assert {key: value for key, value in distributed_figures.items() if "seconds" not in key} == {
        key: value for key, value in single_figures.items() if "seconds" not in key
    }
