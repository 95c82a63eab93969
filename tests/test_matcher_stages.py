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

from itm.checkpoints import CHECKPOINT
from itm.data.records import read_dataset_json
from itm.data.regions import ImageRegions, write_store
from itm.errors import UserError
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.score_file import SplitScores
from itm.measurements import read_record
from itm.models.saved import MODEL_FILE, load_matcher
from itm.seeds import seed_path
from itm.train import loop
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
        block |= TINY_MATCHER | {"max_epochs": None}
    raw["matchers"]["mh_cvse"] |= {"max_epochs": 3, "heads": 4}  # a third epoch: the first with new DWA weights
    clip_config = root / "itm-stage-clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    raw["matchers"]["mvam_clip"] = raw["matchers"]["mvam"] | {
        "views": 4, "backbone": "open_clip", "clip_model": "itm-stage-clip", "clip_config": str(clip_config)
    }  # fmt: skip
    raw["train"] |= {"max_epochs": 2, "patience": None, "batch_size": 32, "learning_rate": 1.0e-3}
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


SEED = 0  # the first of params.yaml's train.seeds


def stop_after_second_checkpoint(monkeypatch: pytest.MonkeyPatch) -> object:
    """Make training raise KeyboardInterrupt right after writing its second checkpoint; returns the real writer."""
    saved, calls = loop._save, []

    def save_then_stop(*args: object, **kwargs: object) -> None:
        saved(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_stop)
    return saved


def _train(root: Path, name: str, *extra: str) -> Path:
    """Train `name` as `train@<name>-0` does, into models/<name>/seed0 (unless `extra` names another --out);
    returns the default model folder."""
    out = seed_path(root / "models", name, SEED)
    train.main(["--params", str(root / "params.yaml"), "--matcher", name, "--regions", str(root / "data/regions"),
                "--captions", str(root / "data/captions"), "--out", str(out),
                "--work", str(seed_path(root / "work" / "train", name, SEED)), "--workers", "0", *extra])  # fmt: skip
    return out


def _evaluate(root: Path, name: str, *extra: str, params: Path | None = None, label: str | None = None) -> dict:
    """Evaluate models/<name>/seed0 as `evaluate@<name>-0` does; its outputs are named `label` (default `name`):
    scores/<label>/seed0.npz, metrics/<label>/seed0.json, plots/<label>/seed0, work/evaluate/<label>/seed0.
    Returns the metrics."""
    label = label or name
    metrics = seed_path(root / "metrics", label, SEED, ".json")
    evaluate.main(["--params", str(params or root / "params.yaml"), "--matcher", name, "--seed", str(SEED),
                   "--model", str(seed_path(root / "models", name, SEED)),
                   "--regions", str(root / "data/regions"), "--captions", str(root / "data/captions"),
                   "--scores", str(seed_path(root / "scores", label, SEED, ".npz")), "--metrics", str(metrics),
                   "--plots", str(seed_path(root / "plots", label, SEED)),
                   "--work", str(seed_path(root / "work" / "evaluate", label, SEED)), *extra])  # fmt: skip
    return json.loads(metrics.read_text())


def _scores(root: Path, label: str) -> SplitScores:
    return SplitScores.load(seed_path(root / "scores", label, SEED, ".npz"))


def _evaluation_record(root: Path, label: str) -> dict:
    """The evaluation's run.json, which must name the score file now in place."""
    work = seed_path(root / "work" / "evaluate", label, SEED)
    record = read_record(work, seed_path(root / "scores", label, SEED, ".npz"))
    assert record is not None, f"no run.json measuring the scores of {label}"
    return record


DEFAULT_MATCHERS = {"vsepp": "vsepp", "scan_t2i_avg": "scan", "scan_i2t_lse": "scan", "uarda": "uarda",
                    "naaf": "naaf", "cvse": "cvse", "mh_cvse": "mh_cvse", "mvam": "mvam",
                    "vse_infty": "vse_infty"}  # fmt: skip


def test_the_default_matchers_are_all_tested() -> None:
    assert yaml.safe_load((REPO / "params.yaml").read_text())["matchers"].keys() == DEFAULT_MATCHERS.keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFAULT_MATCHERS)
def test_train_then_evaluate_each_default_matcher(prepared: Path, name: str) -> None:
    model_dir = _train(prepared, name)
    card = json.loads((model_dir / "card.json").read_text())
    assert card["name"] == name and card["kind"] == DEFAULT_MATCHERS[name] and card["seed"] == SEED
    assert 1 <= card["best_epoch"] <= card["train"]["max_epochs"] and card["val"]["rsum"] > 0
    assert (card["concepts_digest"] is not None) == name.endswith("cvse")
    training = card["training"]
    assert len(card["history"]) == training["epochs"] == card["train"]["max_epochs"] and training["stopped"] == "cap"
    assert training["pairs_seen"] == sum(epoch["train/pairs"] for epoch in card["history"]) > 0
    assert not any("seconds" in key for epoch in card["history"] for key in epoch)  # times live in run.json
    # Nothing that changes between runs or commits of the same code: times, run ids and the git revision live in MLflow.
    assert "seeds" not in card["train"] and not {"train_seconds", "mlflow_run_id", "git_revision"} & card.keys()
    work = seed_path(prepared / "work" / "train", name, SEED)
    measured = read_record(work, model_dir / MODEL_FILE)
    assert measured is not None, "no run.json measuring the saved model"
    assert len(measured["epoch_seconds"]) == training["epochs"] and min(measured["epoch_seconds"]) > 0
    assert measured["train_seconds"] == pytest.approx(sum(measured["epoch_seconds"]))
    assert card["environment"]["torch"] == torch.__version__
    assert max(epoch["val/rsum"] for epoch in card["history"]) == card["val"]["rsum"]
    assert not (work / CHECKPOINT).exists()  # removed once the model is saved
    matcher, _ = load_matcher(model_dir, torch.device("cpu"))
    assert not matcher.training

    figures = _evaluate(prepared, name)
    n_images = TINY_SYNTHETIC["splits"]["test"]
    assert figures["test/images"] == n_images and figures["test/captions"] == 5 * n_images
    assert not any("seconds" in key for key in figures)  # times live in run.json
    timing = _evaluation_record(prepared, name)
    assert timing["test/seconds_per_query"] > 0 and timing["test/score_seconds"] > 0
    assert timing["test/seconds_per_query"] == pytest.approx(timing["test/score_seconds"] / (5 * n_images))
    assert {f"test/{side}_{key}" for side in ("i2t", "t2i") for key in ("r1", "r5", "r10", "medr")} <= set(figures)
    curve = json.loads((seed_path(prepared / "plots", name, SEED) / "recall_curve.json").read_text())
    assert [point["k"] for point in curve] == list(range(1, 21))
    assert curve[0]["t2i"] == figures["test/t2i_r1"] and curve[9]["i2t"] == figures["test/i2t_r10"]
    scores = _scores(prepared, name)
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
    model_dir = _train(prepared, "mvam_clip", "--dataset", str(tiny_synthetic))
    card = json.loads((model_dir / "card.json").read_text())
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
    model_dir = seed_path(prepared / "models", "mh_cvse", SEED)
    if not model_dir.is_dir():
        _train(prepared, "mh_cvse")
    saved = torch.load(model_dir / MODEL_FILE, weights_only=True)
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
    if not seed_path(prepared / "models", "cvse", SEED).is_dir():
        _train(prepared, "cvse")
    plain = _evaluate(prepared, "cvse")
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["evaluate"]["transductive_concepts"] = True
    completed_params = prepared / "params_transductive.yaml"
    completed_params.write_text(yaml.safe_dump(raw))
    completed = _evaluate(prepared, "cvse", params=completed_params, label="cvse_t")
    assert plain["test/transductive_concepts"] == 0.0 and completed["test/transductive_concepts"] == 1.0
    # the completion's time is measured, apart from the figures
    assert _evaluation_record(prepared, "cvse_t")["test/completion_seconds"] > 0
    assert "test/completion_seconds" not in _evaluation_record(prepared, "cvse")
    assert not any("seconds" in key for key in completed)
    first, second = (_scores(prepared, label).scores for label in ("cvse", "cvse_t"))
    assert not torch.equal(first, second)  # completed labels change the textual consensus embeddings


@pytest.mark.slow
def test_ensemble_of_the_two_scan_directions(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ensemble@scan_ensemble-0` averages its members' seed-0 score files (scores/<member>/seed0.npz)."""
    members = ("scan_t2i_avg", "scan_i2t_lse")
    for name in members:
        if not seed_path(prepared / "scores", name, SEED, ".npz").is_file():
            _train(prepared, name)
            _evaluate(prepared, name)
    metrics = seed_path(prepared / "metrics", "scan_ensemble", SEED, ".json")
    ensemble.main(["--params", str(prepared / "params.yaml"), "--name", "scan_ensemble", "--seed", str(SEED),
                   "--scores", str(prepared / "scores"), "--metrics", str(metrics)])  # fmt: skip
    figures = json.loads(metrics.read_text())
    first, second = (_scores(prepared, name) for name in members)
    expected = recall_metrics((first.scores + second.scores) / 2, first.caption_image)
    assert figures["test/rsum"] == pytest.approx(expected["rsum"])
    headline = f"ensemble@scan_ensemble-0 test: i2t R@1/5/10 {figures['test/i2t_r1']:.1f}/"
    assert headline in capsys.readouterr().out  # the stage ends with its figures


@pytest.mark.slow
def test_a_seed_fixes_the_model_and_another_seed_changes_it(prepared: Path) -> None:
    """Training is a function of its inputs and seed: the same seed writes the same bytes of model.pt and card.json
    (also when train.seeds gains a seed, which is why DVC need not train seed 0 again), another seed other
    weights."""
    name = "vsepp"
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"]["seeds"] = [SEED, 1]
    two_seeds = prepared / "params_two_seeds.yaml"
    two_seeds.write_text(yaml.safe_dump(raw))
    first = seed_path(prepared / "models", name, SEED)
    if not first.is_dir():
        _train(prepared, name)
    models = {}
    for label, seed in (("again", SEED), ("other", 1)):
        models[label] = prepared / "models" / f"{name}_{label}"
        _train(prepared, name, "--params", str(two_seeds), "--seed", str(seed), "--out", str(models[label]),
               "--work", str(prepared / "work" / "train" / f"{name}_{label}"))  # fmt: skip

    for file in (MODEL_FILE, "card.json"):
        assert (models["again"] / file).read_bytes() == (first / file).read_bytes(), file
    same = torch.load(first / MODEL_FILE, weights_only=True)
    other = torch.load(models["other"] / MODEL_FILE, weights_only=True)
    assert other["card"]["seed"] == 1 and same["card"]["seed"] == SEED
    assert same["state_dict"].keys() == other["state_dict"].keys()
    changed = [key for key, value in same["state_dict"].items() if not torch.equal(value, other["state_dict"][key])]
    assert len(changed) == len(same["state_dict"]), set(same["state_dict"]) - set(changed)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vsepp", "mh_cvse"])
def test_an_interrupted_training_resumes_to_the_same_model(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Stop a training after its second epoch's checkpoint, run it again: same weights as one whole run (for
    MH-CVSE, also the same dynamic loss weights, which its third epoch is the first to change)."""
    whole = prepared / "models" / f"{name}_whole"
    _train(prepared, name, "--out", str(whole), "--work", str(prepared / "work" / "train" / f"{name}_whole"))

    saved = stop_after_second_checkpoint(monkeypatch)
    resumed = prepared / "models" / f"{name}_resumed"
    work = prepared / "work" / "train" / f"{name}_resumed"
    with pytest.raises(KeyboardInterrupt):
        _train(prepared, name, "--out", str(resumed), "--work", str(work))
    assert (work / CHECKPOINT).is_file() and not resumed.exists()
    monkeypatch.setattr(loop, "_save", saved)
    _train(prepared, name, "--out", str(resumed), "--work", str(work))

    first = torch.load(whole / MODEL_FILE, weights_only=True)
    second = torch.load(resumed / MODEL_FILE, weights_only=True)
    assert first["card"]["best_epoch"] == second["card"]["best_epoch"]
    assert first["card"]["val"] == second["card"]["val"]
    assert first["card"]["history"] == second["card"]["history"]
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "stages.train", "--matcher", "nope", "--regions", "r", "--captions", "c", "--out", "o", "--work", "w"],
         "--matcher 'nope' is not a key of matchers"),
        (["-m", "stages.train", "--matcher", "vsepp", "--seed", "5", "--regions", "r", "--captions", "c", "--out", "o",
          "--work", "w"],
         "--seed 5 is not one of train.seeds [0]"),
        (["-m", "stages.ensemble", "--name", "nope", "--scores", "s", "--metrics", "m.json"],
         "--name 'nope' is not a key of evaluate.ensembles"),
        (["-m", "stages.ensemble", "--name", "scan_ensemble", "--seed", "1", "--scores", "s", "--metrics", "m.json"],
         "--seed 1 is not one of train.seeds [0]"),
        (["-m", "stages.evaluate", "--matcher", "vsepp", "--model", "missing", "--regions", "r", "--captions",
          "missing", "--scores", "s.npz", "--metrics", "m.json", "--plots", "p", "--work", "w"],
         "vocabulary not found (run the tokenize stage first)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, *args, "--params", str(REPO / "params.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"ITM_TRACKING": "off", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not {path.name for path in tmp_path.iterdir()} & {"o", "w", "m.json", "s.npz", "p"}


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
    single = seed_path(prepared / "models", name, SEED)
    if not single.exists():
        _train(prepared, name)
    label = f"{name}_ddp"
    out, scores = seed_path(prepared / "models", label, SEED), seed_path(prepared / "scores", label, SEED, ".npz")
    metrics = seed_path(prepared / "metrics", label, SEED, ".json")
    common = ["--regions", str(prepared / "data/regions"), "--captions", str(prepared / "data/captions")]
    for command in (
        ["-m", "stages.train", "--params", str(two), "--matcher", name, "--out", str(out),
         "--work", str(seed_path(prepared / "work" / "train", label, SEED)), "--workers", "0", *common],
        ["-m", "stages.evaluate", "--params", str(two), "--matcher", name, "--model", str(single),
         "--scores", str(scores), "--metrics", str(metrics), "--plots", str(seed_path(prepared / "plots", label, SEED)),
         "--work", str(seed_path(prepared / "work" / "evaluate", label, SEED)), *common],
    ):  # fmt: skip
        done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "launching 2 processes" in done.stderr

    first = torch.load(single / MODEL_FILE, weights_only=True)
    second = torch.load(out / MODEL_FILE, weights_only=True)
    assert second["card"]["train"]["gpus"] == 2 and first["card"]["best_epoch"] == second["card"]["best_epoch"]
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert _evaluation_record(prepared, label)["test/seconds_per_query"] > 0  # rank 0 recorded the times
    distributed_figures, single_figures = json.loads(metrics.read_text()), _evaluate(prepared, name)
    assert distributed_figures == single_figures  # the metrics file holds no times: the same figures exactly
