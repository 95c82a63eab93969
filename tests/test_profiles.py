"""Profiles (itm/profiles.py): params.yaml overrides checked against the schema and turned into `dvc exp run -S`
flags; `make quick` runs profiles/quick.yaml (its run end to end: tests/test_pipeline.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml

from itm.config import parse_params
from itm.errors import UserError
from itm.profiles import applied, expand_matchers, experiment_name, read_profile, set_flags
from tests.conftest import REPO

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
QUICK = REPO / "profiles" / "quick.yaml"


def test_the_quick_profile_is_valid_params_for_every_matcher() -> None:
    overrides = expand_matchers(read_profile(QUICK), list(PARAMS["matchers"]))
    params = parse_params(applied(PARAMS, overrides))
    assert params.train.epoch_limit == 1 and params.datasets["synthetic"].splits.train == 60
    assert {block.embed_dim for block in params.matchers.values()} == {16}
    assert {block.kind for block in params.matchers.values()} == {b["kind"] for b in PARAMS["matchers"].values()}


def test_every_matcher_entry_takes_the_shared_block_then_its_own() -> None:
    profile = {"matchers": {"*": {"embed_dim": 16, "word_dim": 8}, "vsepp": {"embed_dim": 32}}}
    expanded = expand_matchers(profile, ["vsepp", "scan_t2i_avg"])
    assert expanded["matchers"] == {"scan_t2i_avg": {"embed_dim": 16, "word_dim": 8},
                                    "vsepp": {"embed_dim": 32, "word_dim": 8}}  # fmt: skip
    assert expand_matchers({"train": {"batch_size": 8}}, ["vsepp"]) == {"train": {"batch_size": 8}}


def test_flags_set_each_leaf_in_json() -> None:
    flags = set_flags({"train": {"epoch_limit": 1, "seeds": [0, 1]}, "regions": {"precomp_dir": None, "source": "x"}})
    assert flags == ["-S", "train.epoch_limit=1", "-S", "train.seeds=[0, 1]", "-S", "regions.precomp_dir=null",
                     "-S", 'regions.source="x"']  # fmt: skip


def test_a_key_params_yaml_does_not_have_is_named() -> None:
    with pytest.raises(UserError, match=r"profile key train\.epochs: params.yaml has no such key"):
        applied(PARAMS, {"train": {"epochs": 1}})
    with pytest.raises(UserError, match=r"profile key trian\.batch_size: params.yaml has no section 'trian'"):
        applied(PARAMS, {"trian": {"batch_size": 1}})


def test_a_value_the_schema_refuses_is_named_with_the_profile() -> None:
    overrides = applied(PARAMS, {"train": {"epoch_limit": 0}})
    with pytest.raises(UserError, match=r"with profiles/x.yaml: train\.epoch_limit"):
        parse_params(overrides, source="params.yaml with profiles/x.yaml")


@pytest.mark.parametrize("text", ["[1, 2]", "a: [", ""])
def test_a_profile_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"bad\.yaml: (expected a mapping|invalid YAML)"):
        read_profile(path)


def test_the_experiment_is_named_after_the_profile_and_the_time() -> None:
    now = datetime.datetime(2026, 12, 2, 14, 5, 9, tzinfo=datetime.UTC)
    assert experiment_name(Path("profiles/quick.yaml"), now) == "quick-20261202-140509"
