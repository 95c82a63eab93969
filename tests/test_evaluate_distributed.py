"""Evaluation in two CPU processes over gloo gives exactly what one process gives: the same encodings, the same
similarity matrix (bit for bit), the same recall figures, with and without transductive concept completion.

The galleries are sized so that neither the encoding batches nor the caption chunks divide evenly between the two
ranks, and one case gives rank 1 nothing to encode or score at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from torch import Tensor

from itm.config import MatcherParams
from itm.data.concepts import Concepts
from itm.data.loaders import CaptionTable
from itm.data.regions import RegionStore
from itm.distributed import Context
from itm.evaluate.completion import ConceptCompletion
from itm.evaluate.protocols import protocol_metrics
from itm.evaluate.score_file import SplitScores
from itm.evaluate.scoring import encode_captions, encode_images, score_split
from itm.models import Matcher, MatcherInputs, build_matcher
from itm.models.base import Encoded
from tests.processes import run_processes
from tests.test_evaluate import _store

pytestmark = pytest.mark.slow  # several processes

CPU = torch.device("cpu")
FEATURE_DIM, VOCAB, N_CONCEPTS = 6, 30, 5
REGION_COUNTS = [3, 7, 2, 5, 4, 6, 1]  # 7 images: 3 batches of 3 (2 for rank 0, 1 for rank 1)
N_CAPTIONS = 25  # 9 batches of 3 (5 + 4), 5 chunks of 5 captions (3 + 2)


@dataclass(frozen=True)
class Case:
    """One evaluation to run both ways: the matcher kind, the sizes of its batches and blocks, and completion."""

    kind: str
    batch_size: int = 3
    image_chunk: int = 2
    caption_chunk: int = 5
    completion: ConceptCompletion | None = None


def _matcher(kind: str) -> Matcher:
    """A small matcher with the same weights in every process."""
    torch.manual_seed(0)
    settings = {"kind": kind, "embed_dim": 16, "word_dim": 8}
    if kind == "cvse":
        settings["concept_input_dim"] = 8
    params = TypeAdapter(MatcherParams).validate_python(settings)
    return build_matcher(params, MatcherInputs(FEATURE_DIM, VOCAB, _concepts()))


def _concepts() -> Concepts:
    labels = (np.random.default_rng(0).random((40, N_CONCEPTS)) < 0.4).astype(np.int64)
    cooccurrence = labels.T @ labels
    return Concepts(tuple(f"concept{i}" for i in range(N_CONCEPTS)), tuple(np.diag(cooccurrence)), cooccurrence, 40)


def _captions() -> CaptionTable:
    """25 captions of 1..8 words (lengths tie, so the longest-first order has ties to keep), every image described
    at least once, images first seen in another order than the store's, and 0..3 concepts each."""
    rng = np.random.default_rng(7)
    images = 100 + np.concatenate([rng.permutation(len(REGION_COUNTS)), rng.integers(0, 7, N_CAPTIONS - 7)])
    token_ids = [[1, *rng.integers(3, VOCAB, int(n)).tolist(), 2] for n in rng.integers(1, 9, N_CAPTIONS)]
    concept_ids = [
        sorted(rng.choice(N_CONCEPTS, int(n), replace=False).tolist()) for n in rng.integers(0, 4, N_CAPTIONS)
    ]
    return CaptionTable(np.arange(N_CAPTIONS, dtype=np.int64) + 500, images.astype(np.int64), token_ids, concept_ids)


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("regions") / "test"
    _store(folder, REGION_COUNTS, FEATURE_DIM)
    return folder


# --- run in each of the two processes -------------------------------------------------------------------------------


def _score_both_ways(context: Context, regions: Path, captions: CaptionTable, case: Case) -> dict[str, Any]:
    """`score_split` in this process alone, then shared with the other rank."""
    matcher, store = _matcher(case.kind), RegionStore(regions)

    def score(shared: Context | None) -> tuple[Tensor, list[int], Tensor, float | None]:
        scored, image_ids, caption_image = score_split(
            matcher, store, captions, batch_size=case.batch_size, device=CPU, precision="fp16",
            completion=case.completion, context=shared, image_chunk=case.image_chunk, caption_chunk=case.caption_chunk,
        )  # fmt: skip
        return scored.matrix, image_ids, caption_image, scored.completion_seconds

    return {"alone": score(None), "shared": score(context)}


def _encode_both_ways(context: Context, regions: Path, captions: CaptionTable, batch_size: int) -> dict[str, Any]:
    """Both galleries encoded in this process alone, then shared with the other rank."""
    matcher, store = _matcher("scan"), RegionStore(regions)
    image_ids = [100 + index for index in reversed(range(len(REGION_COUNTS)))]

    def encode(shared: Context | None) -> tuple[Encoded, Encoded]:
        images = encode_images(matcher, store, image_ids, batch_size=batch_size, device=CPU, context=shared)
        texts = encode_captions(matcher, captions.token_ids, batch_size=batch_size, device=CPU, context=shared)
        return images, texts

    return {"alone": encode(None), "shared": encode(context)}


# --- tests ----------------------------------------------------------------------------------------------------------

SCAN, ONE_CHUNK = Case("scan"), Case("scan", batch_size=16, image_chunk=256, caption_chunk=1024)  # rank 1: idle
COMPLETED = Case("cvse", completion=ConceptCompletion(text_neighbours=4, image_window=3))
ENCODING_BATCHES = {"uneven": 3, "rank-1-idle": 16}


def _every_case(context: Context, regions: Path, captions: CaptionTable) -> dict[str, Any]:
    """Every case of this file, in the same two processes (starting them takes longer than all the cases)."""
    encoded = {name: _encode_both_ways(context, regions, captions, size) for name, size in ENCODING_BATCHES.items()}
    scored = {case: _score_both_ways(context, regions, captions, case) for case in (SCAN, ONE_CHUNK, COMPLETED)}
    return {"encoded": encoded, "scored": scored}


@pytest.fixture(scope="module")
def ranks(regions: Path) -> list[dict[str, Any]]:
    """What each of the two ranks returned for every case."""
    return run_processes(_every_case, regions, _captions())


def _assert_same_encoding(actual: Encoded, expected: Encoded) -> None:
    assert torch.equal(actual.local, expected.local) and actual.local.dtype == expected.local.dtype
    assert torch.equal(actual.mask, expected.mask) and actual.mask.dtype == torch.bool
    assert (actual.pooled is None) == (expected.pooled is None)
    if expected.pooled is not None:
        assert torch.equal(actual.pooled, expected.pooled)
    assert actual.extras.keys() == expected.extras.keys()
    assert all(torch.equal(actual.extras[key], value) for key, value in expected.extras.items())


def _assert_same_scores(ranks: list[dict[str, Any]], case: Case) -> dict[str, float]:
    """Every rank's shared scoring of `case` equals its own single-process one exactly, and gives the same figures;
    the figures."""
    captions, figures = _captions(), []
    for rank in ranks:
        result = rank["scored"][case]
        (alone, image_ids, caption_image, _), (shared, shared_ids, shared_rows, _) = result["alone"], result["shared"]
        assert shared.dtype == torch.float32 and shared.shape == (len(REGION_COUNTS), N_CAPTIONS)
        assert torch.equal(shared, alone)
        assert shared_ids == image_ids and torch.equal(shared_rows, caption_image)
        test = SplitScores(shared, np.array(image_ids), captions.caption_ids, caption_image)
        expected = protocol_metrics(
            SplitScores(alone, np.array(image_ids), captions.caption_ids, caption_image), "synthetic"
        )
        assert protocol_metrics(test, "synthetic") == expected
        figures.append(expected)
    assert figures[0] == figures[1]
    return figures[0]


@pytest.mark.parametrize("batches", ENCODING_BATCHES)
def test_shared_encoding_equals_one_process(ranks: list[dict[str, Any]], batches: str) -> None:
    captions = _captions()
    for rank in ranks:
        result = rank["encoded"][batches]
        for shared, alone in zip(result["shared"], result["alone"], strict=True):
            _assert_same_encoding(shared, alone)
        images, texts = result["shared"]
        assert images.mask.sum(1).tolist() == REGION_COUNTS[::-1]  # rows in the order asked for
        assert texts.mask.sum(1).tolist() == [len(ids) for ids in captions.token_ids]  # and in input order


def test_scan_scores_and_recall_are_exactly_those_of_one_process(ranks: list[dict[str, Any]]) -> None:
    figures = _assert_same_scores(ranks, SCAN)
    assert 0 <= figures["test/rsum"] <= 600


def test_one_chunk_for_two_ranks_still_scores_everything(ranks: list[dict[str, Any]]) -> None:
    _assert_same_scores(ranks, ONE_CHUNK)


def test_concept_completion_with_two_processes(ranks: list[dict[str, Any]], regions: Path) -> None:
    _assert_same_scores(ranks, COMPLETED)
    for rank in ranks:
        assert rank["scored"][COMPLETED]["shared"][3] is not None  # the completion pass ran
    # and it changed the labels: the matrix is not the one of the captions' own labels
    completed = ranks[0]["scored"][COMPLETED]["shared"][0]
    uncompleted, _, _ = score_split(_matcher("cvse"), RegionStore(regions), _captions(), batch_size=3, device=CPU,
                                    precision="fp32")  # fmt: skip
    assert not torch.allclose(uncompleted.matrix, completed, atol=1e-4)
