"""The params.yaml schema: the committed file is valid and complete; mistakes give one clear line each."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from itm.config import Params, load_params, parse_params
from itm.errors import UserError
from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def _unset_fields(model: pydantic.BaseModel, path: str = "") -> list[str]:
    missing = [f"{path}{name}" for name in type(model).model_fields if name not in model.model_fields_set]
    for name in model.model_fields_set:
        value = getattr(model, name)
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, tuple) else []
        if isinstance(value, pydantic.BaseModel):
            missing += _unset_fields(value, f"{path}{name}.")
        for key, child in children:
            if isinstance(child, pydantic.BaseModel):
                missing += _unset_fields(child, f"{path}{name}.{key}.")
    return missing


def test_committed_params_are_valid_and_spell_out_every_knob() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.dataset == "synthetic" and params.active_dataset.kind == "synthetic"
    assert _unset_fields(params) == []


def test_params_are_frozen() -> None:
    params = parse_params(RAW)
    with pytest.raises(pydantic.ValidationError):
        params.dataset = "coco"  # type: ignore[misc]


def _mutated(change: Callable[[dict], Any]) -> dict:
    raw = copy.deepcopy(RAW)
    change(raw)
    return raw


MISTAKES = [
    (
        lambda r: r["datasets"]["synthetic"].update(sed=3),
        "params.yaml: datasets.synthetic.sed: unknown key (allowed: kind, seed, splits,",
    ),
    (
        lambda r: r["datasets"]["synthetic"].update(kind="synthetc"),
        "params.yaml: datasets.synthetic.kind: 'synthetc' is not one of 'synthetic', 'flickr30k', 'coco'",
    ),
    (
        lambda r: r["datasets"]["synthetic"].update(seed="abc"),
        "params.yaml: datasets.synthetic.seed: expected an integer, got 'abc'",
    ),
    (
        lambda r: r["datasets"]["synthetic"]["splits"].update(test=0),
        "params.yaml: datasets.synthetic.splits.test: must be > 0, got 0",
    ),
    (
        lambda r: r["datasets"]["synthetic"].update(twin_fraction=1.5),
        "params.yaml: datasets.synthetic.twin_fraction: must be <= 1.0, got 1.5",
    ),
    (
        lambda r: r["datasets"]["synthetic"].update(min_objects=5),
        "params.yaml: datasets.synthetic: min_objects (5) must not exceed max_objects (4)",
    ),
    (
        lambda r: r.update(dataset="cocoo"),
        "params.yaml: dataset: 'cocoo' is not a key of datasets (choices: 'synthetic', 'flickr30k', 'coco')",
    ),
    (
        lambda r: r["datasets"]["coco"]["images"][1].update(md5="xyz"),
        "params.yaml: datasets.coco.images[1].md5: 'xyz' does not match the pattern ^[0-9a-f]{32}$",
    ),
    (
        lambda r: r["datasets"]["coco"].pop("kind"),
        "params.yaml: datasets.coco: missing key 'kind' that selects the variant (one of 'synthetic', 'flickr30k',",
    ),
    (
        lambda r: r["tokenize"]["concepts"].update(stop_words="french"),
        "params.yaml: tokenize.concepts.stop_words: 'french' is not one of 'english', 'none'",
    ),
    (
        lambda r: r.update(trian=3),
        "params.yaml: trian: unknown key (allowed: datasets, dataset, download, detector, regions, tokenize, matchers,",
    ),
    (
        lambda r: r["matchers"]["scan_t2i_avg"].update(direction="t2"),
        "params.yaml: matchers.scan_t2i_avg.direction: 't2' is not one of 't2i', 'i2t'",
    ),
    (
        lambda r: r["matchers"]["vsepp"].update(kind="vse"),
        "params.yaml: matchers.vsepp.kind: 'vse' is not one of 'vsepp', 'scan', 'uarda', 'cvse', 'mh_cvse', 'mvam'",
    ),
    (
        lambda r: r["matchers"]["mvam"].update(views=300),
        "params.yaml: matchers.mvam: embed_dim (256) // views (300) leaves views of fewer than 2 dimensions",
    ),
    (
        lambda r: r["matchers"]["mvam"].update(embed_dim=16, views=16),  # 1-d views: every score the same
        "params.yaml: matchers.mvam: embed_dim (16) // views (16) leaves views of fewer than 2 dimensions",
    ),
    (
        lambda r: r["matchers"]["mvam"].update(view_dim=1),
        "params.yaml: matchers.mvam.view_dim: ",
    ),
    (
        lambda r: r["matchers"]["mvam"].update(objective="triplet"),
        "params.yaml: matchers.mvam.objective: 'triplet' is not one of 'infonce', 'hinge'",
    ),
    (
        lambda r: r["matchers"]["mh_cvse"].update(heads=3),
        "params.yaml: matchers.mh_cvse: embed_dim (256) must be a multiple of heads (3)",
    ),
    (
        lambda r: r["matchers"]["cvse"].update(fusion="sum"),
        "params.yaml: matchers.cvse.fusion: 'sum' is not one of 'weight_sum', 'concat', 'adap_sum'",
    ),
    (
        lambda r: r["matchers"]["cvse"].update(loss_weights=[3.0, 5.0, 1.0]),
        "params.yaml: matchers.cvse.loss_weights: expected 4 items, got [3.0, 5.0, 1.0]",
    ),
    (
        lambda r: r["matchers"]["cvse"].update(label_ratio=1.5),
        "params.yaml: matchers.cvse.label_ratio: must be <= 1.0, got 1.5",
    ),
    (
        lambda r: r["matchers"]["vsepp"].update(direction="t2i"),
        "params.yaml: matchers.vsepp.direction: unknown key (allowed: embed_dim, word_dim, margin,",
    ),
    (
        lambda r: r["evaluate"]["ensembles"].update(pair=["scan_t2i_avg", "scan"]),
        "params.yaml: evaluate.ensembles.pair: 'scan' is not a key of matchers (choices: 'vsepp', 'scan_t2i_avg',",
    ),
    (
        lambda r: r["evaluate"]["ensembles"].update(vsepp=["scan_t2i_avg", "uarda"]),
        "params.yaml: evaluate.ensembles.vsepp: the name is taken by a matcher (both write metrics/vsepp.json)",
    ),
    (
        lambda r: r["train"].update(schedule="linear"),
        "params.yaml: train.schedule: 'linear' is not one of 'step', 'cosine'",
    ),
    (
        lambda r: r["detector"].update(architecture="huge"),
        "params.yaml: detector.architecture: 'huge' is not a key of detector.architectures (choices: 'butd', 'small')",
    ),
    (
        lambda r: r["detector"].update(weights="pretrained"),
        "params.yaml: detector: weights is 'pretrained' but pretrained.source is not set",
    ),
    (
        lambda r: r["detector"]["architectures"]["small"].update(blocks=[1, 1, 1]),
        "params.yaml: detector.architectures.small.blocks: expected 4 items, got [1, 1, 1]",
    ),
    (
        lambda r: r["regions"].update(min_boxes=36, max_boxes=10),
        "params.yaml: regions: min_boxes (36) must not exceed max_boxes (10)",
    ),
    (
        lambda r: r["regions"].update(source="precomp"),
        "params.yaml: regions: source is 'precomp' but precomp_dir is not set",
    ),
    (
        lambda r: r["regions"].update(precision="fp8"),
        "params.yaml: regions.precision: 'fp8' is not one of 'fp32', 'fp16', 'bf16'",
    ),
    (
        lambda r: r["datasets"].update({"Bad Name": r["datasets"]["synthetic"]}),
        "params.yaml: datasets: key 'Bad Name' must match",
    ),
    (lambda r: r["datasets"]["coco"].update(images=[]), "params.yaml: datasets.coco.images: needs at least 1 item"),
    (lambda r: r.update(download=None), "params.yaml: download: expected a mapping, got None"),
    (lambda r: r.pop("dataset"), "params.yaml: dataset: required key is missing"),
]


@pytest.mark.parametrize(("change", "expected"), MISTAKES)
def test_each_mistake_is_one_line_naming_path_value_and_choices(change: Callable, expected: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_params(_mutated(change))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_several_mistakes_give_one_line_each() -> None:
    def two_mistakes(raw: dict) -> None:
        raw["tokenize"]["min_count"] = 0
        raw["download"]["retries"] = "many"

    with pytest.raises(UserError) as caught:
        parse_params(_mutated(two_mistakes))
    assert str(caught.value).splitlines() == [
        "params.yaml: download.retries: expected an integer, got 'many'",
        "params.yaml: tokenize.min_count: must be >= 1, got 0",
    ]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.yaml: file not found"):
        load_params(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: synthetic\ndatasets: {synthetic: [\n")
    with pytest.raises(UserError, match=r"broken\.yaml: invalid YAML at line \d+, column \d+"):
        load_params(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping of sections at the top level, got list"):
        load_params(listing)


@pytest.mark.slow
def test_stage_reports_bad_params_in_one_line_and_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_mutated(lambda r: r["datasets"]["synthetic"].update(seed=-1.5))))
    out = tmp_path / "raw"
    done = subprocess.run(
        [sys.executable, "-m", "stages.download", "--params", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {bad}: datasets.synthetic.seed: expected an integer, got -1.5"
    assert not out.exists()


def test_schema_and_committed_file_agree_on_sections() -> None:
    assert set(RAW) == set(Params.model_fields)


def test_scan_lambdas_left_out_take_the_papers_values_for_the_direction() -> None:
    raw = copy.deepcopy(RAW)
    raw["matchers"]["i2t"] = {"kind": "scan", "direction": "i2t", "pooling": "lse"}
    raw["matchers"]["t2i"] = {"kind": "scan", "direction": "t2i", "lambda_lse": 3.0}
    matchers = parse_params(raw).matchers
    assert (matchers["i2t"].lambda_softmax, matchers["i2t"].lambda_lse) == (4.0, 5.0)
    assert (matchers["t2i"].lambda_softmax, matchers["t2i"].lambda_lse) == (9.0, 3.0)
